"""Predict every cell of a test folder and write the competition's submission CSV (offline).

    python predict.py --test-dir DATA/test --sample-submission DATA/sample_submission.csv \\
        --model runs/x/best.keras --out submission.csv

Runs on CPU or GPU with no network access; see ``hpa_tf.predict`` for what it does per field.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test-dir", required=True, help="folder of {ID}_{red,green,blue,yellow} files")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sample-submission", help="CSV whose IDs (and order) to predict")
    which.add_argument("--ids", nargs="+", help="IDs to predict (default: every field in --test-dir)")
    p.add_argument("--model", nargs="+", required=True, help="one or more .keras models (their model.json beside)")
    p.add_argument("--segmenter", default="builtin", choices=["builtin", "hpacellseg"])
    p.add_argument("--nuclei-model", help="hpacellseg nuclei model file (local path)")
    p.add_argument("--cell-model", help="hpacellseg cell model file (local path)")
    p.add_argument("--device", default="auto",
                   help="hpacellseg device: auto (the GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N "
                   "(default auto)")
    p.add_argument("--masks-dir", help="reuse saved {ID}_cells.png masks found here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true", help="average over flips (4 views)")
    p.add_argument("--image-weight", type=float, default=0.3,
                   help="weight of the field-level score fused into each cell's score (0 = off)")
    p.add_argument("--cache-dir", help="where finished fields are kept (default: OUT.cache)")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from hpa_tf.segmentation import preload

    preload(a.segmenter)  # hpacellseg: PyTorch's stack must be imported before TensorFlow
    from hpa_tf.predict import PredictConfig, PredictError, run

    config = PredictConfig(
        test_dir=a.test_dir, models=a.model, out=a.out, ids=a.ids, sample_submission=a.sample_submission,
        segmenter=a.segmenter, nuclei_model=a.nuclei_model, cell_model=a.cell_model, device=a.device,
        masks_dir=a.masks_dir, batch_size=a.batch_size, tta=a.tta, image_weight=a.image_weight,
        cache_dir=a.cache_dir, progress=not a.no_progress,
    )
    try:
        s = run(config)
    except (PredictError, FileNotFoundError, ValueError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    per = s["seconds_per_field"]
    print(
        f"{s['fields']} fields ({s['cached']} from cache), {s['cells']} cells ({s['cells_per_field']:.1f}/field), "
        f"{s['seconds']} s; per field: " + ", ".join(f"{k} {v:.2f} s" for k, v in per.items())
    )
    if s["no_cells"]:
        print(f"{len(s['no_cells'])} field(s) with no cells (empty rows): {', '.join(s['no_cells'][:10])}")
    if s["failed"]:
        print(f"{len(s['failed'])} field(s) could not be read (empty rows):", file=sys.stderr)
        for image_id, reason in s["failed"]:
            print(f"  {image_id}: {reason}", file=sys.stderr)
    print(f"wrote {s['out']}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
