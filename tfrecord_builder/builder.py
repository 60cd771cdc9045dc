"""Stage 2: fields of view → segmented cells → crops → TFRecord shards, in parallel and resumable.

Plan (deterministic, whatever the number of workers)
    1. ``train.csv`` is read first (an unknown label stops the run before any work, naming the line).
    2. Folds are assigned per image over ALL images of the CSV (``hpa_tf.folds.assign_folds``).
    3. The images to build (sorted IDs, the first ``limit`` of them) are sorted by (fold, ID) and cut
       into groups of ``images_per_shard`` images within each fold; group ``k`` of fold ``f`` becomes
       the shard ``fold{f}-{k:05d}-n{count}.tfrec``. The group size comes from ``--shard-mb`` via an
       estimate of the bytes per cell (``estimate_images_per_shard``) or is given explicitly.
    4. Each group is one task that a worker runs start to finish: read, segment (or read saved
       masks), crop (``hpa_tf.crops``), encode (``hpa_tf.records``), write the shard under a
       temporary name and rename it, then write the sidecar ``parts/fold{f}-{k:05d}.json`` (manifest
       rows and stats of the shard), also atomically.
    5. When every task is done, ``manifest.csv``, ``skipped.csv`` and ``summary.json`` are assembled
       from the sidecars (``summary.json`` last: its presence means "complete").

Resuming
    A task whose sidecar exists (for the same task and content) and whose shard exists with the
    recorded size is done; a rerun builds only the others. Temporary files (``.tmp-*``) and shards
    without a sidecar, left by a killed run, are removed. ``build_config.json`` holds the arguments
    that define the content; an output made with other arguments is refused (``ConfigMismatchError``).
    One builder per output folder at a time.

Output layout (``out`` may be local or any ``tf.io.gfile`` path such as ``gs://``)::

    out/build_config.json   content-defining arguments, flat (crop_size, encoding, …; "run": run info, not compared)
    out/folds.csv           ID,fold for every image of the CSV
    out/fold{f}-{k:05d}-n{count}.tfrec
    out/parts/fold{f}-{k:05d}.json
    out/manifest.csv        one row per cell (MANIFEST_COLUMNS), in shard and record order
    out/skipped.csv         image_id,reason
    out/summary.json        counts per class and fold, skipped fields, bytes, seconds

Processes: workers are started with the ``spawn`` context (TensorFlow is imported in the parent;
forking a process that has started TF threads can deadlock). Each worker imports TF only to
serialise examples and write TFRecords; OpenCV runs single-threaded in workers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from queue import Empty

import numpy as np

from hpa_tf import fileutil
from hpa_tf.crops import DEFAULT_MARGIN, find_cells, iter_cell_crops
from hpa_tf.folds import assign_folds, write_folds_csv
from hpa_tf.io import CHANNELS, ImageReadError, find_channel_file, read_label_image, read_labels, read_rgby
from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES, format_labels, parse_labels

log = logging.getLogger(__name__)

#: Columns of ``manifest.csv`` (one row per cell). ``record`` is the index within the shard;
#: ``x0, y0, x1, y1`` the tight cell box (x1, y1 exclusive), ``height, width`` the field size.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "cell_id", "fold", "labels", "shard", "record", "area",
    "x0", "y0", "x1", "y1", "height", "width", "source",
)
PARTS_DIR = "parts"
CONFIG_FILE = "build_config.json"
FORMAT_VERSION = 1

#: Estimated serialised bytes per crop pixel (S²), measured on synthetic 2048 px fields at
#: 512 px crops (PNG level 1: ~520 kB per cell; JPEG q90: ~135 kB; both include the mask PNG).
BYTES_PER_CROP_PIXEL: dict[str, float] = {"png": 2.0, "jpeg": 0.55}
#: Estimated cells per field (HPA fields hold ~10-60 cells; synthetic 2048 px ones ~33).
CELLS_PER_FIELD: int = 30


class BuildError(RuntimeError):
    """The build cannot start or go on; the message says why."""


class ConfigMismatchError(BuildError):
    """The output folder holds a build made with other content-defining arguments."""


@dataclass
class BuildOptions:
    """Arguments of one build (see ``python -m tfrecord_builder --help``).

    Attributes
    ----------
    data_dir : folder of ``{ID}_{red,green,blue,yellow}.{png,jpg,tif}`` (e.g. Kaggle ``train/``).
    labels : ``train.csv`` (``ID,Label``).
    out : output folder, local or ``gs://…``.
    crop_size : crop side S in pixels.
    segmenter : ``builtin`` or ``hpacellseg`` (ignored when ``masks_dir`` is given).
    segmenter_options : keyword arguments of ``get_segmenter`` (e.g. model paths).
    masks_dir : reuse saved masks ``{masks_dir}/{ID}_cells.png`` instead of segmenting.
    workers : processes (1: in this process).
    shard_mb : target shard size in MB, turned into images per shard by an estimate.
    images_per_shard : explicit group size (overrides ``shard_mb``).
    folds, seed : number of folds and the stratifier's seed.
    mask_neighbors : zero other cells' pixels in each crop.
    encoding, png_compression, jpeg_quality : crop encoding (``hpa_tf.records.encode_example``).
    limit : build only the first ``limit`` images by sorted ID (folds still over all of them).
    min_cell_area : cells with fewer pixels (original resolution) are dropped and counted.
    source : the ``source`` feature of every record (e.g. ``train``, ``hpa-public``).
    margin : crop margin (``hpa_tf.crops``).
    """

    data_dir: str
    labels: str
    out: str
    crop_size: int = 512
    segmenter: str = "builtin"
    segmenter_options: dict = field(default_factory=dict)
    masks_dir: str | None = None
    workers: int = 1
    shard_mb: float = 150.0
    images_per_shard: int | None = None
    folds: int = 5
    seed: int = 0
    mask_neighbors: bool = False
    encoding: str = "png"
    png_compression: int = 1
    jpeg_quality: int = 90
    limit: int | None = None
    min_cell_area: int = 0
    source: str = "train"
    margin: float = DEFAULT_MARGIN


@dataclass(frozen=True)
class ShardTask:
    """One group of images that becomes one shard (all in ``fold``)."""

    fold: int
    index: int
    image_ids: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]  # class ids per image, same order

    @property
    def stem(self) -> str:
        """``fold{f}-{index:05d}``: the shard name without its count; also the sidecar's name."""
        return f"fold{self.fold}-{self.index:05d}"


@dataclass
class BuildResult:
    """What a ``build`` call did. ``complete`` is False when it stopped early (``max_shards``)."""

    out: str
    complete: bool
    fields: int = 0
    fields_skipped: int = 0
    cells: int = 0
    cells_dropped: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    shards_built: int = 0
    shards_kept: int = 0
    summary: dict = field(default_factory=dict)

    def line(self) -> str:
        """One-line summary for a person."""
        state = "" if self.complete else " (incomplete: rerun to finish)"
        return (
            f"{self.fields} fields, {self.cells} cells, {self.shards} shards, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s; skipped {self.fields_skipped} field(s), dropped {self.cells_dropped} "
            f"small cell(s); built {self.shards_built} shard(s) now, kept {self.shards_kept}{state}"
        )


# ---------------------------------------------------------------------------------------------
# small I/O helpers: every write to OUT goes through fileutil / tf.io.gfile
# ---------------------------------------------------------------------------------------------


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _listdir(path: str) -> list[str]:
    if fileutil.is_remote(path):
        return [n.rstrip("/") for n in _gfile().listdir(path)] if _gfile().isdir(path) else []
    return os.listdir(path) if os.path.isdir(path) else []


def _file_size(path: str) -> int:
    return int(_gfile().stat(path).length) if fileutil.is_remote(path) else os.path.getsize(path)


def _read_text(path: str) -> str:
    if fileutil.is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_text(path: str, text: str) -> None:
    with fileutil.atomic_open(path, "w") as f:
        f.write(text)


def _write_json(path: str, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: object) -> object:
    """JSON round trip (tuples → lists), so that a config compares equal to its stored copy."""
    return json.loads(json.dumps(obj, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def estimate_images_per_shard(
    shard_mb: float, crop_size: int, encoding: str, cells_per_field: int = CELLS_PER_FIELD
) -> int:
    """Images per shard so that a shard holds about ``shard_mb`` MB (at least 1).

    Uses ``BYTES_PER_CROP_PIXEL[encoding] * crop_size² * cells_per_field`` bytes per field.
    """
    if encoding not in BYTES_PER_CROP_PIXEL:
        raise ValueError(f"unknown encoding {encoding!r}: expected one of {tuple(BYTES_PER_CROP_PIXEL)}")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb}")
    per_field = BYTES_PER_CROP_PIXEL[encoding] * crop_size * crop_size * cells_per_field
    return max(1, int(shard_mb * 1e6 // per_field))


def plan_shards(
    image_ids: Sequence[str], folds: Mapping[str, int], labels: Mapping[str, Sequence[int]], images_per_shard: int
) -> list[ShardTask]:
    """Cut the images, sorted by (fold, ID), into groups of ``images_per_shard`` within each fold."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    by_fold: dict[int, list[str]] = {}
    for image_id in sorted(image_ids):
        by_fold.setdefault(int(folds[image_id]), []).append(image_id)
    tasks = []
    for fold in sorted(by_fold):
        ids = by_fold[fold]
        for index, start in enumerate(range(0, len(ids), images_per_shard)):
            group = tuple(ids[start : start + images_per_shard])
            tasks.append(ShardTask(fold, index, group, tuple(tuple(int(c) for c in labels[i]) for i in group)))
    return tasks


def content_config(options: BuildOptions, images_per_shard: int) -> dict:
    """The arguments that define the output's content (compared on resume)."""
    seg_opts = {}
    for key, value in sorted(options.segmenter_options.items()):
        if key == "device":  # where it runs does not change what it computes
            continue
        if isinstance(value, str) and os.path.isfile(value):  # a model file: path and size identify it
            seg_opts[key] = {"path": os.path.abspath(value), "bytes": os.path.getsize(value)}
        else:
            seg_opts[key] = value
    config = {
        "format": FORMAT_VERSION,
        "crop_size": int(options.crop_size),
        "margin": float(options.margin),
        "encoding": options.encoding,
        "mask_neighbors": bool(options.mask_neighbors),
        "min_cell_area": int(options.min_cell_area),
        "segmenter": "masks" if options.masks_dir else options.segmenter,
        "segmenter_options": {} if options.masks_dir else seg_opts,
        "masks_dir": os.path.abspath(options.masks_dir) if options.masks_dir else None,
        "folds": int(options.folds),
        "seed": int(options.seed),
        "source": options.source,
        "data_dir": os.path.abspath(options.data_dir),
        "labels_file": os.path.abspath(options.labels),
        "labels_sha256": _sha256(options.labels),
        "limit": options.limit,
        "images_per_shard": int(images_per_shard),
    }
    if options.encoding == "png":
        config["png_compression"] = int(options.png_compression)
    else:
        config["jpeg_quality"] = int(options.jpeg_quality)
    return _canonical(config)


def _config_hash(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _check_options(options: BuildOptions) -> None:
    from hpa_tf.records import ENCODINGS

    problems = []
    if options.crop_size < 8:
        problems.append(f"crop size must be >= 8, got {options.crop_size}")
    if options.encoding not in ENCODINGS:
        problems.append(f"encoding must be one of {ENCODINGS}, got {options.encoding!r}")
    if options.workers < 1:
        problems.append(f"workers must be >= 1, got {options.workers}")
    if options.folds < 1:
        problems.append(f"folds must be >= 1, got {options.folds}")
    if options.limit is not None and options.limit < 1:
        problems.append(f"limit must be >= 1, got {options.limit}")
    if options.min_cell_area < 0:
        problems.append(f"min cell area must be >= 0, got {options.min_cell_area}")
    if options.images_per_shard is not None and options.images_per_shard < 1:
        problems.append(f"images per shard must be >= 1, got {options.images_per_shard}")
    if options.shard_mb <= 0:
        problems.append(f"shard size must be > 0 MB, got {options.shard_mb}")
    if not os.path.isdir(options.data_dir):
        problems.append(f"data dir {options.data_dir} is not a folder")
    if not os.path.isfile(options.labels):
        problems.append(f"labels file {options.labels} not found")
    if options.masks_dir is not None and not os.path.isdir(options.masks_dir):
        problems.append(f"masks dir {options.masks_dir} is not a folder")
    if problems:
        raise BuildError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# the worker: one task start to finish
# ---------------------------------------------------------------------------------------------

_SEGMENTERS: dict[str, object] = {}
#: Where a worker reports each finished field as ``(1, n_cells)``: a multiprocessing queue in pool
#: workers (set by ``_init_worker``), a callback in the parent (1 worker), or None.
_PROGRESS: object = None


def _report(fields: int, cells: int) -> None:
    if _PROGRESS is None:
        return
    if callable(_PROGRESS):
        _PROGRESS(fields, cells)
    else:
        _PROGRESS.put((fields, cells))


def _segmenter(name: str, options: Mapping) -> object:
    key = json.dumps([name, options], sort_keys=True, default=str)
    if key not in _SEGMENTERS:
        from hpa_tf.segmentation import get_segmenter

        _SEGMENTERS[key] = get_segmenter(name, **options)
    return _SEGMENTERS[key]


def _check_segmenter(options: BuildOptions) -> None:
    """Create the segmenter once in this process, so that one that cannot be made (a missing
    package or model file, no GPU) stops the build with its one-line reason before any output."""
    from hpa_tf.segmentation import SEGMENTER_ERRORS

    if options.masks_dir:
        return
    try:
        _segmenter(options.segmenter, options.segmenter_options)
    except SEGMENTER_ERRORS as e:
        raise BuildError(f"segmenter {options.segmenter}: {e}") from None
    if options.workers > 1:  # each worker makes its own; free this one's memory (models, GPU)
        _SEGMENTERS.clear()


def _init_worker(cv2_threads: int, progress_queue: object = None) -> None:
    """Pool initializer: one OpenCV thread per worker (the pool provides the parallelism)."""
    global _PROGRESS
    import cv2

    cv2.setNumThreads(cv2_threads)
    _PROGRESS = progress_queue


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux VmHWM: unlike ru_maxrss, not inherited
    from the parent that started a spawned worker)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


#: Kinds of skipped fields (``summary.json`` counts them; ``skipped.csv`` has the full reason).
SKIP_KINDS: tuple[str, ...] = ("not in data dir", "bad channel file", "bad mask file", "segmentation failed", "no cells")

Skip = tuple[str, str]  # (kind, reason)


def _read_field(options: BuildOptions, image_id: str) -> tuple[np.ndarray | None, Skip | None]:
    """(H, W, 4) uint8 RGBY, or (None, (kind, reason)) to skip the field."""
    try:
        return read_rgby(options.data_dir, image_id), None
    except ImageReadError as e:
        present = 0
        for channel in CHANNELS:
            try:
                find_channel_file(options.data_dir, image_id, channel)
                present += 1
            except ImageReadError:
                pass
        if present == 0:
            return None, ("not in data dir", f"no channel files in {options.data_dir}")
        return None, ("bad channel file", str(e))


def _field_cells(options: BuildOptions, image_id: str, image: np.ndarray) -> tuple[np.ndarray | None, Skip | None]:
    """(H, W) int32 cell label image, or (None, (kind, reason)) to skip the field."""
    if options.masks_dir:
        path = os.path.join(options.masks_dir, f"{image_id}_cells.png")
        if not os.path.isfile(path):
            return None, ("bad mask file", f"{path}: mask file not found")
        try:
            cells = read_label_image(path)
        except ImageReadError as e:
            return None, ("bad mask file", str(e))
        if cells.shape != image.shape[:2]:
            return None, ("bad mask file", f"{path}: mask is {cells.shape[1]}x{cells.shape[0]}, "
                                           f"the field {image.shape[1]}x{image.shape[0]}")
        return cells, None
    try:
        cells, _ = _segmenter(options.segmenter, options.segmenter_options).segment(image)
    except Exception as e:  # a segmenter failing on one odd field must not stop a long run
        log.warning("%s: segmentation failed: %s: %s", image_id, type(e).__name__, e)
        return None, ("segmentation failed", f"segmentation failed: {type(e).__name__}: {e}")
    return cells, None


def build_shard(task: ShardTask, options: BuildOptions, config_hash: str) -> dict:
    """Build one shard and its sidecar (the unit of work; runs in a worker process).

    Reads, segments, crops and encodes every image of ``task``; writes
    ``fold{f}-{index:05d}-n{count}.tfrec`` (none when no cell survives) and then
    ``parts/fold{f}-{index:05d}.json``, each atomically. Returns the sidecar's content.
    """

    if not options.masks_dir:
        from hpa_tf.segmentation import preload

        preload(options.segmenter)  # a worker: PyTorch's stack (hpacellseg) before TensorFlow
    from hpa_tf.records import ShardWriter, encode_example

    t0, cpu0 = time.perf_counter(), time.process_time()
    rows: list[list] = []
    skipped: list[list[str]] = []  # [image_id, kind, reason]
    dropped = fields = 0
    with ShardWriter(options.out, max_per_shard=1 << 62, first_index=task.index) as writer:
        for image_id, label_ids in zip(task.image_ids, task.labels):
            image, skip = _read_field(options, image_id)
            cells = None
            if image is not None:
                cells, skip = _field_cells(options, image_id, image)
            if cells is None:
                skipped.append([image_id, *skip])
                _report(1, 0)
                continue
            height, width = image.shape[:2]
            labels_text = format_labels(label_ids)
            n_cells = 0
            for batch in iter_cell_crops(
                image, cells, options.crop_size, options.margin, options.mask_neighbors, options.min_cell_area
            ):
                dropped += batch.n_dropped
                for k in range(len(batch)):
                    cell_id = int(batch.cell_ids[k])
                    bbox = [int(v) for v in batch.bboxes[k]]
                    example = encode_example(
                        batch.crops[k], batch.masks[k], label_ids, image_id, cell_id, bbox, (height, width),
                        fold=task.fold, source=options.source, encoding=options.encoding,
                        jpeg_quality=options.jpeg_quality, png_compression=options.png_compression,
                    )
                    writer.write(example, fold=task.fold)
                    rows.append([image_id, cell_id, task.fold, labels_text, None, len(rows), int(batch.areas[k]),
                                 *bbox, height, width, options.source])
                    n_cells += 1
            if n_cells == 0:
                n_small = find_cells(cells, min_area=options.min_cell_area).n_dropped
                dropped += n_small
                reason = "no cells" if n_small == 0 else f"no cells of at least {options.min_cell_area} px ({n_small} smaller)"
                skipped.append([image_id, "no cells", reason])
                _report(1, 0)
                continue
            fields += 1
            _report(1, n_cells)
    paths = writer.paths
    if len(paths) > 1:  # cannot happen with max_per_shard = 2**62; guards the naming assumption
        raise BuildError(f"{task.stem}: expected one shard, the writer made {paths}")
    shard = paths[0].replace("\\", "/").rsplit("/", 1)[-1] if paths else ""
    for row in rows:
        row[4] = shard
    part = {
        "task": {"fold": task.fold, "index": task.index, "image_ids": list(task.image_ids)},
        "config_hash": config_hash,
        "shard": shard,
        "count": len(rows),
        "bytes": _file_size(paths[0]) if paths else 0,
        "fields": fields,
        "cells_dropped": dropped,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - cpu0, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rows": rows,
    }
    _write_json(fileutil.join(options.out, PARTS_DIR, f"{task.stem}.json"), part)
    return part


# ---------------------------------------------------------------------------------------------
# the parent: plan, check the output, run the tasks, assemble
# ---------------------------------------------------------------------------------------------


def _prepare_output(out: str, config: dict, run_info: dict) -> None:
    """Create ``out`` with ``build_config.json``, or check that an existing one matches ``config``."""
    path = fileutil.join(out, CONFIG_FILE)
    if fileutil.exists(path):
        try:
            old = {k: v for k, v in json.loads(_read_text(path)).items() if k != "run"}
        except (ValueError, AttributeError) as e:
            raise BuildError(f"{path}: unreadable build config ({e}); use a new --out") from None
        if old != config:
            keys = sorted(set(old) | set(config))
            diffs = [f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in keys if old.get(k) != config.get(k)]
            raise ConfigMismatchError(
                f"{out} holds a build made with other arguments ({'; '.join(diffs)}): "
                "rerun with the same arguments to resume, or choose another --out"
            )
        return
    foreign = [n for n in _listdir(out) if n.endswith(".tfrec") or n in ("manifest.csv", PARTS_DIR)]
    if foreign:
        raise BuildError(f"{out} holds {foreign[:3]} but no {CONFIG_FILE}: not a build of this tool; choose another --out")
    fileutil.makedirs(out)
    _write_json(path, {**config, "run": run_info})


def _clean_temp_files(out: str) -> int:
    """Remove ``.tmp-*`` files left by a killed run (in ``out`` and ``out/parts``)."""
    n = 0
    for folder in (out, fileutil.join(out, PARTS_DIR)):
        for name in _listdir(folder):
            if name.startswith(".tmp-"):
                fileutil.remove(fileutil.join(folder, name))
                n += 1
    if n:
        log.info("removed %d temporary file(s) left by an earlier run", n)
    return n


def _load_part(out: str, task: ShardTask, config_hash: str, shard_files: set[str]) -> dict | None:
    """The sidecar of ``task`` if the task is done (same task and content, shard present, size right)."""
    path = fileutil.join(out, PARTS_DIR, f"{task.stem}.json")
    try:
        part = json.loads(_read_text(path))
    except (OSError, ValueError):
        return None
    try:
        same = (
            part["config_hash"] == config_hash
            and part["task"] == {"fold": task.fold, "index": task.index, "image_ids": list(task.image_ids)}
        )
        if not same:
            return None
        if part["shard"]:
            if part["shard"] not in shard_files or _file_size(fileutil.join(out, part["shard"])) != part["bytes"]:
                return None
        return part
    except (KeyError, TypeError, OSError):
        return None


def _summary(tasks: Sequence[ShardTask], parts: Sequence[dict], config: dict, n_folds: int, wall: float) -> dict:
    cells_class = np.zeros((n_folds, NUM_CLASSES), np.int64)
    fields_class = np.zeros((n_folds, NUM_CLASSES), np.int64)
    per_fold = {f: {"fields": 0, "fields_skipped": 0, "cells": 0, "shards": 0, "bytes": 0} for f in range(n_folds)}
    reasons: dict[str, int] = {}
    for task, part in zip(tasks, parts):
        stats = per_fold[task.fold]
        stats["fields"] += part["fields"]
        stats["fields_skipped"] += len(part["skipped"])
        stats["cells"] += part["count"]
        stats["shards"] += 1 if part["shard"] else 0
        stats["bytes"] += part["bytes"]
        skipped = {s[0] for s in part["skipped"]}
        for image_id, label_ids in zip(task.image_ids, task.labels):
            if image_id not in skipped:
                fields_class[task.fold, list(label_ids)] += 1
        for row in part["rows"]:
            cells_class[task.fold, parse_labels(row[3])] += 1
        for _, kind, _ in part["skipped"]:
            reasons[kind] = reasons.get(kind, 0) + 1
    cells = sum(p["count"] for p in parts)
    return {
        "complete": True,
        "fields_planned": sum(len(t.image_ids) for t in tasks),
        "fields": sum(p["fields"] for p in parts),
        "fields_skipped": sum(len(p["skipped"]) for p in parts),
        "cells": cells,
        "cells_dropped_small": sum(p["cells_dropped"] for p in parts),
        "shards": sum(1 for p in parts if p["shard"]),
        "bytes": sum(p["bytes"] for p in parts),
        "bytes_per_cell": round(sum(p["bytes"] for p in parts) / max(cells, 1), 1),
        "work_seconds": round(sum(p["seconds"] for p in parts), 2),
        "work_cpu_seconds": round(sum(p.get("cpu_seconds", 0.0) for p in parts), 2),
        "wall_seconds_last_run": round(wall, 2),
        "peak_worker_rss_mb": max((p.get("peak_rss_mb", 0.0) for p in parts), default=0.0),
        "per_fold": {str(f): v for f, v in per_fold.items()},
        "classes": list(CLASS_NAMES),
        "cells_per_class_and_fold": cells_class.T.tolist(),
        "fields_per_class_and_fold": fields_class.T.tolist(),
        "skipped_reasons": reasons,
        "skipped": [{"image_id": s[0], "kind": s[1], "reason": s[2]} for p in parts for s in p["skipped"]],
        "config": config,
    }


def _assemble(out: str, tasks: Sequence[ShardTask], parts: Sequence[dict], config: dict, n_folds: int,
              wall: float) -> dict:
    """Write manifest.csv, skipped.csv and (last) summary.json from the sidecars; drop stray shards."""
    wanted = {p["shard"] for p in parts if p["shard"]}
    for name in _listdir(out):
        if name.endswith(".tfrec") and name not in wanted:
            log.warning("removing %s: no task of this build made it", name)
            fileutil.remove(fileutil.join(out, name))
    _write_text(fileutil.join(out, "manifest.csv"), _csv_text(MANIFEST_COLUMNS, (r for p in parts for r in p["rows"])))
    _write_text(fileutil.join(out, "skipped.csv"), _csv_text(("image_id", "reason", "kind"), ((s[0], s[2], s[1]) for p in parts for s in p["skipped"])))
    summary = _summary(tasks, parts, config, n_folds, wall)
    _write_json(fileutil.join(out, "summary.json"), summary)
    return summary


def _result_from_summary(out: str, summary: dict, built: int, kept: int, seconds: float) -> BuildResult:
    return BuildResult(
        out=out, complete=True, fields=summary["fields"], fields_skipped=summary["fields_skipped"],
        cells=summary["cells"], cells_dropped=summary["cells_dropped_small"], shards=summary["shards"],
        bytes=summary["bytes"], seconds=seconds, shards_built=built, shards_kept=kept, summary=summary,
    )


def _run_tasks(
    todo: Sequence[ShardTask],
    options: BuildOptions,
    config_hash: str,
    on_done: Callable[[ShardTask, dict], None],
    on_field: Callable[[int, int], None],
) -> None:
    """Run the tasks in this process (1 worker) or in a spawn-context process pool.

    ``on_field(1, n_cells)`` is called in this process for every field a worker finishes,
    ``on_done(task, sidecar)`` for every finished task.
    """
    global _PROGRESS
    if options.workers <= 1 or len(todo) <= 1:
        _PROGRESS = on_field
        try:
            for task in todo:
                on_done(task, build_shard(task, options, config_hash))
        finally:
            _PROGRESS = None
        return
    context = multiprocessing.get_context("spawn")
    workers = min(options.workers, len(todo))
    queue = context.Queue()

    def drain() -> None:
        while True:
            try:
                on_field(*queue.get_nowait())
            except Empty:
                return

    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(1, queue)) as pool:
        pending: dict[Future, ShardTask] = {pool.submit(build_shard, t, options, config_hash): t for t in todo}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in finished:
                    task = pending.pop(future)
                    try:
                        part = future.result()
                    except Exception as e:
                        raise BuildError(f"shard {task.stem} failed: {type(e).__name__}: {e}") from e
                    on_done(task, part)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def build(options: BuildOptions, progress: bool = False, max_shards: int | None = None) -> BuildResult:
    """Build (or resume, or confirm) the TFRecord output described by ``options``.

    Parameters
    ----------
    options : see ``BuildOptions``.
    progress : show a tqdm bar (fields/s, cells/s).
    max_shards : build at most this many missing shards in this call, then stop (the output stays
        resumable; ``BuildResult.complete`` tells whether it is finished).

    Raises
    ------
    LabelError, CsvFormatError : a bad ``train.csv`` (before any output is written).
    BuildError : bad options or too few images for the folds; ConfigMismatchError: ``out`` was
        built with other arguments; BuildError: a worker failed on a task (a bug or I/O error,
        not a bad field: bad fields are skipped and listed in ``skipped.csv``).
    """
    t0 = time.perf_counter()
    _check_options(options)
    labels = read_labels(options.labels)  # stops on an unknown label, naming the line
    try:
        folds = assign_folds(list(labels), labels, options.folds, options.seed)
    except ValueError as e:
        raise BuildError(f"{options.labels}: {e}") from None
    image_ids = sorted(labels)
    if options.limit is not None:
        image_ids = image_ids[: options.limit]
    per_shard = options.images_per_shard or estimate_images_per_shard(
        options.shard_mb, options.crop_size, options.encoding
    )
    tasks = plan_shards(image_ids, folds, labels, per_shard)
    config = content_config(options, per_shard)
    config_hash = _config_hash(config)
    out = str(options.out)
    run_info = {"workers": options.workers, "shard_mb": options.shard_mb, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _check_segmenter(options)
    _prepare_output(out, config, run_info)
    fileutil.makedirs(fileutil.join(out, PARTS_DIR))
    _clean_temp_files(out)
    write_folds_csv(fileutil.join(out, "folds.csv"), folds)

    shard_files = {n for n in _listdir(out) if n.endswith(".tfrec")}
    parts: dict[str, dict] = {}
    for task in tasks:
        part = _load_part(out, task, config_hash, shard_files)
        if part is not None:
            parts[task.stem] = part
    todo = [t for t in tasks if t.stem not in parts]
    kept = len(parts)
    summary_path = fileutil.join(out, "summary.json")
    if not todo and fileutil.exists(summary_path):
        log.info("%s is complete (%d shards): nothing to do", out, kept)
        summary = json.loads(_read_text(summary_path))
        return _result_from_summary(out, summary, 0, kept, time.perf_counter() - t0)

    # a resumed build is incomplete until assembled again
    for name in ("summary.json", "manifest.csv", "skipped.csv"):
        fileutil.remove(fileutil.join(out, name))
    # shards of the tasks to do, left by a run killed between shard and sidecar
    stems = {t.stem for t in todo}
    for name in sorted(shard_files):
        if name.rsplit("-n", 1)[0] in stems:
            fileutil.remove(fileutil.join(out, name))
    if max_shards is not None:
        todo = todo[: max(0, max_shards)]
    log.info(
        "%s: %d images in %d shards (%d per shard), %d done, %d to build with %d worker(s)",
        out, len(image_ids), len(tasks), per_shard, kept, len(todo), options.workers,
    )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t.image_ids) for t in todo), unit="field", desc="cells → tfrecords", smoothing=0)
    counts = {"fields": 0, "cells": 0}
    t_run = time.perf_counter()

    def on_field(fields: int, cells: int) -> None:
        counts["fields"] += fields
        counts["cells"] += cells
        if bar is not None:
            dt = max(time.perf_counter() - t_run, 1e-9)
            bar.update(fields)
            bar.set_postfix(fields_s=f"{counts['fields'] / dt:.2f}", cells_s=f"{counts['cells'] / dt:.1f}",
                            refresh=False)

    def on_done(task: ShardTask, part: dict) -> None:
        parts[task.stem] = part

    try:
        _run_tasks(todo, options, config_hash, on_done, on_field)
    finally:
        if bar is not None:
            bar.close()
    built = len(todo)
    if len(parts) < len(tasks):
        done = [parts[t.stem] for t in tasks if t.stem in parts]
        log.info("stopped after %d shard(s); %d of %d done: rerun to finish", built, len(done), len(tasks))
        return BuildResult(
            out=out, complete=False, fields=sum(p["fields"] for p in done),
            fields_skipped=sum(len(p["skipped"]) for p in done), cells=sum(p["count"] for p in done),
            cells_dropped=sum(p["cells_dropped"] for p in done), shards=sum(1 for p in done if p["shard"]),
            bytes=sum(p["bytes"] for p in done), seconds=time.perf_counter() - t0, shards_built=built, shards_kept=kept,
        )
    wall = time.perf_counter() - t0
    summary = _assemble(out, tasks, [parts[t.stem] for t in tasks], config, options.folds, wall)
    result = _result_from_summary(out, summary, built, kept, wall)
    if result.cells == 0:
        log.error("nothing could be built: all %d field(s) were skipped (see %s)", summary["fields_skipped"],
                  fileutil.join(out, "skipped.csv"))
    return result


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Result of ``verify``: ``problems`` is empty when the output is consistent."""

    shards: int = 0
    records: int = 0
    manifest_rows: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self)


def _read_manifest(path: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing")
    return list(reader)


def verify(out: str, sample: int = 2) -> VerifyReport:
    """Check a built output against its manifest.

    Reads every shard: its record count must equal the count in its name and its manifest rows,
    and its records' (image_id, cell_id) must follow the manifest's order; the first ``sample``
    records of each shard are fully decoded (``hpa_tf.records.parse_example``) and checked for
    shape, fold and labels. Manifest shards that are missing and shards that the manifest lacks
    are reported, and the totals of ``summary.json`` are compared.
    """
    import tensorflow as tf

    from hpa_tf.records import parse_example, parse_shard_name

    report = VerifyReport()
    problems = report.problems
    out = str(out)
    try:
        rows = _read_manifest(fileutil.join(out, "manifest.csv"))
    except (OSError, ValueError, tf.errors.OpError) as e:
        problems.append(f"cannot read the manifest: {e}")
        return report
    report.manifest_rows = len(rows)
    crop_size = None
    try:
        crop_size = int(json.loads(_read_text(fileutil.join(out, CONFIG_FILE)))["crop_size"])
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
        problems.append(f"cannot read {CONFIG_FILE}: {e}")
    try:
        summary = json.loads(_read_text(fileutil.join(out, "summary.json")))
        if summary.get("cells") != len(rows):
            problems.append(f"summary.json says {summary.get('cells')} cells, the manifest has {len(rows)} rows")
    except (OSError, ValueError, tf.errors.OpError) as e:
        problems.append(f"cannot read summary.json (incomplete build?): {e}")

    by_shard: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    on_disk = sorted(n for n in _listdir(out) if n.endswith(".tfrec"))
    for name in sorted(set(by_shard) - set(on_disk)):
        problems.append(f"{name}: in the manifest ({len(by_shard[name])} rows) but not in {out}")
    for name in sorted(set(on_disk) - set(by_shard)):
        problems.append(f"{name}: in {out} but not in the manifest")

    id_spec = {
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "cell_id": tf.io.FixedLenFeature([], tf.int64),
    }
    for name in on_disk:
        path = fileutil.join(out, name)
        expected = by_shard.get(name, [])
        try:
            fold, _, count_in_name = parse_shard_name(name)
        except ValueError as e:
            problems.append(str(e))
            continue
        report.shards += 1
        ids: list[tuple[str, int]] = []
        try:
            dataset = tf.data.TFRecordDataset(path).batch(256).map(lambda s: tf.io.parse_example(s, id_spec))
            for batch in dataset:
                ids.extend(zip((b.decode() for b in batch["image_id"].numpy()), batch["cell_id"].numpy().tolist()))
        except tf.errors.OpError as e:
            problems.append(f"{name}: unreadable after {len(ids)} record(s) (corrupt or truncated): {e.message.splitlines()[0]}")
            continue
        report.records += len(ids)
        if len(ids) != count_in_name:
            problems.append(f"{name}: {len(ids)} records, the name says {count_in_name}")
        if name in by_shard and len(ids) != len(expected):
            problems.append(f"{name}: {len(ids)} records, the manifest lists {len(expected)}")
        listed = [(r["image_id"], int(r["cell_id"])) for r in expected]
        if name in by_shard and len(ids) == len(expected) and ids != listed:
            k = next(i for i, (a, b) in enumerate(zip(ids, listed)) if a != b)
            problems.append(f"{name}: record {k} is {ids[k]}, the manifest says {listed[k]}")
        bad_folds = {r["fold"] for r in expected if int(r["fold"]) != fold}
        if bad_folds:
            problems.append(f"{name}: manifest rows of fold(s) {sorted(bad_folds)} in a fold-{fold} shard")
        try:
            for k, serialized in enumerate(tf.data.TFRecordDataset(path).take(sample)):
                ex = parse_example(serialized, crop_size=crop_size)
                image, mask = ex["image"].numpy(), ex["mask"].numpy()
                s = crop_size or image.shape[0]
                if image.shape != (s, s, 4) or mask.shape != (s, s, 1) or int(ex["crop_size"]) != s:
                    problems.append(f"{name} record {k}: image {image.shape}, mask {mask.shape}, crop size {s} expected")
                if int(ex["fold"]) != fold:
                    problems.append(f"{name} record {k}: fold {int(ex['fold'])}, the name says {fold}")
                if k < len(expected) and parse_labels(expected[k]["labels"]) != ex["label_ids"].numpy().tolist():
                    problems.append(f"{name} record {k}: labels {ex['label_ids'].numpy().tolist()}, "
                                    f"the manifest says {expected[k]['labels']}")
                report.decoded += 1
        except (tf.errors.OpError, ValueError) as e:
            problems.append(f"{name}: a sample record does not decode: {e}")
    log.info("verified %s: %d shards, %d records, %d manifest rows, %d decoded, %d problem(s)",
             out, report.shards, report.records, report.manifest_rows, report.decoded, len(problems))
    return report
