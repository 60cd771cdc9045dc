"""The arguments of a build (``BuildOptions``), their checks, and the content-defining config that
``build_config.json`` holds and a resumed build must match."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from hpa_tf.crops import CropSpec
from hpa_tf.fileutil import is_remote

#: Version of the build config's layout (2: the crop spec is one ``crop`` entry).
FORMAT_VERSION = 2


class BuildError(RuntimeError):
    """The build cannot start or go on; the message says why."""


class ConfigMismatchError(BuildError):
    """The output folder holds a build made with other content-defining arguments."""


@dataclass(frozen=True)
class BuildOptions:
    """Arguments of one build (see ``python -m tfrecord_builder --help``); frozen and picklable.

    Attributes
    ----------
    data_dir : folder of ``{ID}_{red,green,blue,yellow}.{png,jpg,tif}`` (e.g. Kaggle ``train/``).
    labels : ``train.csv`` (``ID,Label``).
    out : output folder, local or ``gs://…``.
    crop : the crop spec of every record (``hpa_tf.crops.CropSpec``: kind, size, margin, neighbour
        masking); kind ``field`` makes one record per field (the whole field resized), unsegmented.
    segmenter : ``builtin`` or ``hpacellseg`` (ignored when ``masks_dir`` is given or for ``field`` records).
    segmenter_options : keyword arguments of ``get_segmenter`` (e.g. model paths).
    masks_dir : reuse saved masks ``{masks_dir}/{ID}_cells.png`` instead of segmenting.
    workers : processes (1: in this process).
    shard_mb : target shard size in MB, turned into images per shard by an estimate.
    images_per_shard : explicit group size (overrides ``shard_mb``).
    folds, seed : number of folds and the stratifier's seed.
    encoding, png_compression, jpeg_quality : crop encoding (``hpa_tf.records.encode_example``).
    limit : build only the first ``limit`` images by sorted ID (folds still over all of them).
    min_cell_area : cells with fewer pixels (original resolution) are dropped and counted.
    source : the ``source`` feature of every record (e.g. ``train``, ``hpa-public``).
    cell_labels : a CSV ``ID,CellId,Label`` (other columns ignored, e.g. the synthetic
        ``train_truth.csv``) giving each cell its own labels instead of its field's; needs
        ``masks_dir`` (the cell ids are the saved masks'). Cells it does not list are dropped.
    source : the ``source`` feature of records whose label-file row has no ``Source`` value
        (e.g. ``train``; the downloader's label file says ``hpa-public`` per row).
    runner : ``local`` (this machine: a process pool) or ``beam`` (an Apache Beam pipeline:
        ``tfrecord_builder.beam_runner``); both build the same shard set.
    beam_options : Beam pipeline options (``--runner=DataflowRunner --project=…``); with
        ``runner="beam"`` only (empty: the local DirectRunner with ``workers`` workers).
    """

    data_dir: str
    labels: str
    out: str
    crop: CropSpec = CropSpec()
    segmenter: str = "builtin"
    segmenter_options: Mapping = field(default_factory=dict)
    masks_dir: str | None = None
    workers: int = 1
    shard_mb: float = 150.0
    images_per_shard: int | None = None
    folds: int = 5
    seed: int = 0
    encoding: str = "png"
    png_compression: int = 1
    jpeg_quality: int = 90
    limit: int | None = None
    min_cell_area: int = 0
    source: str = "train"
    cell_labels: str | None = None
    runner: str = "local"
    beam_options: tuple[str, ...] = ()


#: Runners of a build (``BuildOptions.runner``).
RUNNERS: tuple[str, ...] = ("local", "beam")


def check_options(options: BuildOptions) -> None:
    """BuildError listing every problem with the options (checked before any output is written)."""
    from hpa_tf.records import ENCODINGS

    problems = []
    if not isinstance(options.crop, CropSpec):
        problems.append(f"crop must be a hpa_tf.crops.CropSpec, got {type(options.crop).__name__}")
    elif options.crop.size < 8:
        problems.append(f"crop size must be >= 8, got {options.crop.size}")
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
    if options.runner not in RUNNERS:
        problems.append(f"runner must be one of {RUNNERS}, got {options.runner!r}")
    if options.beam_options and options.runner != "beam":
        problems.append("beam options need runner beam")
    # remote inputs (gs://…) are read by the Beam runner through Beam's file systems; it checks them
    for what, path in (("data dir", options.data_dir), ("masks dir", options.masks_dir)):
        if path is None:
            continue
        if is_remote(path):
            if options.runner != "beam":
                problems.append(f"{what} {path} is remote: only --runner beam reads fields from remote storage")
        elif not os.path.isdir(path):
            problems.append(f"{what} {path} is not a folder")
    if not os.path.isfile(options.labels):
        problems.append(f"labels file {options.labels} not found")
    if options.cell_labels is not None:
        if not os.path.isfile(options.cell_labels):
            problems.append(f"cell labels file {options.cell_labels} not found")
        if options.masks_dir is None or (isinstance(options.crop, CropSpec) and options.crop.is_field):
            problems.append("cell labels need cell records from saved masks (masks_dir, kind 'cell'): their ids")
    if problems:
        raise BuildError("; ".join(problems))


def _where(path: str) -> str:
    """A local path made absolute; a remote one as it is."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: object) -> object:
    """JSON round trip (tuples → lists), so that a config compares equal to its stored copy."""
    return json.loads(json.dumps(obj, sort_keys=True))


def content_config(options: BuildOptions, images_per_shard: int) -> dict:
    """The arguments that define the output's content (``build_config.json`` without ``run``).

    ``crop`` is ``options.crop.to_dict()``: the shard set's crop spec, read back by
    ``hpa_tf.shardset.read_crop_spec``.
    """
    seg_opts = {}
    for key, value in sorted(options.segmenter_options.items()):
        if key == "device":  # where it runs does not change what it computes
            continue
        if isinstance(value, str) and os.path.isfile(value):  # a model file: path and size identify it
            seg_opts[key] = {"path": os.path.abspath(value), "bytes": os.path.getsize(value)}
        else:
            seg_opts[key] = value
    if isinstance(options.crop, CropSpec) and options.crop.is_field:  # no segmentation: none of its settings count
        segmenter, seg_opts, masks_dir = "none", {}, None
    else:
        segmenter = "masks" if options.masks_dir else options.segmenter
        seg_opts = {} if options.masks_dir else seg_opts
        masks_dir = _where(options.masks_dir) if options.masks_dir else None
    config = {
        "format": FORMAT_VERSION,
        "crop": options.crop.to_dict(),
        "encoding": options.encoding,
        "min_cell_area": int(options.min_cell_area),
        "segmenter": segmenter,
        "segmenter_options": seg_opts,
        "masks_dir": masks_dir,
        "folds": int(options.folds),
        "seed": int(options.seed),
        "source": options.source,
        "data_dir": _where(options.data_dir),
        "labels_file": os.path.abspath(options.labels),
        "labels_sha256": _sha256(options.labels),
        "limit": options.limit,
        "images_per_shard": int(images_per_shard),
    }
    if options.cell_labels is not None:
        config["cell_labels_file"] = os.path.abspath(options.cell_labels)
        config["cell_labels_sha256"] = _sha256(options.cell_labels)
    if options.encoding == "png":
        config["png_compression"] = int(options.png_compression)
    else:
        config["jpeg_quality"] = int(options.jpeg_quality)
    return _canonical(config)


def config_hash(config: Mapping) -> str:
    """A short digest of a content config (recorded in every sidecar)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``key: old there, new now`` for every differing key (nested objects as ``crop.size``)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diffs
