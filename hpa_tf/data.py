"""The training input pipeline: TFRecord shards of cell crops → batches of (image, multi-hot labels).

Shards (``hpa_tf.records`` schema, named ``fold{f}-{index:05d}-n{count}.tfrec``) are found by
``list_shards`` (a folder, a local or ``gs://`` glob, or a list of paths), split into training and
validation folds by their names (``split_folds``) and counted from the ``manifest.csv`` beside them
(``read_manifest``/``check_manifest``; the shards are never scanned to count). ``make_dataset``
turns shard paths into a ``tf.data.Dataset``:

training   files (shuffled) → interleave → [repeat-factor resampling] → shuffle → repeat → map
           (parse, decode, channels, augment, resize, float32 0..255) → batch(drop_remainder) → prefetch
           elements ``(images (B, S, S, C) float32, labels (B, 19) float32)``
evaluation files → interleave (deterministic) → map → batch → pad the last batch → prefetch
           elements ``(images, labels, weights (B,) float32)``: padded rows have weight 0, so that
           TPUs see static shapes and metrics ignore the padding (big_vision's pad-and-mask)

Pixels stay on the 0..255 scale: the model normalises its own input. Random augmentation uses
stateless ops seeded per example from ``tf.data.Dataset.random``, so a map function gives the
same result eagerly and inside ``tf.data`` for the same seed (tested), and every epoch differs.

Class balance (``balance=...``): repeat-factor sampling (LVIS, Gupta et al. 2019). A class of
frequency ``f_c`` (fraction of training examples holding it) gets ``r_c = max(1, sqrt(t / f_c))``;
an example is emitted ``r = max_c r_c`` times over its labels on average (stochastic rounding),
so Mitotic spindle, Aggresome and Negative cells come round more often and nothing is dropped.

Every problem with the input (no shards, a glob matching nothing, an empty fold, a manifest that
disagrees with the shard names) raises ``DataError`` naming the file and the reason.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from hpa_tf import fileutil
from hpa_tf.io import channel_indices as io_channel_indices
from hpa_tf.labels import NUM_CLASSES, LabelError, format_labels, parse_labels
from hpa_tf.records import CHANNELS, FEATURE_SPEC, decode_image, labels_to_multi_hot, parse_shard_name, shard_name

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
#: Channel letters in the order they are stored in a crop.
CHANNEL_ORDER: str = "rgby"
MANIFEST_NAME: str = "manifest.csv"
BUILD_CONFIG_NAME: str = "build_config.json"
MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "cell_id", "fold", "labels", "shard", "area")
#: Read buffer per open shard (bytes); large reads matter on GCS.
READ_BUFFER: int = 4 << 20


class DataError(ValueError):
    """The training data cannot be used as given (message names the file and the reason)."""


# ---------------------------------------------------------------------------------------------
# finding shards, manifest, folds
# ---------------------------------------------------------------------------------------------


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_shard(path: str) -> bool:
    try:
        parse_shard_name(path)
    except ValueError:
        return False
    return True


def _shard_key(path: str) -> tuple[int, int, str]:
    fold, index, _ = parse_shard_name(path)
    return fold, index, path


def list_shards(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (``folder/fold*.tfrec``), a local or ``gs://`` glob, a file, or a list of those.

    Files whose names are not shard names (temporary ``.tmp-…`` files, ``*.partial``) are ignored.
    Returned sorted by (fold, index).

    Raises
    ------
    DataError : an empty list, a glob or folder matching no shard, a path that does not exist.
    """
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise DataError("empty shard list: give a folder, a glob such as gs://bucket/shards/fold*.tfrec, or paths")
    found: list[str] = []
    for item in items:
        item = str(item)
        if _is_glob(item):
            matches = tf.io.gfile.glob(item)
            shards = [p for p in matches if _is_shard(p)]
            if not shards:
                extra = f" ({len(matches)} file(s) matched but none is named fold{{f}}-{{index}}-n{{count}}.tfrec)"
                raise DataError(f"{item}: glob matches no shard files" + (extra if matches else ""))
        elif tf.io.gfile.isdir(item):
            shards = [p for p in tf.io.gfile.glob(fileutil.join(item, "fold*.tfrec")) if _is_shard(p)]
            if not shards:
                raise DataError(f"{item}: folder holds no shard files fold{{f}}-{{index:05d}}-n{{count}}.tfrec")
        elif tf.io.gfile.exists(item):
            if not _is_shard(item):
                raise DataError(f"{item}: not a shard name of the form fold{{f}}-{{index:05d}}-n{{count}}.tfrec")
            shards = [item]
        else:
            raise DataError(f"{item}: no such file or folder")
        found.extend(shards)
    return sorted(set(found), key=_shard_key)


def _shard_dir(data: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """The folder that holds the shards (where manifest.csv and build_config.json are looked for)."""
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        return None
    first = str(items[0])
    if not _is_glob(first) and tf.io.gfile.isdir(first):
        return first.rstrip("/")
    head = posixpath.dirname(first) if fileutil.is_remote(first) else os.path.dirname(first)
    return head or "."


def find_manifest(data: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """``manifest.csv`` beside the shards of ``data`` (folder, glob or paths), or None if absent."""
    folder = _shard_dir(data)
    if folder is None:
        return None
    path = fileutil.join(folder, MANIFEST_NAME)
    return path if tf.io.gfile.exists(path) else None


def read_build_config(data: str | os.PathLike | Sequence[str | os.PathLike]) -> dict | None:
    """The builder's ``build_config.json`` beside the shards (crop size, encoding, masking…), or None."""
    folder = _shard_dir(data)
    if folder is None:
        return None
    path = fileutil.join(folder, BUILD_CONFIG_NAME)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class Manifest:
    """The rows of a ``manifest.csv``: one per example (cell), N rows.

    Attributes
    ----------
    path : where it was read from.
    image_id : (N,) str. cell_id, fold : (N,) int64. labels : (N, 19) uint8 multi-hot.
    shard : (N,) str, the shard's base name.
    """

    path: str
    image_id: np.ndarray
    cell_id: np.ndarray
    fold: np.ndarray
    labels: np.ndarray
    shard: np.ndarray

    def __len__(self) -> int:
        return len(self.fold)

    def shard_counts(self) -> dict[str, int]:
        """Rows per shard base name."""
        return dict(Counter(self.shard.tolist()))

    def class_counts(self, folds: Iterable[int] | None = None) -> np.ndarray:
        """(19,) int64: examples holding each class (in ``folds``; all folds when None)."""
        rows = self.labels if folds is None else self.labels[np.isin(self.fold, list(folds))]
        return rows.sum(axis=0, dtype=np.int64)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a ``manifest.csv`` (columns ``image_id,cell_id,fold,labels,shard,area``, more allowed).

    Raises
    ------
    DataError : the file is missing, lacks a column, or holds a malformed row (row number given).
    """
    path = str(path)
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path}: manifest not found")
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("image_id", "cell_id", "fold", "labels", "shard") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing} (has {reader.fieldnames})")
    image_ids, cell_ids, folds, shards = [], [], [], []
    labels: list[list[int]] = []
    for row_no, row in enumerate(reader, start=2):
        try:
            image_ids.append(row["image_id"])
            cell_ids.append(int(row["cell_id"]))
            folds.append(int(row["fold"]))
            text = (row["labels"] or "").strip()  # empty: an unlabelled cell
            labels.append(parse_labels(text, where=f"{path} line {row_no}") if text else [])
            shards.append(posixpath.basename(row["shard"].replace("\\", "/")))
        except (ValueError, TypeError, LabelError, AttributeError) as exc:
            raise DataError(f"{path} line {row_no}: malformed row ({exc})") from None
    hot = np.zeros((len(labels), NUM_CLASSES), np.uint8)
    for i, ids in enumerate(labels):
        hot[i, ids] = 1
    return Manifest(
        path=path,
        image_id=np.asarray(image_ids, dtype=object),
        cell_id=np.asarray(cell_ids, dtype=np.int64),
        fold=np.asarray(folds, dtype=np.int64),
        labels=hot,
        shard=np.asarray(shards, dtype=object),
    )


def check_manifest(shards: Sequence[str], manifest: Manifest, folds: Iterable[int] | None = None) -> None:
    """Check that the manifest agrees with the shard names: per shard, its rows = the count in its
    name and its rows' fold = the fold in its name; and that no manifest row of ``folds`` (all when
    None) points at a shard that is not in ``shards``.

    Raises
    ------
    DataError : listing the first disagreements.
    """
    counts = manifest.shard_counts()
    problems = []
    names = set()
    for path in shards:
        base = posixpath.basename(str(path).replace("\\", "/"))
        names.add(base)
        fold, _, count = parse_shard_name(base)
        rows = counts.get(base, 0)
        if rows != count:
            problems.append(f"{base}: {rows} manifest rows, {count} in its name")
            continue
        if rows:
            bad_fold = set(manifest.fold[manifest.shard == base].tolist()) - {fold}
            if bad_fold:
                problems.append(f"{base}: manifest rows say fold(s) {sorted(bad_fold)}, its name says {fold}")
    wanted = None if folds is None else set(int(f) for f in folds)
    orphans = Counter(
        s for s, f in zip(manifest.shard.tolist(), manifest.fold.tolist()) if s not in names and (wanted is None or f in wanted)
    )
    problems += [f"{s}: {n} manifest rows but no such shard file" for s, n in sorted(orphans.items())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{manifest.path}: manifest disagrees with the shards: {shown}")


def shard_folds(shards: Sequence[str]) -> dict[int, list[str]]:
    """Shard paths grouped by the fold in their names."""
    out: dict[int, list[str]] = {}
    for path in shards:
        out.setdefault(parse_shard_name(path)[0], []).append(path)
    return out


def select_shards(shards: Sequence[str], folds: Iterable[int]) -> list[str]:
    """The shards whose names say one of ``folds``."""
    wanted = {int(f) for f in folds}
    return [p for p in shards if parse_shard_name(p)[0] in wanted]


@dataclass(frozen=True)
class FoldSplit:
    """Training and validation shards of one cross-validation split, counted from the manifest."""

    train_shards: list[str]
    val_shards: list[str]
    train_folds: list[int]
    val_folds: list[int]
    n_train: int
    n_val: int
    class_counts: np.ndarray  # (19,) int64 over the training examples (zeros without a manifest)
    manifest: Manifest | None = None
    build_config: dict | None = None
    crop_size: int | None = None
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)


def split_folds(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    val_fold: int | None,
    manifest: str | os.PathLike | None = None,
    train_folds: Iterable[int] | None = None,
) -> FoldSplit:
    """Select training shards (``train_folds``, default every fold but ``val_fold``) and validation
    shards (``val_fold``; None: no validation) by their names, and count examples from the manifest
    (``manifest`` or ``manifest.csv`` beside the shards; without one, from the shard names, warned).

    Raises
    ------
    DataError : no shards, a fold with no examples, a manifest that disagrees with the shard names.
    """
    shards = list_shards(data)
    by_fold = shard_folds(shards)
    available = sorted(by_fold)
    val_folds = [] if val_fold is None else [int(val_fold)]
    if train_folds is None:
        tr_folds = [f for f in available if f not in val_folds]
    else:
        tr_folds = sorted({int(f) for f in train_folds})
    for f in tr_folds + val_folds:
        if f not in by_fold:
            raise DataError(f"{_shard_dir(data)}: fold {f} has no shards (folds present: {available})")
    if not tr_folds:
        raise DataError(f"{_shard_dir(data)}: no training folds left (folds present: {available}, validation {val_folds})")
    overlap = set(tr_folds) & set(val_folds)
    if overlap:
        raise DataError(f"folds {sorted(overlap)} are both training and validation folds")
    train_shards = select_shards(shards, tr_folds)
    val_shards = select_shards(shards, val_folds)
    manifest_path = str(manifest) if manifest is not None else find_manifest(data)
    table = None
    if manifest_path is None:
        log.warning("no %s beside %s: counting examples from the shard names", MANIFEST_NAME, _shard_dir(data))
        n_train = sum(parse_shard_name(p)[2] for p in train_shards)
        n_val = sum(parse_shard_name(p)[2] for p in val_shards)
        class_counts = np.zeros(NUM_CLASSES, np.int64)
    else:
        table = read_manifest(manifest_path)
        check_manifest(train_shards + val_shards, table, folds=tr_folds + val_folds)
        n_train = int(np.isin(table.fold, tr_folds).sum())
        n_val = int(np.isin(table.fold, val_folds).sum())
        class_counts = table.class_counts(tr_folds)
    for name, folds, n in (("training", tr_folds, n_train), ("validation", val_folds, n_val)):
        if folds and n == 0:
            raise DataError(f"{manifest_path or _shard_dir(data)}: {name} fold(s) {folds} hold no examples")
    build = read_build_config(data)
    crop = int(build["crop_size"]) if build and "crop_size" in build else None
    split = FoldSplit(
        train_shards=train_shards, val_shards=val_shards, train_folds=tr_folds, val_folds=val_folds,
        n_train=n_train, n_val=n_val, class_counts=class_counts, manifest=table, build_config=build,
        crop_size=crop, data_dir=_shard_dir(data),
    )
    log.info("folds: train %s (%d examples, %d shards), validation %s (%d examples, %d shards)",
             tr_folds, n_train, len(train_shards), val_folds, n_val, len(val_shards))
    return split


def peek_crop_size(shard: str) -> int:
    """The crop size S of the first record of a shard (reads one record)."""
    for record in tf.data.TFRecordDataset(shard).take(1):
        return int(tf.io.parse_single_example(record, {"crop_size": FEATURE_SPEC["crop_size"]})["crop_size"])
    raise DataError(f"{shard}: shard holds no records")


# ---------------------------------------------------------------------------------------------
# map functions (each works eagerly and inside tf.data.Dataset.map)
# ---------------------------------------------------------------------------------------------


def channel_indices(channels: str) -> list[int]:
    """Indices into the stored RGBY planes for a channel string such as ``rgby``, ``g``, ``rgb``, ``gy``
    (``hpa_tf.io.channel_indices``, the one letter → plane map shared with prediction).

    Raises
    ------
    DataError : an empty string, a letter outside r, g, b, y, or a repeated letter.
    """
    try:
        return io_channel_indices(str(channels))
    except ValueError as exc:
        raise DataError(str(exc)) from None


def select_channels(image: tf.Tensor, channels: str = CHANNEL_ORDER) -> tf.Tensor:
    """(S, S, 4) RGBY → (S, S, len(channels)) in the order of ``channels``."""
    idx = channel_indices(channels)
    if idx == list(range(CHANNELS)):
        return image
    return tf.gather(image, idx, axis=-1)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (all label-preserving for cell crops).

    flip : random left-right and up-down flips. rotate90 : a random multiple of 90°.
    brightness : per-channel offset drawn from ±brightness × 255. contrast : per-channel gain drawn
    from 1 ± contrast. scale : (lo, hi) side fraction of a random square sub-crop taken before the
    resize (None: whole crop), e.g. (0.8, 1.0).
    """

    flip: bool = True
    rotate90: bool = True
    brightness: float = 0.05
    contrast: float = 0.1
    scale: tuple[float, float] | None = None

    @property
    def active(self) -> bool:
        """True when any augmentation is on."""
        return bool(self.flip or self.rotate90 or self.brightness or self.contrast or self.scale is not None)


def _uniform(seed: tf.Tensor, n: int | tf.Tensor) -> tf.Tensor:
    """(n,) float32 uniform in [0, 1) from a (2,) integer seed (stateless: same seed, same values)."""
    return tf.random.stateless_uniform([n], tf.cast(seed, tf.int64))


def _scale_crop(image: tf.Tensor, u: tf.Tensor, scale: tuple[float, float]) -> tf.Tensor:
    """Square sub-crop of side ``scale[0] + u[0] × (scale[1] - scale[0])`` of the side, at offsets u[1], u[2]."""
    size = tf.shape(image)[0]
    frac = scale[0] + u[0] * (scale[1] - scale[0])
    side = tf.clip_by_value(tf.cast(tf.round(frac * tf.cast(size, tf.float32)), tf.int32), 1, size)
    room = tf.cast(size - side + 1, tf.float32)
    y0 = tf.minimum(tf.cast(u[1] * room, tf.int32), size - side)
    x0 = tf.minimum(tf.cast(u[2] * room, tf.int32), size - side)
    return image[y0:y0 + side, x0:x0 + side]


def random_scale_crop(image: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float]) -> tf.Tensor:
    """A random square sub-crop of side ``U(scale) × S`` of an (S, S, C) image (shape becomes dynamic)."""
    return _scale_crop(image, _uniform(seed, 3), scale)


#: The 8 symmetries of a square (dihedral group D4) on (H, W, C) arrays: index bit 0 flips left-right,
#: bit 1 flips up-down, bit 2 transposes first. 0-3: flips only; {0, 5, 3, 6}: the four rotations.
_D4_FLIPS = (0, 1, 2, 3)
_D4_ROTATIONS = (0, 5, 3, 6)


def _d4(image: tf.Tensor, index: int) -> tf.Tensor:
    if index & 4:
        image = tf.transpose(image, [1, 0, *range(2, image.shape.rank)])
    axes = [a for a, bit in ((1, 1), (0, 2)) if index & bit]
    return tf.reverse(image, axes) if axes else image


def _geometry(image: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    if config.flip and config.rotate90:
        choices = tuple(range(8))
    elif config.flip:
        choices = _D4_FLIPS
    elif config.rotate90:
        choices = _D4_ROTATIONS
    else:
        return image
    shape = image.shape
    packed = image.dtype == tf.uint8 and shape.rank == 3 and shape[-1] == 4
    work = tf.bitcast(image, tf.uint32) if packed else image
    k = tf.minimum(tf.cast(u * len(choices), tf.int32), len(choices) - 1)
    out = tf.switch_case(k, [lambda i=i: _d4(work, i) for i in choices])
    if packed:
        out = tf.bitcast(out, tf.uint8)
    return tf.ensure_shape(out, shape)


def augment_geometry(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Random flips and 90° rotations of a square (S, S, C) image (any dtype); shape kept.

    With both enabled, one of the 8 symmetries of the square, uniformly (= random left-right and
    up-down flips then a random multiple of 90°), applied as one transpose and/or one reverse.
    A (S, S, 4) uint8 crop is moved as (S, S) uint32 pixels (bitcast): 3-4x faster on CPU.
    """
    return _geometry(image, _uniform(seed, 1)[0], config)


def _intensity(image: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    if not config.brightness and not config.contrast:
        return image
    shape = tf.shape(image)
    u = tf.reshape(u, [2, -1]) * 2.0 - 1.0
    gain, offset = 1.0 + config.contrast * u[0], (config.brightness * 255.0) * u[1]
    # on (S, S·C) rows against the gains tiled S times: TensorFlow's CPU kernels broadcast a long
    # row far faster than a C-vector (3x here)
    rows = tf.reshape(image, [shape[0], -1])
    out = tf.clip_by_value(rows * tf.tile(gain, [shape[1]]) + tf.tile(offset, [shape[1]]), 0.0, 255.0)
    return tf.ensure_shape(tf.reshape(out, shape), image.shape)


def augment_intensity(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Per-channel gain (1 ± contrast) and offset (± brightness × 255) of an (S, S, C) float32 0..255
    image, clipped to 0..255."""
    c = image.shape[-1] if image.shape[-1] is not None else tf.shape(image)[-1]
    return _intensity(image, _uniform(seed, 2 * c), config)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """(h, w, C) or a batch (B, h, w, C), any dtype → (…, size, size, C) float32 on the input's
    value scale: bilinear, antialiased when shrinking (or when the input size is unknown); a cast
    only when the size already matches. Training and prediction both resize with this function.

    Enlarging skips the antialias kernel: the same values (to 1e-4) at half the cost.
    """
    h, w = image.shape[-3], image.shape[-2]
    if h == size and w == size:
        return tf.cast(image, tf.float32)
    enlarging = h is not None and w is not None and h <= size and w <= size
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=not enlarging)
    return tf.ensure_shape(out, [*image.shape[:-3], size, size, image.shape[-1]])


def preprocess(
    example: dict[str, tf.Tensor],
    image_size: int,
    channels: str = CHANNEL_ORDER,
    augment: AugmentConfig | None = None,
    seed: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """A parsed example (``hpa_tf.records.parse_example``) → ``(image, labels)``.

    ``image`` is (image_size, image_size, len(channels)) float32 on the 0..255 scale (the model
    normalises); ``labels`` (19,) float32 multi-hot. ``augment`` needs ``seed``, a (2,) integer
    tensor: the same seed gives the same result eagerly and inside ``tf.data``.
    """
    image = example["image"]
    if augment is not None:
        if seed is None:
            raise ValueError("augment needs a (2,) seed tensor")
        c = len(channel_indices(channels))
        u = _uniform(seed, 4 + 2 * c)  # one random draw per example: geometry, scale crop, intensity
        image = _geometry(image, u[0], augment)  # on the stored RGBY uint8 crop: the fast path
        if augment.scale is not None:
            image = _scale_crop(image, u[1:4], augment.scale)
    image = resize(select_channels(image, channels), image_size)
    if augment is not None:
        image = _intensity(image, u[4:], augment)
    return image, example["labels"]


# ---------------------------------------------------------------------------------------------
# class balance
# ---------------------------------------------------------------------------------------------


def repeat_factors(class_counts: Sequence[int] | np.ndarray, n_examples: int, threshold: float = 0.05) -> np.ndarray:
    """(19,) float32 per-class repeat factors ``max(1, sqrt(threshold / f_c))``, ``f_c = count_c / n``.

    Classes at or above ``threshold`` frequency get 1; a class at ``threshold / 25`` gets 5.
    Absent classes get 1.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (NUM_CLASSES,):
        raise ValueError(f"class_counts must be ({NUM_CLASSES},), got {counts.shape}")
    if n_examples <= 0:
        raise DataError("cannot balance classes over zero examples")
    freq = counts / float(n_examples)
    with np.errstate(divide="ignore"):
        r = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    return np.maximum(r, 1.0).astype(np.float32)


def example_repeat(labels: tf.Tensor, factors: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """How many copies of an example to emit: ``max`` of its classes' factors, stochastically rounded
    (expected value = the factor); int64 scalar. ``labels`` (19,) multi-hot; unlabelled → 1."""
    r = tf.maximum(tf.reduce_max(labels * factors), 1.0)
    base = tf.floor(r)
    extra = tf.cast(tf.random.stateless_uniform([], seed) < (r - base), tf.float32)
    return tf.cast(base + extra, tf.int64)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _records(shards: Sequence[str], training: bool, seed: int | None, cycle_length: int) -> tf.data.Dataset:
    """Serialized records of the shards, interleaved (shuffled files and free order when training)."""
    files = tf.data.Dataset.from_tensor_slices([str(s) for s in shards])
    if training:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)

    def read(path: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER)

    return files.interleave(
        read,
        cycle_length=max(1, min(cycle_length, len(shards))),
        num_parallel_calls=AUTOTUNE,
        deterministic=not training,
    )


_IMAGE_LABELS_SPEC = {k: FEATURE_SPEC[k] for k in ("image", "encoding", "labels")}


def parse_image_labels(serialized: tf.Tensor, crop_size: int | None = None) -> dict[str, tf.Tensor]:
    """The lean parse of the training pipeline: ``{"image": (S, S, 4) uint8 RGBY, "labels": (19,) float32}``
    (``hpa_tf.records`` decoding; no mask, no provenance: less work per example than ``parse_example``)."""
    parsed = tf.io.parse_single_example(serialized, _IMAGE_LABELS_SPEC)
    image = decode_image(tf.sparse.to_dense(parsed["image"]), parsed["encoding"], crop_size)
    return {"image": image, "labels": labels_to_multi_hot(tf.sparse.to_dense(parsed["labels"]))}


def _label_only(serialized: tf.Tensor) -> tf.Tensor:
    parsed = tf.io.parse_single_example(serialized, {"labels": FEATURE_SPEC["labels"]})
    return labels_to_multi_hot(tf.sparse.to_dense(parsed["labels"]))


def _pad_batch(batch_size: int):
    def pad(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        n = tf.shape(images)[0]
        extra = batch_size - n
        images = tf.pad(images, [[0, extra], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(labels, [[0, extra], [0, 0]])
        weights = tf.concat([tf.ones([n], tf.float32), tf.zeros([extra], tf.float32)], axis=0)
        return (
            tf.ensure_shape(images, [batch_size, *images.shape[1:]]),
            tf.ensure_shape(labels, [batch_size, NUM_CLASSES]),
            tf.ensure_shape(weights, [batch_size]),
        )

    return pad


def make_dataset(
    shards: Sequence[str],
    batch_size: int,
    image_size: int,
    channels: str = CHANNEL_ORDER,
    training: bool = True,
    augment: AugmentConfig | None = None,
    balance: Sequence[float] | np.ndarray | None = None,
    shuffle_buffer: int = 1024,
    seed: int | None = None,
    crop_size: int | None = None,
    repeat: bool | None = None,
    pad_last: bool = True,
    cycle_length: int = 16,
    n_examples: int | None = None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of cell crops from TFRecord shards.

    Parameters
    ----------
    shards : shard paths (``list_shards``/``split_folds``); local or ``gs://``.
    batch_size : GLOBAL batch size (``per_replica × replicas``).
    image_size : model input side S in pixels (crops are resized when they differ).
    channels : which planes, e.g. ``rgby`` (default), ``g``, ``rgb``.
    training : shuffle, repeat, augment, ``drop_remainder=True``, free element order. Otherwise one
        deterministic pass, no augmentation, and the last batch padded (``pad_last``).
    augment : training augmentation; default ``AugmentConfig()`` when training (pass
        ``AugmentConfig(flip=False, rotate90=False, brightness=0, contrast=0)`` for none).
    balance : (19,) per-class repeat factors (``repeat_factors``) for class-balanced sampling.
    shuffle_buffer : examples (still encoded: ~S² × 4 × 0.4 bytes each) in the shuffle buffer.
    seed : seeds file order, shuffling, augmentation and resampling (None: random).
    crop_size : S of the stored crops (static shapes); read from the first record when None.
    repeat : repeat forever (default: ``training``).
    pad_last : evaluation only; pad the last batch to ``batch_size`` and yield ``(images, labels,
        weights)`` with weight 0 on padding; False: ``(images, labels)`` with a short last batch.
    n_examples : evaluation only; the example count (manifest), asserted as the batch count.

    Returns
    -------
    tf.data.Dataset of ``(images (B, S, S, C) float32 0..255, labels (B, 19) float32)`` when
    training, ``(images, labels, weights (B,))`` for evaluation with ``pad_last``.

    Raises
    ------
    DataError : no shards, bad channels, a balance vector of the wrong shape.
    """
    shards = [str(s) for s in shards]
    if not shards:
        raise DataError("empty shard list: nothing to read")
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    channel_indices(channels)  # validate early
    if crop_size is None:
        crop_size = peek_crop_size(shards[0])
    repeat = training if repeat is None else repeat
    if training and augment is None:
        augment = AugmentConfig()
    if not training or (augment is not None and not augment.active):
        augment = None  # nothing random per example: the plain decode/resize map, no per-example draws
    rng = np.random.default_rng(seed)

    def new_seed() -> int:
        return int(rng.integers(0, 2**31 - 1))

    # Order (why): interleave the files first (parallel reads); resample for balance BEFORE the
    # shuffle so that copies of one example spread over many batches; shuffle the still-encoded
    # records (4-10x smaller than decoded crops, so the buffer holds more examples); repeat after
    # the shuffle so that epochs do not blend (each pass reshuffles files and buffer); map
    # (parse, decode, augment, resize) in parallel after the repeat so the work never stalls at an
    # epoch boundary; batch with drop_remainder for static shapes (TPU); prefetch last to overlap
    # input with the training step.
    ds = _records(shards, training, new_seed() if seed is not None else None, cycle_length)
    if balance is not None:
        factors = np.asarray(balance, dtype=np.float32)
        if factors.shape != (NUM_CLASSES,):
            raise DataError(f"balance needs ({NUM_CLASSES},) per-class repeat factors, got {factors.shape}")
        factors_t = tf.constant(factors)
        draws = tf.data.Dataset.random(seed=new_seed(), rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws)

        def copies(serialized: tf.Tensor, draw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            seed_ = tf.stack([draw, tf.constant(7, tf.int64)])
            return serialized, example_repeat(_label_only(serialized), factors_t, seed_)

        def emit(serialized: tf.Tensor, count: tf.Tensor) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensors(serialized).repeat(count)

        ds = ds.map(copies, num_parallel_calls=AUTOTUNE, deterministic=not training).flat_map(emit)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=new_seed() if seed is not None else None, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return parse_image_labels(serialized, crop_size)

    def train_map(serialized: tf.Tensor, draw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess(parse(serialized), image_size, channels, augment, tf.stack([draw, tf.constant(11, tf.int64)]))

    def eval_map(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess(parse(serialized), image_size, channels)

    if augment is not None:
        draws = tf.data.Dataset.random(seed=new_seed(), rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws).map(train_map, num_parallel_calls=AUTOTUNE, deterministic=not training)
    else:
        ds = ds.map(eval_map, num_parallel_calls=AUTOTUNE, deterministic=not training)
    if training:
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        ds = ds.batch(batch_size, drop_remainder=False)
        if pad_last:
            ds = ds.map(_pad_batch(batch_size))
        if n_examples is not None:  # known from the manifest: lets Keras see the end without a warning
            ds = ds.apply(tf.data.experimental.assert_cardinality(steps_for(n_examples, batch_size, drop_remainder=False)))
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = not training
    return ds.with_options(options)


def eval_labels(shards: Sequence[str], cycle_length: int = 16) -> np.ndarray:
    """(N, 19) float32 labels of every example, in the order ``make_dataset(..., training=False)`` yields
    them (the same deterministic interleave; images are not decoded)."""
    ds = _records([str(s) for s in shards], False, None, cycle_length).map(_label_only, num_parallel_calls=AUTOTUNE)
    chunks = [b.numpy() for b in ds.batch(8192)]
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, NUM_CLASSES), np.float32)


# ---------------------------------------------------------------------------------------------
# small synthetic shard sets (tests, benchmarks, demos)
# ---------------------------------------------------------------------------------------------


def write_synthetic_shards(
    out: str | os.PathLike,
    n_fields: int = 8,
    field_size: int = 384,
    crop_size: int = 64,
    n_folds: int = 4,
    seed: int = 0,
    per_shard: int = 256,
    encoding: str = "png",
    mask_neighbors: bool = False,
    weights: str | Sequence[float] = "default",
    field_labels: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Write a small shard set from ``hpa_tf.synthetic`` fields, as the TFRecord builder would lay it out.

    Fields are cropped with the true cell masks (``hpa_tf.crops.cell_crops``); field ``i`` goes to
    fold ``i % n_folds``; shards ``fold{f}-{index:05d}-n{count}.tfrec`` of at most ``per_shard``
    records, ``manifest.csv`` (``image_id,cell_id,fold,labels,shard,area``) and ``build_config.json``.
    ``field_labels`` optionally fixes each field's classes (cycled).

    Returns
    -------
    dict with ``shards`` (paths), ``manifest`` (path), ``n_examples``, ``folds`` (examples per fold).
    """
    from hpa_tf.crops import cell_crops  # lazy: only this helper needs them
    from hpa_tf.records import encode_example, write_shard
    from hpa_tf.synthetic import generate_field

    out = str(out)
    fileutil.makedirs(out)
    per_fold: dict[int, list[tuple[bytes, dict]]] = {f: [] for f in range(n_folds)}
    for i in range(n_fields):
        labels = None if field_labels is None else field_labels[i % len(field_labels)]
        fld = generate_field(seed * 100_003 + i, size=field_size, labels=labels, weights=weights)
        crops = cell_crops(fld.image, fld.cells, size=crop_size, mask_neighbors=mask_neighbors)
        fold = i % n_folds
        image_id = f"synth-{seed}-{i:04d}"
        for k, cid in enumerate(crops.cell_ids):
            cell_labels = fld.cell_labels[int(cid)]
            example = encode_example(
                crops.crops[k], crops.masks[k], cell_labels, image_id=image_id, cell_id=int(cid),
                bbox=crops.bboxes[k], image_size=fld.image.shape[:2], fold=fold, source="synthetic", encoding=encoding,
            )
            row = {"image_id": image_id, "cell_id": int(cid), "fold": fold, "labels": format_labels(cell_labels),
                   "area": int(crops.areas[k])}
            per_fold[fold].append((example, row))
    paths, rows = [], []
    for fold, items in per_fold.items():
        for index, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start:start + per_shard]
            name = shard_name(fold, index, len(chunk))
            path = fileutil.join(out, name)
            write_shard(path, (ex for ex, _ in chunk))
            paths.append(path)
            rows += [{**row, "shard": name} for _, row in chunk]
    with fileutil.atomic_open(fileutil.join(out, MANIFEST_NAME), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    config = {"crop_size": crop_size, "encoding": encoding, "mask_neighbors": mask_neighbors,
              "margin": None, "source": "synthetic", "n_folds": n_folds}
    with fileutil.atomic_open(fileutil.join(out, BUILD_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return {
        "shards": paths,
        "manifest": fileutil.join(out, MANIFEST_NAME),
        "n_examples": len(rows),
        "folds": {f: len(items) for f, items in per_fold.items()},
    }


def steps_for(n_examples: int, global_batch: int, drop_remainder: bool = True) -> int:
    """Batches in one pass over ``n_examples``: floor (training) or ceil (evaluation, padded)."""
    if drop_remainder:
        return n_examples // global_batch
    return math.ceil(n_examples / global_batch)
