"""Input pipeline throughput on one core: hpa_tf.data.make_dataset vs bare tf.io.decode_png of the same records.

    python benchmarks/bench_input.py [--sizes 128 256 512] [--examples 1500] [--fields 6]

Shards of synthetic cell crops (PNG, as the builder writes them) are made once per crop size in a
temporary folder (page-cached), then each variant reads ``--examples`` examples after a warm-up:

bare        TFRecordDataset → parse ``image`` → ``decode_png`` → batch (the floor: decode alone)
pipeline    the default training input (``train --augment-on device``): make_dataset(training=True)
            with no host augmentation: interleave, shuffle, repeat, parse, decode, channels, float32,
            batch (crop size = model size: no resize); flips/rot90/intensity run in the training
            step on the accelerator (``hpa_tf.augment.RandomAugment``), see bench_train.py
host-aug    ``--augment-on host``: the same plus flips/rot90/intensity per example in tf.data
host-geom   host flips/rot90 only (no per-channel brightness/contrast)
eval        make_dataset(training=False): no augmentation, padded last batch
+resize224  the default training pipeline resizing to 224 px (antialiased bilinear), for reference

One core: TF intra/inter-op threads and the tf.data thread pool are pinned to 1.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_core, peak_rss_mb  # noqa: E402

one_core()

import tensorflow as tf  # noqa: E402

from hpa_tf import data, shardset  # noqa: E402
from hpa_tf.config import AugmentConfig  # noqa: E402
from hpa_tf.crops import CropSpec  # noqa: E402
from hpa_tf.records import FEATURE_SPEC  # noqa: E402
from tfrecord_builder import build_synthetic  # noqa: E402

BATCH = 32
#: host side of the default training input: augmentation runs on the device (train.host_augmentation
#: leaves tf.data nothing to do)
DEVICE_MODE = None


def _one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def bare(shards: list[str]) -> tf.data.Dataset:
    spec = {"image": FEATURE_SPEC["image"]}

    def decode(serialized):
        image = tf.sparse.to_dense(tf.io.parse_single_example(serialized, spec)["image"])
        return tf.io.decode_png(image[0], channels=4)

    return tf.data.TFRecordDataset(shards).repeat().map(decode).batch(BATCH)


def rate(ds: tf.data.Dataset, examples: int) -> float:
    it = iter(_one_thread(ds))
    for _ in range(10):  # warm-up: graph tracing, file open, shuffle buffer fill, tf.data autotuning
        next(it)
    n_batches = max(1, examples // BATCH)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * BATCH / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--examples", type=int, default=1500, help="examples timed per variant")
    p.add_argument("--fields", type=int, default=6, help="synthetic 1024 px fields per size (~30 cells each)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_input_")
    print(f"one core, batch {BATCH}, {a.examples} examples per variant; examples/s (and % of bare decode)")
    names = ("pipeline", "host-aug", "host-geom", "eval", "+resize224")
    print(f"{'crop':>5} {'records':>8} {'bare':>8} " + " ".join(f"{n:>15}" for n in names))
    for size in a.sizes:
        result = build_synthetic(f"{tmp}/d{size}", f"{tmp}/s{size}", n_fields=a.fields, field_size=1024,
                                 crop=CropSpec(size=size), folds=2, seed=7, images_per_shard=2)
        shards = shardset.list_shards(result.out)

        def inputs(augment: AugmentConfig | None, image_size: int = size, crop: int = size) -> data.InputConfig:
            return data.InputConfig(crop_size=crop, image_size=image_size, batch_size=BATCH, seed=0,
                                    shuffle_buffer=256, augment=augment)

        base = rate(bare(shards), a.examples)
        train = rate(data.make_dataset(shards, inputs(DEVICE_MODE)), a.examples)
        host = rate(data.make_dataset(shards, inputs(AugmentConfig())), a.examples)
        geometry = rate(data.make_dataset(shards, inputs(AugmentConfig(brightness=0.0, contrast=0.0))), a.examples)
        evaluation = rate(data.make_dataset(shards, inputs(None), training=False).repeat(), a.examples)
        resized = rate(data.make_dataset(shards, inputs(DEVICE_MODE, 224)), a.examples)
        cells = [f"{v:7.0f} ({100 * v / base:3.0f}%)" for v in (train, host, geometry, evaluation, resized)]
        print(f"{size:>5} {result.cells:>8} {base:>8.0f} " + " ".join(f"{c:>15}" for c in cells), flush=True)
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
