"""Cell crops: THE one crop geometry of the project (the TFRecord builder and the predictor both call it).

Geometry
    For a cell whose tight bounding box is ``x0, y0, x1, y1`` (original pixels, ``x1``/``y1``
    exclusive; ``w = x1 - x0``, ``h = y1 - y0``) the crop window is a square of side

        ``side = ceil(max(w, h) * (1 + 2 * margin))``

    i.e. ``margin`` is a fraction of the box's longer side added on EACH side. The square is
    centred on the box (``left = x0 - (side - w) // 2``, likewise for ``top``), so the cell sits in
    the middle to within half a pixel and its aspect ratio is preserved (a square is never
    stretched). Parts of the square outside the field are zero. The square is then resized to
    ``size × size`` with ``cv2.INTER_AREA`` when shrinking and ``cv2.INTER_LINEAR`` when enlarging
    (no resize when ``side == size``). ``crop_window`` computes the window alone.

Masks
    ``masks`` holds the cell's own binary mask through the same window and resize (the resized
    mask is thresholded at half: values 0 or 255). With ``mask_neighbors=True`` the pixels of
    OTHER cells are set to zero in the crop before resizing; background (label 0) and the cell's
    own pixels are kept.

Whole fields (kind ``field``)
    A ``field`` spec describes one record per field of view: the whole field resized to
    ``size × size`` (``field_image``; ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when
    enlarging; a non-square field is stretched, and cell masks map onto it with the same
    stretch). It has no margin (recorded as 0.0) and no neighbour masking (refused).

The crop spec
    ``CropSpec`` (frozen) is everything that defines a crop: ``kind``, ``size``, ``margin`` and
    ``mask_neighbors``. It is the one object that travels between the stages: the TFRecord builder
    writes it into the shard set's ``build_config.json``, training reads it from there and copies it
    into ``model.json``, and the predictor and the demo read it from ``model.json`` and crop with
    ``spec.crop``/``spec.iter_crops``. It is serialised only by ``to_dict``/``from_dict``; the
    latter refuses a missing or unknown key (nothing is filled in from a default on the way).

Memory
    ``cell_crops`` returns all crops of a field at once: ``N × size² × C`` bytes, e.g. 50 cells ×
    512² × 4 = 52 MB. ``iter_cell_crops`` yields the same crops in batches of ``batch_size`` cells
    (one batch of 16 at 512 px is 16 MB), for fields with many cells or large crop sizes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: Default margin: 10 % of the longer box side on each side.
DEFAULT_MARGIN: float = 0.1
#: Default crop side in pixels.
DEFAULT_CROP_SIZE: int = 512
#: Record kinds a crop spec can describe. ``cell``: one square crop per segmented cell (this
#: module's geometry); ``field``: one record per field of view, the whole field resized to
#: ``size`` × ``size`` (``field_image``), with the same spec, shard-set layout and folds.
KINDS: tuple[str, ...] = ("cell", "field")


@dataclass(frozen=True)
class CellCrops:
    """Crops of the cells of one field (``N`` cells, in increasing id order unless ids were given).

    Attributes
    ----------
    crops : (N, size, size, C), the image's dtype (uint8 normally; RGBY for HPA fields).
    masks : (N, size, size) uint8, 255 where the crop pixel belongs to the cell, else 0.
    cell_ids : (N,) int32, label values in the label image.
    bboxes : (N, 4) int64, tight cell boxes ``x0, y0, x1, y1`` in original pixels (x1, y1 exclusive).
    areas : (N,) int64, cell areas in original pixels.
    n_dropped : cells smaller than ``min_area`` that were left out.
    """

    crops: np.ndarray
    masks: np.ndarray
    cell_ids: np.ndarray
    bboxes: np.ndarray
    areas: np.ndarray
    n_dropped: int = 0

    def __len__(self) -> int:
        return len(self.cell_ids)


@dataclass(frozen=True)
class CellTable:
    """The cells of a label image that ``cell_crops`` would crop (no pixels): see ``find_cells``."""

    cell_ids: np.ndarray  # (N,) int32
    bboxes: np.ndarray  # (N, 4) int64 x0, y0, x1, y1
    areas: np.ndarray  # (N,) int64
    n_dropped: int

    def __len__(self) -> int:
        return len(self.cell_ids)


class CropSpecError(ValueError):
    """A crop spec that is malformed or incomplete (the message says where it came from)."""


@dataclass(frozen=True)
class CropSpec:
    """Everything that defines a crop (see the module docstring); hashable, comparable, frozen.

    Attributes
    ----------
    kind : record kind, one of ``KINDS``: ``"cell"`` (a crop per cell) or ``"field"`` (the whole field).
    size : crop side S in pixels (>= 1).
    margin : fraction of the cell box's longer side added on each side (>= 0; 0 is a tight box);
        always 0.0 for a ``field`` spec (a field has no margin).
    mask_neighbors : zero the pixels of other cells in each crop (``cell`` only).

    >>> spec = CropSpec(size=64, margin=0.0, mask_neighbors=True)
    >>> CropSpec.from_dict(spec.to_dict()) == spec
    True
    >>> CropSpec.from_dict({"kind": "cell", "size": 64, "margin": 0.0}, where="model.json")
    Traceback (most recent call last):
    ...
    hpa_tf.crops.CropSpecError: model.json: crop spec lacks key(s) ['mask_neighbors']
    """

    kind: str = "cell"
    size: int = DEFAULT_CROP_SIZE
    margin: float = DEFAULT_MARGIN
    mask_neighbors: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            problems.append(f"size must be an integer >= 1, got {self.size!r}")
        if (isinstance(self.margin, bool) or not isinstance(self.margin, (int, float, np.floating, np.integer))
                or not math.isfinite(self.margin) or self.margin < 0):
            problems.append(f"margin must be a finite number >= 0, got {self.margin!r}")
        if not isinstance(self.mask_neighbors, (bool, np.bool_)):
            problems.append(f"mask_neighbors must be true or false, got {self.mask_neighbors!r}")
        elif self.kind == "field" and self.mask_neighbors:
            problems.append("mask_neighbors applies to cell crops, not to whole fields (kind 'field')")
        if problems:
            raise CropSpecError("; ".join(problems))
        # canonical Python types, so that equality, hashing and JSON do not depend on the caller's
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "margin", 0.0 if self.kind == "field" else float(self.margin))
        object.__setattr__(self, "mask_neighbors", bool(self.mask_neighbors))

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "size", "margin", "mask_neighbors"}``, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "crop spec") -> CropSpec:
        """The spec ``to_dict`` wrote. Every key is required and no other is accepted.

        Raises
        ------
        CropSpecError : not a mapping, a missing or unknown key, or a bad value; the message
            starts with ``where`` (e.g. the file it came from).
        """
        if not isinstance(data, Mapping):
            raise CropSpecError(f"{where}: crop spec must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in data]
        unknown = sorted(k for k in data if k not in names)
        if missing:
            raise CropSpecError(f"{where}: crop spec lacks key(s) {missing}")
        if unknown:
            raise CropSpecError(f"{where}: crop spec has unknown key(s) {unknown} (known: {names})")
        try:
            return cls(**{k: data[k] for k in names})
        except CropSpecError as e:
            raise CropSpecError(f"{where}: {e}") from None

    @property
    def is_field(self) -> bool:
        """True for a whole-field spec (kind ``field``)."""
        return self.kind == "field"

    def field(self, image: np.ndarray) -> np.ndarray:
        """The whole field resized to ``size × size`` (``field_image``); a ``field`` spec only."""
        if not self.is_field:
            raise CropSpecError(f"a {self.kind!r} crop spec crops cells; field() needs kind 'field'")
        return field_image(image, self.size)

    def _need_cells(self) -> None:
        if self.is_field:
            raise CropSpecError("a 'field' crop spec describes whole fields (field()); it crops no cells")

    def crop(self, image: np.ndarray, cells: np.ndarray, cell_ids: Sequence[int] | np.ndarray | None = None,
             min_area: int = 0) -> CellCrops:
        """``cell_crops`` of a field with this spec's size, margin and neighbour masking."""
        self._need_cells()
        return cell_crops(image, cells, self.size, self.margin, self.mask_neighbors, min_area, cell_ids)

    def iter_crops(self, image: np.ndarray, cells: np.ndarray, cell_ids: Sequence[int] | np.ndarray | None = None,
                   min_area: int = 0, batch_size: int = 16) -> Iterator[CellCrops]:
        """``iter_cell_crops`` of a field with this spec (bounded memory)."""
        self._need_cells()
        return iter_cell_crops(image, cells, self.size, self.margin, self.mask_neighbors, min_area, cell_ids,
                               batch_size)


def field_image(image: np.ndarray, size: int) -> np.ndarray:
    """A whole field resized to ``(size, size, C)`` in its dtype: ``cv2.INTER_AREA`` when shrinking,
    ``cv2.INTER_LINEAR`` when enlarging, unchanged when already that size (a non-square field is
    stretched to the square)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be (H, W, C) or (H, W), got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image.copy()
    interp = cv2.INTER_AREA if height * width > size * size else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
    return out[..., None] if out.ndim == 2 else out


def crop_window(bbox: Sequence[int], shape: Sequence[int], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """The square crop window of a cell box (see the module docstring).

    Parameters
    ----------
    bbox : ``x0, y0, x1, y1`` tight box in pixels, x1/y1 exclusive, non-empty.
    shape : the field's ``(H, W, ...)``; only used to check that the box lies inside it.
    margin : fraction of the longer box side added on each side (>= 0).

    Returns
    -------
    (left, top, side) : the window is ``[left, left + side) × [top, top + side)`` in field pixels;
    ``left``/``top`` may be negative and the window may extend past the field (zero padding).
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    height, width = int(shape[0]), int(shape[1])
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"bbox {tuple(bbox)} is empty or outside a field of shape {(height, width)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    w, h = x1 - x0, y1 - y0
    side = max(1, math.ceil(max(w, h) * (1.0 + 2.0 * margin) - 1e-9))
    return x0 - (side - w) // 2, y0 - (side - h) // 2, side


def _check_inputs(image: np.ndarray, cells: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C) or (H, W), got shape {image.shape}")
    if cells.ndim != 2 or cells.shape != image.shape[:2]:
        raise ValueError(f"label image shape {cells.shape} does not match image shape {image.shape}")
    if not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"label image must be an integer array, got {cells.dtype}")
    return image


def find_cells(cells: np.ndarray, min_area: int = 0, cell_ids: Sequence[int] | np.ndarray | None = None) -> CellTable:
    """Ids, tight boxes and areas of the cells of a label image (0 = background).

    Parameters
    ----------
    cells : (H, W) integer label image; ids need not be contiguous.
    min_area : cells with fewer pixels are dropped and counted in ``n_dropped``.
    cell_ids : only these ids, in this order (ValueError if one is absent); default all, ascending.
    """
    cells = np.asarray(cells)
    if cells.size and cells.min() < 0:
        raise ValueError("label image has negative values")
    flat = cells.ravel()
    areas_all = np.bincount(flat, minlength=1) if flat.size else np.zeros(1, np.int64)
    slices = ndimage.find_objects(cells.astype(np.int32, copy=False)) if flat.size else []
    if cell_ids is None:
        ids = np.flatnonzero(areas_all[1:]) + 1
    else:
        ids = np.asarray(cell_ids, dtype=np.int64).reshape(-1)
        bad = [int(i) for i in ids if i <= 0 or i >= len(areas_all) or areas_all[i] == 0]
        if bad:
            raise ValueError(f"cell ids {bad[:10]} are not in the label image")
    areas = areas_all[ids].astype(np.int64)
    keep = areas >= min_area
    n_dropped = int((~keep).sum())
    ids, areas = ids[keep], areas[keep]
    bboxes = np.zeros((len(ids), 4), np.int64)
    for k, i in enumerate(ids):
        sy, sx = slices[i - 1]
        bboxes[k] = (sx.start, sy.start, sx.stop, sy.stop)
    return CellTable(ids.astype(np.int32), bboxes, areas, n_dropped)


def _crop_one(
    image: np.ndarray, cells: np.ndarray, cell_id: int, bbox: np.ndarray, size: int, margin: float, mask_neighbors: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Crop and mask of one cell: ((size, size, C), (size, size) uint8 0/255)."""
    height, width, channels = image.shape
    left, top, side = crop_window(bbox, image.shape, margin)
    # intersection of the window with the field, in field and in window coordinates
    fx0, fy0 = max(left, 0), max(top, 0)
    fx1, fy1 = min(left + side, width), min(top + side, height)
    wx0, wy0 = fx0 - left, fy0 - top
    wx1, wy1 = wx0 + (fx1 - fx0), wy0 + (fy1 - fy0)

    labels = cells[fy0:fy1, fx0:fx1]
    own = labels == cell_id
    window = np.zeros((side, side, channels), image.dtype)
    window[wy0:wy1, wx0:wx1] = image[fy0:fy1, fx0:fx1]
    if mask_neighbors:
        window[wy0:wy1, wx0:wx1][(labels != 0) & ~own] = 0
    mask = np.zeros((side, side), np.uint8)
    mask[wy0:wy1, wx0:wx1][own] = 255

    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        window = cv2.resize(window, (size, size), interpolation=interp)
        if window.ndim == 2:  # cv2 drops a single channel axis
            window = window[..., None]
        mask = cv2.resize(mask, (size, size), interpolation=interp)
        mask = np.where(mask >= 128, np.uint8(255), np.uint8(0))
    return window, mask


def iter_cell_crops(
    image: np.ndarray,
    cells: np.ndarray,
    size: int = DEFAULT_CROP_SIZE,
    margin: float = DEFAULT_MARGIN,
    mask_neighbors: bool = False,
    min_area: int = 0,
    cell_ids: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 16,
) -> Iterator[CellCrops]:
    """``cell_crops`` in batches of at most ``batch_size`` cells (bounded memory).

    Yields ``CellCrops`` in cell order; only the first batch carries ``n_dropped`` (the others
    have 0), so the sum over batches equals ``cell_crops(...).n_dropped``. A field with no kept
    cells yields nothing; ``find_cells`` gives the cell table without cropping.
    """
    image = _check_inputs(image, np.asarray(cells))
    cells = np.asarray(cells)
    if size < 1 or batch_size < 1:
        raise ValueError(f"size and batch_size must be >= 1, got {size}, {batch_size}")
    table = find_cells(cells, min_area=min_area, cell_ids=cell_ids)
    if table.n_dropped:
        log.debug("dropped %d cells smaller than %d px", table.n_dropped, min_area)
    for start in range(0, len(table), batch_size):
        stop = min(start + batch_size, len(table))
        crops = np.empty((stop - start, size, size, image.shape[2]), image.dtype)
        masks = np.empty((stop - start, size, size), np.uint8)
        for k in range(start, stop):
            crops[k - start], masks[k - start] = _crop_one(
                image, cells, int(table.cell_ids[k]), table.bboxes[k], size, margin, mask_neighbors
            )
        yield CellCrops(
            crops,
            masks,
            table.cell_ids[start:stop],
            table.bboxes[start:stop],
            table.areas[start:stop],
            table.n_dropped if start == 0 else 0,
        )


def cell_crops(
    image: np.ndarray,
    cells: np.ndarray,
    size: int = DEFAULT_CROP_SIZE,
    margin: float = DEFAULT_MARGIN,
    mask_neighbors: bool = False,
    min_area: int = 0,
    cell_ids: Sequence[int] | np.ndarray | None = None,
) -> CellCrops:
    """Square crops of every cell of a field, resized to ``size`` (geometry: module docstring).

    Parameters
    ----------
    image : (H, W, C) or (H, W) array, normally uint8 RGBY; the output keeps its dtype.
    cells : (H, W) integer label image, 0 = background, any positive ids.
    size : output side in pixels.
    margin : fraction of the cell box's longer side added on each side.
    mask_neighbors : zero the pixels of other cells in each crop (background is kept).
    min_area : cells with fewer pixels are dropped and counted in ``n_dropped`` (default 0: keep all).
    cell_ids : crop only these ids, in this order; default every cell, ascending.

    Returns
    -------
    CellCrops with crops (N, size, size, C), masks (N, size, size) uint8 0/255, cell_ids (N,),
    bboxes (N, 4) x0, y0, x1, y1 (exclusive), areas (N,), n_dropped.
    """
    image = _check_inputs(image, np.asarray(cells))
    batches = list(iter_cell_crops(image, cells, size, margin, mask_neighbors, min_area, cell_ids, batch_size=1 << 30))
    if batches:
        return batches[0]
    table = find_cells(np.asarray(cells), min_area=min_area, cell_ids=cell_ids)
    return CellCrops(
        np.zeros((0, size, size, image.shape[2]), image.dtype),
        np.zeros((0, size, size), np.uint8),
        table.cell_ids,
        table.bboxes,
        table.areas,
        table.n_dropped,
    )
