"""What a TPU demands, checked on the CPU (no TPU is reachable from the test machine):

* the training step (EfficientNet-B0, on-device augmentation, focal loss, AdamW, the metrics)
  compiles into one XLA program and runs, in float32 and in bfloat16 (XLA lowers every op the
  way the TPU compiler does; TPUStrategy compiles each replica's step with XLA whatever Keras'
  ``jit_compile`` says);
* the training input has fully static shapes (the batch dimension too) and no op that calls
  Python, on builder output;
* ``--steps-per-execution`` > 1 with the validation AP callback, through ``train()``;
* the TPU branch of the strategy choice, with stand-ins for the resolver and TPUStrategy;
* the settings a MirroredStrategy over several devices cannot run are refused in one line.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from hpa_tf import data as hpa_data
from hpa_tf import distribute, shardset, train
from hpa_tf.backbones import build_classifier
from hpa_tf.cli import train as train_cli
from hpa_tf.config import AugmentConfig, TrainConfig

TWO_CPUS = ["/cpu:0", "/cpu:1"]


@pytest.fixture
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def no_tpu_env(monkeypatch):
    for var in distribute.TPU_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _config(shards, out, **kw) -> TrainConfig:
    base = dict(data=shards, out=str(out), backbone="tiny_cnn", image_size=32, batch_size=4, epochs=2,
                steps_per_epoch=3, lr=1e-3, warmup_epochs=0.5, strategy="cpu", tensorboard=False, verbose=0)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------
# the input pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment, balance", [
    (None, False),                                   # the default: augmentation on the device
    (AugmentConfig(), False),                        # --augment-on host
    (AugmentConfig(scale=(0.8, 1.0)), True),         # scale crop (dynamic inside) and class balance
])
def test_training_input_has_static_shapes_and_no_python_ops(shard_set, augment, balance):
    split = shardset.split_folds(shard_set, 0)
    inputs = hpa_data.InputConfig(crop_size=split.crop.size, image_size=32, batch_size=4, augment=augment,
                                  balance=(2.0,) * 19 if balance else None, seed=0)
    ds = hpa_data.make_dataset(split.train_shards, inputs, training=True)
    images, labels = ds.element_spec
    assert images.shape.as_list() == [4, 32, 32, 4] and labels.shape.as_list() == [4, 19]
    assert hpa_data.tpu_problems(ds) == []
    ops = hpa_data.dataset_ops(ds)
    assert "ParseExampleV2" in ops and "DecodePng" in ops  # the walk reaches inside the map functions
    # validation: the last batch is padded, so its shapes are static too
    val = hpa_data.make_dataset(split.val_shards, inputs, training=False, n_examples=split.n_val)
    assert [s.shape.as_list() for s in val.element_spec] == [[4, 32, 32, 4], [4, 19], [4]]
    assert hpa_data.tpu_problems(val) == []
    images, labels, weights = next(iter(val.skip(hpa_data.steps_for(split.n_val, 4, drop_remainder=False) - 1)))
    assert images.shape == (4, 32, 32, 4) and weights.numpy().sum() == (split.n_val % 4 or 4)


def test_tpu_problems_finds_dynamic_batches_and_python_calls():
    """The check can fail: a short last batch and ``tf.py_function``/``tf.numpy_function`` are named."""
    ds = tf.data.Dataset.range(10).map(lambda i: tf.fill([3], i))
    assert "not static" in " ".join(hpa_data.tpu_problems(ds.batch(4)))
    assert hpa_data.tpu_problems(ds.batch(4, drop_remainder=True)) == []
    py = ds.map(lambda x: tf.py_function(lambda t: t + 1, [x], tf.int64)).map(lambda x: tf.ensure_shape(x, [3]))
    assert hpa_data.tpu_problems(py.batch(4, drop_remainder=True)) == ["Python ops in the pipeline: EagerPyFunc"]
    npy = ds.map(lambda x: tf.ensure_shape(tf.numpy_function(lambda t: t * 2, [x], tf.int64), [3]))
    assert hpa_data.tpu_problems(npy.batch(4, drop_remainder=True)) == ["Python ops in the pipeline: PyFunc"]


# ---------------------------------------------------------------------------------------------
# the training step under XLA
# ---------------------------------------------------------------------------------------------


def test_efficientnet_training_step_compiles_and_runs_with_xla_in_bfloat16(shard_set, tmp_path, float32_after):
    """The trainer's model and compile (EfficientNet-B0 with weights=None, RandomAugment, focal loss,
    AdamW, F1) under bfloat16, as on a TPU, with ``jit_compile=True`` on builder output: 2
    steps in one execution. (EfficientNet-B0 compiles in float32 too, at about the same cost, nearly
    all of it tracing and compiling, so the float32 step under XLA is checked through ``train()``
    with tiny_cnn below, to keep the suite short.)"""
    policy = "mixed_bfloat16"
    keras.utils.set_random_seed(0)
    distribute.set_mixed_precision("cpu", policy)
    config = _config(shard_set, tmp_path, backbone="efficientnet_b0", steps_per_execution=2)
    host, device = train.host_augmentation(config)
    assert host is None and device is not None  # the augmentation is in the step being compiled
    model = build_classifier("efficientnet_b0", 32, 4, dropout=0.2, augment=device,
                             normalization=train.channel_normalization("efficientnet_b0", "rgby"))
    train.compile_model(model, config, total_steps=2, warmup_steps=1, jit_compile=True)
    assert model.jit_compile is True  # Keras turns it off silently when a layer says it cannot
    split = shardset.split_folds(shard_set, 0)
    ds = hpa_data.make_dataset(split.train_shards, hpa_data.InputConfig(
        crop_size=split.crop.size, image_size=32, batch_size=4, seed=0), training=True)
    before = [w.numpy().copy() for w in model.trainable_weights[:3]]
    history = model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["f1"][0])
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights[:3]))
    conv = model.get_layer("efficientnetb0").get_layer("stem_conv")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"  # bf16 math, float32 weights
    assert model.output.dtype == "float32"


# ---------------------------------------------------------------------------------------------
# steps per execution, through train()
# ---------------------------------------------------------------------------------------------


def test_steps_per_execution_with_xla_and_the_validation_ap(shard_set, tmp_path, monkeypatch):
    """``train()`` with 2 steps per execution and ``--jit-compile on`` (single replica): every epoch
    completes with the right step count, ``val_map`` is finite and logged; the datasets the trainer
    feeds (builder output) are static and Python-free."""
    fed = []
    make_dataset = hpa_data.make_dataset

    def recording(*args, **kwargs):
        ds = make_dataset(*args, **kwargs)
        fed.append((kwargs.get("training", True), ds))
        return ds

    monkeypatch.setattr(train.hpa_data, "make_dataset", recording)
    # 5 steps per epoch are rounded down to whole executions (Keras would run 3 × 2 = 6)
    result = train.train(_config(shard_set, tmp_path, steps_per_execution=2, steps_per_epoch=5, jit_compile="on",
                                 val_fold=1))
    assert result.epochs_completed == 2 and result.model.jit_compile is True
    assert result.steps_per_epoch == 4 and int(result.model.optimizer.iterations.numpy()) == 2 * 4
    assert len(result.history["val_map"]) == 2 and np.all(np.isfinite(result.history["val_map"]))
    rows = (tmp_path / "val_ap.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"] and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    assert sorted(t for t, _ in fed) == [False, True]
    for _, ds in fed:
        assert hpa_data.tpu_problems(ds) == []
    info = (tmp_path / "model.json").read_text()
    assert '"steps_per_execution": 2' in info and '"jit_compile": true' in info


def test_mirrored_replicas_refuse_what_keras_cannot_run(shard_set, tmp_path, capsys):
    """Several mirrored replicas: XLA stays off (``auto``), ``on`` and steps per execution > 1 are
    refused in one line before anything is written (Keras 3 limits, see hpa_tf.distribute)."""
    mirrored = distribute.get_strategy("cpu", devices=TWO_CPUS)
    single = distribute.get_strategy("cpu")
    assert distribute.jit_compile_for(mirrored, "auto") is False
    assert distribute.jit_compile_for(mirrored, "off") is False
    with pytest.raises(ValueError, match="--jit-compile on does not work with MirroredStrategy over 2 devices"):
        distribute.jit_compile_for(mirrored, "on")
    assert distribute.jit_compile_for(single, "on") is True and distribute.jit_compile_for(single, "auto") == "auto"
    assert distribute.jit_compile_for(single, "off") is False
    with pytest.raises(ValueError, match="not understood"):
        distribute.jit_compile_for(single, "yes")
    assert distribute.check_steps_per_execution(single, 32) == 32
    assert distribute.check_steps_per_execution(mirrored, 1) == 1
    with pytest.raises(ValueError, match=r"--steps-per-execution 2 does not work with MirroredStrategy.*use --steps-per"):
        distribute.check_steps_per_execution(mirrored, 2)
    with pytest.raises(ValueError, match=">= 1"):
        distribute.check_steps_per_execution(single, 0)
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="steps-per-execution"):
        train.train(_config(shard_set, out, steps_per_execution=4), strategy=mirrored)
    assert not out.exists()
    args = ["--data", shard_set, "--out", str(out), "--strategy", "cpu", "--devices", *TWO_CPUS,
            "--jit-compile", "on", "--backbone", "tiny_cnn"]
    assert train_cli.main(args, prog="train") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train: error: --jit-compile on does not work") and "\n" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the TPU branch of the strategy choice, with stand-ins
# ---------------------------------------------------------------------------------------------


class _Reached(Exception):
    """Raised by the stand-in strategy's scope(): train() got as far as building the model."""


def _fake_tpu(monkeypatch, calls: list, fail: Exception | None = None, replicas: int = 8):
    """Recording stand-ins for the four TensorFlow calls that connect a TPU."""

    class Resolver:
        def __init__(self, tpu=None):
            self.tpu = tpu
            calls.append(("TPUClusterResolver", tpu))

    def connect(resolver):
        calls.append(("experimental_connect_to_cluster", resolver.tpu))

    def initialize(resolver):
        calls.append(("initialize_tpu_system", resolver.tpu))
        if fail is not None:
            raise fail

    class FakeTPUStrategy:
        num_replicas_in_sync = replicas

        def __init__(self, resolver):
            calls.append(("TPUStrategy", resolver.tpu))

        def scope(self):
            raise _Reached

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", connect)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", initialize)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    return FakeTPUStrategy


@pytest.mark.parametrize("tpu, env, address", [
    (None, {}, "local"),                                              # Kaggle / Colab TPU VM
    ("my-tpu", {"TPU_NAME": "other"}, "my-tpu"),                      # --tpu wins
    (None, {"TPU_NAME": "node-1"}, "node-1"),                         # Cloud TPU name
    (None, {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "grpc://10.0.0.2:8470"),  # legacy Colab TPU node
])
def test_tpu_strategy_connects_in_order(monkeypatch, no_tpu_env, caplog, tpu, env, address):
    calls: list = []
    fake = _fake_tpu(monkeypatch, calls)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.INFO, logger="hpa_tf.distribute"):
        strategy = distribute.get_strategy("tpu", tpu=tpu)
    assert isinstance(strategy, fake)
    assert calls == [("TPUClusterResolver", address), ("experimental_connect_to_cluster", address),
                     ("initialize_tpu_system", address), ("TPUStrategy", address)]
    assert f"TPU strategy at {address!r}: 8 replicas" in caplog.text
    assert distribute.strategy_kind(strategy) == "tpu"
    assert distribute.jit_compile_for(strategy, "on") is False  # TPUStrategy compiles by itself
    assert distribute.check_steps_per_execution(strategy, 32) == 32


def test_auto_uses_a_hinted_tpu(monkeypatch, no_tpu_env):
    calls: list = []
    fake = _fake_tpu(monkeypatch, calls)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v3-8")
    assert isinstance(distribute.get_strategy("auto"), fake)
    assert [c[0] for c in calls] == ["TPUClusterResolver", "experimental_connect_to_cluster",
                                     "initialize_tpu_system", "TPUStrategy"]


def test_train_on_a_tpu_gets_to_the_model_with_tpu_settings(shard_set, tmp_path, monkeypatch, no_tpu_env, caplog,
                                                           float32_after):
    """``--strategy tpu --tpu local --mixed-precision --steps-per-execution 32`` with a stand-in TPU of
    8 replicas: bfloat16, global batch 8 × per-replica, Keras' jit_compile off (TPUStrategy compiles),
    32 steps per execution accepted, the input passes the TPU checks, and the model is built under
    the TPU strategy's scope."""
    calls: list = []
    _fake_tpu(monkeypatch, calls)
    config = _config(shard_set, tmp_path, strategy="tpu", tpu="local", mixed_precision="auto", batch_size=2,
                     steps_per_execution=32, jit_compile="on", steps_per_epoch=None)
    with caplog.at_level(logging.INFO, logger="hpa_tf"), pytest.raises(_Reached):
        train.train(config)
    assert calls[0] == ("TPUClusterResolver", "local") and calls[-1] == ("TPUStrategy", "local")
    assert "dtype policy mixed_bfloat16; jit_compile False" in caplog.text
    assert "global batch 16 (2 per replica)" in caplog.text and "steps_per_execution 32" in caplog.text
    # a pipeline a TPU cannot take is refused before the model is built
    make_dataset = hpa_data.make_dataset

    def with_python(*args, **kwargs):
        ds = make_dataset(*args, **kwargs)
        return ds.map(lambda x, y: (tf.numpy_function(lambda t: t, [x], tf.float32), y))

    monkeypatch.setattr(train.hpa_data, "make_dataset", with_python)
    with pytest.raises(shardset.DataError, match="cannot feed a TPU: element shape .* not static; Python ops"):
        train.train(config)


def test_no_tpu_is_a_one_line_error_naming_the_fix(shard_set, tmp_path, monkeypatch, no_tpu_env, capsys):
    calls: list = []
    _fake_tpu(monkeypatch, calls, fail=tf.errors.NotFoundError(None, None, "TPU not found in the cluster\nmore"))
    out = tmp_path / "run"
    code = train_cli.main(["--data", shard_set, "--out", str(out), "--strategy", "tpu", "--tpu", "local"], prog="train")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("train: error: no TPU at tpu='local': NotFoundError: TPU not found in the cluster.")
    assert "kind='gpu', 'cpu' or 'auto'" in err
    assert [c[0] for c in calls] == ["TPUClusterResolver", "experimental_connect_to_cluster", "initialize_tpu_system"]
    assert not out.exists()
