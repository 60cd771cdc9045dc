"""The per-field unit of work: read → segment (or read saved masks) → crop → encode; for a
``field`` crop spec: read → resize the whole field → encode (one record, no segmentation).

``encode_field`` is a plain function of plain, picklable inputs and outputs, with no module state
and no output files: the local runner (``tfrecord_builder.worker``) calls it for every field of a
shard task, and any other runner can call it per field and place the examples itself. A field
that cannot be used is not an error: the result carries a skip reason instead of examples.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpa_tf.crops import find_cells
from hpa_tf.fileutil import raise_csv_field_size_limit
from hpa_tf.io import CHANNELS, ImageReadError, find_channel_file, read_label_image, read_rgby
from hpa_tf.labels import format_labels
from hpa_tf.shardset import MANIFEST_COLUMNS
from tfrecord_builder.options import BuildError, BuildOptions

log = logging.getLogger(__name__)

#: Kinds of skipped fields (``summary.json`` counts them; ``skipped.csv`` has the full reason).
SKIP_KINDS: tuple[str, ...] = ("not in data dir", "bad channel file", "bad mask file", "segmentation failed", "no cells")

_SHARD, _RECORD = MANIFEST_COLUMNS.index("shard"), MANIFEST_COLUMNS.index("record")


@dataclass(frozen=True)
class FieldResult:
    """What one field gave.

    Attributes
    ----------
    image_id : the field.
    examples : serialised ``tf.train.Example`` records, one per kept cell, in cell id order.
    rows : its manifest rows (``MANIFEST_COLUMNS`` order), ``shard`` and ``record`` left None until
        the records are placed in a shard (``manifest_rows``).
    cells_dropped : cells smaller than ``min_cell_area``.
    skip : ``(kind, reason)`` when the field gave no record (kind in ``SKIP_KINDS``), else None.
    """

    image_id: str
    examples: tuple[bytes, ...] = ()
    rows: tuple[tuple, ...] = ()
    cells_dropped: int = 0
    skip: tuple[str, str] | None = None

    def manifest_rows(self, shard: str, first_record: int) -> list[list]:
        """The manifest rows with the shard's name and each record's index in it filled in."""
        out = []
        for k, row in enumerate(self.rows):
            row = list(row)
            row[_SHARD], row[_RECORD] = shard, first_record + k
            out.append(row)
        return out


@functools.lru_cache(maxsize=2)
def read_cell_labels(path: str) -> dict[tuple[str, int], tuple[int, ...]]:
    """``{(ID, CellId): class ids}`` from a CSV with columns ``ID,CellId,Label`` (read once per process).

    Raises
    ------
    BuildError : a missing column or a malformed row (line number given).
    """
    from hpa_tf.labels import LabelError, parse_labels

    out: dict[tuple[str, int], tuple[int, ...]] = {}
    raise_csv_field_size_limit()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("ID", "CellId", "Label") if c not in (reader.fieldnames or [])]
        if missing:
            raise BuildError(f"{path}: cell labels lack column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                out[(row["ID"], int(row["CellId"]))] = tuple(parse_labels(row["Label"], where=f"{path} line {line}"))
            except (ValueError, LabelError) as e:
                raise BuildError(f"{path} line {line}: malformed row ({e})") from None
    return out


def read_field(data_dir: str, image_id: str) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """(H, W, 4) uint8 RGBY, or (None, (kind, reason)) to skip the field."""
    try:
        return read_rgby(data_dir, image_id), None
    except ImageReadError as e:
        present = 0
        for channel in CHANNELS:
            try:
                find_channel_file(data_dir, image_id, channel)
                present += 1
            except ImageReadError:
                pass
        if present == 0:
            return None, ("not in data dir", f"no channel files in {data_dir}")
        return None, ("bad channel file", str(e))


def field_cells(options: BuildOptions, image_id: str, image: np.ndarray,
                segmenter: object | None) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """(H, W) int32 cell label image from the saved masks or the segmenter, or (None, (kind, reason))."""
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
    if segmenter is None:
        raise ValueError("encode_field needs a segmenter when options.masks_dir is not set")
    try:
        cells, _ = segmenter.segment(image)
    except Exception as e:  # a segmenter failing on one odd field must not stop a long run
        log.warning("%s: segmentation failed: %s: %s", image_id, type(e).__name__, e)
        return None, ("segmentation failed", f"segmentation failed: {type(e).__name__}: {e}")
    return cells, None


def encode_field(
    image_id: str,
    labels: Sequence[int],
    fold: int,
    options: BuildOptions,
    segmenter: object | None = None,
    source: str | None = None,
) -> FieldResult:
    """Read, segment, crop and encode one field of view.

    Parameters
    ----------
    image_id, labels, fold : the field, its class ids (image-level) and its fold (assigned beforehand).
    options : the build's options: ``data_dir``, ``masks_dir``, ``crop`` (the ``CropSpec``),
        ``min_cell_area``, ``source`` and the encoding settings are used.
    segmenter : an object with ``segment(image) -> (cells, nuclei)``; not used (may be None) when
        ``options.masks_dir`` is set.
    source : the field's ``source`` (its label-file row's ``Source``); None: ``options.source``.

    Returns
    -------
    FieldResult with one serialised example and one manifest row per kept cell (for a ``field`` crop
    spec: one for the whole field, ``segmenter`` unused), or a skip reason.
    """
    from hpa_tf.records import FIELD_CELL_ID, encode_example, encode_field_example

    image, skip = read_field(options.data_dir, image_id)
    source = options.source if source is None else source
    if options.crop.is_field:  # the whole field, resized: no segmentation
        if image is None:
            return FieldResult(image_id, skip=skip)
        height, width = image.shape[:2]
        example = encode_field_example(
            options.crop.field(image), labels, image_id, (height, width), fold=fold, source=source,
            encoding=options.encoding, jpeg_quality=options.jpeg_quality, png_compression=options.png_compression)
        row = (image_id, FIELD_CELL_ID, int(fold), format_labels(labels), None, None, height * width,
               0, 0, width, height, height, width, source)
        return FieldResult(image_id, (example,), (row,), 0)
    cells = None
    if image is not None:
        cells, skip = field_cells(options, image_id, image, segmenter)
    if cells is None:
        return FieldResult(image_id, skip=skip)
    height, width = image.shape[:2]
    labels_text = format_labels(labels)
    per_cell = read_cell_labels(options.cell_labels) if options.cell_labels else None
    examples, rows = [], []
    dropped = 0
    for batch in options.crop.iter_crops(image, cells, min_area=options.min_cell_area):
        dropped += batch.n_dropped
        for k in range(len(batch)):
            cell_id = int(batch.cell_ids[k])
            bbox = [int(v) for v in batch.bboxes[k]]
            cell_labels = labels
            if per_cell is not None:
                if (image_id, cell_id) not in per_cell:
                    dropped += 1
                    continue
                cell_labels = per_cell[(image_id, cell_id)]
                labels_text = format_labels(cell_labels)
            examples.append(encode_example(
                batch.crops[k], batch.masks[k], cell_labels, image_id, cell_id, bbox, (height, width),
                fold=fold, source=source, encoding=options.encoding,
                jpeg_quality=options.jpeg_quality, png_compression=options.png_compression,
            ))
            rows.append((image_id, cell_id, int(fold), labels_text, None, None, int(batch.areas[k]),
                         *bbox, height, width, source))
    if not examples:
        n_small = find_cells(cells, min_area=options.min_cell_area).n_dropped
        reason = "no cells" if n_small == 0 else f"no cells of at least {options.min_cell_area} px ({n_small} smaller)"
        return FieldResult(image_id, cells_dropped=n_small, skip=("no cells", reason))
    return FieldResult(image_id, tuple(examples), tuple(rows), dropped)
