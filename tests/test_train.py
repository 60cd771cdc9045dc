"""hpa_tf.train and its command line (train_tpu.py, hpa-tf-train), on a shard set the builder made:
two-replica MirroredStrategy, resume with the same optimizer state, learning for real on synthetic
cells, the run folder's files, model.json's crop spec, and clear errors on bad input."""

import csv
import json
import os

import keras
import numpy as np
import pytest
from conftest import SHARD_CROP

from hpa_tf import distribute, metric, shardset, train
from hpa_tf.cli import train as train_cli
from hpa_tf.config import TrainConfig
from hpa_tf.crops import CropSpec
from hpa_tf.model import load_model


@pytest.fixture(scope="module")
def shards(shard_set) -> str:
    return shard_set


def _config(shards, out, **kw) -> TrainConfig:
    base = dict(data=shards, out=str(out), backbone="tiny_cnn", image_size=32, batch_size=16, epochs=2,
                steps_per_epoch=4, lr=3e-3, warmup_epochs=0.5, strategy="cpu", tensorboard=False, verbose=0)
    base.update(kw)
    return TrainConfig(**base)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mirrored_strategy_over_two_cpus_trains_and_writes_the_run_folder(shards, tmp_path):
    strategy = distribute.get_strategy("cpu", devices=["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    config = _config(shards, tmp_path, batch_size=8, epochs=3, steps_per_epoch=None, val_fold=0)
    split = shardset.split_folds(shards, val_fold=0)
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
    assert [r["epoch"] for r in _read_csv(tmp_path / "log.csv")] == ["1", "2", "3"]  # from 1, as val_ap.csv
    assert "val_auc" not in _read_csv(tmp_path / "log.csv")[0]  # no Keras AUC beside val_macro_auc
    assert [r["epoch"] for r in _read_csv(tmp_path / "val_ap.csv")] == ["1", "2", "3"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 3 and state["global_batch"] == 16
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["backbone"] == "tiny_cnn" and info["image_size"] == 32 and info["channels"] == 4
    # the crop spec is the shard set's, copied as one object (recorded == what the pipeline used)
    assert info["channel_letters"] == "rgby" and CropSpec.from_dict(info["crop"]) == split.crop
    assert split.crop == CropSpec(size=SHARD_CROP)
    assert info["shard_set"]["build_config"]["crop"] == info["crop"]
    assert len(info["class_names"]) == 19 and len(info["normalization"]["mean"]) == 4
    assert info["training"]["global_batch"] == 16 and info["training"]["val_folds"] == [0]
    # default: flips/rotations/intensity on the device, in the model; identity when predicting
    assert info["training"]["augment_on"] == "device"
    assert info["augment"] == {"flip": True, "rotate90": True, "brightness": 0.05, "contrast": 0.1, "seed": 0}
    assert result.model.get_layer("augment").contrast == 0.1
    assert {"val_map", "val_macro_auc", "val_f1", "val_loss"} == set(info["val_metrics"])
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
    assert [r["epoch"] for r in _read_csv(tmp_path / "log.csv")] == ["1", "2", "3"]  # appended, not restarted
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 3
    # nothing left to do: a further resume returns at once
    again = train.train(_config(shards, tmp_path, epochs=3, steps_per_epoch=3, val_fold=1, resume=True))
    assert again.initial_epoch == 3 and again.history == {}


def test_a_small_model_learns_the_synthetic_classes(shards, tmp_path):
    """634 training / 232 validation cells (builder output, 64 px crops; 5 classes with distinct green
    patterns, Aggresome in one field), tiny_cnn from scratch, 18 epochs, augmentation on the device
    (the default). Measured over training seeds 0-2: final val macro AUC 0.989-0.995, val mAP
    (competition AP) 0.95-0.97; chance: AUC 0.5, mAP ~ class frequency ~0.2. The floors leave a
    wide margin."""
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
    host, device = train.host_augmentation(_config("", tmp_path, seed=3))
    assert host is None and device["brightness"] == 0.05  # nothing left for tf.data to do
    host, device = train.host_augmentation(_config("", tmp_path, augment_on="host"))
    assert device is None and host.flip and host.rotate90 and host.brightness == 0.05 and host.contrast == 0.1
    assert train.host_augmentation(_config("", tmp_path, augment=False)) == (None, None)
    with pytest.raises(ValueError, match="augment_on"):
        train.host_augmentation(_config("", tmp_path, augment_on="tpu"))


def test_non_finite_loss_raises_a_clear_error():
    guard = train.NonFiniteLossGuard()
    guard.on_epoch_begin(4)
    guard.on_train_batch_end(0, {"loss": 0.3})
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at epoch 5, step 8"):
        guard.on_train_batch_end(7, {"loss": float("nan")})


def test_validation_ap_is_the_competitions_average_precision():
    y = np.zeros((6, 19), np.float32)
    y[[0, 3, 4], 0] = 1
    y[[5], 3] = 1
    scores = np.zeros((6, 19), np.float32)
    # class 0 ranked +, -, -, +, +: precision 1, 2/4, 3/5 at the three recall steps. The competition's
    # all-point (VOC) AP takes the precision envelope: (1 + 0.6 + 0.6) / 3; sklearn's step AP would
    # give (1 + 0.5 + 0.6) / 3 = 0.7
    scores[:, 0] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]
    scores[:, 3] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ap = train.validation_ap(y, scores)
    np.testing.assert_allclose(ap[0], 2.2 / 3)
    np.testing.assert_allclose(ap[3], 1.0)
    assert np.isnan(ap[1]) and np.isnan(ap[18])
    # and it is hpa_tf.metric's function, class by class
    for c in (0, 3):
        assert ap[c] == metric.average_precision(scores[:, c], y[:, c] > 0, int(y[:, c].sum()))


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
    with pytest.raises(shardset.DataError, match=message):
        train.train(_config(shards, tmp_path, **kw))


def test_cli_runs_and_reports_bad_input(shards, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--data", shards, "--val-fold", "2", "--backbone", "tiny_cnn", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--steps-per-epoch", "2", "--strategy", "cpu", "--channels", "gy", "--balance",
            "--no-tensorboard", "--verbose", "0", "--brightness", "0.2", "--contrast", "0.3", "--out", str(out)]
    assert train_cli.main(args) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["channels"] == 2 and info["channel_letters"] == "gy" and info["training"]["balance"] is True
    # brightness and contrast reach the model's on-device augmentation
    assert info["training"]["augment_on"] == "device" and info["augment"]["brightness"] == 0.2
    assert info["augment"]["contrast"] == 0.3
    assert train_cli.main(["--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "folder holds no shard files"),
    ("val_fold", "fold 7 has no shards"),
    ("backbone", "unknown backbone 'resnet9'; valid: efficientnet_b0"),
    ("channels", "channels"),
])
def test_a_refused_start_is_one_line_and_leaves_no_run_folder(shards, tmp_path, capsys, case, message):
    data = {"missing": str(tmp_path / "none"), "empty": str(tmp_path / "empty")}.get(case, shards)
    (tmp_path / "empty").mkdir()
    extra = {"val_fold": ["--val-fold", "7"], "backbone": ["--backbone", "resnet9"],
             "channels": ["--channels", "rgbq"]}.get(case, [])
    out = tmp_path / "runs" / "r1"
    args = ["--data", data, "--out", str(out), "--strategy", "cpu", "--backbone", "tiny_cnn", "--image-size", "32",
            *extra]
    assert train_cli.main(args, prog="python -m hpa_tf train") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("python -m hpa_tf train: error: "), err
    assert message in lines[0], lines[0]
    if case == "backbone":
        assert "tiny_cnn" in lines[0]
    assert not out.exists() and not (tmp_path / "runs").exists()


def _damage(shard, how: str) -> None:
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(data[: len(data) - 300]))
    else:
        data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("fold, how", [(1, "truncated"), (0, "corrupt")])  # a training shard, a validation shard
def test_a_damaged_shard_stops_training_with_one_line_naming_it(shards, tmp_path, capsys, fold, how):
    import shutil
    from pathlib import Path

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    shard = sorted(data.glob(f"fold{fold}-*.tfrec"))[0]
    _damage(shard, how)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--strategy", "cpu", "--backbone", "tiny_cnn",
            "--image-size", "32", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2", "--val-fold", "0",
            "--no-tensorboard", "--verbose", "0"]
    assert train_cli.main(args, prog="python -m hpa_tf train") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error:" in line or "Traceback" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m hpa_tf train: error: {shard}: ")
    assert "corrupt or truncated shard" in lines[0] and "--skip-corrupt-shards" in lines[0]
    assert not (Path(tmp_path / "run") / "last.keras").exists()


def test_skip_corrupt_shards_trains_without_them_and_counts_them(shards, tmp_path, caplog):
    import logging
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    bad_train, bad_val = sorted(data.glob("fold1-*.tfrec"))[0], sorted(data.glob("fold0-*.tfrec"))[-1]
    _damage(bad_train, "corrupt")
    _damage(bad_val, "truncated")
    split = shardset.split_folds(str(data), val_fold=0)
    with caplog.at_level(logging.WARNING, logger="hpa_tf.shardset"):
        result = train.train(_config(str(data), tmp_path / "run", epochs=1, steps_per_epoch=2, val_fold=0,
                                     skip_corrupt_shards=True))
    lost_train, lost_val = shardset.parse_shard_name(bad_train)[2], shardset.parse_shard_name(bad_val)[2]
    assert result.n_train == split.n_train - lost_train and result.n_val == split.n_val - lost_val
    assert result.epochs_completed == 1
    text = caplog.text
    assert f"skipping {bad_train}: corrupt or truncated shard" in text and f"skipping {bad_val}" in text
    assert f"skipped 2 damaged shard(s) of {len(split.train_shards) + len(split.val_shards)}" in text


def test_every_setting_is_a_flag_with_its_default():
    """The command line is derived from TrainConfig: each field is a flag, parsing nothing but the
    required flags gives TrainConfig's own defaults, and --help shows each default."""
    import dataclasses

    parser = train_cli.build_parser()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    parsed = train_cli.parse_config(["--data", "d", "--out", "o"])
    assert parsed == TrainConfig(data="d", out="o")
    assert train_cli.parse_config(["--data", "a", "b", "--out", "o", "--no-augment", "--val-fold", "none",
                                   "--scale-augment", "0.8", "1", "--mixed-precision"]) == TrainConfig(
        data=["a", "b"], out="o", augment=False, val_fold=None, scale_augment=(0.8, 1.0), mixed_precision="auto")
    text = " ".join(parser.format_help().split())
    assert "--brightness BRIGHTNESS per-channel offset drawn from ±brightness × 255 (default: 0.05)" in text
    assert "(default: efficientnet_b0)" in text and "--contrast CONTRAST" in text
