"""Shared test set-up: quiet TensorFlow, two logical CPU devices for MirroredStrategy tests."""

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
