"""Cell masks as competition text, and the submission CSV.

Mask text
    The competition's mask string is the full-resolution binary mask, traversed column-major
    (Fortran order), run-length encoded as COCO RLE *compressed counts* (pycocotools' LEB128-like
    ASCII string), zlib-compressed at level 9 and base64-encoded. The reference path is::

        rle = pycocotools._mask.encode(np.asfortranarray(mask[..., None].astype(np.uint8)))[0]["counts"]
        text = base64.b64encode(zlib.compress(rle, zlib.Z_BEST_COMPRESSION)).decode("ascii")

    ``encode_mask`` gives byte-identical text but computes the run lengths itself, with numpy,
    inside the mask's bounding box only (no full-size Fortran copy, no full-size scan in C), and
    hands them to ``pycocotools.mask.frPyObjects`` for the COCO string. ``encode_cells`` encodes
    every cell of a label image from one pass over the image (run boundaries along columns).

    "COCO bytes" below means the compressed counts string before zlib/base64 (``b"62;O"``): the
    form pycocotools' ``iou``/``decode`` take, and what the metric works on.

Submission file
    ``ID,ImageWidth,ImageHeight,PredictionString``; width and height are the ORIGINAL image size;
    ``PredictionString`` is space-separated triples ``label confidence mask`` (an empty string for
    a field without cells). Confidences are written with ``format_confidence`` (6 significant
    digits, ``repr``-free: ``0.5``, ``1``, ``0.123457``, ``1.5e-05``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from pycocotools import mask as coco_mask

from hpa_tf.fileutil import atomic_open
from hpa_tf.io import CsvFormatError, raise_csv_field_size_limit
from hpa_tf.labels import NUM_CLASSES

log = logging.getLogger(__name__)

HEADER: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")


class MaskFormatError(ValueError):
    """A mask string that is not valid base64 / zlib / COCO RLE, or does not fit the stated size."""


# ----------------------------------------------------------------------------------------------
# Run lengths
# ----------------------------------------------------------------------------------------------


def _label_runs(block: np.ndarray, y0: int, x0: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of each non-zero label of ``block`` in the column-major order of the full image.

    ``block`` is the window ``[y0:y0+h, x0:x0+w]`` of an image ``height`` rows tall that is zero
    outside the window. Returns ``(starts, ends, labels)`` (int64, ends exclusive, flat
    column-major pixel indices ``x * height + y``), sorted by label and then start; runs of one
    label that continue from the bottom of a column into the top of the next are merged.
    """
    block = np.ascontiguousarray(block)
    h, w = block.shape
    flat = block.ravel()
    # a "change" starts a segment (label of the pixels from there on, down the column)
    top_x = np.flatnonzero(block[0])
    inner = np.flatnonzero(block[1:] != block[:-1])  # index into the (h-1, w) difference array
    inner_y, inner_x = np.divmod(inner, w)
    bottom_x = np.flatnonzero(block[-1])  # the segment below the window is background
    ys = np.concatenate([np.zeros(top_x.size, np.int64), inner_y + 1, np.full(bottom_x.size, h, np.int64)])
    xs = np.concatenate([top_x, inner_x, bottom_x]).astype(np.int64)
    labels = np.concatenate(
        [flat[top_x].astype(np.int64), flat[inner + w].astype(np.int64), np.zeros(bottom_x.size, np.int64)]
    )
    pos = (xs + x0) * height + ys + y0
    # sort by position; where a column's bottom end meets the next column's top start, end first
    order = np.lexsort((labels != 0, pos))
    pos, labels = pos[order], labels[order]
    nonzero = np.flatnonzero(labels)
    starts, ends, labels = pos[nonzero], pos[nonzero + 1], labels[nonzero]
    by_label = np.argsort(labels, kind="stable")
    starts, ends, labels = starts[by_label], ends[by_label], labels[by_label]
    join = (ends[:-1] == starts[1:]) & (labels[:-1] == labels[1:])
    if join.any():
        keep_start = np.ones(starts.size, bool)
        keep_start[1:][join] = False
        keep_end = np.ones(ends.size, bool)
        keep_end[:-1][join] = False
        starts, ends, labels = starts[keep_start], ends[keep_end], labels[keep_start]
    return starts, ends, labels


def _counts_by_label(starts: np.ndarray, ends: np.ndarray, labels: np.ndarray, n_pixels: int) -> dict[int, np.ndarray]:
    """Uncompressed COCO counts (zeros first, alternating) per label from ``_label_runs`` output."""
    if starts.size == 0:
        return {}
    group_start = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    previous_end = np.empty_like(ends)
    previous_end[0] = 0
    previous_end[1:] = ends[:-1]
    previous_end[group_start] = 0
    interleaved = np.empty(2 * starts.size, np.int64)
    interleaved[0::2] = starts - previous_end
    interleaved[1::2] = ends - starts
    bounds = np.r_[group_start, starts.size]
    out: dict[int, np.ndarray] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        tail = n_pixels - int(ends[b - 1])
        counts = interleaved[2 * a : 2 * b]
        out[int(labels[a])] = np.append(counts, tail) if tail else counts
    return out


def _counts_to_coco(counts: np.ndarray | Sequence[int], height: int, width: int) -> bytes:
    """COCO compressed counts string from uncompressed counts (pycocotools' own string encoder)."""
    rle = coco_mask.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    return rle["counts"]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask if mask.dtype == bool else mask != 0


def mask_counts(mask: np.ndarray) -> np.ndarray:
    """Uncompressed COCO RLE counts of a mask: run lengths in column-major order, zeros first.

    Parameters
    ----------
    mask : (H, W) bool (any other dtype: non-zero is foreground).

    Returns
    -------
    (K,) int64 run lengths summing to H*W (``[H*W]`` for an empty mask, ``[0, ...]`` when the
    first pixel is set), exactly as pycocotools' ``encode`` counts them.
    """
    mask = _check_mask(mask)
    height, width = mask.shape
    n_pixels = height * width
    if n_pixels == 0:
        return np.zeros(1, np.int64)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.array([n_pixels], np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    runs = _label_runs(mask[y0:y1, x0:x1], y0, x0, height)
    return _counts_by_label(*runs, n_pixels)[1]


def mask_to_coco(mask: np.ndarray) -> bytes:
    """COCO compressed counts (bytes, before zlib/base64) of an (H, W) bool mask."""
    mask = _check_mask(mask)
    return _counts_to_coco(mask_counts(mask), *mask.shape)


def cells_to_coco(cells: np.ndarray, ids: Iterable[int] | None = None) -> dict[int, bytes]:
    """COCO compressed counts of many cells of one label image, from one pass over the image.

    Parameters
    ----------
    cells : (H, W) integer label image, 0 = background.
    ids : cell ids to encode (default: every non-zero id present). An id absent from the image
        gets the empty mask's string.

    Returns
    -------
    ``{id: COCO bytes}`` in the order of ``ids`` (ascending ids by default).
    """
    counts = _cells_counts(cells)
    height, width = cells.shape
    if ids is None:
        ids = sorted(counts)
    out: dict[int, bytes] = {}
    empty = np.array([height * width], np.int64)
    for cell_id in ids:
        cell_id = int(cell_id)
        if cell_id == 0:
            raise ValueError("cell id 0 is the background, not a cell")
        out[cell_id] = _counts_to_coco(counts.get(cell_id, empty), height, width)
    return out


def _cells_counts(cells: np.ndarray) -> dict[int, np.ndarray]:
    """``{id: uncompressed COCO counts}`` for every non-zero label of an (H, W) label image."""
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"label image must be 2-D (H, W), got shape {cells.shape}")
    if cells.dtype == bool or not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"label image must have an integer dtype, got {cells.dtype}")
    height, width = cells.shape
    if cells.size == 0:
        return {}
    return _counts_by_label(*_label_runs(cells, 0, 0, height), height * width)


def coco_to_text(coco: bytes) -> str:
    """Competition mask text from COCO bytes: zlib (level 9) then base64, as ASCII."""
    return base64.b64encode(zlib.compress(coco, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def text_to_coco(text: str) -> bytes:
    """COCO bytes from competition mask text (base64, then zlib); MaskFormatError if malformed."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MaskFormatError(f"mask is not valid base64: {exc}") from None
    try:
        return zlib.decompress(raw)
    except zlib.error as exc:
        raise MaskFormatError(f"mask is not valid zlib data: {exc}") from None


def coco_counts(coco: bytes) -> np.ndarray:
    """Uncompressed counts (int64) from COCO bytes: the inverse of pycocotools' string encoder.

    Hand-written (pycocotools exposes no string → counts function) so that a malformed or
    wrong-sized mask can be rejected before pycocotools decodes it: its ``decode`` returns
    uninitialised memory for counts that sum to less than H*W.

    Raises
    ------
    MaskFormatError : characters outside the alphabet, a truncated value, or a negative count.
    """
    chars = np.frombuffer(coco, np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise MaskFormatError("COCO RLE string has characters outside '0'..'o'")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise MaskFormatError("COCO RLE string ends inside a value (truncated)")
    last = np.flatnonzero(~more)
    first = np.r_[0, last[:-1] + 1]
    n_chars = last - first + 1
    if n_chars.max() > 12:
        raise MaskFormatError("COCO RLE string has a value too long for 64 bits")
    group = np.repeat(np.arange(first.size), n_chars)
    shift = 5 * (np.arange(chars.size) - first[group])
    values = np.add.reduceat((chars & 0x1F) << shift, first)
    negative = (chars[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * n_chars[negative])
    # counts[m] = value[m] + counts[m - 2] for m > 2: running sums over odd and over even (>=2) indices
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    if (counts < 0).any():
        raise MaskFormatError("COCO RLE string decodes to a negative run length")
    return counts


def check_coco(coco: bytes, height: int, width: int) -> np.ndarray:
    """Counts of COCO bytes, checked to cover exactly ``height * width`` pixels (MaskFormatError)."""
    counts = coco_counts(coco)
    total = int(counts.sum())
    if total != height * width:
        raise MaskFormatError(f"mask covers {total} pixels but the image is {width}x{height} = {height * width} pixels")
    return counts


def encode_mask(mask: np.ndarray) -> str:
    """Competition mask text of one binary mask.

    Parameters
    ----------
    mask : (H, W) bool, full resolution of the original image (other dtypes: non-zero = set).

    Returns
    -------
    ASCII text, byte-identical to the pycocotools reference path (module docstring).
    """
    return coco_to_text(mask_to_coco(mask))


def encode_cells(cells: np.ndarray, ids: Iterable[int] | None = None) -> dict[int, str]:
    """Competition mask text of many cells of one label image (``encode_mask(cells == id)`` each).

    Parameters
    ----------
    cells : (H, W) integer label image at the original resolution, 0 = background.
    ids : cell ids (default: every non-zero id present, ascending); an absent id gets the
        empty mask's text.
    """
    return {cell_id: coco_to_text(coco) for cell_id, coco in cells_to_coco(cells, ids).items()}


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask from competition mask text (pycocotools ``decode``).

    Raises
    ------
    MaskFormatError : malformed text, or a mask that does not cover exactly ``height * width`` pixels.
    """
    coco = text_to_coco(text)
    check_coco(coco, height, width)
    with warnings.catch_warnings():
        # pycocotools' Masks.__array__ predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = coco_mask.decode({"size": [int(height), int(width)], "counts": coco})
    return decoded.astype(bool)


# ----------------------------------------------------------------------------------------------
# Submission rows
# ----------------------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """One detection: class id 0..18, confidence in [0, 1], competition mask text."""

    label: int
    confidence: float
    mask: str


@dataclass
class SubmissionRow:
    """One field of view in the submission; width/height are the original image size."""

    image_id: str
    width: int
    height: int
    predictions: list[Prediction] = field(default_factory=list)


def format_confidence(confidence: float) -> str:
    """Compact confidence text: 6 significant digits (``0.5``, ``1``, ``0.123457``, ``1.5e-05``)."""
    return f"{confidence:.6g}"


def _check_prediction(label: int, confidence: float, mask: str, where: str) -> None:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
        raise ValueError(f"{where}: label {label!r} is not a class id 0..{NUM_CLASSES - 1}")
    if not isinstance(confidence, (float, int, np.floating, np.integer)) or not 0.0 <= confidence <= 1.0:
        raise ValueError(f"{where}: confidence {confidence!r} is not a number in [0, 1]")
    parts = mask.split(None, 1) if isinstance(mask, str) else None
    if not parts or len(parts) != 1 or parts[0] != mask:
        raise ValueError(f"{where}: mask must be non-empty text without whitespace")


def format_prediction_string(predictions: Iterable[tuple[int, float, str]], where: str = "prediction") -> str:
    """``"label confidence mask label confidence mask …"`` ("" for no predictions).

    Raises ValueError for a label outside 0..18, a confidence outside [0, 1] (or NaN), or an
    empty mask text / one containing spaces.
    """
    parts: list[str] = []
    for label, confidence, mask in predictions:
        _check_prediction(label, confidence, mask, where)
        parts.append(f"{int(label)} {format_confidence(float(confidence))} {mask}")
    return " ".join(parts)


def parse_prediction_string(text: str, where: str = "PredictionString") -> list[Prediction]:
    """Parse a PredictionString into ``Prediction`` triples (CsvFormatError naming ``where``)."""
    tokens = (text or "").split()
    if len(tokens) % 3:
        raise CsvFormatError(f"{where}: {len(tokens)} tokens is not a whole number of 'label confidence mask' triples")
    out: list[Prediction] = []
    for i in range(0, len(tokens), 3):
        label_text, conf_text, mask = tokens[i], tokens[i + 1], tokens[i + 2]
        if not label_text.isdecimal() or int(label_text) >= NUM_CLASSES:
            raise CsvFormatError(
                f"{where}: triple {i // 3 + 1}: label {label_text!r} is not a class id 0..{NUM_CLASSES - 1}"
            )
        try:
            confidence = float(conf_text)
        except ValueError:
            raise CsvFormatError(f"{where}: triple {i // 3 + 1}: confidence {conf_text!r} is not a number") from None
        if not 0.0 <= confidence <= 1.0:
            raise CsvFormatError(f"{where}: triple {i // 3 + 1}: confidence {conf_text} is outside [0, 1]")
        out.append(Prediction(int(label_text), confidence, mask))
    return out


def write_submission(path: str | os.PathLike, rows: Iterable[SubmissionRow]) -> int:
    """Write the submission CSV atomically; returns the number of rows.

    Raises ValueError (naming the ID) for a duplicate ID, a non-positive size, or a bad prediction.
    """
    seen: set[str] = set()
    n = 0
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for row in rows:
            if not row.image_id or row.image_id in seen:
                raise ValueError(f"{path}: empty or duplicate ID {row.image_id!r}")
            if int(row.width) <= 0 or int(row.height) <= 0:
                raise ValueError(f"{path}: ID {row.image_id}: image size {row.width}x{row.height} is not positive")
            seen.add(row.image_id)
            text = format_prediction_string(row.predictions, where=f"{path}: ID {row.image_id}")
            writer.writerow((row.image_id, int(row.width), int(row.height), text))
            n += 1
    log.info("wrote %d rows to %s", n, path)
    return n


def _records(reader, path: str | os.PathLike):
    """``(line number, fields)`` of a csv reader; undecodable text or bad quoting → CsvFormatError."""
    try:
        for record in reader:
            yield reader.line_num, record
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CsvFormatError(f"{path} line {reader.line_num + 1}: unreadable CSV ({exc})") from None


def _open_submission(path: str | os.PathLike):
    raise_csv_field_size_limit()
    f = open(path, newline="", encoding="utf-8")
    reader = csv.reader(f)
    try:
        header = next(_records(reader, path), (0, None))[1]
    except CsvFormatError:
        f.close()
        raise
    if header is None or [h.strip() for h in header] != list(HEADER):
        f.close()
        raise CsvFormatError(f"{path}: header must be {','.join(HEADER)}, got {header}")
    return _records(reader, path), f


def read_submission(path: str | os.PathLike) -> list[SubmissionRow]:
    """Read a submission CSV (strict: CsvFormatError naming the line at the first problem).

    Masks are returned as text, not decoded or checked (``validate_submission`` does that).
    """
    reader, f = _open_submission(path)
    rows: list[SubmissionRow] = []
    seen: dict[str, int] = {}
    with f:
        for line_no, record in reader:
            where = f"{path} line {line_no}"
            if not record:
                continue
            if len(record) != 4:
                raise CsvFormatError(f"{where}: expected 4 fields, got {len(record)}")
            image_id = record[0].strip()
            if not image_id:
                raise CsvFormatError(f"{where}: empty ID")
            if image_id in seen:
                raise CsvFormatError(f"{where}: duplicate ID {image_id!r} (first on line {seen[image_id]})")
            seen[image_id] = line_no
            width, height = _parse_size(record[1], record[2], where)
            rows.append(SubmissionRow(image_id, width, height, parse_prediction_string(record[3], where)))
    return rows


def _parse_size(width_text: str, height_text: str, where: str) -> tuple[int, int]:
    try:
        width, height = int(width_text), int(height_text)
    except ValueError:
        raise CsvFormatError(
            f"{where}: ImageWidth/ImageHeight must be integers, got {width_text!r}, {height_text!r}"
        ) from None
    if width <= 0 or height <= 0:
        raise CsvFormatError(f"{where}: image size {width}x{height} is not positive")
    return width, height


def validate_submission(
    path: str | os.PathLike,
    expected_ids: Iterable[str] | Mapping[str, tuple[int, int]] | None = None,
    check_masks: bool = True,
    max_problems: int = 200,
) -> list[str]:
    """All problems of a submission file, one line each (an empty list: the file is valid).

    Checks the header; every row has 4 fields, a non-empty unique ID and positive integer size;
    the PredictionString is whole triples with labels 0..18 and finite confidences in [0, 1];
    every mask is valid base64/zlib/COCO RLE covering exactly width × height pixels
    (``check_masks``; each distinct mask text is decoded once). With ``expected_ids`` every
    expected ID must appear exactly once and no other; a mapping ``{ID: (width, height)}`` also
    checks the sizes (e.g. from ``hpa_tf.io.read_sample_submission``).

    Problems beyond ``max_problems`` are counted in a final line.
    """
    problems: list[str] = []
    n_more = 0

    def report(message: str) -> None:
        nonlocal n_more
        if len(problems) < max_problems:
            problems.append(message)
        else:
            n_more += 1

    try:
        reader, f = _open_submission(path)
    except (OSError, CsvFormatError) as exc:
        return [str(exc)]
    seen: dict[str, int] = {}
    with f:
        try:
            _validate_rows(reader, expected_ids, check_masks, seen, report)
        except CsvFormatError as exc:
            report(str(exc))
    if expected_ids is not None:
        expected = set(expected_ids)
        for image_id in sorted(expected - seen.keys()):
            report(f"missing ID {image_id!r}")
        for image_id in sorted(seen.keys() - expected):
            report(f"line {seen[image_id]}: unexpected ID {image_id!r}")
    if n_more:
        problems.append(f"... and {n_more} more problems")
    return problems


def _validate_rows(
    records: Iterable[tuple[int, list[str]]],
    expected_ids: Iterable[str] | Mapping[str, tuple[int, int]] | None,
    check_masks: bool,
    seen: dict[str, int],
    report,
) -> None:
    """Check each row of a submission (the body of ``validate_submission``)."""
    for line_no, record in records:
        where = f"line {line_no}"
        if not record:
            continue
        if len(record) != 4:
            report(f"{where}: expected 4 fields, got {len(record)}")
            continue
        image_id = record[0].strip()
        if not image_id:
            report(f"{where}: empty ID")
        elif image_id in seen:
            report(f"{where}: duplicate ID {image_id!r} (first on line {seen[image_id]})")
        else:
            seen[image_id] = line_no
        try:
            width, height = _parse_size(record[1], record[2], where)
        except CsvFormatError as exc:
            report(str(exc))
            width = height = None
        if isinstance(expected_ids, Mapping) and image_id in expected_ids and width is not None:
            exp_w, exp_h = expected_ids[image_id]
            if (width, height) != (int(exp_w), int(exp_h)):
                report(f"{where}: ID {image_id}: size {width}x{height}, expected {exp_w}x{exp_h}")
        tokens = record[3].split()
        if len(tokens) % 3:
            report(f"{where}: {len(tokens)} PredictionString tokens is not a whole number of triples")
            continue
        checked: dict[str, str | None] = {}
        for i in range(0, len(tokens), 3):
            at = f"{where} triple {i // 3 + 1}"
            label_text, conf_text, mask = tokens[i : i + 3]
            if not label_text.isdecimal() or int(label_text) >= NUM_CLASSES:
                report(f"{at}: label {label_text!r} is not a class id 0..{NUM_CLASSES - 1}")
            try:
                confidence = float(conf_text)
            except ValueError:
                report(f"{at}: confidence {conf_text!r} is not a number")
            else:
                if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
                    report(f"{at}: confidence {conf_text} is outside [0, 1]")
            if check_masks and width is not None:
                if mask not in checked:
                    try:
                        check_coco(text_to_coco(mask), height, width)
                        checked[mask] = None
                    except MaskFormatError as exc:
                        checked[mask] = str(exc)
                if checked[mask] is not None:
                    report(f"{at}: {checked[mask]}")
