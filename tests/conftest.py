"""Shared test set-up: quiet TensorFlow, two logical CPU devices for MirroredStrategy tests, and one
shard set built by the TFRecord builder from synthetic fields (what the training tests train on)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hpa_protocol"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real HPA-protocol fields beside the checkout (skipped only when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


#: Classes of the fields of the shared shard set: five classes with distinct green patterns, each in
#: several fields of every fold, and Aggresome (15) in one field only (the rare class of the balance test).
SHARD_FIELD_LABELS = [[0], [2], [13], [14], [16]] * 4 + [[0], [2], [15], [14]]
SHARD_CROP = 64


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory) -> str:
    """A shard set made by ``tfrecord_builder.build`` (true masks) from 24 synthetic 384 px fields:
    4 folds, 64 px crops, every cell carrying its field's classes (no cell dropout). Read-only: tests
    that damage it work on a copy."""
    from hpa_tf.crops import CropSpec
    from tfrecord_builder import build_synthetic

    root = tmp_path_factory.mktemp("shard_set")
    result = build_synthetic(root / "data", root / "shards", n_fields=len(SHARD_FIELD_LABELS), field_size=384,
                             crop=CropSpec(size=SHARD_CROP), folds=4, seed=1, field_labels=SHARD_FIELD_LABELS,
                             cell_dropout=0.0, images_per_shard=3)
    assert result.complete and result.cells > 500, result.line()
    return str(root / "shards")


def pytest_configure(config):
    """Split the CPU into two logical devices before TensorFlow starts, so that
    ``tf.distribute.MirroredStrategy`` tests run over two real replicas."""
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - tensorflow is a hard requirement
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
    except RuntimeError:
        pass  # already initialised (e.g. a plugin touched TensorFlow first)


FIELD_SIZE = 64


@pytest.fixture(scope="session")
def field_shard_set(shard_set) -> str:
    """Whole-field records (crop spec kind ``field``, 64 px) of the same 24 synthetic fields as
    ``shard_set``, same folds: the image-level model's training data. Read-only."""
    from hpa_tf.crops import CropSpec
    from tfrecord_builder import build_synthetic

    root = Path(shard_set).parent
    result = build_synthetic(root / "data", root / "fields", n_fields=len(SHARD_FIELD_LABELS), field_size=384,
                             crop=CropSpec(kind="field", size=FIELD_SIZE), folds=4, seed=1,
                             field_labels=SHARD_FIELD_LABELS, cell_dropout=0.0, images_per_shard=3)
    assert result.complete and result.cells == len(SHARD_FIELD_LABELS), result.line()
    return str(root / "fields")
