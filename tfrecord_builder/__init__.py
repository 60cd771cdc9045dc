"""Stage 2 of hpa-tf: build TFRecord shards of cell crops (``python -m tfrecord_builder --help``).

Library entry points (see ``tfrecord_builder.builder``)::

    from tfrecord_builder import BuildOptions, build, verify
    result = build(BuildOptions(data_dir="data/train", labels="data/train.csv", out="records"))
    assert verify("records").ok
"""

from tfrecord_builder.builder import (
    MANIFEST_COLUMNS,
    BuildError,
    BuildOptions,
    BuildResult,
    ConfigMismatchError,
    ShardTask,
    VerifyReport,
    build,
    build_shard,
    estimate_images_per_shard,
    plan_shards,
    verify,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "BuildError",
    "BuildOptions",
    "BuildResult",
    "ConfigMismatchError",
    "ShardTask",
    "VerifyReport",
    "build",
    "build_shard",
    "estimate_images_per_shard",
    "plan_shards",
    "verify",
]
