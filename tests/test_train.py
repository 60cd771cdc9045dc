"""hpa_tf.train and train_tpu.py: two-replica MirroredStrategy, resume with the same optimizer state,
learning for real on synthetic cells, the run folder's files, and clear errors on bad input."""

import csv
import json
import os

import keras
import numpy as np
import pytest

import train_tpu
from hpa_tf import data, distribute, train
from hpa_tf.model import load_model

# five classes with distinct green patterns; 5 label sets over 4 folds: every fold holds all five
FIELD_LABELS = [[0], [2], [13], [14], [16]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("train_shards")
    info = data.write_synthetic_shards(out, n_fields=24, field_size=384, crop_size=64, n_folds=4, per_shard=64,
                                       seed=1, field_labels=FIELD_LABELS)
    assert info["n_examples"] > 500
    return str(out)


def _config(shards, out, **kw) -> train.TrainConfig:
    base = dict(data=shards, out=str(out), backbone="tiny_cnn", image_size=32, batch_size=16, epochs=2,
                steps_per_epoch=4, lr=3e-3, warmup_epochs=0.5, strategy="cpu", tensorboard=False, verbose=0)
    base.update(kw)
    return train.TrainConfig(**base)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mirrored_strategy_over_two_cpus_trains_and_writes_the_run_folder(shards, tmp_path):
    strategy = distribute.get_strategy("cpu", devices=["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    config = _config(shards, tmp_path, batch_size=8, epochs=3, steps_per_epoch=None, val_fold=0)
    split = data.split_folds(shards, val_fold=0)
    result = train.train(config, strategy=strategy)

    # batch arithmetic: per replica × replicas; steps from the manifest's count
    assert result.replicas == 2 and result.global_batch == 16
    assert result.steps_per_epoch == split.n_train // 16 and result.n_train == split.n_train
    assert result.n_val == split.n_val
    losses = result.history["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(np.isfinite(result.history["val_map"]))

    names = set(os.listdir(tmp_path))
    assert {"best.keras", "best.json", "last.keras", "last.json", "model.json", "state.json", "log.csv",
            "val_ap.csv", "val_ap.json", "train_config.json"} <= names
    assert len(_read_csv(tmp_path / "log.csv")) == 3
    assert [r["epoch"] for r in _read_csv(tmp_path / "val_ap.csv")] == ["1", "2", "3"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 3 and state["global_batch"] == 16
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["backbone"] == "tiny_cnn" and info["image_size"] == 32 and info["channels"] == 4
    assert info["channel_letters"] == "rgby" and info["crop_size"] == 64 and info["mask_neighbors"] is False
    assert len(info["class_names"]) == 19 and len(info["normalization"]["mean"]) == 4
    assert info["training"]["global_batch"] == 16 and info["training"]["val_folds"] == [0]
    # default: flips/rotations/intensity on the device, in the model; identity when predicting
    assert info["training"]["augment_on"] == "device"
    assert info["augment"] == {"flip": True, "rotate90": True, "brightness": 0.05, "contrast": 0.1, "seed": 0}
    assert result.model.get_layer("augment").contrast == 0.1
    assert "val_map" in info["val_metrics"] and "val_auc" in info["val_metrics"]
    per_class = json.loads((tmp_path / "val_ap.json").read_text())["ap"]
    assert per_class["Nucleoplasm"] is not None and per_class["Mitotic spindle"] is None  # no positives: no AP
    # the predictor's loader reads the best model and its description
    model, cfg = load_model(tmp_path / "best.keras")
    assert model.input_shape == (None, 32, 32, 4) and cfg["training"]["epoch"] >= 1


class _StopAfter(keras.callbacks.Callback):
    """Stop the run like a kill after epoch ``n`` (after the checkpoint), recording the optimizer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.snapshot = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.n:
            opt = self.model.optimizer
            self.snapshot = (int(opt.iterations.numpy()), {v.path.split("/", 1)[-1]: v.numpy().copy() for v in opt.variables})
            raise KeyboardInterrupt("simulated kill")


class _Record(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        self.snapshot = (int(opt.iterations.numpy()), {v.path.split("/", 1)[-1]: v.numpy().copy() for v in opt.variables})


def test_resume_continues_at_the_next_epoch_with_the_same_optimizer_state(shards, tmp_path):
    config = _config(shards, tmp_path, epochs=3, steps_per_epoch=3, val_fold=1)
    stop = _StopAfter(2)
    with pytest.raises(KeyboardInterrupt):
        train.train(config, callbacks=[stop])
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2
    iterations, slots = stop.snapshot
    assert iterations == 2 * 3

    record = _Record()
    result = train.train(_config(shards, tmp_path, epochs=3, steps_per_epoch=3, val_fold=1, resume=True),
                         callbacks=[record])
    assert result.initial_epoch == 2 and result.epochs_completed == 3 and len(result.history["loss"]) == 1
    resumed_iterations, resumed_slots = record.snapshot
    assert resumed_iterations == iterations
    momentum = [k for k in slots if k.endswith("_momentum")]
    velocity = [k for k in slots if k.endswith("_velocity")]
    assert momentum and velocity
    for key in (momentum[0], velocity[-1]):
        assert np.abs(slots[key]).sum() > 0
        np.testing.assert_array_equal(resumed_slots[key], slots[key])
    assert int(result.model.optimizer.iterations.numpy()) == 3 * 3
    assert [r["epoch"] for r in _read_csv(tmp_path / "log.csv")] == ["0", "1", "2"]  # appended, not restarted
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 3
    # nothing left to do: a further resume returns at once
    again = train.train(_config(shards, tmp_path, epochs=3, steps_per_epoch=3, val_fold=1, resume=True))
    assert again.initial_epoch == 3 and again.history == {}


def test_a_small_model_learns_the_synthetic_classes(shards, tmp_path):
    """~630 training / ~210 validation cells of 5 classes (+ Negative), 64 px, tiny_cnn from scratch,
    18 epochs, augmentation on the device (the default). Measured over training seeds 0-3: final val
    macro AUC 0.967-0.99, val mAP 0.86-0.96 (host augmentation, seeds 0-5: 0.97-0.996 and 0.86-0.97;
    chance: AUC 0.5, mAP ~ class frequency ~0.2); the floors leave a wide margin."""
    config = _config(shards, tmp_path, image_size=64, batch_size=32, epochs=18, steps_per_epoch=None, lr=3e-3,
                     val_fold=0, seed=0)
    result = train.train(config)
    auc, m_ap = result.history["val_macro_auc"][-1], result.history["val_map"][-1]
    assert auc >= 0.85, result.history["val_macro_auc"]
    assert m_ap >= 0.65, result.history["val_map"]
    assert result.best_value >= m_ap - 1e-9


def test_host_augmentation_splits_the_work_between_tf_data_and_the_model(tmp_path):
    host, device = train.host_augmentation(_config("", tmp_path, brightness=0.02, contrast=0.2, seed=3,
                                                   scale_augment=(0.8, 1.0)))
    assert not (host.flip or host.rotate90 or host.brightness or host.contrast) and host.scale == (0.8, 1.0)
    assert device == {"flip": True, "rotate90": True, "brightness": 0.02, "contrast": 0.2, "seed": 3}
    host, device = train.host_augmentation(_config("", tmp_path, augment_on="host"))
    assert device is None and host.flip and host.rotate90 and host.brightness == 0.05 and host.contrast == 0.1
    host, device = train.host_augmentation(_config("", tmp_path, augment=False))
    assert device is None and not host.active
    with pytest.raises(ValueError, match="augment_on"):
        train.host_augmentation(_config("", tmp_path, augment_on="tpu"))


def test_non_finite_loss_raises_a_clear_error():
    guard = train.NonFiniteLossGuard()
    guard.on_epoch_begin(4)
    guard.on_train_batch_end(0, {"loss": 0.3})
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at epoch 5, step 8"):
        guard.on_train_batch_end(7, {"loss": float("nan")})


def test_average_precision_per_class():
    y = np.zeros((6, 19), np.float32)
    y[[0, 2], 0] = 1
    y[[5], 3] = 1
    scores = np.zeros((6, 19), np.float32)
    scores[:, 0] = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]  # positives ranked 1st and 3rd: AP = (1 + 2/3) / 2
    scores[:, 3] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ap = train.average_precision(y, scores)
    np.testing.assert_allclose(ap[0], (1 + 2 / 3) / 2)
    np.testing.assert_allclose(ap[3], 1.0)
    assert np.isnan(ap[1]) and np.isnan(ap[18])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(data="{d}/nothing-*.tfrec"), "glob matches no shard"),
        (dict(data=[]), "empty shard list"),
        (dict(val_fold=9), "fold 9 has no shards"),
        (dict(batch_size=5000, steps_per_epoch=None), "no full global batch"),
        (dict(channels="rgbq"), "channels"),
    ],
)
def test_bad_input_is_a_clear_error(shards, tmp_path, kw, message):
    if isinstance(kw.get("data"), str):
        kw = {**kw, "data": kw["data"].format(d=shards)}
    with pytest.raises(data.DataError, match=message):
        train.train(_config(shards, tmp_path, **kw))


def test_cli_runs_and_reports_bad_input(shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tpu.main(["--help"])
    assert exit_info.value.code == 0
    out = tmp_path / "cli"
    args = ["--data", shards, "--val-fold", "2", "--backbone", "tiny_cnn", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--steps-per-epoch", "2", "--strategy", "cpu", "--channels", "gy", "--balance",
            "--no-tensorboard", "--verbose", "0", "--augment-on", "host", "--out", str(out)]
    assert train_tpu.main(args) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["channels"] == 2 and info["channel_letters"] == "gy" and info["training"]["balance"] is True
    assert info["training"]["augment_on"] == "host" and info["augment"] is None
    assert train_tpu.main(["--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_global_batch_and_steps_arithmetic():
    strategy = distribute.get_strategy("cpu", devices=["/cpu:0", "/cpu:1"])
    assert distribute.global_batch_size(16, strategy) == 32
    assert data.steps_for(100, 32) == 3 and data.steps_for(100, 32, drop_remainder=False) == 4
