"""The settings of the programs as data: one dataclass per program, one default and one help text per
setting, the command lines derived from them (``hpa_tf.settings``). Light to import (no TensorFlow),
so that ``--help`` and argument errors come at once.

``AugmentConfig``  training augmentation (``hpa_tf.augment``, ``hpa_tf.data``); ``AugmentConfig()``
                   is the one place of the augmentation defaults
``TrainConfig``    a training run (``hpa_tf.train.train``, ``train_tpu.py`` / ``hpa-tf-train``)
``PredictConfig``  a prediction run (``hpa_tf.predict.run``, ``predict.py`` / ``hpa-tf-predict``)

What defines a crop is not a setting of either program: it travels with the data
(``hpa_tf.crops.CropSpec``, in the shard set's ``build_config.json`` and in ``model.json``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from hpa_tf.settings import setting


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings; ``AugmentConfig()`` holds the project's defaults.

    flip : random left-right and up-down flips. rotate90 : a random multiple of 90°.
    brightness : per-channel offset drawn from ±brightness × 255, in [0, 1). contrast : per-channel
    gain drawn from 1 ± contrast, in [0, 1). scale : (lo, hi) side fraction of a random square
    sub-crop taken before the resize (None: whole crop), e.g. (0.8, 1.0); host only.
    """

    flip: bool = True
    rotate90: bool = True
    brightness: float = 0.05
    contrast: float = 0.1
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for key in ("brightness", "contrast"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"augment {key} must be in [0, 1), got {value!r}")
        if self.scale is not None:
            lo, hi = self.scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"augment scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale!r}")
            object.__setattr__(self, "scale", (float(lo), float(hi)))

    @property
    def active(self) -> bool:
        """True when any augmentation is on."""
        return bool(self.flip or self.rotate90 or self.brightness or self.contrast or self.scale is not None)


#: The augmentation defaults, as one object (``TrainConfig`` and ``RandomAugment`` read theirs from here).
DEFAULT_AUGMENT = AugmentConfig()


def parse_fold(text: str) -> int | None:
    """A fold number from the command line; ``none`` (or -1, or empty) means no validation fold."""
    return None if text.strip().lower() in ("none", "-1", "") else int(text)


def parse_weights(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``a,b,c`` (or three numbers) → three non-negative floats, not all 0: the fusion weights of the
    cell model, field image and CAM scores (ValueError otherwise)."""
    parts = [p.strip() for p in str(text).split(",")] if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"fusion weights must be three numbers a,b,c, got {text!r}") from None
    if len(values) != 3 or any(not v >= 0 for v in values) or not any(v > 0 for v in values):
        raise ValueError(f"fusion weights must be three numbers a,b,c >= 0, not all 0, got {text!r}")
    return values  # type: ignore[return-value]

def parse_sources(text: str) -> tuple[str, ...]:
    """Source names from one command-line word: ``train,hpa-public`` → ``("train", "hpa-public")``
    (``argparse.ArgumentTypeError`` when empty)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no source name in {text!r}")
    return names


def parse_source_weights(text: str) -> tuple[tuple[str, float], ...]:
    """``NAME=W[,NAME=W…]`` from one command-line word → ``(("hpa-public", 0.5), …)`` (W finite, >= 0)."""
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, eq, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not eq or not name.strip() or not (weight >= 0.0 and weight != float("inf")):
            raise argparse.ArgumentTypeError(f"{item!r}: expected SOURCE=WEIGHT with a weight >= 0, e.g. hpa-public=0.5")
        pairs.append((name.strip(), weight))
    if not pairs:
        raise argparse.ArgumentTypeError(f"no SOURCE=WEIGHT in {text!r}")
    return tuple(pairs)


def _flatten(groups: Sequence[Sequence]) -> tuple:
    """One tuple from the per-word tuples of a ``nargs="+"`` flag (later entries win for weights)."""
    return tuple(item for group in groups for item in group)


def _one_or_many(paths: Sequence[str]) -> str | Sequence[str]:
    return paths[0] if len(paths) == 1 else list(paths)


@dataclass
class TrainConfig:
    """Everything that defines a training run: the one table of the settings, their defaults and their
    help; ``train_tpu.py``'s flags are derived from it (``hpa_tf.settings``). Used by ``hpa_tf.train.train``.

    Sizes are in pixels; ``batch_size`` is PER REPLICA; ``lr`` is the peak learning rate reached
    after ``warmup_epochs`` and decayed by a cosine to ``lr × min_lr_fraction`` at the last step.
    ``augment_on``: ``"device"`` runs flips/rotations/intensity jitter inside the training step
    (``hpa_tf.augment.RandomAugment`` after the model input; the host only decodes, resizes and
    batches, plus the ``scale_augment`` crop, which changes sizes); ``"host"`` runs them in tf.data.
    The crop spec is not a setting: it comes with the shards (``build_config.json``).
    """

    data: str | Sequence[str] = setting(
        help="shard folder, glob (gs://bucket/shards/fold*.tfrec) or shard paths", group="data", nargs="+",
        convert=_one_or_many)
    out: str = setting(help="run folder (local or gs://) for checkpoints and logs", group="output")
    manifest: str | None = setting(None, help="manifest.csv", group="data", default_text="beside the shards")
    task: str | None = setting(
        None, choices=("cell", "field"), group="data", default_text="the shard set's record kind",
        help="what the model classifies: 'cell' crops or whole 'field's (image-level model, class activation "
             "maps); must match the shard set's crop spec kind (build_config.json)")
    val_fold: int | None = setting(0, help="held-out fold ('none': train on all folds)", group="data", type=parse_fold)
    train_folds: Sequence[int] | None = setting(None, help="training folds", group="data",
                                                default_text="all but --val-fold")
    channels: str = setting("rgby", help="input planes, letters of rgby (e.g. rgby, rgb, g)", group="data")
    sources: Sequence[str] | None = setting(
        None, help="train and validate on the records of these sources only (the records' 'source': train for "
        "the competition's fields, hpa-public for downloaded ones), e.g. train,hpa-public", group="data",
        type=parse_sources, convert=_flatten, metavar="SOURCE[,SOURCE]", default_text="all")
    source_weights: Sequence[tuple[str, float]] | None = setting(
        None, help="draw the training records of a source W times on average, e.g. hpa-public=0.5 (0 leaves them "
        "out of training; sources not named: 1); steps per epoch and class balance count the weighted records",
        group="data", type=parse_source_weights, convert=_flatten, metavar="SOURCE=W[,SOURCE=W]",
        default_text="1 for every source")
    balance: bool = setting(False, help="oversample rare classes (repeat-factor sampling)", group="data")
    balance_threshold: float = setting(
        0.05, help="classes rarer than this fraction of examples are repeated sqrt(threshold/freq) times",
        group="data")
    augment: bool = setting(True, help="flips/rotations/intensity jitter", group="augmentation")
    augment_on: str = setting("device", choices=("device", "host"), group="augmentation",
                              help="where flips/rotations/intensity jitter run: 'device' = inside the training step "
                                   "on the accelerator, 'host' = in tf.data on the CPU")
    scale_augment: tuple[float, float] | None = setting(
        None, metavar=("LO", "HI"), group="augmentation",
        help="random square sub-crop of LO..HI of the crop side before resizing, e.g. 0.8 1.0")
    brightness: float = setting(DEFAULT_AUGMENT.brightness, group="augmentation",
                                help="per-channel offset drawn from ±brightness × 255")
    contrast: float = setting(DEFAULT_AUGMENT.contrast, group="augmentation",
                              help="per-channel gain drawn from 1 ± contrast")
    shuffle_buffer: int = setting(1024, help="examples in the shuffle buffer", group="data")
    skip_corrupt_shards: bool = setting(
        False, group="data",
        help="read every shard first and train without the corrupt or truncated ones, counted in the log "
             "(off: a damaged shard stops the run with its name)")
    backbone: str = setting("efficientnet_b0", group="model",
                            help="efficientnet_b0..b7, efficientnet_v2_b0..b3/s/m/l, or tiny_cnn (small, for CPU runs)")
    image_size: int = setting(256, help="model input side in pixels (crops are resized to it)", group="model")
    weights: str | None = setting(None, help="'imagenet' or a weights file of the backbone", group="model",
                                  default_text="random init")
    dropout: float = setting(0.2, help="dropout rate before the classifier", group="model")
    batch_size: int = setting(32, help="PER REPLICA; global = this × replicas", group="optimisation")
    epochs: int = setting(10, help="epochs (passes of steps-per-epoch steps)", group="optimisation")
    steps_per_epoch: int | None = setting(None, help="training steps per epoch", group="optimisation",
                                          default_text="training examples // global batch")
    lr: float = setting(1e-3, help="peak learning rate (after warm-up)", group="optimisation")
    warmup_epochs: float = setting(1.0, help="linear warm-up length, then cosine decay", group="optimisation")
    min_lr_fraction: float = setting(0.01, help="final lr = lr × this", group="optimisation")
    weight_decay: float = setting(1e-5, help="AdamW decoupled weight decay", group="optimisation")
    focal_gamma: float = setting(2.0, help="focal loss gamma (0 = binary cross-entropy)", group="optimisation")
    focal_alpha: float | None = setting(None, help="focal alpha for positives (enables class balancing)",
                                        group="optimisation", default_text="off")
    label_smoothing: float = setting(0.0, help="label smoothing of the focal loss", group="optimisation")
    seed: int = setting(0, help="seed of weights, data order and augmentation", group="optimisation")
    monitor: str = setting("val_map", help="metric that picks best.keras (val_map, val_macro_auc, val_loss…)",
                           group="optimisation")
    strategy: str = setting("auto", choices=("auto", "tpu", "gpu", "cpu"), group="hardware",
                            help="where to train: auto = TPU if present, else GPUs, else CPU")
    tpu: str | None = setting(None, help="TPU name or address ('local' on Kaggle/Colab TPU VMs)", group="hardware")
    devices: Sequence[str] | None = setting(None, help="devices of a MirroredStrategy, e.g. /gpu:0 /gpu:1",
                                            group="hardware", default_text="all of the strategy's kind")
    mixed_precision: str = setting(
        "float32", nargs="?", const="auto", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"),
        group="hardware", help="dtype policy; the bare flag means auto = bfloat16 on TPU, float16 on GPU")
    steps_per_execution: int = setting(1, help="training steps per host call (TPU: 32+; must be 1 with several GPUs)",
                                       group="hardware")
    jit_compile: str = setting("auto", choices=("auto", "on", "off"), group="hardware",
                               help="XLA for the training step on one GPU/CPU (auto: on a GPU); off with several "
                                    "GPUs; a TPU always compiles with XLA, whatever this says")
    resume: bool = setting(False, help="continue from OUT/last.keras + state.json if present", group="output")
    tensorboard: bool = setting(True, help="TensorBoard logs under OUT/tensorboard", group="output")
    verbose: int = setting(2, choices=(0, 1, 2), help="Keras: 0 silent, 1 bar, 2 a line/epoch", group="output")


@dataclass
class PredictConfig:
    """Everything that defines a prediction run (the cache is keyed on it); ``predict.py``'s flags are
    derived from it (``hpa_tf.settings``). The crop spec of each model comes from its ``model.json``."""

    test_dir: str = setting(help="folder of {ID}_{red,green,blue,yellow} files")
    models: Sequence[str] | None = setting(None, help="one or more cell models (.keras, their model.json beside)",
                                           flag="--model", metavar="MODEL", default_text="none")
    field_models: Sequence[str] | None = setting(
        None, flag="--field-model", metavar="MODEL", default_text="none",
        help="one or more image-level (field) models: their image probabilities and class activation maps "
             "score every cell (give --model, --field-model or both)")
    fusion: str | None = setting(
        None, choices=("mean", "product"), default_text="mean with a cell model, product with only a field model",
        help="how the components (cell model prob, field image prob, CAM score) combine per cell and class: "
             "'mean' = weighted mean; 'product' = image^b × weighted mean of cell and CAM")
    fusion_weights: tuple[float, float, float] | str = setting(
        (1.0, 1.0, 1.0), type=parse_weights, metavar="A,B,C", default_text="1,1,1",
        help="weights a (cell model), b (field image prob), c (CAM) of --fusion; absent components are left out")
    component_scores: bool = setting(
        False, help="also write OUT's stem + .components.json: every cell's score from each component")
    out: str = setting("submission.csv", help="submission CSV to write")
    ids: Sequence[str] | None = setting(None, help="IDs to predict", exclusive="which",
                                        default_text="every field in --test-dir")
    sample_submission: str | None = setting(None, help="CSV whose IDs (and order) to predict", exclusive="which")
    segmenter: str = setting("builtin", choices=("builtin", "hpacellseg"), help="segmentation backend")
    nuclei_model: str | None = setting(None, help="hpacellseg nuclei model file (local path)")
    cell_model: str | None = setting(None, help="hpacellseg cell model file (local path)")
    device: str = setting("auto", help="hpacellseg device: auto (the GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
    masks_dir: str | None = setting(None, help="reuse saved {ID}_cells.png masks found here")
    batch_size: int = setting(32, help="crops per model call")
    tta: bool = setting(False, help="average over flips (4 views)")
    image_weight: float = setting(0.3, help="without --field-model: weight of the field's highest cell score fused "
                                            "into each cell's score (0 = off)")
    cache_dir: str | None = setting(None, help="where finished fields are kept", default_text="OUT.cache")
    progress: bool = setting(True, help="progress bar")
