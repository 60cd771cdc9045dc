"""The shard set: the folder of TFRecord shards that the builder writes and training reads.

This module owns its layout (file names, manifest schema, build config, folds file) and every read
and write of those files; the builder (``tfrecord_builder``) and the input pipeline
(``hpa_tf.data``) both go through it. ``folder`` may be local or any ``tf.io.gfile`` path
(``gs://…``)::

    folder/build_config.json   BUILD_CONFIG: the arguments that define the content; "crop" is the
                               CropSpec (hpa_tf.crops) of every record, "run" is run info
    folder/folds.csv           FOLDS_FILE: ID,fold for every image of the label file
    folder/fold{f}-{index:05d}-n{count}.tfrec   the shards (shard_name / parse_shard_name)
    folder/manifest.csv        MANIFEST: one row per record (MANIFEST_COLUMNS), in shard and record order
    folder/skipped.csv         SKIPPED: fields that gave no record (SKIPPED_COLUMNS)
    folder/summary.json        SUMMARY: counts per class and fold; written last, so its presence
                               means the build is complete
    folder/parts/              PARTS_DIR: the builder's per-shard sidecars (resume)

Where the crop spec lives: in ``build_config.json`` (key ``crop``, ``CropSpec.to_dict()``), once
per shard set. A shard set is made with one spec (a resumed build with another is refused), so
one copy describes every record; the records keep only ``crop_size``, which the parser needs for
static shapes and ``verify`` checks against the spec. Repeating margin and masking in every
record would cost bytes and parse work and have no reader. Training reads the spec with
``read_crop_spec`` (a shard set without it is refused) and copies it into ``model.json``.

Every problem with a shard set as input (no shards, a glob matching nothing, an empty fold, a
manifest that disagrees with the shard names, a missing build config) raises ``DataError`` naming
the file and the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hpa_tf import fileutil
from hpa_tf.crops import CropSpec, CropSpecError
from hpa_tf.labels import NUM_CLASSES, LabelError, parse_labels

log = logging.getLogger(__name__)

BUILD_CONFIG: str = "build_config.json"
MANIFEST: str = "manifest.csv"
SKIPPED: str = "skipped.csv"
SUMMARY: str = "summary.json"
FOLDS_FILE: str = "folds.csv"
PARTS_DIR: str = "parts"

#: Columns of ``manifest.csv``, one row per record. ``labels`` is ``0|5|16`` (empty: unlabelled),
#: ``shard`` the shard's file name, ``record`` the index within it, ``area`` the cell's pixels,
#: ``x0, y0, x1, y1`` the tight cell box (x1, y1 exclusive) and ``height, width`` the field size,
#: all in original pixels; ``source`` as in the records.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "cell_id", "fold", "labels", "shard", "record", "area",
    "x0", "y0", "x1", "y1", "height", "width", "source",
)
#: Columns of ``skipped.csv``: the field, why it gave no record, and the kind of reason.
SKIPPED_COLUMNS: tuple[str, ...] = ("image_id", "reason", "kind")

_SHARD_RE = re.compile(r"^fold(-?\d+)-(\d{5,})-n(\d+)\.tfrec$")
_SHARD_FORM = "fold{f}-{index:05d}-n{count}.tfrec"


class DataError(ValueError):
    """The training data cannot be used as given (message names the file and the reason)."""


# ---------------------------------------------------------------------------------------------
# shard names
# ---------------------------------------------------------------------------------------------


def shard_name(fold: int, index: int, count: int) -> str:
    """``fold{fold}-{index:05d}-n{count}.tfrec``: the record count travels in the name."""
    if index < 0 or count < 0:
        raise ValueError(f"shard index and count must be >= 0, got {index}, {count}")
    return f"fold{int(fold)}-{int(index):05d}-n{int(count)}.tfrec"


def parse_shard_name(name: str | os.PathLike) -> tuple[int, int, int]:
    """``(fold, index, count)`` from a shard file name or path; ValueError if it is not one."""
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    match = _SHARD_RE.match(base)
    if not match:
        raise ValueError(f"{name}: not a shard name of the form {_SHARD_FORM}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def is_shard_name(name: str | os.PathLike) -> bool:
    """True for a finished shard's name (temporary ``.tmp-…`` and ``*.partial`` files are not)."""
    try:
        parse_shard_name(name)
    except ValueError:
        return False
    return True


def _base(path: str | os.PathLike) -> str:
    return posixpath.basename(str(path).replace("\\", "/"))


# ---------------------------------------------------------------------------------------------
# finding shards
# ---------------------------------------------------------------------------------------------


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _shard_key(path: str) -> tuple[int, int, str]:
    fold, index, _ = parse_shard_name(path)
    return fold, index, path


def list_shards(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder, a local or ``gs://`` glob, a file, or a list of those, sorted by
    (fold, index). Files whose names are not shard names are ignored.

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
            matches = fileutil.glob(item)
            shards = [p for p in matches if is_shard_name(p)]
            if not shards:
                extra = f" ({len(matches)} file(s) matched but none is named {_SHARD_FORM})"
                raise DataError(f"{item}: glob matches no shard files" + (extra if matches else ""))
        elif fileutil.isdir(item):
            shards = [fileutil.join(item, n) for n in fileutil.listdir(item) if is_shard_name(n)]
            if not shards:
                raise DataError(f"{item}: folder holds no shard files {_SHARD_FORM}")
        elif fileutil.exists(item):
            if not is_shard_name(item):
                raise DataError(f"{item}: not a shard name of the form {_SHARD_FORM}")
            shards = [item]
        else:
            raise DataError(f"{item}: no such file or folder")
        found.extend(shards)
    return sorted(set(found), key=_shard_key)


def shard_dir(data: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """The folder of a shard set given as a folder, a glob or shard paths (the first one's)."""
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        return None
    first = str(items[0])
    if not _is_glob(first) and fileutil.isdir(first):
        return first.rstrip("/")
    head = posixpath.dirname(first) if fileutil.is_remote(first) else os.path.dirname(first)
    return head or "."


def _parent(path: str) -> str:
    head = posixpath.dirname(path) if fileutil.is_remote(path) else os.path.dirname(path)
    return head or "."


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


# ---------------------------------------------------------------------------------------------
# build config and crop spec
# ---------------------------------------------------------------------------------------------


def write_build_config(folder: str, config: Mapping) -> str:
    """Write ``folder/build_config.json`` atomically; returns its path."""
    path = fileutil.join(folder, BUILD_CONFIG)
    fileutil.write_json(path, dict(config))
    return path


def read_build_config(folder: str) -> dict:
    """``folder/build_config.json`` as a dict.

    Raises
    ------
    DataError : missing, unreadable, not JSON, or not a JSON object.
    """
    path = fileutil.join(folder, BUILD_CONFIG)
    if not fileutil.exists(path):
        raise DataError(f"{folder}: no {BUILD_CONFIG} (the shard set's crop spec and encoding); "
                        "shard sets are made by python -m tfrecord_builder")
    try:
        config = fileutil.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: not a JSON object")
    return config


def crop_spec_of(config: Mapping, where: str) -> CropSpec:
    """The ``crop`` entry of a build config as a ``CropSpec`` (DataError naming ``where`` if absent or bad)."""
    if "crop" not in config:
        raise DataError(f"{where}: no 'crop' entry (written by an older builder?): rebuild the shard set")
    try:
        return CropSpec.from_dict(config["crop"], where=where)
    except CropSpecError as e:
        raise DataError(str(e)) from None


def read_crop_spec(folder: str) -> CropSpec:
    """The crop spec of the shard set in ``folder`` (from its ``build_config.json``)."""
    return crop_spec_of(read_build_config(folder), fileutil.join(folder, BUILD_CONFIG))


# ---------------------------------------------------------------------------------------------
# manifest, skipped list, summary
# ---------------------------------------------------------------------------------------------


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text with ``\\n`` line ends (the same bytes on every platform)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_manifest(folder: str, rows: Iterable[Sequence]) -> str:
    """Write ``folder/manifest.csv`` atomically; each row holds the ``MANIFEST_COLUMNS`` in order."""
    rows = list(rows)
    bad = next((r for r in rows if len(r) != len(MANIFEST_COLUMNS)), None)
    if bad is not None:
        raise ValueError(f"manifest row {bad!r} has {len(bad)} values, expected {len(MANIFEST_COLUMNS)}")
    path = fileutil.join(folder, MANIFEST)
    fileutil.write_text(path, csv_text(MANIFEST_COLUMNS, rows))
    return path


def write_skipped(folder: str, rows: Iterable[Sequence[str]]) -> str:
    """Write ``folder/skipped.csv`` atomically: rows of ``(image_id, reason, kind)``."""
    path = fileutil.join(folder, SKIPPED)
    fileutil.write_text(path, csv_text(SKIPPED_COLUMNS, rows))
    return path


def write_summary(folder: str, summary: Mapping) -> str:
    """Write ``folder/summary.json`` atomically (the builder's last write)."""
    path = fileutil.join(folder, SUMMARY)
    fileutil.write_json(path, dict(summary))
    return path


def read_summary(folder: str) -> dict:
    """``folder/summary.json`` (OSError/ValueError when absent or invalid)."""
    return fileutil.read_json(fileutil.join(folder, SUMMARY))


def find_manifest(data: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """``manifest.csv`` beside the shards of ``data`` (folder, glob or paths), or None if absent."""
    folder = shard_dir(data)
    if folder is None:
        return None
    path = fileutil.join(folder, MANIFEST)
    return path if fileutil.exists(path) else None


@dataclass(frozen=True)
class Manifest:
    """The rows of a ``manifest.csv``: one per record, N rows, in file order.

    Attributes
    ----------
    path : where it was read from.
    image_id : (N,) str. cell_id, fold, record : (N,) int64. labels : (N, 19) uint8 multi-hot.
    shard : (N,) str, the shard's base name. source : (N,) str, where the field came from
    (``train``, ``hpa-public``, …).
    """

    path: str
    image_id: np.ndarray
    cell_id: np.ndarray
    fold: np.ndarray
    labels: np.ndarray
    shard: np.ndarray
    record: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.fold)

    def sources(self) -> list[str]:
        """The distinct sources, sorted."""
        return sorted(set(self.source.tolist()))

    def rows(self, folds: Iterable[int] | None = None, sources: Iterable[str] | None = None) -> np.ndarray:
        """(N,) bool: the rows in ``folds`` and of ``sources`` (None: all)."""
        keep = np.ones(len(self), bool)
        if folds is not None:
            keep &= np.isin(self.fold, list(folds))
        if sources is not None:
            keep &= np.isin(self.source, list(sources))
        return keep

    def weighted_counts(self, folds: Iterable[int] | None = None, sources: Iterable[str] | None = None,
                        source_weights: Mapping[str, float] | None = None) -> tuple[float, np.ndarray]:
        """``(examples, (19,) float64 examples per class)`` over the rows of ``folds`` and ``sources``,
        each row counted ``source_weights[its source]`` times (1 for sources not named)."""
        keep = self.rows(folds, sources)
        weights = np.ones(len(self), np.float64)
        for name, weight in (source_weights or {}).items():
            weights[self.source == name] = float(weight)
        weights = weights * keep
        return float(weights.sum()), (self.labels.astype(np.float64) * weights[:, None]).sum(axis=0)

    def shard_counts(self) -> dict[str, int]:
        """Rows per shard base name."""
        return dict(Counter(self.shard.tolist()))

    def class_counts(self, folds: Iterable[int] | None = None) -> np.ndarray:
        """(19,) int64: examples holding each class (in ``folds``; all folds when None)."""
        rows = self.labels if folds is None else self.labels[np.isin(self.fold, list(folds))]
        return rows.sum(axis=0, dtype=np.int64)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a ``manifest.csv`` (every one of ``MANIFEST_COLUMNS``; extra columns are ignored).

    Raises
    ------
    DataError : the file is missing, lacks a column, or holds a malformed row (line number given).
    """
    path = str(path)
    if not fileutil.exists(path):
        raise DataError(f"{path}: manifest not found")
    fileutil.raise_csv_field_size_limit()
    reader = csv.DictReader(io.StringIO(fileutil.read_text(path)))
    missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing} (has {reader.fieldnames})")
    image_ids, cell_ids, folds, shards, records, sources = [], [], [], [], [], []
    labels: list[list[int]] = []
    for row_no, row in enumerate(reader, start=2):
        try:
            image_ids.append(row["image_id"])
            cell_ids.append(int(row["cell_id"]))
            folds.append(int(row["fold"]))
            records.append(int(row["record"]))
            text = (row["labels"] or "").strip()  # empty: an unlabelled cell
            labels.append(parse_labels(text, where=f"{path} line {row_no}") if text else [])
            shards.append(_base(row["shard"]))
            sources.append(row["source"] or "")
        except (ValueError, TypeError, LabelError, AttributeError) as exc:
            raise DataError(f"{path} line {row_no}: malformed row ({exc})") from None
    hot = np.zeros((len(labels), NUM_CLASSES), np.uint8)
    for i, ids in enumerate(labels):
        hot[i, ids] = 1
    return Manifest(
        path=path, image_id=np.asarray(image_ids, dtype=object), cell_id=np.asarray(cell_ids, dtype=np.int64),
        fold=np.asarray(folds, dtype=np.int64), labels=hot, shard=np.asarray(shards, dtype=object),
        record=np.asarray(records, dtype=np.int64), source=np.asarray(sources, dtype=object),
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
        base = _base(path)
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
    wanted = None if folds is None else {int(f) for f in folds}
    orphans = Counter(
        s for s, f in zip(manifest.shard.tolist(), manifest.fold.tolist()) if s not in names and (wanted is None or f in wanted)
    )
    problems += [f"{s}: {n} manifest rows but no such shard file" for s, n in sorted(orphans.items())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{manifest.path}: manifest disagrees with the shards: {shown}")


# ---------------------------------------------------------------------------------------------
# training / validation split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldSplit:
    """Training and validation shards of one cross-validation split, counted from the manifest.

    ``crop`` is the shard set's crop spec (``build_config.json``): the crops' size for the input
    pipeline and what ``model.json`` records, one object for both.
    """

    train_shards: list[str]
    val_shards: list[str]
    train_folds: list[int]
    val_folds: list[int]
    n_train: int
    n_val: int
    class_counts: np.ndarray  # (19,) int64 over the training examples (zeros without a manifest)
    crop: CropSpec
    build_config: dict
    data_dir: str
    manifest: Manifest | None = None
    sources: tuple[str, ...] | None = None  # the records used (None: all); counts are of these only


def _crop_of_shards(shards: Sequence[str]) -> tuple[CropSpec, dict]:
    """The one crop spec (and the first build config) of the folders holding ``shards``."""
    specs: dict[str, tuple[CropSpec, dict]] = {}
    for folder in dict.fromkeys(_parent(s) for s in shards):
        config = read_build_config(folder)
        specs[folder] = (crop_spec_of(config, fileutil.join(folder, BUILD_CONFIG)), config)
    distinct = {spec for spec, _ in specs.values()}
    if len(distinct) > 1:
        shown = "; ".join(f"{folder}: {spec}" for folder, (spec, _) in specs.items())
        raise DataError(f"the shards come from shard sets with different crop specs ({shown}): train on one")
    return next(iter(specs.values()))


def split_folds(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    val_fold: int | None,
    manifest: str | os.PathLike | None = None,
    train_folds: Iterable[int] | None = None,
    sources: Iterable[str] | None = None,
) -> FoldSplit:
    """Select training shards (``train_folds``, default every fold but ``val_fold``) and validation
    shards (``val_fold``; None: no validation) by their names, count examples from the manifest
    (``manifest`` or ``manifest.csv`` beside the shards; without one, from the shard names, warned)
    and read the crop spec from ``build_config.json`` (required). Never opens a shard.

    ``sources``: count only the records of these sources (the manifest's ``source`` column; the
    input pipeline filters the records the same way: ``hpa_tf.data.InputConfig.sources``).

    Raises
    ------
    DataError : no shards, a fold with no examples, a manifest that disagrees with the shard names,
        no build config, shards of different crop specs, a source that no record has (or sources
        without a manifest).
    """
    shards = list_shards(data)
    folder = shard_dir(data) or "."
    by_fold = shard_folds(shards)
    available = sorted(by_fold)
    val_folds = [] if val_fold is None else [int(val_fold)]
    tr_folds = [f for f in available if f not in val_folds] if train_folds is None else sorted({int(f) for f in train_folds})
    for f in tr_folds + val_folds:
        if f not in by_fold:
            raise DataError(f"{folder}: fold {f} has no shards (folds present: {available})")
    if not tr_folds:
        raise DataError(f"{folder}: no training folds left (folds present: {available}, validation {val_folds})")
    overlap = set(tr_folds) & set(val_folds)
    if overlap:
        raise DataError(f"folds {sorted(overlap)} are both training and validation folds")
    crop, build_config = _crop_of_shards(shards)
    train_shards = select_shards(shards, tr_folds)
    val_shards = select_shards(shards, val_folds)
    manifest_path = str(manifest) if manifest is not None else find_manifest(data)
    table = None
    sources = None if sources is None else tuple(dict.fromkeys(str(x) for x in sources))
    if sources is not None and manifest_path is None:
        raise DataError(f"{folder}: choosing records by source needs {MANIFEST} beside the shards")
    if manifest_path is None:
        log.warning("no %s beside %s: counting examples from the shard names", MANIFEST, folder)
        n_train = sum(parse_shard_name(p)[2] for p in train_shards)
        n_val = sum(parse_shard_name(p)[2] for p in val_shards)
        class_counts = np.zeros(NUM_CLASSES, np.int64)
    else:
        table = read_manifest(manifest_path)
        check_manifest(train_shards + val_shards, table, folds=tr_folds + val_folds)
        if sources is not None:
            unknown = [x for x in sources if x not in set(table.source.tolist())]
            if unknown:
                raise DataError(f"{manifest_path}: no record of source(s) {unknown} (sources present: {table.sources()})")
        n_train = int(table.rows(tr_folds, sources).sum())
        n_val = int(table.rows(val_folds, sources).sum())
        class_counts = table.labels[table.rows(tr_folds, sources)].sum(axis=0, dtype=np.int64)
    for name, folds, n in (("training", tr_folds, n_train), ("validation", val_folds, n_val)):
        if folds and n == 0:
            of = "" if sources is None else f" of source(s) {list(sources)}"
            raise DataError(f"{manifest_path or folder}: {name} fold(s) {folds} hold no examples{of}")
    log.info("folds: train %s (%d examples, %d shards), validation %s (%d examples, %d shards); crops %s",
             tr_folds, n_train, len(train_shards), val_folds, n_val, len(val_shards), crop)
    return FoldSplit(
        train_shards=train_shards, val_shards=val_shards, train_folds=tr_folds, val_folds=val_folds,
        n_train=n_train, n_val=n_val, class_counts=class_counts, crop=crop, build_config=build_config,
        data_dir=folder, manifest=table, sources=sources,
    )


# ---------------------------------------------------------------------------------------------
# damaged shards
# ---------------------------------------------------------------------------------------------


def find_damaged_shards(shards: Sequence[str]) -> dict[str, str]:
    """``{shard path: reason}`` of the shards that cannot be read to the end (corrupt or truncated)
    or hold fewer records than their name says. Reads every record of every shard (not decoded)."""
    from hpa_tf.records import scan_shard

    damaged: dict[str, str] = {}
    for path in shards:
        n, reason = scan_shard(path)
        expected = parse_shard_name(path)[2]
        if reason is not None:
            damaged[path] = f"corrupt or truncated shard, unreadable after {n} of {expected} records ({reason})"
        elif n != expected:
            damaged[path] = f"truncated shard: {n} records, the name says {expected}"
    return damaged


def damaged_shard_error(split: FoldSplit, damaged: Mapping[str, str]) -> DataError:
    """The one-line error for damaged shards met while training (the first named, the others counted)."""
    path, reason = next(iter(damaged.items()))
    more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
    return DataError(f"{path}: {reason}{more}: rebuild the shard set {split.data_dir}, or train without the damaged "
                     "shards with --skip-corrupt-shards")


def without_damaged_shards(split: FoldSplit) -> tuple[FoldSplit, dict[str, str]]:
    """The split without its damaged shards (``find_damaged_shards``: every shard is read once), the
    counts lowered by what they held; and ``{path: reason}`` of the dropped ones.

    Raises DataError when the training or the validation folds lose every shard.
    """
    damaged = find_damaged_shards([*split.train_shards, *split.val_shards])
    if not damaged:
        log.info("checked %d shard(s): none damaged", len(split.train_shards) + len(split.val_shards))
        return split, {}
    train = [p for p in split.train_shards if p not in damaged]
    val = [p for p in split.val_shards if p not in damaged]
    for name, kept, folds in (("training", train, split.train_folds), ("validation", val, split.val_folds)):
        if folds and not kept:
            raise DataError(f"{split.data_dir}: every {name} shard is damaged (first: "
                            f"{next(iter(damaged))}: {next(iter(damaged.values()))})")
    dropped_train = [p for p in split.train_shards if p in damaged]
    dropped_val = [p for p in split.val_shards if p in damaged]
    table, class_counts = split.manifest, split.class_counts
    if table is not None:  # the manifest without the dropped shards' rows: every count comes from it
        keep = ~np.isin(table.shard, [_base(p) for p in damaged])
        table = dataclasses.replace(table, **{f.name: getattr(table, f.name)[keep] for f in dataclasses.fields(table)
                                              if f.name != "path"})
        n_train = int(table.rows(split.train_folds, split.sources).sum())
        n_val = int(table.rows(split.val_folds, split.sources).sum())
        class_counts = table.labels[table.rows(split.train_folds, split.sources)].sum(axis=0, dtype=np.int64)
    else:
        n_train = split.n_train - sum(parse_shard_name(p)[2] for p in dropped_train)
        n_val = split.n_val - sum(parse_shard_name(p)[2] for p in dropped_val)
    for path, reason in damaged.items():
        log.warning("skipping %s: %s", path, reason)
    log.warning("skipped %d damaged shard(s) of %d: %d training and %d validation examples left out",
                len(damaged), len(split.train_shards) + len(split.val_shards), split.n_train - n_train,
                split.n_val - n_val)
    return dataclasses.replace(split, train_shards=train, val_shards=val, n_train=n_train, n_val=n_val,
                               class_counts=class_counts, manifest=table), damaged

