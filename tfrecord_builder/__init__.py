"""Stage 2 of hpa-tf: build TFRecord shards of cell crops (``python -m tfrecord_builder --help``).

Library entry points::

    from hpa_tf.crops import CropSpec
    from tfrecord_builder import BuildOptions, build, verify
    result = build(BuildOptions(data_dir="data/train", labels="data/train.csv", out="records",
                                crop=CropSpec(size=512, margin=0.1, mask_neighbors=False)))
    assert verify("records").ok

``encode_field`` is the per-field unit of work (read → segment → crop → encode) that both runners
call; ``build`` runs a build (resumable) with the local runner (a process pool with ``workers > 1``)
or, with ``BuildOptions(runner="beam", beam_options=(...))``, as an Apache Beam pipeline
(``tfrecord_builder.beam_runner``; ``pip install .[beam]``) that builds the same shard set.
"""

from tfrecord_builder.builder import BuildResult, build
from tfrecord_builder.field import SKIP_KINDS, FieldResult, encode_field
from tfrecord_builder.options import BuildError, BuildOptions, ConfigMismatchError
from tfrecord_builder.plan import ShardTask, estimate_images_per_shard, plan_shards
from tfrecord_builder.synthetic import build_synthetic
from tfrecord_builder.verify import VerifyReport, verify
from tfrecord_builder.worker import build_shard

__all__ = [
    "SKIP_KINDS",
    "BuildError",
    "BuildOptions",
    "BuildResult",
    "ConfigMismatchError",
    "FieldResult",
    "ShardTask",
    "VerifyReport",
    "build",
    "build_shard",
    "build_synthetic",
    "encode_field",
    "estimate_images_per_shard",
    "plan_shards",
    "verify",
]
