"""A small shard set made the real way: ``hpa_tf.synthetic`` fields → the builder (with the true masks).

For tests, benchmarks and trying the trainer without data: the shard set is exactly what
``python -m tfrecord_builder`` writes for the same fields, so whatever trains on it trains on
builder output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hpa_tf.crops import CropSpec
from hpa_tf.synthetic import write_dataset
from tfrecord_builder.builder import BuildResult, build
from tfrecord_builder.options import BuildOptions


def build_synthetic(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    n_fields: int = 8,
    field_size: int = 384,
    crop: CropSpec = CropSpec(size=64),
    folds: int = 4,
    seed: int = 0,
    field_labels: Sequence[Sequence[int]] | None = None,
    cell_dropout: float = 0.2,
    images_per_shard: int = 4,
    encoding: str = "png",
    workers: int = 1,
) -> BuildResult:
    """Write ``n_fields`` synthetic training fields to ``data_dir`` (unless its ``train.csv`` is
    there) and build the shard set ``out`` from them with their true cell masks.

    ``field_labels`` fixes each field's classes (cycled); ``cell_dropout=0`` gives every cell all
    of its field's classes, so that image-level labels are the cells' truth. Returns the
    ``BuildResult`` (the shard set is complete).
    """
    data_dir = Path(data_dir)
    if not (data_dir / "train.csv").exists():
        write_dataset(data_dir, n_train=n_fields, n_test=0, size=field_size, seed=seed, cell_dropout=cell_dropout,
                      workers=workers, field_labels=field_labels)
    options = BuildOptions(data_dir=str(data_dir / "train"), labels=str(data_dir / "train.csv"), out=str(out),
                           crop=crop, masks_dir=str(data_dir / "masks"), folds=folds, seed=seed,
                           images_per_shard=images_per_shard, encoding=encoding, workers=workers)
    return build(options)
