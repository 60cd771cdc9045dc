"""hpa_tf.distribute: strategy choice, batch sizes, mixed precision, and a real 2-replica fit."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from hpa_tf import distribute as D
from hpa_tf.model import build_model

TWO_CPUS = ["/cpu:0", "/cpu:1"]


@pytest.fixture
def no_tpu_env(monkeypatch):
    for var in D.TPU_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def reset_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_cpu_strategy_has_one_replica():
    strategy = D.get_strategy("cpu")
    assert strategy.num_replicas_in_sync == 1
    assert D.global_batch_size(8, strategy) == 8
    assert D.strategy_kind(strategy) == "cpu"


def test_mirrored_over_two_logical_cpus():
    assert len(tf.config.list_logical_devices("CPU")) >= 2, "tests/conftest.py should split the CPU in two"
    strategy = D.get_strategy("cpu", devices=TWO_CPUS)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert D.global_batch_size(8, strategy) == 16
    info = D.describe(strategy)
    assert info["replicas"] == 2 and len(info["devices"]) == 2
    assert D.strategy_kind(strategy) == "cpu"
    with pytest.raises(ValueError, match="per-replica"):
        D.global_batch_size(0, strategy)


def test_auto_without_accelerators_is_cpu(no_tpu_env, monkeypatch, caplog):
    monkeypatch.setattr(D, "TPU_DEVICE_GLOBS", ())
    assert D.tpu_hint() is None
    assert D.get_strategy("auto").num_replicas_in_sync == 1
    # a TPU hint that does not pan out falls back with a warning, not an error
    monkeypatch.setattr(D, "tpu_hint", lambda: "test hint")
    with caplog.at_level(logging.WARNING, logger="hpa_tf.distribute"):
        strategy = D.get_strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    assert "TPU suggested by test hint but not usable" in caplog.text


def test_tpu_without_tpu_raises_a_clear_error(no_tpu_env):
    with pytest.raises(D.AcceleratorNotFoundError, match=r"no TPU at tpu='local'.*kind='gpu', 'cpu' or 'auto'") as err:
        D.get_strategy("tpu")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained TF traceback


def test_gpu_without_gpu_and_unknown_kind_raise():
    with pytest.raises(D.AcceleratorNotFoundError, match="no GPU"):
        D.get_strategy("gpu")
    with pytest.raises(ValueError, match="valid: auto, tpu, gpu, cpu"):
        D.get_strategy("quantum")


def test_enable_memory_growth_sets_every_gpu_and_survives_initialised_ones(monkeypatch, caplog):
    """The GPU list is faked (the suite runs without GPUs): growth is requested for each GPU, a GPU
    that TensorFlow already initialised is logged and skipped, and no GPU means nothing to do."""
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(3)]
    calls = []

    def set_memory_growth(device, enable):
        calls.append((device.name, enable))
        if device.name.endswith(":1"):
            raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", set_memory_growth)
    with caplog.at_level(logging.WARNING, logger="hpa_tf.distribute"):
        assert D.enable_memory_growth() == 3
    assert calls == [(g.name, True) for g in gpus]
    assert "GPU:1" in caplog.text and "cannot enable memory growth" in caplog.text
    calls.clear()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert D.enable_memory_growth() == 0 and calls == []


def test_mixed_precision_policy_choices(reset_policy):
    assert D.set_mixed_precision("tpu", True) == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert D.set_mixed_precision("gpu", "auto") == "mixed_float16"
    assert D.set_mixed_precision("cpu", True) == "float32"
    assert D.set_mixed_precision("gpu", False) == "float32"
    assert D.set_mixed_precision("cpu", "mixed_bfloat16") == "mixed_bfloat16"  # explicit: honoured
    assert D.set_mixed_precision(D.get_strategy("cpu"), True) == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(ValueError, match="not understood"):
        D.set_mixed_precision("gpu", "float8")
    with pytest.raises(ValueError, match="device kind"):
        D.set_mixed_precision("fpga", True)


def test_fit_under_two_replica_mirrored_strategy_lowers_the_loss():
    strategy = D.get_strategy("cpu", devices=TWO_CPUS)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("efficientnet_b0", image_size=32, channels=4, dropout=0.0)
        model.compile(  # SGD: Adam's per-variable update graph takes ~3x longer to trace on CPU
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.25, gamma=2.0),
        )
    assert all(strategy.extended.variable_created_in_scope(v.value) for v in model.weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 4)).astype("float32")
    labels = (rng.uniform(size=(16, 19)) < 0.2).astype("float32")
    batch = D.global_batch_size(8, strategy)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True).repeat()
    history = model.fit(data, epochs=3, steps_per_epoch=1, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
