"""The TFRecord schema of cell crops and whole fields: one module writes (``encode_example``,
``encode_field_example``) and parses (``parse_example``).

One ``tf.train.Example`` per cell (crop spec kind ``cell``) or per field of view (kind ``field``,
``hpa_tf.crops.field_image``: the whole field resized to S × S). Features (``FEATURE_SPEC``):

============  ==============  =====  ==========================================================
feature       type            shape  meaning
============  ==============  =====  ==========================================================
image         bytes_list      1 | 4  the (S, S, 4) RGBY crop: one 4-channel PNG (planes stored
                                     as R, G, B, A = R, G, B, Y) or, with ``encoding=jpeg``,
                                     four greyscale JPEGs, one per channel in R, G, B, Y order
encoding      bytes           1      ``png`` or ``jpeg``
mask          bytes           1      the cell's own mask crop, 1-channel PNG, 0/255
labels        int64_list      0..19  class ids 0..18 of the cell (empty: unlabelled, e.g. test)
image_id      bytes           1      field of view id (the competition's ``ID``)
cell_id       int64           1      the cell's value in the field's label image
bbox          int64_list      4      tight cell box x0, y0, x1, y1 in original pixels (exclusive)
image_size    int64_list      2      field size H, W in original pixels
fold          int64           1      cross-validation fold (-1: none)
source        bytes           1      where the field came from, e.g. ``train``, ``hpa-public``
crop_size     int64           1      S, the crop side in pixels
============  ==============  =====  ==========================================================

A field record uses the same features: ``image`` is the resized field, ``mask`` is all 255 (the
whole field), ``labels`` the image-level labels, ``cell_id`` is ``FIELD_CELL_ID`` (0, never a
cell's id) and ``bbox`` the whole field ``0, 0, W, H``. Which kind a shard set holds is its crop
spec's ``kind`` (``build_config.json``), not a per-record feature.

Encoding happens on the numpy side with OpenCV (fast); ``cv2.imencode`` takes BGR(A) arrays, so
planes are swapped before writing and ``tf.io.decode_png(image, channels=4)`` returns R, G, B, Y.
``parse_example`` works eagerly and inside ``tf.data.Dataset.map``; it reads the encoding of
each example (``tf.cond``), so PNG and JPEG records may be mixed.

Shards are written uncompressed under a temporary name and renamed when complete
(``write_shard``, ``ShardWriter``), under the names ``hpa_tf.shardset`` gives them
(``fold{f}-{index:05d}-n{count}.tfrec``; that module owns the shard set's layout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import tensorflow as tf

from hpa_tf import fileutil
from hpa_tf.labels import NUM_CLASSES, LabelError
from hpa_tf.shardset import shard_name

log = logging.getLogger(__name__)

ENCODINGS: tuple[str, ...] = ("png", "jpeg")
CHANNELS: int = 4
#: ``cell_id`` of a whole-field record (label images use 0 for background, so no cell has it).
FIELD_CELL_ID: int = 0

#: Parsing spec of one serialised example (see the module docstring for the meaning).
FEATURE_SPEC: dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature] = {
    "image": tf.io.VarLenFeature(tf.string),
    "encoding": tf.io.FixedLenFeature([], tf.string, default_value=b"png"),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "labels": tf.io.VarLenFeature(tf.int64),
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "cell_id": tf.io.FixedLenFeature([], tf.int64),
    "bbox": tf.io.FixedLenFeature([4], tf.int64),
    "image_size": tf.io.FixedLenFeature([2], tf.int64),
    "fold": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "source": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    "crop_size": tf.io.FixedLenFeature([], tf.int64),
}


# ---------------------------------------------------------------------------------------------
# encoding (numpy / OpenCV side)
# ---------------------------------------------------------------------------------------------


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _png_params(compression: int) -> list[int]:
    """PNG writer settings: zlib level, plus the fast filters and run-length strategy, which halve
    the encoding time of cell crops and make them ~15 % smaller (still plain PNG for any decoder).
    The filter setting is OpenCV 4.12's (numpy 2 only); older OpenCV, as next to numpy 1.26, gets the rest."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression), cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FAST_FILTERS]
    return params


def _imencode(ext: str, array: np.ndarray, params: Sequence[int], what: str) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(array), list(params))
    if not ok:
        raise ValueError(f"{what}: OpenCV could not encode a {array.shape} {array.dtype} array as {ext}")
    return buf.tobytes()


def encode_image(
    crop: np.ndarray, encoding: str = "png", jpeg_quality: int = 90, png_compression: int = 1
) -> list[bytes]:
    """Encode an (S, S, 4) uint8 RGBY crop: ``[png]`` or ``[jpeg_r, jpeg_g, jpeg_b, jpeg_y]``."""
    if encoding == "png":
        # cv2 writes its array as B, G, R, A: swap so that the PNG's R, G, B, A planes are R, G, B, Y.
        return [_imencode(".png", crop[..., [2, 1, 0, 3]], _png_params(png_compression), "crop")]
    if encoding == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
        return [_imencode(".jpg", crop[..., c], params, f"crop channel {c}") for c in range(crop.shape[-1])]
    raise ValueError(f"unknown encoding {encoding!r}: expected one of {ENCODINGS}")


def encode_example(
    crop: np.ndarray,
    mask: np.ndarray,
    labels: Iterable[int],
    image_id: str,
    cell_id: int,
    bbox: Sequence[int],
    image_size: Sequence[int],
    fold: int = -1,
    source: str = "train",
    encoding: str = "png",
    jpeg_quality: int = 90,
    png_compression: int = 1,
) -> bytes:
    """Serialise one cell as a ``tf.train.Example`` (schema: module docstring).

    Parameters
    ----------
    crop : (S, S, 4) uint8, RGBY (as returned by ``hpa_tf.crops.cell_crops``).
    mask : (S, S) or (S, S, 1) uint8 0/255 (bool is accepted and stored as 0/255).
    labels : class ids 0..18 (empty for unlabelled cells).
    image_id, cell_id : provenance: field id and the cell's value in the label image.
    bbox : x0, y0, x1, y1 tight box in original pixels (x1, y1 exclusive).
    image_size : H, W of the field in original pixels.
    fold, source : cross-validation fold (-1: none) and data source name.
    encoding : ``png`` (lossless) or ``jpeg`` (one greyscale JPEG per channel, ``jpeg_quality``).
    png_compression : zlib level 0..9 for the PNGs (1: fast, near the best size for noisy crops).

    Raises
    ------
    LabelError : a label id outside 0..18. ValueError : a malformed crop, mask, box or size.
    """
    where = f"image {image_id!r} cell {cell_id}"
    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[0] != crop.shape[1] or crop.shape[2] != CHANNELS or crop.dtype != np.uint8:
        raise ValueError(f"{where}: crop must be (S, S, {CHANNELS}) uint8, got {crop.shape} {crop.dtype}")
    size = crop.shape[0]
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.shape != (size, size) or mask.dtype != np.uint8:
        raise ValueError(f"{where}: mask must be ({size}, {size}) uint8, got {mask.shape} {mask.dtype}")
    label_ids = sorted({int(i) for i in labels})
    bad = [i for i in label_ids if not 0 <= i < NUM_CLASSES]
    if bad:
        raise LabelError(f"{where}: unknown label id(s) {bad}: classes are 0..{NUM_CLASSES - 1}")
    bbox = [int(v) for v in bbox]
    image_size = [int(v) for v in image_size]
    if len(bbox) != 4 or len(image_size) != 2:
        raise ValueError(
            f"{where}: bbox needs 4 values (x0, y0, x1, y1) and image_size 2 (H, W), got {bbox}, {image_size}"
        )
    if encoding not in ENCODINGS:
        raise ValueError(f"{where}: unknown encoding {encoding!r}: expected one of {ENCODINGS}")

    features = {
        "image": _bytes(encode_image(crop, encoding, jpeg_quality, png_compression)),
        "encoding": _bytes([encoding.encode()]),
        "mask": _bytes([_imencode(".png", mask, _png_params(png_compression), f"{where} mask")]),
        "labels": _ints(label_ids),
        "image_id": _bytes([str(image_id).encode()]),
        "cell_id": _ints([cell_id]),
        "bbox": _ints(bbox),
        "image_size": _ints(image_size),
        "fold": _ints([fold]),
        "source": _bytes([str(source).encode()]),
        "crop_size": _ints([size]),
    }
    # deterministic: protobuf map order otherwise varies between processes (PYTHONHASHSEED)
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def encode_field_example(
    field: np.ndarray,
    labels: Iterable[int],
    image_id: str,
    image_size: Sequence[int],
    fold: int = -1,
    source: str = "train",
    encoding: str = "png",
    jpeg_quality: int = 90,
    png_compression: int = 1,
) -> bytes:
    """Serialise one whole field (kind ``field``): ``field`` is the (S, S, 4) uint8 resized field
    (``hpa_tf.crops.field_image``), ``image_size`` the original H, W; the mask is all 255, the
    cell id ``FIELD_CELL_ID`` and the box the whole field (module docstring)."""
    field = np.asarray(field)
    height, width = (int(v) for v in image_size)
    mask = np.full(field.shape[:2], 255, np.uint8)
    return encode_example(field, mask, labels, image_id, FIELD_CELL_ID, (0, 0, width, height), (height, width),
                          fold=fold, source=source, encoding=encoding, jpeg_quality=jpeg_quality,
                          png_compression=png_compression)


# ---------------------------------------------------------------------------------------------
# parsing (TensorFlow side: eager or graph)
# ---------------------------------------------------------------------------------------------


def decode_image(image: tf.Tensor, encoding: tf.Tensor | str, crop_size: int | None = None) -> tf.Tensor:
    """Decode the ``image`` feature (a (1,) or (4,) string tensor) to (S, S, 4) uint8 RGBY.

    ``encoding`` is the example's ``encoding`` feature (a string tensor) or a Python string.
    """

    def png() -> tf.Tensor:
        return tf.io.decode_png(image[0], channels=CHANNELS, dtype=tf.uint8)

    def jpeg() -> tf.Tensor:
        return tf.concat([tf.io.decode_jpeg(image[c], channels=1) for c in range(CHANNELS)], axis=-1)

    if isinstance(encoding, str):
        decoded = png() if encoding == "png" else jpeg()
    else:
        decoded = tf.cond(tf.equal(encoding, "png"), png, jpeg)
    return tf.ensure_shape(decoded, [crop_size, crop_size, CHANNELS])


def decode_mask(mask: tf.Tensor, crop_size: int | None = None) -> tf.Tensor:
    """Decode the ``mask`` feature (scalar string) to (S, S, 1) uint8 0/255."""
    return tf.ensure_shape(tf.io.decode_png(mask, channels=1), [crop_size, crop_size, 1])


def labels_to_multi_hot(label_ids: tf.Tensor) -> tf.Tensor:
    """(K,) int64 class ids → (19,) float32 multi-hot (all zeros for K = 0)."""
    hot = tf.one_hot(tf.cast(label_ids, tf.int32), NUM_CLASSES, dtype=tf.float32)
    return tf.minimum(tf.reduce_sum(hot, axis=0), 1.0)


def parse_example(
    serialized: tf.Tensor | bytes, decode: bool = True, crop_size: int | None = None
) -> dict[str, tf.Tensor]:
    """Parse one serialised example (eagerly or inside ``tf.data.Dataset.map``).

    Returns a dict: ``image`` (S, S, 4) uint8 RGBY, ``mask`` (S, S, 1) uint8, ``labels`` (19,)
    float32 multi-hot, ``label_ids`` (K,) int64, ``image_id`` string, ``cell_id`` int64, ``bbox``
    (4,) int64, ``image_size`` (2,) int64 H, W, ``fold`` int64, ``source`` string, ``encoding``
    string, ``crop_size`` int64.

    With ``decode=False`` ``image`` is the raw (1,) PNG or (4,) JPEG string tensor and ``mask``
    the raw PNG string (decode later with ``decode_image``/``decode_mask``). ``crop_size`` sets
    static shapes (and checks them at run time).
    """
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    image = tf.sparse.to_dense(parsed["image"])
    label_ids = tf.sparse.to_dense(parsed["labels"])
    out = {
        "image": image,
        "mask": parsed["mask"],
        "labels": labels_to_multi_hot(label_ids),
        "label_ids": label_ids,
        "image_id": parsed["image_id"],
        "cell_id": parsed["cell_id"],
        "bbox": parsed["bbox"],
        "image_size": parsed["image_size"],
        "fold": parsed["fold"],
        "source": parsed["source"],
        "encoding": parsed["encoding"],
        "crop_size": parsed["crop_size"],
    }
    if decode:
        out["image"] = decode_image(image, parsed["encoding"], crop_size)
        out["mask"] = decode_mask(parsed["mask"], crop_size)
    return out


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, examples: Iterable[bytes]) -> int:
    """Write serialised examples to a TFRecord file atomically; returns the record count.

    The records go to a temporary name beside ``path`` (local or ``gs://``), renamed on
    success; on an exception the temporary file is removed and nothing exists at ``path``.
    """
    count = 0
    with fileutil.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for example in examples:
            writer.write(example)
            count += 1
    return count


def read_error_reason(exc: BaseException) -> str:
    """The reason of a TFRecord read error in one line (``truncated record at 690342: Read less bytes
    than requested``), without TensorFlow's function-node and op decorations."""
    text = str(getattr(exc, "message", None) or exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text.replace("' failed with ", ": ").strip() or type(exc).__name__


def scan_shard(path: str | os.PathLike) -> tuple[int, str | None]:
    """Read every record of a shard (checksums included, nothing decoded): ``(records, None)`` for a
    whole shard, ``(records read before the damage, reason)`` for a corrupt or truncated one."""
    n = 0
    try:
        for batch in tf.data.TFRecordDataset(str(path)).batch(4096):
            n += int(batch.shape[0])
    except tf.errors.OpError as e:
        return n, read_error_reason(e)
    return n, None


def _discard(path: str) -> None:
    """Remove a temporary file, never raising (it may be gone, or the file system may be failing)."""
    with contextlib.suppress(Exception):
        fileutil.remove(path)


class ShardWriter:
    """Stream examples into ``fold{f}-{index:05d}-n{count}.tfrec`` shards of at most ``max_per_shard``.

    One open shard per fold; each is written under a temporary name and renamed to its final
    name (which includes its record count) when full or on ``close()``. Used as a context manager,
    an exception discards the open shards' temporary files (completed shards stay).

    >>> with ShardWriter(out_dir, max_per_shard=1000) as w:   # doctest: +SKIP
    ...     w.write(encode_example(...), fold=2)
    >>> w.paths   # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, max_per_shard: int = 1000, first_index: int = 0) -> None:
        if max_per_shard < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        self.directory = str(directory)
        self.max_per_shard = int(max_per_shard)
        self.paths: list[str] = []
        self._next_index: dict[int, int] = {}
        self._first_index = int(first_index)
        self._open: dict[int, tuple[tf.io.TFRecordWriter, str, int]] = {}  # fold → (writer, tmp, count)
        fileutil.makedirs(self.directory)

    def write(self, example: bytes, fold: int = -1) -> None:
        """Append one serialised example to the current shard of ``fold``."""
        fold = int(fold)
        if fold not in self._open:
            # not "*.tfrec": a reader globbing shards never sees a partial one
            tmp = fileutil.temp_name(fileutil.join(self.directory, f"fold{fold}.partial"))
            self._open[fold] = (tf.io.TFRecordWriter(tmp), tmp, 0)
        writer, tmp, count = self._open[fold]
        writer.write(example)
        self._open[fold] = (writer, tmp, count + 1)
        if count + 1 >= self.max_per_shard:
            self._finish(fold)

    def _finish(self, fold: int) -> None:
        writer, tmp, count = self._open.pop(fold)
        index = self._next_index.get(fold, self._first_index)
        final = fileutil.join(self.directory, shard_name(fold, index, count))
        try:
            writer.close()  # flushes: a full disk shows here at the latest
            fileutil.rename(tmp, final)
        except BaseException:
            _discard(tmp)
            raise
        self._next_index[fold] = index + 1
        self.paths.append(final)
        log.debug("wrote %s", final)

    def close(self) -> list[str]:
        """Finish the open shards; returns every shard path written."""
        for fold in sorted(self._open):
            self._finish(fold)
        return self.paths

    def abort(self) -> None:
        """Discard the open shards' temporary files (also after a write error such as a full disk)."""
        for writer, tmp, _ in self._open.values():
            with contextlib.suppress(Exception):
                writer.close()
            _discard(tmp)
        self._open.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
