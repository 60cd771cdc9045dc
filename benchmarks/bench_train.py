"""Training-step throughput of EfficientNetB0 on this CPU, fed by the input pipeline vs by in-memory tensors.

    python benchmarks/bench_train.py [--image-size 128] [--batch-size 16] [--steps 15] [--backbone efficientnet_b0]

Both runs use the same model, loss, optimizer and metrics as ``hpa_tf.train`` (``compile_model``)
and its default ``--augment-on device``: the model carries the on-device augmentation block
(``hpa_tf.augment.RandomAugment``: flips/rot90/intensity inside the training step, so the figures
include it) and the host pipeline only decodes and batches (``train.host_augmentation``).
``memory`` repeats one batch already in memory (no input cost), ``pipeline`` reads synthetic
shards (built by the TFRecord builder) through ``hpa_tf.data.make_dataset`` (training: shuffle, decode). If the two rates match,
the pipeline is not the bottleneck. ``--augment-on host`` measures the tf.data-augmented variant.
All cores of the machine are used (no pinning).
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import peak_rss_mb  # noqa: E402

from hpa_tf import data, shardset, train  # noqa: E402
from hpa_tf.backbones import build_classifier  # noqa: E402
from hpa_tf.config import TrainConfig  # noqa: E402
from hpa_tf.crops import CropSpec  # noqa: E402
from tfrecord_builder import build_synthetic  # noqa: E402


def images_per_second(model, ds: tf.data.Dataset, steps: int, batch: int) -> float:
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)  # trace, compile, fill buffers
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=15, help="timed training steps per variant")
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--augment-on", default="device", choices=["device", "host"])
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size, batch = a.image_size, a.batch_size
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    build_synthetic(f"{tmp}/data", f"{tmp}/shards", n_fields=6, field_size=768, crop=CropSpec(size=size), folds=2,
                    seed=3, images_per_shard=2)
    shards = shardset.list_shards(f"{tmp}/shards")
    config = TrainConfig(data="", out="", backbone=a.backbone, image_size=size, augment_on=a.augment_on)
    host_augment, device_augment = train.host_augmentation(config)
    model = build_classifier(a.backbone, size, 4, dropout=0.2, augment=device_augment)
    train.compile_model(model, config, total_steps=10_000, warmup_steps=100)

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch, size, size, 4)).astype(np.float32)
    y = (rng.random((batch, 19)) < 0.15).astype(np.float32)
    memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    pipeline = data.make_dataset(shards, data.InputConfig(crop_size=size, image_size=size, batch_size=batch, seed=0,
                                                          shuffle_buffer=256, augment=host_augment))

    n_input = 40 * batch
    it = iter(pipeline)
    next(it)
    t0 = time.perf_counter()
    for _ in range(40):
        next(it)
    input_rate = n_input / (time.perf_counter() - t0)

    rate_memory = images_per_second(model, memory, a.steps, batch)
    rate_pipeline = images_per_second(model, pipeline, a.steps, batch)
    print(f"{a.backbone} {size} px, batch {batch}, {a.steps} steps, {tf.config.threading.get_intra_op_parallelism_threads()}"
          f" intra-op threads (0 = all cores); augmentation on {a.augment_on}"
          f" ({'in the model' if device_augment else 'in tf.data'})")
    print(f"input pipeline alone   {input_rate:8.1f} examples/s")
    print(f"train, in-memory batch {rate_memory:8.1f} images/s")
    print(f"train, input pipeline  {rate_pipeline:8.1f} images/s ({100 * rate_pipeline / rate_memory:.0f}% of in-memory)")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
