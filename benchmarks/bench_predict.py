"""Seconds per 2048² field of predict.py on the CPU (segmentation, crops, model, encoding apart)
and peak memory, with an EfficientNet-B0 at 256 px on 512 px crops (untrained weights: speed
does not depend on them).

    python benchmarks/bench_predict.py [--fields 4] [--size 2048] [--backbone efficientnet_b0]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true")
    a = p.parse_args()

    from hpa_tf import predict as hp
    from hpa_tf.backbones import build_classifier
    from hpa_tf.crops import CropSpec
    from hpa_tf.model import save_model
    from hpa_tf.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "data", n_train=0, n_test=a.fields, size=a.size, seed=7, bit16_test=True)
        model = build_classifier(a.backbone, image_size=a.image_size, channels=4)
        save_model(model, str(tmp / "m.keras"), crop=CropSpec(size=a.crop_size))
        # warm-up on one field so tracing and first-call costs are not counted
        config = hp.PredictConfig(test_dir=str(tmp / "data" / "test"), models=[str(tmp / "m.keras")],
                                  out=str(tmp / "warm.csv"), progress=False, batch_size=a.batch_size, tta=a.tta)
        ids = sorted({f.name.rsplit("_", 1)[0] for f in (tmp / "data" / "test").iterdir()})
        config.ids = ids[:1]
        hp.run(config)
        config.ids, config.out, config.cache_dir = ids, str(tmp / "sub.csv"), str(tmp / "cache2")
        t0 = time.perf_counter()
        s = hp.run(config)
        wall = time.perf_counter() - t0
    per = s["seconds_per_field"]
    print(f"{a.fields} fields of {a.size}² (16-bit), {s['cells_per_field']:.1f} cells/field, "
          f"{a.backbone} at {a.image_size} px on {a.crop_size} px crops, tta={a.tta}")
    print("seconds per field: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
          + f"; total {wall / a.fields:.2f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
