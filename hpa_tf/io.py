"""Reading HPA fields of view and the competition's CSV files.

A field of view is four greyscale files ``{ID}_red``, ``{ID}_green``, ``{ID}_blue``,
``{ID}_yellow`` (png, jpg/jpeg, tif/tiff). ``read_rgby`` stacks them into one ``(H, W, 4)``
array in R, G, B, Y order.

Bit depth
    8-bit files are returned as they are. 16-bit files (the competition's test images) are
    converted to uint8 by ``to_uint8``: ``round(x / 257)``, i.e. ``(x + 128) // 257``, which maps
    0 → 0 and 65535 → 255 and uses the full 16-bit range, deterministically and without any
    per-image stretching. ``read_rgby(..., native=True)`` returns the file's own dtype instead.

Colour-coded files
    The HPA website serves each channel as an RGB image whose signal sits in the plane matching
    the file's name: red → R, green → G, blue → B, yellow → R and G (yellow is taken as the mean
    of R and G). A 3- or 4-plane file is reduced that way; a 1-plane file is used as it is.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hpa_tf.fileutil import raise_csv_field_size_limit
from hpa_tf.labels import LabelError, parse_labels

log = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "tif", "tiff")
_JPEG_EXT = ("jpg", "jpeg")


def channel_indices(channels: str) -> list[int]:
    """Indices into an RGBY array for a channel string such as ``"rgby"``, ``"g"`` or ``"rgb"``.

    The one place that maps channel letters to array planes (training and prediction both use it).
    """
    letters = "rgby"
    channels = channels.lower()
    if not channels or any(c not in letters for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct letters of 'rgby' (e.g. 'rgby', 'g', 'rgb'), got {channels!r}")
    return [letters.index(c) for c in channels]


class ImageReadError(IOError):
    """A channel file is missing, unreadable, corrupt, or inconsistent with its siblings."""


class CsvFormatError(ValueError):
    """A malformed CSV file or row; the message names the file and line."""


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an 8- or 16-bit image to uint8 (16-bit: ``(x + 128) // 257``, full range)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        # float images in [0, 1] (e.g. some TIFF writers)
        return np.clip(np.rint(np.nan_to_num(image) * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {image.dtype}")


def find_channel_file(directory: str | os.PathLike, image_id: str, channel: str) -> Path:
    """Path of ``{ID}_{channel}.{ext}`` in ``directory``; ImageReadError if none exists."""
    directory = Path(directory)
    for ext in EXTENSIONS:
        for candidate in (directory / f"{image_id}_{channel}.{ext}", directory / f"{image_id}_{channel}.{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise ImageReadError(
        f"missing channel file: {directory / f'{image_id}_{channel}'}.{{{','.join(EXTENSIONS)}}} not found"
    )


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Capture what C libraries write straight to file descriptor 2 during the block (libpng's
    ``libpng error: …``, OpenCV's ``[ WARN:0@…]`` lines), so that they do not land in the middle of a
    progress bar; yields a list that holds the captured text, whitespace-collapsed, after the block.

    The messages belong in the error of the file being decoded (``ImageReadError``), which a
    build lists in ``skipped.csv``. One block at a time per process (a lock); Python's own
    ``sys.stderr`` writes from this thread wait until the block ends.
    """
    captured: list[str] = []
    with _STDERR_LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 (a detached process): nothing to capture
            yield captured
            return
        try:
            with tempfile.TemporaryFile() as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield captured
                finally:
                    os.dup2(saved, 2)
                    sink.seek(0)
                    text = " ".join(sink.read().decode("utf-8", "replace").split())
                    if text:
                        captured.append(text)
        finally:
            os.close(saved)


def _decode(data: bytes, flags: int, path: Path) -> np.ndarray:
    """``cv2.imdecode`` with the decoder's own messages captured: they go into the error when the
    file cannot be decoded, and to the debug log when it can."""
    with decoder_messages() as said:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        detail = f": {'; '.join(said)}" if said else ""
        raise ImageReadError(f"{path}: cannot decode image (corrupt or truncated file){detail}")
    if said:
        log.debug("%s: decoder said: %s", path, "; ".join(said))
    return image


def read_channel(path: str | os.PathLike, channel: str) -> np.ndarray:
    """Read one channel file as a 2-D array in its native dtype (uint8 or uint16).

    Colour-coded RGB files are reduced to the plane that matches ``channel``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    data = path.read_bytes()
    if not data:
        raise ImageReadError(f"{path}: empty file")
    ext = path.suffix.lower().lstrip(".")
    if ext in _JPEG_EXT and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")
    image = _decode(data, cv2.IMREAD_UNCHANGED, path)
    if image.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(image.dtype, np.floating):
            image = to_uint8(image)
        else:
            raise ImageReadError(f"{path}: unsupported pixel type {image.dtype}")
    if image.ndim == 3:
        # OpenCV decodes colour files as BGR(A)
        b, g, r = image[..., 0], image[..., 1], image[..., 2]
        if channel == "red":
            image = r
        elif channel == "green":
            image = g
        elif channel == "blue":
            image = b
        elif channel == "yellow":
            image = ((r.astype(np.uint32) + g + 1) // 2).astype(image.dtype)
        else:
            raise ValueError(f"unknown channel {channel!r}")
    if image.ndim != 2:
        raise ImageReadError(f"{path}: unexpected image shape {image.shape}")
    return np.ascontiguousarray(image)


def read_rgby(directory: str | os.PathLike, image_id: str, native: bool = False) -> np.ndarray:
    """Read a field of view as ``(H, W, 4)`` in R, G, B, Y order.

    Parameters
    ----------
    directory : folder holding ``{image_id}_{red,green,blue,yellow}.{png,jpg,tif}``.
    image_id : the field's ID.
    native : keep the files' dtype (uint16 for 16-bit files) instead of converting to uint8.
        Channels of different bit depths are promoted to uint16 (8-bit values × 257).

    Raises
    ------
    ImageReadError : a missing, corrupt or truncated file, or channels of different sizes; the
        message names the file.
    """
    planes: list[np.ndarray] = []
    paths: list[Path] = []
    for channel in CHANNELS:
        path = find_channel_file(directory, image_id, channel)
        planes.append(read_channel(path, channel))
        paths.append(path)
    shape = planes[0].shape
    for path, plane in zip(paths, planes):
        if plane.shape != shape:
            raise ImageReadError(
                f"{path}: size {plane.shape[1]}x{plane.shape[0]} differs from "
                f"{paths[0].name} ({shape[1]}x{shape[0]})"
            )
    if native:
        if any(p.dtype == np.uint16 for p in planes):
            planes = [p.astype(np.uint16) * 257 if p.dtype == np.uint8 else p for p in planes]
        return np.stack(planes, axis=-1)
    return np.stack([to_uint8(p) for p in planes], axis=-1)


def list_image_ids(directory: str | os.PathLike) -> list[str]:
    """Sorted IDs of the fields in ``directory`` (any ``{ID}_{channel}.{ext}`` file counts).

    An ID with only some channel files is listed; ``read_rgby`` then names the missing file.
    """
    ids: set[str] = set()
    for name in os.listdir(directory):
        stem, dot, ext = name.rpartition(".")
        if not dot or ext.lower() not in EXTENSIONS:
            continue
        image_id, _, channel = stem.rpartition("_")
        if image_id and channel in CHANNELS:
            ids.add(image_id)
    return sorted(ids)


def _open_csv(path: str | os.PathLike, required: Sequence[str]) -> tuple[csv.DictReader, object]:
    raise_csv_field_size_limit()  # e.g. a full submission given as the sample submission
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f)
    try:
        header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        f.close()
        raise CsvFormatError(f"{path} line 1: unreadable CSV ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise CsvFormatError(f"{path}: header {header} lacks column(s) {missing}")
    return reader, f


def read_labels(path: str | os.PathLike) -> dict[str, list[int]]:
    """Read ``train.csv`` (``ID,Label``) into ``{ID: [class ids]}``, in file order.

    Raises CsvFormatError / LabelError naming the file and line for a row that is not an ``ID,Label``
    row (too few fields), a duplicate ID, a row without an ID or without a label, or a malformed or
    unknown label.
    """
    reader, f = _open_csv(path, ("ID", "Label"))
    labels: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    with f:
        for row in _rows(reader, path):
            line_no = reader.line_num
            where = f"{path} line {line_no}"
            if row.get("Label") is None:  # fewer fields than the header: not a row of this file
                text = ",".join(v for v in row.values() if isinstance(v, str))
                raise CsvFormatError(f"{where}: not an ID,Label row: {text[:80]!r} ({len(reader.fieldnames or [])} "
                                     "columns expected)")
            image_id = (row.get("ID") or "").strip()
            if not image_id:
                raise CsvFormatError(f"{where}: empty ID")
            if image_id in labels:
                raise CsvFormatError(
                    f"{where}: duplicate ID {image_id!r} (first on line {first_line[image_id]})"
                )
            if not row["Label"].strip():
                raise LabelError(f"{where}: ID {image_id!r} has an empty Label (expected class ids 0..18 "
                                 "separated by '|')")
            labels[image_id] = parse_labels(row["Label"], where=where)
            first_line[image_id] = line_no
    return labels


def _rows(reader: csv.DictReader, path: str | os.PathLike) -> Iterator[dict]:
    """The rows of a DictReader; undecodable text or broken quoting → CsvFormatError naming the line."""
    try:
        yield from reader
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CsvFormatError(f"{path} line {reader.line_num + 1}: unreadable CSV ({exc})") from None


def read_sources(path: str | os.PathLike) -> dict[str, str]:
    """The ``Source`` column of a label file (``ID,Label,Source,…``, as ``hpa_tf.download`` writes it):
    ``{ID: source}`` for the rows with a non-empty value; ``{}`` when the file has no such column."""
    raise_csv_field_size_limit()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "Source" not in (reader.fieldnames or []):
            return {}
        sources = {}
        for row in reader:
            image_id, source = (row.get("ID") or "").strip(), (row.get("Source") or "").strip()
            if image_id and source:
                sources[image_id] = source
        return sources


@dataclass(frozen=True)
class SampleRow:
    image_id: str
    width: int
    height: int


def read_sample_submission(path: str | os.PathLike) -> list[SampleRow]:
    """Read ``sample_submission.csv`` (``ID,ImageWidth,ImageHeight,PredictionString``)."""
    reader, f = _open_csv(path, ("ID", "ImageWidth", "ImageHeight"))
    rows: list[SampleRow] = []
    seen: set[str] = set()
    with f:
        for row in _rows(reader, path):
            line_no = reader.line_num
            image_id = (row.get("ID") or "").strip()
            if not image_id:
                raise CsvFormatError(f"{path} line {line_no}: empty ID")
            if image_id in seen:
                raise CsvFormatError(f"{path} line {line_no}: duplicate ID {image_id!r}")
            try:
                width, height = int(row["ImageWidth"]), int(row["ImageHeight"])
            except (TypeError, ValueError):
                raise CsvFormatError(
                    f"{path} line {line_no}: ImageWidth/ImageHeight must be integers, got "
                    f"{row.get('ImageWidth')!r}, {row.get('ImageHeight')!r}"
                ) from None
            seen.add(image_id)
            rows.append(SampleRow(image_id, width, height))
    return rows


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an image array as PNG (8 or 16 bit, 1, 3 or 4 planes in OpenCV's BGR(A) order),
    under a temporary name renamed when complete."""
    from hpa_tf.fileutil import atomic_path

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())


def write_label_image(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write an int label image as a uint16 PNG, atomically (ids must be < 65536)."""
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) > 65535:
        raise ValueError(f"{path}: label ids above 65535 cannot be stored in a uint16 PNG")
    write_png(path, labels.astype(np.uint16))


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label image written by ``write_label_image`` as int32 ``(H, W)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read label image ({e.strerror or e})") from None
    try:
        image = _decode(data, cv2.IMREAD_UNCHANGED, path) if data else None
    except ImageReadError as e:
        raise ImageReadError(str(e).replace("cannot decode image", "cannot read label image", 1)) from None
    if image is None:
        raise ImageReadError(f"{path}: cannot read label image (empty file)")
    if image.ndim != 2:
        raise ImageReadError(f"{path}: label image must have one channel, got shape {image.shape}")
    return image.astype(np.int32)
