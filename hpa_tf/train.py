"""Training: one linear ``train(config)`` (strategy → data → model → callbacks → fit), resumable.

``hpa_tf.cli.train`` is its command line (``train_tpu.py``, ``hpa-tf-train``), with one flag per
``hpa_tf.config.TrainConfig`` setting. The sections, top to bottom:

strategy   ``hpa_tf.distribute``: TPU / GPUs / CPU, mixed-precision policy, global batch =
           per-replica batch × replicas (``tf.data`` yields global batches; Keras splits them);
           ``jit_compile`` and ``steps_per_execution`` checked against the strategy (on a TPU,
           TPUStrategy compiles with XLA itself; several mirrored devices take neither XLA nor
           more than one step per execution in Keras 3), before anything is written.
input      ``hpa_tf.shardset``: shards of the training folds and the held-out fold, counted from the
           manifest, and the shard set's crop spec (``build_config.json``); ``hpa_tf.data``: the
           pipeline (on a TPU it must pass ``hpa_tf.data.tpu_problems``: static shapes, no Python
           ops); steps per epoch = training examples // global batch unless given, rounded down
           to whole executions of ``steps_per_execution`` steps. By default
           (``augment_on="device"``) the flips/rotations/intensity jitter run on the accelerator in
           the training step (``hpa_tf.augment.RandomAugment`` after the model input) and tf.data
           only decodes, resizes and batches; ``augment_on="host"`` does them in tf.data.
model      built (``hpa_tf.model.build_model``, or ``hpa_tf.backbones`` for ``tiny_cnn``) and
           compiled under ``strategy.scope()``: AdamW, linear warm-up then cosine decay
           (``CosineDecay(warmup_target=…)``), ``BinaryFocalCrossentropy``, macro F1 as a weighted
           metric (padded validation rows carry weight 0).
callbacks  non-finite loss → ``NonFiniteLossError`` (before anything is saved); per-class average
           precision over every validation example, by the competition's definition
           (``validation_ap``: ``val_map``; also ``val_macro_auc``, ``val_ap.csv``); ``last.keras`` +
           ``state.json`` every epoch and ``best.keras`` on improvement (atomic writes), each with
           its ``.json`` and a ``model.json`` (``hpa_tf.model.model_config``, the one writer: the
           crop spec the pipeline used, channels, normalisation, training) that tells the predictor
           how the model was trained; ``log.csv`` (epochs from 1); TensorBoard under ``tensorboard/``.
resume     ``resume=True`` rebuilds the model, loads ``last.keras`` (weights AND optimizer slots and
           step count) and continues at the epoch after the last completed one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hpa_tf import data as hpa_data
from hpa_tf import distribute, fileutil, shardset
from hpa_tf import model as hpa_model
from hpa_tf import records as hpa_records
from hpa_tf.backbones import build_classifier, check_backbone, is_tiny
from hpa_tf.balance import repeat_factors
from hpa_tf.config import AugmentConfig, TrainConfig
from hpa_tf.labels import CLASS_NAMES, SHORT_NAMES
from hpa_tf.metric import average_precision as competition_ap

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
LAST_NAME = "last.keras"
BEST_NAME = "best.keras"
MODEL_JSON = "model.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What ``train`` did: paths, counts and the metric history of this call (epochs run now)."""

    out: str
    last_path: str
    best_path: str | None
    initial_epoch: int
    epochs_completed: int
    history: dict[str, list[float]]
    replicas: int
    global_batch: int
    steps_per_epoch: int
    n_train: int
    n_val: int
    best_value: float | None = None
    monitor: str | None = None
    val_ap: dict[str, float] | None = None
    model: keras.Model | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# metrics over numpy arrays
# ---------------------------------------------------------------------------------------------


def validation_ap(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """(C,) per-class average precision of (N, C) 0/1 labels and (N, C) scores, by the competition's
    definition (``hpa_tf.metric.average_precision``: detections pooled and ranked by score, AP = the
    all-point VOC area under the precision envelope); every example counts as one detection of
    every class. NaN for a class with no positive example."""
    y_true = np.asarray(y_true) > 0.5
    y_score = np.asarray(y_score, dtype=np.float64)
    out = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        out[c] = competition_ap(y_score[:, c], y_true[:, c], int(y_true[:, c].sum()))
    return out


def per_class_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """(C,) per-class ROC AUC; NaN for a class with only positives or only negatives."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true) > 0.5
    out = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        if 0 < y_true[:, c].sum() < len(y_true):
            out[c] = roc_auc_score(y_true[:, c], y_score[:, c])
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ---------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Raise ``NonFiniteLossError`` as soon as a batch loss is NaN/inf (before any checkpoint is
    written; Keras' ``TerminateOnNaN`` only stops, and the epoch-end callbacks would then save)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"training loss is {float(loss)} at epoch {self.epoch + 1}, step {batch + 1}: lower --lr, "
                "check the input data, or run without --mixed-precision"
            )


def _images_only(images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    return images


class ValidationAP(keras.callbacks.Callback):
    """At each epoch end, predict EVERY validation example and log per-class average precision
    (``validation_ap``: the competition's AP over cell crops, without masks).

    Adds ``val_map`` (mean AP over classes with a positive) and ``val_macro_auc`` (mean ROC AUC over
    classes with both kinds) to the epoch logs (callbacks after this one see them), appends a row to
    ``val_ap.csv`` and writes ``val_ap.json`` (latest epoch, per class) in ``out``.

    ``dataset`` yields ``(images, labels, weights)`` with the last batch padded (``make_dataset(...,
    training=False)``); ``labels`` (N, 19) are the true labels in the same order (``eval_labels``).
    """

    def __init__(self, dataset: tf.data.Dataset, labels: np.ndarray, out: str | None = None) -> None:
        super().__init__()
        self.dataset = dataset.map(_images_only)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.out = out
        self.last: dict[str, Any] | None = None

    def evaluate(self) -> dict[str, Any]:
        """Predict the validation set; returns ``{"val_map", "val_macro_auc", "ap" (19,), "auc" (19,)}``."""
        scores = np.asarray(self.model.predict(self.dataset, verbose=0), dtype=np.float32)
        n = len(self.labels)
        if len(scores) < n:
            raise RuntimeError(f"validation predicted {len(scores)} rows for {n} examples")
        scores = scores[:n]  # the rest is padding of the last batch
        ap = validation_ap(self.labels, scores)
        auc = per_class_auc(self.labels, scores)
        return {"val_map": _nanmean(ap), "val_macro_auc": _nanmean(auc), "ap": ap, "auc": auc, "scores": scores}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        result = self.evaluate()
        if logs is not None:
            logs["val_map"] = result["val_map"]
            logs["val_macro_auc"] = result["val_macro_auc"]
        per_class = {name: (None if not np.isfinite(v) else round(float(v), 6)) for name, v in zip(CLASS_NAMES, result["ap"])}
        self.last = {"epoch": epoch + 1, "val_map": result["val_map"], "val_macro_auc": result["val_macro_auc"],
                     "ap": per_class, "n_examples": len(self.labels),
                     "positives": {name: int(k) for name, k in zip(CLASS_NAMES, (self.labels > 0.5).sum(axis=0))}}
        log.info("epoch %d: val_map %.4f, val_macro_auc %.4f over %d examples", epoch + 1, result["val_map"],
                 result["val_macro_auc"], len(self.labels))
        if self.out:
            self._write(epoch + 1, result)

    def _write(self, epoch: int, result: dict[str, Any]) -> None:
        csv_path = fileutil.join(self.out, "val_ap.csv")
        header = ["epoch", "val_map", "val_macro_auc", *SHORT_NAMES]
        rows: list[list[str]] = []
        if fileutil.exists(csv_path):
            text = fileutil.read_text(csv_path)
            fileutil.raise_csv_field_size_limit()
            rows = [r for r in list(csv.reader(io.StringIO(text)))[1:] if r and int(r[0]) < epoch]  # drop re-done epochs
        rows.append([str(epoch), f"{result['val_map']:.6f}", f"{result['val_macro_auc']:.6f}",
                     *("" if not np.isfinite(v) else f"{v:.6f}" for v in result["ap"])])
        with fileutil.atomic_open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        fileutil.write_json(fileutil.join(self.out, "val_ap.json"), self.last, indent=2)


class EpochCheckpoint(keras.callbacks.Callback):
    """At each epoch end: ``last.keras`` (with optimizer state) + ``last.json``, then ``state.json``
    (the completed epoch count; written last, so it never points past a saved model); on improvement
    of ``monitor``, ``best.keras`` + ``best.json``; ``model.json`` = the best model's description
    (the last one's while nothing has been monitored). All writes are atomic (temp name + rename).

    ``describe(epoch, logs)`` gives the keyword arguments of ``hpa_tf.model.model_config`` (crop,
    channels, training details): every description is written by that one function.
    """

    def __init__(self, out: str, describe: Any, monitor: str | None, best: float | None = None,
                 extra_state: dict | None = None) -> None:
        super().__init__()
        self.out = out
        self.describe = describe  # (epoch, logs) -> model_config keyword arguments
        self.monitor = monitor
        self.mode = "min" if monitor and "loss" in monitor else "max"
        self.best = best
        self.extra_state = dict(extra_state or {})

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        details = self.describe(epoch + 1, logs)
        hpa_model.save_model(self.model, fileutil.join(self.out, LAST_NAME), **details)
        value = float(logs[self.monitor]) if self.monitor and self.monitor in logs else None
        improved = value is not None and self._improved(value)
        if improved:
            self.best = value
            hpa_model.save_model(self.model, fileutil.join(self.out, BEST_NAME), **details)
            log.info("epoch %d: %s improved to %.4f, saved %s", epoch + 1, self.monitor, value, BEST_NAME)
        if improved or self.best is None:
            hpa_model.write_config(fileutil.join(self.out, MODEL_JSON), hpa_model.model_config(self.model, **details))
        state = {**self.extra_state, "epoch": epoch + 1, "monitor": self.monitor, "best": self.best,
                 "logs": {k: _jsonable(v) for k, v in logs.items()}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        fileutil.write_json(fileutil.join(self.out, STATE_NAME), state, indent=2)


class EpochCSVLogger(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` with epochs counted from 1, as ``val_ap.csv``, ``state.json`` and the log
    lines count them (Keras' own counts from 0)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)


#: What the per-epoch figures mean (logged when a run starts).
METRICS_NOTE = ("per epoch: loss = focal loss; f1 = Keras macro F1 at threshold 0.5 over all 19 classes (a class "
                "absent from the data counts 0); val_map = mean per-class AP over the validation fold's classes, by "
                "the competition's definition; val_macro_auc = mean per-class ROC AUC over the classes with "
                "positives and negatives")


def _jsonable(value: Any) -> Any:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# pieces of train()
# ---------------------------------------------------------------------------------------------


def read_state(out: str) -> dict | None:
    """``state.json`` of a run folder (None when absent)."""
    path = fileutil.join(out, STATE_NAME)
    return fileutil.read_json(path) if fileutil.exists(path) else None


def make_schedule(lr: float, total_steps: int, warmup_steps: int, min_lr_fraction: float) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr × min_lr_fraction``."""
    warmup_steps = int(max(0, min(warmup_steps, total_steps - 1)))
    decay_steps = max(1, int(total_steps) - warmup_steps)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=min_lr_fraction)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps, alpha=min_lr_fraction, warmup_target=lr,
                                                  warmup_steps=warmup_steps)


def channel_normalization(backbone: str, channels: str) -> dict[str, Any]:
    """The backbone's per-channel input normalisation (``hpa_tf.model.default_normalization`` of the
    four RGBY planes) restricted to the selected channel letters, e.g. ``gy`` → green's and yellow's."""
    ref = "efficientnet_b0" if is_tiny(backbone) else backbone
    full = hpa_model.default_normalization(ref, 4)
    idx = hpa_data.channel_indices(channels)
    return {**full, "mean": [full["mean"][i] for i in idx], "std": [full["std"][i] for i in idx]}


def host_augmentation(config: TrainConfig) -> tuple[AugmentConfig | None, dict[str, Any] | None]:
    """(tf.data augmentation or None, on-device augment settings for the model or None) for ``config``.

    ``augment_on="device"``: the host keeps only the ``scale_augment`` crop and the model gets flips,
    90° rotations and ``brightness``/``contrast`` (seeded from ``config.seed``); ``"host"``: all in tf.data.
    """
    if config.augment_on not in ("device", "host"):
        raise ValueError(f"augment_on must be 'device' or 'host', got {config.augment_on!r}")
    if not config.augment:
        return None, None
    scale = tuple(config.scale_augment) if config.scale_augment else None
    if config.augment_on == "host":
        return AugmentConfig(brightness=config.brightness, contrast=config.contrast, scale=scale), None
    device = {"flip": True, "rotate90": True, "brightness": float(config.brightness),
              "contrast": float(config.contrast), "seed": int(config.seed)}
    host = AugmentConfig(flip=False, rotate90=False, brightness=0.0, contrast=0.0, scale=scale) if scale else None
    return host, device


def compile_model(model: keras.Model, config: TrainConfig, total_steps: int, warmup_steps: int,
                  jit_compile: bool | str = "auto") -> None:
    """Compile with AdamW + warm-up/cosine schedule, focal loss, weighted AUC and macro F1.

    ``jit_compile``: Keras' setting as ``hpa_tf.distribute.jit_compile_for`` resolves
    ``config.jit_compile`` for the strategy (True: the training step is one XLA program)."""
    schedule = make_schedule(config.lr, total_steps, warmup_steps, config.min_lr_fraction)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "adapt_mean", "adapt_variance"])
    loss = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=config.focal_alpha is not None,
        alpha=0.25 if config.focal_alpha is None else float(config.focal_alpha),
        gamma=float(config.focal_gamma), label_smoothing=float(config.label_smoothing),
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        # weighted: validation batches are padded to a static shape and the padding has weight 0.
        # No Keras AUC: its multi-label mean counts every class absent from the fold as 0 (about 0.05
        # on a small fold); ValidationAP's val_macro_auc averages the classes that have both kinds.
        weighted_metrics=[keras.metrics.F1Score(average="macro", threshold=0.5, name="f1")],
        steps_per_execution=int(config.steps_per_execution),
        jit_compile=jit_compile,
    )


def _model_description(config: TrainConfig, split: shardset.FoldSplit, policy: str, strategy_info: dict,
                       global_batch: int, steps_per_epoch: int) -> Any:
    """A function (epoch, logs) → keyword arguments of ``hpa_tf.model.model_config``: the crop spec the
    pipeline used (``split.crop``), the channel letters, and how the model was trained."""
    shard_set = {"folder": split.data_dir, "build_config": split.build_config}
    training = {
        "data": config.data if isinstance(config.data, str) else list(config.data),
        "train_folds": split.train_folds, "val_folds": split.val_folds, "n_train": split.n_train, "n_val": split.n_val,
        "epochs": config.epochs, "steps_per_epoch": steps_per_epoch, "batch_size_per_replica": config.batch_size,
        "global_batch": global_batch, "lr": config.lr, "warmup_epochs": config.warmup_epochs,
        "weight_decay": config.weight_decay, "weights": config.weights, "dropout": config.dropout,
        "focal_gamma": config.focal_gamma, "focal_alpha": config.focal_alpha, "balance": config.balance,
        "augment": config.augment, "augment_on": config.augment_on, "scale_augment": config.scale_augment,
        "seed": config.seed, "dtype_policy": policy, "task": split.crop.kind, **strategy_info,
    }

    def describe(epoch: int, logs: dict) -> dict:
        val = {k: _jsonable(v) for k, v in logs.items() if k.startswith("val_")}
        return {"crop": split.crop, "channels": config.channels.lower(), "shard_set": shard_set,
                "training": {**training, "epoch": epoch}, "val_metrics": val,
                "train_metrics": {k: _jsonable(v) for k, v in logs.items() if not k.startswith("val_")}}

    return describe


@contextlib.contextmanager
def _naming_damaged_shards(split: shardset.FoldSplit):
    """Turn TensorFlow's read error of a damaged shard (which names no file) into a DataError naming
    the shard: the split's shards are read once to find it (only after such an error)."""
    try:
        yield
    except tf.errors.DataLossError as e:
        log.error("a shard could not be read (%s); finding which", hpa_records.read_error_reason(e))
        damaged = shardset.find_damaged_shards([*split.train_shards, *split.val_shards])
        if not damaged:
            raise
        raise shardset.damaged_shard_error(split, damaged) from None


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Train a classifier on the shards of ``config.data``; see the module docstring. The shard set's
    crop spec kind is the task: ``cell`` crops (the cell model) or whole ``field``s (the image-level
    model, whose class activation maps ``hpa_tf.cam`` reads); the network, loss, strategies and
    files are the same for both.

    ``strategy`` overrides ``config.strategy``/``config.tpu``/``config.devices`` (tests pass a
    ``MirroredStrategy`` over logical CPUs). ``callbacks`` run after the built-in ones (so they see
    ``val_map`` and a saved epoch). Returns a ``TrainResult`` (the trained model in ``.model``).

    Raises
    ------
    hpa_tf.shardset.DataError : unusable input (no shards, empty fold, manifest mismatch, no build config,
        too few examples).
    NonFiniteLossError : the loss became NaN/inf.
    """
    out = str(config.out)
    # the run folder is made only once the inputs, the strategy and the model are known to be good:
    # a refused start leaves nothing behind
    check_backbone(config.backbone)
    hpa_data.channel_indices(config.channels)

    # ---- strategy (first: a TPU must be initialised before other TensorFlow work) ---------------
    if strategy is None:
        strategy = distribute.get_strategy(config.strategy, tpu=config.tpu, devices=config.devices)
    # settings the strategy cannot run are refused before anything is written
    jit_compile = distribute.jit_compile_for(strategy, config.jit_compile)
    distribute.check_steps_per_execution(strategy, config.steps_per_execution)
    keras.utils.set_random_seed(int(config.seed))
    policy = distribute.set_mixed_precision(strategy, config.mixed_precision)
    global_batch = distribute.global_batch_size(config.batch_size, strategy)
    info = distribute.describe(strategy)
    replicas = int(strategy.num_replicas_in_sync)

    # ---- input ---------------------------------------------------------------------------------
    split = shardset.split_folds(config.data, config.val_fold, manifest=config.manifest, train_folds=config.train_folds,
                                 sources=config.sources)
    task = split.crop.kind  # "cell" crops or whole "field"s: the same classifier, trained the same way
    if config.task is not None and config.task != task:
        raise shardset.DataError(f"{split.data_dir}: --task {config.task}, but the shard set holds {task} records "
                                 f"(its crop spec: {split.crop.to_dict()}); build {config.task} records with "
                                 f"python -m tfrecord_builder --kind {config.task}")
    if config.skip_corrupt_shards:
        split, _ = shardset.without_damaged_shards(split)
    source_weights = dict(config.source_weights or ())
    n_train, class_counts = split.n_train, split.class_counts
    if source_weights:  # training records of a source drawn W times on average: count them so
        if split.manifest is None:
            raise shardset.DataError(f"{split.data_dir}: --source-weights needs manifest.csv (the records' sources)")
        unknown = sorted(set(source_weights) - set(split.manifest.sources()))
        if unknown:
            raise shardset.DataError(f"{split.manifest.path}: no record of source(s) {unknown} "
                                     f"(sources present: {split.manifest.sources()})")
        weighted, class_counts = split.manifest.weighted_counts(split.train_folds, split.sources, source_weights)
        n_train = int(round(weighted))
        log.info("source weights %s: %d training records count as %d", source_weights, split.n_train, n_train)
    steps_per_epoch = int(config.steps_per_epoch or n_train // global_batch)
    if steps_per_epoch < 1:
        raise shardset.DataError(
            f"{split.data_dir}: {n_train} training examples make no full global batch of {global_batch} "
            f"({config.batch_size} per replica × {replicas} replicas): lower --batch-size or add data"
        )
    spe = int(config.steps_per_execution)
    if steps_per_epoch % spe:
        # Keras runs whole executions: an epoch of 5 steps at 2 per execution would run 6
        rounded = max(spe, steps_per_epoch - steps_per_epoch % spe)
        log.warning("%d steps per epoch is not a multiple of --steps-per-execution %d: %d steps per epoch",
                    steps_per_epoch, spe, rounded)
        steps_per_epoch = rounded
    balance = None
    if config.balance:
        if split.manifest is None:
            raise shardset.DataError(f"{split.data_dir}: --balance needs manifest.csv (class counts of the training folds)")
        balance = repeat_factors(class_counts, max(n_train, 1), config.balance_threshold)
        log.info("class balance: repeat factors %s", dict(zip(SHORT_NAMES, np.round(balance, 2).tolist())))
    augment, model_augment = host_augmentation(config)
    # the crops' size is the shard set's crop spec, the same object model.json records (describe below)
    inputs = hpa_data.InputConfig(crop_size=split.crop.size, image_size=config.image_size, batch_size=global_batch,
                                  channels=config.channels, augment=augment,
                                  balance=None if balance is None else tuple(balance.tolist()),
                                  sources=split.sources, source_weights=tuple(source_weights.items()),
                                  shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    train_ds = hpa_data.make_dataset(split.train_shards, inputs, training=True)
    if distribute.strategy_kind(strategy) == "tpu":
        problems = hpa_data.tpu_problems(train_ds)
        if problems:
            raise shardset.DataError(f"{split.data_dir}: the training input cannot feed a TPU: {'; '.join(problems)}")
    val_ds = val_labels = None
    if split.val_shards:
        val_ds = hpa_data.make_dataset(split.val_shards, inputs, training=False, n_examples=split.n_val)
        with _naming_damaged_shards(split):
            val_labels = hpa_data.eval_labels(split.val_shards, sources=split.sources)
        if len(val_labels) != split.n_val:
            raise shardset.DataError(f"{split.data_dir}: validation shards hold {len(val_labels)} records, "
                                     f"the manifest says {split.n_val}")
    val_steps = hpa_data.steps_for(split.n_val, global_batch, drop_remainder=False)
    log.info("strategy %s: %d replica(s) %s; dtype policy %s; jit_compile %s", info["strategy"], replicas,
             info["devices"], policy, jit_compile)
    log.info("global batch %d (%d per replica); %d training examples → %d steps/epoch; %d validation examples → "
             "%d steps; %d epochs; steps_per_execution %d", global_batch, config.batch_size, split.n_train,
             steps_per_epoch, split.n_val, val_steps, config.epochs, config.steps_per_execution)

    # ---- model ---------------------------------------------------------------------------------
    state = read_state(out) if config.resume else None
    last_path = fileutil.join(out, LAST_NAME)
    initial_epoch = 0
    if config.resume and state is not None and not fileutil.exists(last_path):
        raise FileNotFoundError(f"{out}: {STATE_NAME} exists but {LAST_NAME} does not; cannot resume")
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    channels = len(config.channels)
    with strategy.scope():
        model = build_classifier(config.backbone, config.image_size, channels,
                                 weights=None if state is not None else config.weights, dropout=config.dropout,
                                 normalization=channel_normalization(config.backbone, config.channels),
                                 augment=model_augment)
        compile_model(model, config, total_steps, warmup_steps, jit_compile)
        if state is not None:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(last_path)  # weights, optimizer slots and step count
            initial_epoch = int(state["epoch"])
            log.info("resumed from %s: %d epoch(s) done, optimizer step %d", last_path, initial_epoch,
                     int(model.optimizer.iterations.numpy()))
        elif config.resume:
            log.info("--resume: no %s in %s, starting from epoch 0", STATE_NAME, out)
    fileutil.makedirs(out)
    fileutil.write_json(fileutil.join(out, "train_config.json"),
                        json.loads(json.dumps(dataclasses.asdict(config), default=str)), indent=2)

    # ---- callbacks -----------------------------------------------------------------------------
    describe = _model_description(config, split, policy, {**info, "jit_compile": bool(model.jit_compile),
                                                          "steps_per_execution": int(config.steps_per_execution)},
                                  global_batch, steps_per_epoch)
    monitor = config.monitor if val_ds is not None else "loss"
    # order matters: the guard raises before anything is saved; ValidationAP adds val_map to the
    # logs that the checkpoint and the CSV logger then see
    callback_list: list[keras.callbacks.Callback] = [NonFiniteLossGuard()]
    ap_callback = None
    if val_ds is not None:
        ap_callback = ValidationAP(val_ds, val_labels, out)
        callback_list.append(ap_callback)
    checkpoint = EpochCheckpoint(out, describe, monitor, best=(state or {}).get("best"),
                                 extra_state={"global_batch": global_batch, "steps_per_epoch": steps_per_epoch})
    callback_list.append(checkpoint)
    callback_list.append(EpochCSVLogger(fileutil.join(out, "log.csv"), append=initial_epoch > 0))
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    elif config.tensorboard:
        callback_list.append(keras.callbacks.TensorBoard(fileutil.join(out, "tensorboard"), update_freq="epoch",
                                                         write_graph=False, profile_batch=0))
    callback_list.extend(callbacks)

    # ---- loop ----------------------------------------------------------------------------------
    log.info(METRICS_NOTE)
    history: dict[str, list[float]] = {}
    if initial_epoch >= config.epochs:
        log.info("%s: %d of %d epochs already done; nothing to train", out, initial_epoch, config.epochs)
    else:
        with _naming_damaged_shards(split):
            fit = model.fit(train_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                            steps_per_epoch=steps_per_epoch, validation_data=val_ds, callbacks=callback_list,
                            verbose=config.verbose, shuffle=False)
        history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    best_path = fileutil.join(out, BEST_NAME)
    return TrainResult(
        out=out, last_path=last_path, best_path=best_path if fileutil.exists(best_path) else None,
        initial_epoch=initial_epoch, epochs_completed=initial_epoch + len(history.get("loss", [])),
        history=history, replicas=replicas, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
        n_train=split.n_train, n_val=split.n_val, best_value=checkpoint.best, monitor=monitor,
        val_ap=(ap_callback.last or {}).get("ap") if ap_callback else None, model=model,
    )
