"""Built-in classical cell segmentation (no learned weights): scikit-image, SciPy, OpenCV.

Pipeline, at reduced resolution (``scale``, a quarter of the size by default, as hpacellseg):

1. **Nuclei** from the blue channel: Gaussian smoothing, a threshold (Li's, at most Otsu's, at
   least a noise floor above the background, so an empty field gives nothing), holes filled,
   slivers opened away. The typical nucleus radius ``r`` is estimated from the blobs (their
   area-weighted median size) and sets every other length. Touching nuclei are split by a
   watershed on the distance transform seeded by its h-maxima (a dip deeper than ``0.15 r``
   between two centres separates them); nuclei under ``0.15`` of the typical area are dropped.
2. **Cell body**: red (microtubules) + yellow (ER) + half-weight green (protein), each scaled to
   the same robust maximum. The foreground is its threshold (same rule) joined with the nuclei,
   small holes filled, thin bits opened away.
3. **Cells**: a watershed seeded by the nuclei inside the foreground, over an elevation that adds
   the distance from the nearest nucleus (splits flat regions fairly), the negated brightness
   (dim gaps between cells become ridges) and the summed per-channel gradient magnitude of the
   log signal (a brightness step or a bright rim between two cells becomes a ridge; gradients
   right at a nucleus's edge are ignored). Cells under half the typical nucleus area are dropped.
4. **Full size**: each object's indicator is smoothed, enlarged by linear interpolation and every
   pixel takes the strongest object (smooth outlines, no 4-pixel staircase); see
   ``upsample_labels``.
5. Every cell keeps its nucleus and vice versa (``pair_labels``); ids are ``1..N``.

Deterministic. A 2048² field takes about 0.2-0.3 s on one core (``benchmarks/bench_segmentation.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Label helpers (shared with the hpacellseg backend)
# --------------------------------------------------------------------------------------------


def pair_labels(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make cell and nucleus label images share ids ``1..N``.

    A nucleus pixel counts only where it lies inside the cell with the same id; a cell without
    nucleus pixels and a nucleus without a cell are dropped, and the surviving ids are renumbered
    consecutively in increasing order of their old id.

    Parameters
    ----------
    cells, nuclei : (H, W) integer label images, 0 = background, nuclei already carrying the id of
        their cell.

    Returns
    -------
    (cells, nuclei) : (H, W) int32 each.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} label images differ in shape")
    if cells.size and (cells.min() < 0 or nuclei.min() < 0):
        raise ValueError("label ids must be non-negative")
    cells = cells.astype(np.intp, copy=False)
    nuclei = np.where(nuclei == cells, cells, 0)
    n = int(cells.max()) if cells.size else 0
    if n == 0:
        z = np.zeros(cells.shape, np.int32)
        return z, z.copy()
    has_cell = np.bincount(cells.ravel(), minlength=n + 1) > 0
    has_nucleus = np.bincount(nuclei.ravel(), minlength=n + 1) > 0
    keep = has_cell & has_nucleus
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[cells], lut[nuclei]


def upsample_labels(labels: np.ndarray, shape: tuple[int, int], sigma: float = 1.0) -> np.ndarray:
    """Resize a label image to ``shape`` (H, W) with smooth outlines.

    Each object's indicator is smoothed (Gaussian ``sigma``, in input pixels), enlarged by linear
    interpolation, and every output pixel takes the object with the highest value, inside the
    enlarged smoothed foreground (> 0.5). This follows the objects' outlines without the staircase
    of nearest-neighbour enlargement and irons out one-pixel wiggles. ``sigma=0`` gives plain
    nearest-neighbour resizing.

    Parameters
    ----------
    labels : (h, w) integer label image, 0 = background.
    shape : (H, W) of the result.
    sigma : smoothing in input pixels (0 = nearest neighbour).

    Returns
    -------
    (H, W) int32.
    """
    h, w = shape
    lh, lw = labels.shape
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros((h, w), np.int32)
    if sigma <= 0 or (lh, lw) == (h, w):
        if (lh, lw) == (h, w):
            return labels.astype(np.int32, copy=True)
        dtype = np.uint16 if n < 65536 else np.float32  # cv2.resize takes neither int32 nor int64
        return cv2.resize(labels.astype(dtype), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    fy, fx = h / lh, w / lw
    fg = cv2.resize(_blur((labels > 0).astype(np.float32), sigma), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    out = np.zeros((h, w), np.int32)
    best = np.zeros((h, w), np.float32)
    pad = int(math.ceil(3 * sigma)) + 1
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - pad), min(lh, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(lw, sl[1].stop + pad)
        ind = _blur((labels[y0:y1, x0:x1] == i).astype(np.float32), sigma)
        # output pixels whose centres map into this box
        oy0, oy1 = int(math.ceil(y0 * fy)), min(h, int(math.ceil(y1 * fy)))
        ox0, ox1 = int(math.ceil(x0 * fx)), min(w, int(math.ceil(x1 * fx)))
        if oy1 <= oy0 or ox1 <= ox0:
            continue
        # map output pixel centres back to input coordinates within the box (align corners as cv2)
        ys = ((np.arange(oy0, oy1, dtype=np.float32) + 0.5) / fy - 0.5 - y0)
        xs = ((np.arange(ox0, ox1, dtype=np.float32) + 0.5) / fx - 0.5 - x0)
        mx, my = np.meshgrid(xs, ys)
        up = cv2.remap(ind, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        view_best = best[oy0:oy1, ox0:ox1]
        better = up > view_best
        view_best[better] = up[better]
        out[oy0:oy1, ox0:ox1][better] = i
    out[~fg] = 0
    return out


# --------------------------------------------------------------------------------------------
# Thresholds and small image operations
# --------------------------------------------------------------------------------------------


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image.astype(np.float32, copy=False)
    return cv2.GaussianBlur(image.astype(np.float32, copy=False), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _noise_floor(smoothed: np.ndarray, raw: np.ndarray, k: float) -> tuple[float, float]:
    """(background level, threshold floor) of an image.

    The background level is the 5th percentile of the smoothed image; the noise is the median
    absolute deviation of the raw image around the smoothed one over the darkest quarter of the
    pixels (background where there is any; scaled to a standard deviation). The floor is ``k``
    noise standard deviations (at least 2 counts) above the background level.
    """
    background = float(np.percentile(smoothed, 5))
    dark = smoothed <= np.percentile(smoothed, 25)
    resid = np.abs(raw[dark] - smoothed[dark])
    noise = 1.4826 * float(np.median(resid)) if resid.size else 0.0
    return background, background + max(k * noise, 2.0)


def robust_threshold(smoothed: np.ndarray, raw: np.ndarray, k_noise: float = 3.0) -> float:
    """Foreground threshold: Li's, no higher than Otsu's, no lower than a noise floor.

    Returns ``inf`` when the image holds no signal above the floor (an empty field).
    """
    _, floor = _noise_floor(smoothed, raw, k_noise)
    top = float(smoothed.max())
    if top <= floor:
        return math.inf
    try:
        t_otsu = float(filters.threshold_otsu(smoothed))
        t_li = float(filters.threshold_li(smoothed, initial_guess=t_otsu))
    except ValueError:  # a constant image
        return math.inf
    t = min(t_li, t_otsu)
    if not math.isfinite(t):
        t = t_otsu
    return max(t, floor)


def _weighted_median_area(areas: np.ndarray) -> float:
    """Area-weighted median of object areas: the size of the object a random pixel belongs to.

    Robust against many small specks of debris.
    """
    areas = np.sort(areas[areas > 0]).astype(np.float64)
    if areas.size == 0:
        return 0.0
    cum = np.cumsum(areas)
    return float(areas[np.searchsorted(cum, cum[-1] / 2)])


def _remove_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero out labels with fewer than ``min_area`` pixels (ids are not renumbered)."""
    if labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return labels


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


@dataclass
class BuiltinSegmenter:
    """Classical nuclei + cell segmentation of RGBY fields (see the module docstring).

    Lengths marked "r" are in units of the typical nucleus radius, which is estimated from each
    image (or given by ``nucleus_diameter``), so the same settings work for fields of any size and
    magnification.

    Parameters
    ----------
    scale : working resolution as a fraction of the input size (0.25 = a quarter, as hpacellseg).
    nucleus_diameter : typical nucleus diameter in full-resolution pixels; ``None`` estimates it
        from each image (the area-weighted median size of the thresholded blue blobs).
    nucleus_sigma : Gaussian sigma for the blue channel, in working pixels (applied before the
        nucleus size is known).
    split_depth : touching nuclei are split where the distance-transform dip between two centres
        is deeper than this (r).
    min_nucleus_fraction : nuclei smaller than this fraction of the typical nucleus area are dropped
        (debris, slivers, nuclei cut by the border to a sliver).
    green_weight : weight of the green (protein) channel in the cell-body signal and its gradient
        (red and yellow weigh 1).
    mask_sigma : smoothing of the cell-body signal for the foreground threshold (r).
    max_hole_fraction : background holes inside the foreground smaller than this fraction of the
        typical nucleus area are filled.
    body_sigma : smoothing of the channels for the watershed elevation (r).
    intensity_weight : weight of the (negated, normalised) cell-body brightness in the elevation:
        dim gaps between cells become ridges.
    gradient_weight : weight of the summed per-channel log-gradient magnitude in the elevation:
        brightness steps between neighbouring cells become ridges.
    gradient_sigma : smoothing of the gradient magnitude (r).
    nucleus_band : gradients closer than this to a nucleus are ignored (r): the edge of a nucleus
        is not the edge of its cell.
    distance_weight : weight of the distance from the nearest nucleus (per r) in the elevation:
        splits flat regions fairly between neighbours.
    min_cell_fraction : cells smaller than this fraction of the typical nucleus area are dropped.
    upsample_sigma : outline smoothing when enlarging the labels to full size, in working pixels
        (0 = nearest neighbour; see ``upsample_labels``).
    """

    scale: float = 0.25
    nucleus_diameter: float | None = None
    nucleus_sigma: float = 1.0
    split_depth: float = 0.15
    min_nucleus_fraction: float = 0.15
    green_weight: float = 0.5
    mask_sigma: float = 0.1
    max_hole_fraction: float = 0.5
    body_sigma: float = 0.15
    intensity_weight: float = 1.0
    gradient_weight: float = 2.0
    gradient_sigma: float = 0.05
    nucleus_band: float = 0.3
    distance_weight: float = 0.5
    min_cell_fraction: float = 0.5
    upsample_sigma: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.nucleus_diameter is not None and self.nucleus_diameter <= 0:
            raise ValueError(f"nucleus_diameter must be positive, got {self.nucleus_diameter}")
        for name in ("nucleus_sigma", "mask_sigma", "body_sigma", "gradient_sigma", "upsample_sigma", "green_weight",
                     "intensity_weight", "gradient_weight", "distance_weight", "nucleus_band"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")

    # -- public API ------------------------------------------------------------------------

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment one field.

        Parameters
        ----------
        image : (H, W, 4) RGBY, uint8 (uint16 and float in [0, 1] are converted by
            ``hpa_tf.io.to_uint8``).

        Returns
        -------
        (cells, nuclei) : (H, W) int32 label images, 0 = background; a cell and its nucleus share
            one id, ids are ``1..N``.
        """
        image = _check_image(image)
        h, w = image.shape[:2]
        small = self._downscale(image)
        cells, nuclei = self.segment_small(small)
        cells_up = upsample_labels(cells, (h, w), sigma=self.upsample_sigma)
        nuclei_up = upsample_labels(nuclei, (h, w), sigma=self.upsample_sigma)
        return pair_labels(cells_up, nuclei_up)

    def segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Segment several fields (one after the other); see ``segment``."""
        return [self.segment(image) for image in images]

    def segment_small(self, small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment a field already at working resolution.

        Parameters
        ----------
        small : (h, w, 4) float32 RGBY, 0..255.

        Returns
        -------
        (cells, nuclei) : (h, w) int32, paired ids ``1..N``.
        """
        nuclei, radius = self._nuclei(small[..., 2])
        if nuclei.max() == 0:
            z = np.zeros(small.shape[:2], np.int32)
            return z, z.copy()
        cells = self._cells(small, nuclei, radius)
        return pair_labels(cells, nuclei)

    # -- internals -------------------------------------------------------------------------

    def _downscale(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        sh, sw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        if (sh, sw) != (h, w):
            image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        return image.astype(np.float32)

    def _nuclei(self, blue: np.ndarray) -> tuple[np.ndarray, float]:
        """Nuclei labels (h, w) int32 at working resolution and the typical radius (working px)."""
        empty = np.zeros(blue.shape, np.int32)
        smoothed = _blur(blue, self.nucleus_sigma)
        t = robust_threshold(smoothed, blue)
        if not math.isfinite(t):
            return empty, 0.0
        mask = _fill_small_holes(smoothed > t, math.inf)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0
        n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        if n <= 1:
            return empty, 0.0
        if self.nucleus_diameter is not None:
            radius = 0.5 * self.nucleus_diameter * self.scale
        else:
            radius = math.sqrt(_weighted_median_area(np.bincount(comp.ravel())[1:]) / math.pi)
        radius = max(radius, 2.0)
        min_area = self.min_nucleus_fraction * math.pi * radius**2
        mask = _remove_small(comp, min_area) > 0
        if not mask.any():
            return empty, radius

        # split touching nuclei: h-maxima of the (slightly smoothed) distance transform
        dist = _blur(cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5), 1.0)
        peaks = morphology.h_maxima(dist, max(1.0, self.split_depth * radius)).astype(bool) & mask
        markers, _ = ndi.label(peaks)
        nuclei = segmentation.watershed(-dist, markers, mask=mask)
        nuclei = _remove_small(nuclei, min_area)
        return nuclei.astype(np.int32), radius

    def _cells(self, small: np.ndarray, nuclei: np.ndarray, radius: float) -> np.ndarray:
        """Cell labels (h, w) int32 grown from ``nuclei`` (same ids); ``radius`` in working px."""
        weights = {0: 1.0, 3: 1.0, 1: self.green_weight}  # red, yellow, green
        typical_area = math.pi * radius**2
        has_nucleus = nuclei > 0

        # foreground: threshold of the cell-body signal, joined with the nuclei
        raw = _body_signal(small, weights)
        masked = _blur(raw, self.mask_sigma * radius)
        t = robust_threshold(masked, raw)
        fg = masked > t if math.isfinite(t) else np.zeros(raw.shape, bool)
        fg |= has_nucleus
        fg = _fill_small_holes(fg, self.max_hole_fraction * typical_area)
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, _disk(max(1, round(radius / 8)))) > 0
        fg |= has_nucleus
        cyto = fg & ~has_nucleus

        # watershed elevation: dim gaps, brightness steps, distance from the nucleus
        dist = cv2.distanceTransform((~has_nucleus).astype(np.uint8), cv2.DIST_L2, 5)
        elevation = (self.distance_weight / radius) * dist
        body_sigma = self.body_sigma * radius
        if self.intensity_weight:
            body = _blur(raw, body_sigma)
            level = _median_or(body[cyto], 1.0)
            elevation -= (self.intensity_weight / max(level, 1e-6)) * body
        if self.gradient_weight:
            grad = np.zeros(raw.shape, np.float32)
            total = sum(weights.values())
            for c, wt in weights.items():
                if wt <= 0:
                    continue
                ch = _blur(small[..., c], body_sigma)
                level = max(_median_or(ch[cyto], 1.0), 1.0)
                # log: a brightness ratio between two cells gives the same step at any brightness
                logc = np.log(ch + 0.25 * level)
                gx = cv2.Sobel(logc, cv2.CV_32F, 1, 0, ksize=3)
                gy = cv2.Sobel(logc, cv2.CV_32F, 0, 1, ksize=3)
                grad += (wt / total) * cv2.magnitude(gx, gy)
            grad = _blur(grad, self.gradient_sigma * radius)
            grad[dist < self.nucleus_band * radius] = 0
            elevation += self.gradient_weight * grad
        cells = segmentation.watershed(elevation, nuclei, mask=fg)
        return _remove_small(cells, self.min_cell_fraction * typical_area).astype(np.int32)


def _body_signal(small: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    """Weighted sum of channels (h, w) float32, in counts of the brightest of them.

    Each channel is scaled to the same robust maximum (99.5th percentile); a dim channel is
    scaled up by at most 4× so that an empty channel's noise is not blown up.
    """
    highs = {c: float(np.percentile(small[..., c], 99.5)) for c in weights}
    ref = max(max(highs.values()), 1.0)
    total = sum(weights.values())
    body = np.zeros(small.shape[:2], np.float32)
    for c, wt in weights.items():
        if wt > 0:
            body += np.float32(wt / total * ref / max(highs[c], 0.25 * ref)) * small[..., c]
    return body


def _median_or(values: np.ndarray, default: float) -> float:
    return float(np.median(values)) if values.size else default


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill background regions of ``mask`` smaller than ``max_area`` pixels that do not touch the border."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (area < max_area) & ~touches
    fill[0] = False  # component 0 is the mask itself
    return mask | fill[comp]


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _check_image(image: np.ndarray) -> np.ndarray:
    from hpa_tf.io import to_uint8

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"expected an (H, W, 4) RGBY image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return to_uint8(image)
