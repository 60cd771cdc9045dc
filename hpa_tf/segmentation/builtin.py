"""Built-in classical cell segmentation (no learned weights): scikit-image, SciPy, OpenCV.

Pipeline, at reduced resolution (``scale``, a quarter of the size by default, as hpacellseg, but
at least 256 px on the shorter side, ``min_working_size``):

1. **Nuclei** from the blue channel: Gaussian smoothing, a threshold (Li's, at most Otsu's, at
   least a noise floor above the background, so an empty field gives nothing), holes filled,
   slivers opened away. The typical nucleus radius ``r`` is estimated from the blobs (their
   area-weighted median size) and sets every other length. Touching nuclei are split by a
   watershed on the distance transform seeded by its h-maxima (a dip deeper than ``0.15 r``
   between two centres separates them); nuclei under ``0.15`` of the typical area are dropped.
2. **Cell body**: red (microtubules) + yellow (ER), each scaled to the same robust maximum (the
   green protein channel is left out by default: a bright protein pattern, such as a membrane
   rim, would pull outlines towards it). The foreground is thresholded **per cell**: every pixel
   is compared with a fraction (``local_fraction``) of the body brightness just outside its
   nearest nucleus, above the background (the field's darkest percentile), so a dim cell is
   measured against its own brightness, not the field's; that local threshold stays between
   ``global_fraction`` of the field-wide threshold (Li's, at most Otsu's) and that threshold,
   and above a noise floor. Joined with the nuclei, small holes filled, thin bits opened away.
3. **Cells**: a watershed seeded by the nuclei inside the foreground, over an elevation that adds
   the distance from the nearest nucleus in units of that nucleus's own radius (splits flat
   regions fairly; a large nucleus tends to sit in a large cell), the negated brightness (dim
   gaps between cells become ridges) and the summed per-channel gradient magnitude of the log
   signal (a brightness step or a bright rim between two cells becomes a ridge; gradients right
   at a nucleus's edge are ignored). Cells under half the typical nucleus area are dropped.
4. **Full size**: each object's indicator is smoothed, enlarged by linear interpolation and every
   pixel takes the strongest object (smooth outlines, no 4-pixel staircase); see
   ``upsample_labels``.
5. Every cell keeps its nucleus and vice versa (``pair_labels``); ids are ``1..N``.

Deterministic. Speed and accuracy (worst and mean per-field recall on synthetic fields): run
``benchmarks/bench_segmentation.py`` (figures in the README).
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
    cells = cells.astype(np.int32, copy=False)  # int32 indexes as fast as intp, without a 2x copy
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


def _noise_floor(
    smoothed: np.ndarray, raw: np.ndarray, k: float, dark: float = 25.0, low: float = 5.0
) -> tuple[float, float]:
    """(background level, threshold floor) of an image.

    The background level is the ``low`` percentile of the smoothed image (5th by default); the
    noise is the median absolute deviation of the raw image around the smoothed one over the
    darkest ``dark`` percent of the pixels (a quarter by default: background where there is any;
    scaled to a standard deviation). The floor is ``k``
    noise standard deviations (at least 2 counts) above the background level.
    """
    background = float(np.percentile(smoothed, low))
    darkest = smoothed <= np.percentile(smoothed, dark)
    resid = np.abs(raw[darkest] - smoothed[darkest])
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
    min_working_size : the working resolution keeps at least this many pixels on the shorter side
        (a 512² field is segmented at half size, not at 128²; 0 = always ``scale``).
    nucleus_diameter : typical nucleus diameter in full-resolution pixels; ``None`` estimates it
        from each image (the area-weighted median size of the thresholded blue blobs).
    nucleus_sigma : Gaussian sigma for the blue channel, in working pixels (applied before the
        nucleus size is known).
    split_depth : touching nuclei are split where the distance-transform dip between two centres
        is deeper than this (r).
    min_nucleus_fraction : nuclei smaller than this fraction of the typical nucleus area are dropped
        (debris, slivers, nuclei cut by the border to a sliver).
    green_weight : weight of the green (protein) channel in the cell-body signal and its gradient
        (red and yellow weigh 1; default 0, left out).
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
    local_fraction : a pixel is cell body when its brightness above the background exceeds this
        fraction of the brightness just outside its nearest nucleus (the median over a ring of
        ``level_ring`` r).
    level_ring : width of that ring outside each nucleus (r).
    global_fraction : the per-cell threshold is kept at or above this fraction of the field-wide
        threshold (both above the background), and at or below the field-wide threshold: a
        nucleus without a visible cell body does not claim the faint haze around it.
    background_percentile : the background level of the cell-body signal is this percentile of
        it (low, so that a field nearly covered by cells still has a background below them).
    noise_percentile : the noise is measured over this darkest percentage of the pixels.
    scaled_distance : measure the distance term in units of each nucleus's own radius (True) or of
        the typical radius (False).
    open_radius : radius of the opening that removes thin bits of foreground (r).
    """

    scale: float = 0.25
    min_working_size: int = 256
    nucleus_diameter: float | None = None
    nucleus_sigma: float = 1.0
    split_depth: float = 0.15
    min_nucleus_fraction: float = 0.15
    green_weight: float = 0.0
    mask_sigma: float = 0.1
    max_hole_fraction: float = 0.1
    body_sigma: float = 0.15
    intensity_weight: float = 2.0
    gradient_weight: float = 2.0
    gradient_sigma: float = 0.05
    nucleus_band: float = 0.3
    distance_weight: float = 0.5
    min_cell_fraction: float = 0.5
    upsample_sigma: float = 2.0
    local_fraction: float = 0.2
    level_ring: float = 0.5
    global_fraction: float = 0.3
    background_percentile: float = 1.0
    noise_percentile: float = 2.0
    scaled_distance: bool = True
    open_radius: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.min_working_size < 0:
            raise ValueError(f"min_working_size must be >= 0, got {self.min_working_size}")
        if self.nucleus_diameter is not None and self.nucleus_diameter <= 0:
            raise ValueError(f"nucleus_diameter must be positive, got {self.nucleus_diameter}")
        for name in ("nucleus_sigma", "mask_sigma", "body_sigma", "gradient_sigma", "upsample_sigma", "green_weight",
                     "intensity_weight", "gradient_weight", "distance_weight", "nucleus_band", "level_ring",
                     "open_radius"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        for name in ("local_fraction", "global_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("background_percentile", "noise_percentile"):
            value = getattr(self, name)
            if not 0 < value <= 100:
                raise ValueError(f"{name} must be in (0, 100], got {value}")

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
        scale = self.working_scale(h, w)
        small = self._downscale(image, scale)
        cells, nuclei = self.segment_small(small, scale)
        cells_up = upsample_labels(cells, (h, w), sigma=self.upsample_sigma)
        nuclei_up = upsample_labels(nuclei, (h, w), sigma=self.upsample_sigma)
        return pair_labels(cells_up, nuclei_up)

    def segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Segment several fields (one after the other); see ``segment``."""
        return [self.segment(image) for image in images]

    def working_scale(self, h: int, w: int) -> float:
        """The working resolution of an (h, w) field, as a fraction of its size: ``scale``, raised
        so that the shorter side keeps at least ``min_working_size`` pixels (at most 1)."""
        short = max(1, min(h, w))
        return max(self.scale, min(1.0, self.min_working_size / short))

    def segment_small(self, small: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment a field already at working resolution.

        Parameters
        ----------
        small : (h, w, 4) float32 RGBY, 0..255.
        scale : the working resolution as a fraction of the full size (converts
            ``nucleus_diameter``; default ``scale``).

        Returns
        -------
        (cells, nuclei) : (h, w) int32, paired ids ``1..N``.
        """
        nuclei, radius = self._nuclei(small[..., 2], self.scale if scale is None else scale)
        if nuclei.max() == 0:
            z = np.zeros(small.shape[:2], np.int32)
            return z, z.copy()
        cells = self._cells(small, nuclei, radius)
        return pair_labels(cells, nuclei)

    # -- internals -------------------------------------------------------------------------

    def _downscale(self, image: np.ndarray, scale: float) -> np.ndarray:
        h, w = image.shape[:2]
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        if (sh, sw) != (h, w):
            image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        return image.astype(np.float32)

    def _nuclei(self, blue: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
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
            radius = 0.5 * self.nucleus_diameter * scale
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

    def _foreground(self, masked: np.ndarray, raw: np.ndarray, levels: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Cell-body foreground (h, w) bool: above a fraction of the nearest nucleus's surroundings."""
        background, floor = _noise_floor(masked, raw, 3.0, dark=self.noise_percentile, low=self.background_percentile)
        if float(masked.max()) <= floor:
            return np.zeros(masked.shape, bool)
        local = background + self.local_fraction * np.maximum(levels - background, 0.0)
        t_global = robust_threshold(masked, raw)
        if math.isfinite(t_global):
            local = np.clip(local, background + self.global_fraction * (t_global - background), t_global)
        t = np.maximum(local, floor).astype(np.float32)
        return masked > t[nearest]

    def _cells(self, small: np.ndarray, nuclei: np.ndarray, radius: float) -> np.ndarray:
        """Cell labels (h, w) int32 grown from ``nuclei`` (same ids); ``radius`` in working px."""
        weights = {0: 1.0, 3: 1.0, 1: self.green_weight}  # red, yellow, green
        typical_area = math.pi * radius**2
        has_nucleus = nuclei > 0

        # foreground: threshold of the cell-body signal, joined with the nuclei
        raw = _body_signal(small, weights)
        masked = _blur(raw, self.mask_sigma * radius)
        dist, nearest = _nearest_nucleus(nuclei)
        levels = _local_levels(masked, nearest, dist, self.level_ring * radius)
        fg = self._foreground(masked, raw, levels, nearest)
        fg |= has_nucleus
        fg = _fill_small_holes(fg, self.max_hole_fraction * typical_area)
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, _disk(max(1, round(self.open_radius * radius)))) > 0
        fg |= has_nucleus
        cyto = fg & ~has_nucleus

        # watershed elevation: dim gaps, brightness steps, distance from the nucleus
        if self.scaled_distance:
            elevation = self.distance_weight * _scaled_distance(nuclei, radius, reach=6.0)
        else:
            elevation = (self.distance_weight / radius) * dist
        body_sigma = self.body_sigma * radius
        if self.intensity_weight:
            body = _blur(raw, body_sigma)
            level = max(_median_or(body[cyto], 1.0), 1e-6)
            elevation -= (self.intensity_weight / level) * body
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


def _nearest_nucleus(nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest nucleus pixel float32, id of that nucleus int32), both (h, w)."""
    dist, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    return dist.astype(np.float32), nuclei[iy, ix]


def _scaled_distance(nuclei: np.ndarray, typical: float, reach: float) -> np.ndarray:
    """Distance from the nearest nucleus in units of that nucleus's own radius, (h, w) float32.

    ``min_i d_i / r_i`` over the nuclei ``i`` (``r_i`` the radius of a disc of the same area,
    ``d_i`` the distance from nucleus ``i``): a large nucleus's reach is wider, as a large nucleus
    tends to sit in a large cell. Each nucleus is handled within ``reach`` radii of its box;
    beyond every such window the value is ``reach``.
    """
    h, w = nuclei.shape
    out = np.full((h, w), reach, np.float32)
    areas = np.bincount(nuclei.ravel())
    for i, sl in enumerate(ndi.find_objects(nuclei), start=1):
        if sl is None:
            continue
        r_i = max(math.sqrt(areas[i] / math.pi), 0.5 * typical, 1.0)
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
            # cut by the border: its extent along the border tells its size better than its area
            r_i = max(r_i, 0.5 * max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
        pad = int(math.ceil(reach * r_i))
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        d = cv2.distanceTransform((nuclei[y0:y1, x0:x1] != i).astype(np.uint8), cv2.DIST_L2, 5)
        np.minimum(out[y0:y1, x0:x1], d / np.float32(r_i), out=out[y0:y1, x0:x1])
    return out


def _local_levels(signal: np.ndarray, nearest: np.ndarray, dist: np.ndarray, ring: float) -> np.ndarray:
    """Per-nucleus brightness of ``signal`` just outside each nucleus: ``levels[i]`` (float64, index 0
    unused) is the median of ``signal`` over the pixels within ``ring`` pixels outside nucleus ``i``
    (those nearer to it than to any other); 0 for a nucleus without such pixels."""
    n = int(nearest.max())
    levels = np.zeros(n + 1, np.float64)
    if n:
        zone = np.where((dist > 0) & (dist <= ring), nearest, 0)
        levels[1:] = np.nan_to_num(ndi.median(signal, zone, np.arange(1, n + 1)))
    return levels


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
