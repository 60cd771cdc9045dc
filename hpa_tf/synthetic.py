"""An HPA-like synthetic dataset with cell-level truth: the project's built-in data.

Each field of view has touching cells of varied size and irregular shape, a nucleus in each
(blue), microtubule fibres (red), ER texture around the nucleus (yellow), and in green the
pattern of each of the cell's classes, drawn where the biology puts it (see ``_draw_green``).
Background offset, shot-like noise, blur and per-cell intensity variation make segmentation and
classification non-trivial.

Weak supervision as in the real data: an image draws 1-3 classes; each cell drops each of them
with probability ``cell_dropout`` (a cell left with none is Negative), and the image's labels are
the union of its cells' labels, with Negative dropped when any other class is present (as in the
competition, where Negative never co-occurs with another label).

Geometry (cells, nuclei) is computed at a working resolution of at most 1024 px and upsampled by
nearest neighbour; all textures and patterns are drawn at full resolution.

``python -m hpa_tf.synthetic --out DIR --train 64 --test 16 --size 1024 --seed 0`` writes the
Kaggle layout plus the truth (``masks/``, ``truth.csv`` for the test split, ``train_truth.csv``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from hpa_tf.fileutil import atomic_open
from hpa_tf.io import write_label_image, write_png
from hpa_tf.labels import NEGATIVE, NUM_CLASSES, format_labels

log = logging.getLogger(__name__)

#: The smallest field side ``generate_field`` makes.
MIN_SIZE = 32

#: Approximate image-level class counts of the competition's 21,806 training images.
COMPETITION_COUNTS = np.array(
    [8797, 1095, 2224, 1224, 1420, 2071, 884, 2329, 1109, 593, 1054, 78, 1560, 3059, 2637, 332, 6197, 1096, 34],
    dtype=np.float64,
)


def class_weights(kind: str | Sequence[float] = "default") -> np.ndarray:
    """Per-class sampling weights for an image's labels, normalised to sum 1.

    ``"competition"``: the competition's image-level frequencies. ``"default"``: the same,
    flattened by a square root, so that small synthetic sets still hold the rare classes while
    Nucleoplasm and Cytosol stay common and Mitotic spindle, Aggresome and Negative rare.
    ``"uniform"``: all equal. Or a sequence of 19 non-negative weights.
    """
    if isinstance(kind, str):
        if kind == "competition":
            w = COMPETITION_COUNTS.copy()
        elif kind == "default":
            w = np.sqrt(COMPETITION_COUNTS)
        elif kind == "uniform":
            w = np.ones(NUM_CLASSES)
        else:
            raise ValueError(f"unknown class weights {kind!r}: use default, competition, uniform or 19 numbers")
    else:
        w = np.asarray(kind, dtype=np.float64)
        if w.shape != (NUM_CLASSES,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"class weights must be {NUM_CLASSES} non-negative numbers with a positive sum")
    return w / w.sum()


@dataclass
class SyntheticField:
    """One synthetic field of view and its truth.

    Attributes
    ----------
    image : (H, W, 4) uint8 (or uint16 when ``bit16``), RGBY.
    cells : (H, W) int32 cell label image, 0 = background, ids 1..N.
    nuclei : (H, W) int32 nucleus label image, same ids as ``cells``.
    cell_labels : {cell id: sorted class ids}; a cell without its image's classes is ``[18]``.
    image_labels : the image-level labels (union of the cells', Negative only when alone).
    """

    image: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    cell_labels: dict[int, list[int]]
    image_labels: list[int]
    dividing: set[int] = field(default_factory=set)


# ----------------------------------------------------------------------------------------------
# Label sampling
# ----------------------------------------------------------------------------------------------


def sample_image_labels(rng: np.random.Generator, weights: np.ndarray) -> list[int]:
    """1-3 distinct classes drawn by ``weights``; Negative only ever alone."""
    if rng.random() < weights[NEGATIVE]:
        return [NEGATIVE]
    w = weights.copy()
    w[NEGATIVE] = 0
    w /= w.sum()
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    k = min(k, int((w > 0).sum()))
    return sorted(int(c) for c in rng.choice(NUM_CLASSES, size=k, replace=False, p=w))


def covering_labels(n_fields: int) -> list[list[int] | None]:
    """Image labels for ``n_fields`` fields (None: drawn as usual) such that every class is some
    field's label: the 18 classes other than Negative spread round robin over the first
    ``min(n_fields - 1, 18)`` fields, the next field Negative, the rest drawn. E.g. for a test split
    that must hold truth of every class, Mitotic spindle and Negative included."""
    if n_fields < 2:
        raise ValueError(f"covering every class needs at least 2 fields, got {n_fields}")
    k = min(n_fields - 1, NUM_CLASSES - 1)
    out: list[list[int] | None] = [sorted(c for c in range(NUM_CLASSES - 1) if c % k == i) for i in range(k)]
    out.append([NEGATIVE])
    return out + [None] * (n_fields - len(out))


def assign_cell_labels(
    rng: np.random.Generator, image_labels: list[int], n_cells: int, cell_dropout: float
) -> list[list[int]]:
    """Give each cell a subset of the image's labels; each class keeps at least one cell.

    Mitotic spindle is special: only 1-2 cells (the dividing ones) carry it.
    """
    if image_labels == [NEGATIVE] or n_cells == 0:
        return [[NEGATIVE] for _ in range(n_cells)]
    keep = rng.random((n_cells, len(image_labels))) >= cell_dropout
    for j, c in enumerate(image_labels):
        if c == 11:  # mitotic spindle: a rare dividing cell or two
            keep[:, j] = False
            keep[rng.choice(n_cells, size=min(n_cells, int(rng.integers(1, 3))), replace=False), j] = True
        elif not keep[:, j].any():
            keep[rng.integers(n_cells), j] = True
    out = []
    for i in range(n_cells):
        labels = [c for j, c in enumerate(image_labels) if keep[i, j]]
        out.append(labels or [NEGATIVE])
    return out


def image_labels_from_cells(cell_labels: Sequence[Sequence[int]]) -> list[int]:
    union = sorted({c for labels in cell_labels for c in labels})
    if len(union) > 1 and NEGATIVE in union:
        union.remove(NEGATIVE)
    return union


# ----------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise smooth over ``scale`` pixels, ``(H, W) float32``."""
    h, w = shape
    gh, gw = max(2, int(h / max(scale, 1.0)) + 2), max(2, int(w / max(scale, 1.0)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    out = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def ridge_texture(rng: np.random.Generator, shape: tuple[int, int], scale: float, width: float = 0.12) -> np.ndarray:
    """A tubular network in [0, 1]: the zero-crossings of band-pass noise, ``(H, W) float32``."""
    n = smooth_noise(rng, shape, scale) - 0.6 * smooth_noise(rng, shape, scale * 3)
    return np.exp(-((n / width) ** 2)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


@dataclass
class _Cell:
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    harmonics: np.ndarray  # (k, 2): amplitude, phase for k = 2..
    nuc_scale: float
    nuc_aspect: float
    nuc_angle: float
    dividing: bool = False


def _place_cells(rng: np.random.Generator, size: int, r_mean: float, confluence: float) -> list[_Cell]:
    """Dart-throwing of nucleus centres with a minimum spacing; returns cell shape parameters."""
    target = int(confluence * size * size / (math.pi * r_mean**2) * 1.15) + 1
    cells: list[_Cell] = []
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    for _ in range(target * 30):
        if len(cells) >= target:
            break
        r = r_mean * float(rng.uniform(0.7, 1.3))
        c = rng.uniform(0, size, 2)
        if len(cells):
            d = np.hypot(*(centres - c).T)
            if (d < 0.95 * (radii + r)).any():
                continue
        k = 4
        harmonics = np.stack([rng.uniform(0, 0.12, k) / np.arange(1, k + 1) ** 0.5, rng.uniform(0, 2 * np.pi, k)], 1)
        cells.append(
            _Cell(
                cx=float(c[0]), cy=float(c[1]), radius=r, angle=float(rng.uniform(0, np.pi)),
                aspect=float(rng.uniform(1.0, 1.7)), harmonics=harmonics,
                nuc_scale=float(rng.uniform(0.36, 0.5)), nuc_aspect=float(rng.uniform(1.0, 1.35)),
                nuc_angle=float(rng.uniform(0, np.pi)),
            )
        )
        centres = np.vstack([centres, c])
        radii = np.append(radii, r)
    return cells


def _shape_distance(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float, aspect: float,
    harmonics: np.ndarray | None,
) -> np.ndarray:
    """Normalised distance: < 1 inside an irregular ellipse-like outline."""
    dx, dy = xx - cx, yy - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / math.sqrt(aspect)
    v = (-dx * sa + dy * ca) * math.sqrt(aspect)
    rho = np.hypot(u, v) / radius
    if harmonics is not None and len(harmonics):
        theta = np.arctan2(v, u)
        bump = np.ones_like(rho)
        for k, (amp, phase) in enumerate(harmonics, start=2):
            bump += amp * np.cos(k * theta + phase)
        rho = rho / bump
    return rho


def _geometry(
    rng: np.random.Generator, size: int, r_mean: float, confluence: float, spindle_cells: int
) -> tuple[np.ndarray, np.ndarray, list[_Cell]]:
    """Cell and nucleus label images at working resolution (<= 1024 px) and the cell list."""
    work = min(size, 1024)
    f = work / size
    cells = _place_cells(rng, size, r_mean, confluence)
    for i in range(min(spindle_cells, len(cells))):
        c = cells[i]
        c.dividing = True
        c.aspect = float(rng.uniform(1.0, 1.1))
        c.radius *= 0.8
        c.harmonics = c.harmonics * 0.2
    # domain warp: irregular, touching outlines
    warp_scale = r_mean * f * 0.9
    wx = smooth_noise(rng, (work, work), warp_scale) * (0.18 * r_mean * f)
    wy = smooth_noise(rng, (work, work), warp_scale) * (0.18 * r_mean * f)
    best = np.full((work, work), 1.0, np.float32)  # only pixels with distance < 1 belong to a cell
    labels = np.zeros((work, work), np.int32)
    nuclei = np.zeros((work, work), np.int32)
    nuc_rho: list[tuple[tuple[slice, slice], np.ndarray]] = []
    for idx, c in enumerate(cells, start=1):
        reach = c.radius * f * 1.6 * math.sqrt(c.aspect)
        x0, x1 = max(0, int(c.cx * f - reach)), min(work, int(c.cx * f + reach) + 1)
        y0, y1 = max(0, int(c.cy * f - reach)), min(work, int(c.cy * f + reach) + 1)
        if x1 <= x0 or y1 <= y0:
            nuc_rho.append(((slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)))
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        sl = (slice(y0, y1), slice(x0, x1))
        wxs, wys = xx + wx[sl], yy + wy[sl]
        rho = _shape_distance(wxs, wys, c.cx * f, c.cy * f, c.radius * f * 1.4, c.angle, c.aspect, c.harmonics)
        take = rho < best[sl]
        best[sl][take] = rho[take]
        labels[sl][take] = idx
        # nucleus: smaller, smoother, less warped
        nrho = _shape_distance(
            xx + 0.3 * wx[sl], yy + 0.3 * wy[sl], c.cx * f, c.cy * f, c.radius * f * c.nuc_scale,
            c.nuc_angle if not c.dividing else c.angle, c.nuc_aspect if not c.dividing else 2.2,
            c.harmonics[:2] * 0.5,
        )
        if c.dividing:
            nrho = nrho * 1.35  # condensed chromatin
        nuc_rho.append((sl, nrho))
    for idx, (sl, nrho) in enumerate(nuc_rho, start=1):
        if nrho.size:
            inside = (nrho < 1.0) & (labels[sl] == idx)
            nuclei[sl][inside] = idx
    # drop cells whose nucleus is not visible, or that are mostly outside the field / tiny slivers
    ids = np.arange(len(cells) + 1)
    cell_area = np.bincount(labels.ravel(), minlength=len(ids))
    nuc_area = np.bincount(nuclei.ravel(), minlength=len(ids))
    min_nuc = 0.25 * math.pi * (r_mean * f * 0.4) ** 2
    # a dividing cell's nucleus is condensed on purpose (0.8 × radius, / 1.35: about a third of the
    # area): judge its visibility on that scale, or the spindle's only cells would be dropped
    dividing = np.array([False] + [c.dividing for c in cells])
    keep = (nuc_area >= np.where(dividing, 0.3, 1.0) * min_nuc) & (cell_area >= 2 * nuc_area)
    keep[0] = False
    remap = np.zeros(len(ids), np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    kept_cells = [c for c, k in zip(cells, keep[1:]) if k]
    labels, nuclei = remap[labels], remap[nuclei]
    nuclei[labels != nuclei] = 0  # nucleus pixels always lie in their own cell
    if work != size:
        labels = cv2.resize(labels.astype(np.uint16), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int32)
        nuclei = cv2.resize(nuclei.astype(np.uint16), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    return labels, nuclei, kept_cells


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _spots(canvas: np.ndarray, rng: np.random.Generator, where: np.ndarray, n: int, radius: float, value: float,
           offset: tuple[int, int]) -> list[tuple[int, int]]:
    """Draw ``n`` filled discs at random pixels of the boolean ``where`` (bbox-local) on ``canvas``."""
    ys, xs = np.nonzero(where)
    if len(ys) == 0 or n <= 0:
        return []
    pick = rng.choice(len(ys), size=n, replace=len(ys) < n)
    centres = []
    for p in pick:
        x, y = int(xs[p]) + offset[1], int(ys[p]) + offset[0]
        r = max(1, int(round(radius * float(rng.uniform(0.7, 1.3)))))
        cv2.circle(canvas, (x, y), r, float(value * rng.uniform(0.7, 1.0)), -1, lineType=cv2.LINE_AA)
        centres.append((x, y))
    return centres


def _curve(rng: np.random.Generator, start: np.ndarray, direction: float, length: float, curl: float,
           steps: int = 12) -> np.ndarray:
    pts = [start.copy()]
    step = length / steps
    for _ in range(steps):
        direction += float(rng.normal(0, curl))
        pts.append(pts[-1] + step * np.array([math.cos(direction), math.sin(direction)]))
    return np.round(np.array(pts)).astype(np.int32)


def generate_field(
    seed: int | np.random.Generator | Sequence[int],
    size: int = 512,
    labels: Sequence[int] | None = None,
    bit16: bool = False,
    cell_dropout: float = 0.2,
    weights: str | Sequence[float] = "default",
    cell_radius: float | None = None,
    confluence: float | None = None,
) -> SyntheticField:
    """Generate one synthetic field of view with its cell-level truth.

    Parameters
    ----------
    seed : an int, a sequence of ints, or a numpy Generator; the same seed gives the same field.
    size : side in pixels (256-3072 is typical).
    labels : the image's classes; drawn by ``weights`` when None.
    bit16 : return a uint16 image (full 16-bit range) instead of uint8.
    cell_dropout : probability that a cell lacks one of its image's classes.
    weights : class sampling weights (see ``class_weights``).
    cell_radius : mean cell radius in pixels (default: 7-10 % of ``size``).
    confluence : fraction of the field covered by cells (default: 0.55-0.9).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    w = class_weights(weights)
    image_labels = sorted({int(c) for c in labels}) if labels is not None else sample_image_labels(rng, w)
    for c in image_labels:
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"unknown class {c}")
    r_mean = cell_radius if cell_radius is not None else size * float(rng.uniform(0.07, 0.1))
    conf = confluence if confluence is not None else float(rng.uniform(0.55, 0.9))
    n_spindle = int(rng.integers(1, 3)) if 11 in image_labels else 0
    cells, nuclei, cell_list = _geometry(rng, size, r_mean, conf, n_spindle)
    n = len(cell_list)
    dividing_ids = {i for i, c in enumerate(cell_list, start=1) if c.dividing}
    per_cell = assign_cell_labels(rng, image_labels, n, cell_dropout)
    if 11 in image_labels and n:
        # the spindle goes to the dividing cells, and only to them
        per_cell = [sorted(set(lab) - {11}) or [NEGATIVE] for lab in per_cell]
        for i in dividing_ids:
            per_cell[i - 1] = sorted((set(per_cell[i - 1]) - {NEGATIVE}) | {11})
    cell_labels = {i + 1: lab for i, lab in enumerate(per_cell)}
    image = _render(rng, size, cells, nuclei, cell_list, cell_labels, r_mean)
    if bit16:
        image = np.clip(np.rint(image * 65535.0), 0, 65535).astype(np.uint16)
    else:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return SyntheticField(
        image=image, cells=cells, nuclei=nuclei, cell_labels=cell_labels,
        image_labels=image_labels_from_cells(per_cell) if n else image_labels, dividing=dividing_ids,
    )


def _render(
    rng: np.random.Generator, size: int, cells: np.ndarray, nuclei: np.ndarray, cell_list: list[_Cell],
    cell_labels: dict[int, list[int]], r_mean: float,
) -> np.ndarray:
    """Float32 (H, W, 4) RGBY image in [0, 1]."""
    shape = (size, size)
    red = np.zeros(shape, np.float32)
    green = np.zeros(shape, np.float32)
    blue = np.zeros(shape, np.float32)
    yellow = np.zeros(shape, np.float32)
    # global textures
    fine = max(1.5, r_mean * 0.05)
    er_tex = 0.35 + 0.65 * ridge_texture(rng, shape, fine * 2.0, width=0.35)
    mito_tex = ridge_texture(rng, shape, fine * 2.5, width=0.10)
    nuc_tex = 0.8 + 0.1 * smooth_noise(rng, shape, fine * 3)
    # distances: outside nuclei to the nearest nucleus; inside nuclei to the nucleus edge; to cell edges
    nuc_mask = (nuclei > 0).astype(np.uint8)
    d_out = cv2.distanceTransform(1 - nuc_mask, cv2.DIST_L2, 3)
    d_in = cv2.distanceTransform(nuc_mask, cv2.DIST_L2, 3)
    edge = np.zeros(shape, np.uint8)
    edge[:, 1:] |= (cells[:, 1:] != cells[:, :-1]).astype(np.uint8)
    edge[1:, :] |= (cells[1:, :] != cells[:-1, :]).astype(np.uint8)
    d_edge = cv2.distanceTransform(1 - edge, cv2.DIST_L2, 3)
    boxes = ndimage.find_objects(cells)
    fib_w = max(1, int(round(r_mean * 0.012)))
    for idx, bb in enumerate(boxes, start=1):
        if bb is None:
            continue
        c = cell_list[idx - 1]
        off = (bb[0].start, bb[1].start)
        m = cells[bb] == idx
        nuc = nuclei[bb] == idx
        cyto = m & ~nuc
        gain = float(rng.uniform(0.6, 1.0))
        dn = d_out[bb]
        # blue: nucleus with texture; dividing cells have bright condensed chromatin
        b = nuc * nuc_tex[bb] * gain * (1.3 if c.dividing else 1.0)
        # nucleoli (dark in blue, visible to the nucleoli classes)
        nucleoli_canvas = np.zeros(m.shape, np.float32)
        nr = c.radius * c.nuc_scale
        ncent = _spots(nucleoli_canvas, rng, d_in[bb] > 0.35 * nr, int(rng.integers(1, 4)), 0.16 * nr, 1.0, (0, 0))
        nucleoli = (nucleoli_canvas > 0.5) & nuc
        b = np.where(nucleoli, b * 0.45, b)
        blue[bb] += b
        # red: microtubules radiating from the centrosome, plus diffuse signal
        mt = np.zeros(m.shape, np.float32)
        centre = np.array([c.cx - off[1], c.cy - off[0]])
        ang0 = float(rng.uniform(0, 2 * np.pi))
        centro = centre + nr * 1.15 * np.array([math.cos(ang0), math.sin(ang0)])
        for a in rng.uniform(0, 2 * np.pi, 40):
            pts = _curve(rng, centro, float(a), c.radius * 1.6, 0.12, steps=8)
            cv2.polylines(mt, [pts], False, float(rng.uniform(0.4, 0.9)), fib_w, lineType=cv2.LINE_AA)
        red_cell = (0.25 + mt) * m * gain * float(rng.uniform(0.5, 1.0))
        red[bb] += red_cell
        # yellow: ER, reticular and strongest around the nucleus
        er = m * er_tex[bb] * (0.25 + 0.75 * np.exp(-dn / (0.45 * c.radius)))
        er *= ~nuc * 1.0 + nuc * 0.15
        yellow_cell = er * gain * float(rng.uniform(0.5, 1.0))
        yellow[bb] += yellow_cell
        # green: the cell's classes
        g = np.zeros(m.shape, np.float32)
        for cls in cell_labels.get(idx, []):
            g = np.maximum(
                g,
                _draw_green(cls, rng, m, nuc, cyto, nucleoli, ncent, dn, d_in[bb], d_edge[bb], mito_tex[bb],
                            red_cell, yellow_cell, c, off, centre, centro, fib_w),
            )
        green[bb] += g * float(rng.uniform(0.5, 1.0)) * (0.55 + 0.45 * er_tex[bb])
    _debris(rng, (red, green, yellow), r_mean)
    stack = np.stack([red, green, blue, yellow], axis=-1)
    # optics: blur, background offset, noise
    sigma = max(0.6, r_mean * 0.006)
    stack = cv2.GaussianBlur(stack, (0, 0), sigma)
    gains = rng.uniform(0.55, 0.9, 4).astype(np.float32)
    stack *= gains
    stack += rng.uniform(0.01, 0.04, 4).astype(np.float32)
    stack += rng.standard_normal(stack.shape, dtype=np.float32) * np.float32(0.012)
    return np.clip(stack, 0.0, 1.0)


def _debris(rng: np.random.Generator, planes: tuple[np.ndarray, np.ndarray, np.ndarray], r_mean: float) -> None:
    """Bright specks of debris anywhere in the (red, green, yellow) planes, never in blue: what a
    segmenter must not take for cells."""
    size = planes[0].shape[0]
    n = int(rng.integers(4, 16))
    for _ in range(n):
        x, y = (int(v) for v in rng.uniform(0, size, 2))
        r = max(1, int(r_mean * float(rng.uniform(0.03, 0.15))))
        values = rng.uniform(0.3, 1.0, 3) * np.array([0.8, float(rng.random() < 0.3), 1.0])
        for plane, value in zip(planes, values):
            if value > 0:
                cv2.circle(plane, (x, y), r, float(value), -1, lineType=cv2.LINE_AA)


def _draw_green(
    cls: int, rng: np.random.Generator, m, nuc, cyto, nucleoli, ncent, dn, din, dedge, mito_tex, red_cell,
    yellow_cell, c: _Cell, off, centre, centro, fib_w,
) -> np.ndarray:
    """The green signal of one class inside one cell (bbox-local float32)."""
    g = np.zeros(m.shape, np.float32)
    nr = c.radius * c.nuc_scale
    s = float(rng.uniform(0.6, 1.0))
    if cls == 0:  # nucleoplasm: the nucleus except nucleoli
        g = (nuc & ~nucleoli) * s * 0.8
    elif cls == 1:  # nuclear membrane: ring on the nucleus edge
        g = (nuc & (din < max(1.5, 0.1 * nr))) * s
    elif cls == 2:  # nucleoli: the large nuclear spots
        g = nucleoli * s
    elif cls == 3:  # fibrillar centres: tiny spots inside nucleoli
        for x, y in ncent:
            for _ in range(int(rng.integers(2, 5))):
                p = (int(x + rng.normal(0, 0.05 * nr)), int(y + rng.normal(0, 0.05 * nr)))
                cv2.circle(g, p, max(1, int(0.035 * nr)), s, -1, lineType=cv2.LINE_AA)
        g *= nucleoli
    elif cls == 4:  # nuclear speckles: many small nuclear spots
        _spots(g, rng, nuc & ~nucleoli, int(rng.integers(20, 40)), 0.06 * nr, s, (0, 0))
        g *= nuc
    elif cls == 5:  # nuclear bodies: a few bright dots
        _spots(g, rng, nuc & (din > 0.15 * nr), int(rng.integers(2, 7)), 0.07 * nr, s * 1.2, (0, 0))
        g *= nuc
    elif cls == 6:  # ER: follows the yellow pattern
        g = yellow_cell / (yellow_cell.max() + 1e-6) * s
    elif cls == 7:  # Golgi: compact perinuclear blob on one side
        a = float(rng.uniform(0, 2 * np.pi))
        p = centre + nr * 1.25 * np.array([math.cos(a), math.sin(a)])
        axes = (max(2, int(nr * 0.7)), max(2, int(nr * 0.4)))
        cv2.ellipse(g, (int(p[0]), int(p[1])), axes, math.degrees(a) + 90, 0, 360, s, -1, lineType=cv2.LINE_AA)
        g *= cyto * (0.6 + 0.4 * mito_tex)
    elif cls == 8:  # intermediate filaments: long curved fibres
        for _ in range(14):
            start = centre + rng.normal(0, 0.5 * c.radius, 2)
            pts = _curve(rng, start, float(rng.uniform(0, 2 * np.pi)), c.radius * 2.0, 0.25, steps=14)
            cv2.polylines(g, [pts], False, s, fib_w + 1, lineType=cv2.LINE_AA)
        g *= cyto
    elif cls == 9:  # actin: straight fibres near the cell edge
        for _ in range(12):
            a = float(rng.uniform(0, np.pi))
            p = centre + rng.normal(0, 0.6 * c.radius, 2)
            d = np.array([math.cos(a), math.sin(a)]) * c.radius * 2
            cv2.line(g, tuple(int(v) for v in p - d), tuple(int(v) for v in p + d), s, fib_w, lineType=cv2.LINE_AA)
        g *= cyto * (0.35 + 0.65 * (dedge < 0.3 * c.radius))
        g = np.maximum(g, cyto * (dedge < 0.06 * c.radius) * s * 0.3)
    elif cls == 10:  # microtubules: follows the red pattern
        g = red_cell / (red_cell.max() + 1e-6) * s * m
    elif cls == 11:  # mitotic spindle: a bipolar shape across the dividing cell
        a = c.angle
        half = c.radius * 0.75
        p1 = centre + half * np.array([math.cos(a), math.sin(a)])
        p2 = centre - half * np.array([math.cos(a), math.sin(a)])
        perp = np.array([-math.sin(a), math.cos(a)]) * c.radius * 0.45
        poly = np.array([p1, centre + perp, p2, centre - perp]).round().astype(np.int32)
        cv2.fillPoly(g, [poly], s * 0.7, lineType=cv2.LINE_AA)
        for p in (p1, p2):
            cv2.circle(g, (int(p[0]), int(p[1])), max(2, int(0.08 * c.radius)), s, -1, lineType=cv2.LINE_AA)
        g *= m
    elif cls == 12:  # centrosome: one or two bright dots beside the nucleus
        for _ in range(int(rng.integers(1, 3))):
            p = centro + rng.normal(0, 0.04 * c.radius, 2)
            cv2.circle(g, (int(p[0]), int(p[1])), max(1, int(0.045 * c.radius)), s * 1.3, -1, lineType=cv2.LINE_AA)
        g *= m
    elif cls == 13:  # plasma membrane: the cell's outline
        g = (m & (dedge < max(1.5, 0.05 * c.radius))) * s
    elif cls == 14:  # mitochondria: a tubular network in the cytoplasm
        g = cyto * mito_tex * s * 1.3 * (0.4 + 0.6 * np.exp(-dn / (0.6 * c.radius)))
    elif cls == 15:  # aggresome: one large perinuclear blob
        a = float(rng.uniform(0, 2 * np.pi))
        p = centre + nr * 1.35 * np.array([math.cos(a), math.sin(a)])
        cv2.circle(g, (int(p[0]), int(p[1])), max(2, int(nr * 0.45)), s * 1.2, -1, lineType=cv2.LINE_AA)
        g *= m & ~nuc
    elif cls == 16:  # cytosol: the cytoplasm evenly
        g = cyto * s * 0.6
    elif cls == 17:  # vesicles: many cytoplasmic puncta
        _spots(g, rng, cyto, int(rng.integers(25, 60)), 0.035 * c.radius, s, (0, 0))
        g *= cyto
    # 18 negative: no specific signal
    return g.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------


def _image_id(seed: int, split: str, index: int) -> str:
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split], index, 7])
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _make_one(job: tuple) -> tuple[str, str, int, dict[int, list[int]], list[int]]:
    out, split, index, image_id, seed, size, bit16, cell_dropout, weights, labels = job
    f = generate_field([seed, {"train": 0, "test": 1}[split], index], size=size, labels=labels, bit16=bit16,
                       cell_dropout=cell_dropout, weights=weights)
    folder = Path(out) / split
    for k, ch in enumerate(("red", "green", "blue", "yellow")):
        write_png(folder / f"{image_id}_{ch}.png", f.image[..., k])
    masks = Path(out) / "masks"
    write_label_image(masks / f"{image_id}_cells.png", f.cells)
    write_label_image(masks / f"{image_id}_nuclei.png", f.nuclei)
    return split, image_id, size, f.cell_labels, f.image_labels


def write_dataset(
    out: str | os.PathLike,
    n_train: int = 64,
    n_test: int = 16,
    size: int | Sequence[int] = 1024,
    seed: int = 0,
    bit16_test: bool = False,
    cell_dropout: float = 0.2,
    weights: str | Sequence[float] = "default",
    workers: int = 1,
    progress: bool = False,
    field_labels: Sequence[Sequence[int]] | None = None,
    test_labels: Sequence[Sequence[int] | None] | None = None,
) -> dict:
    """Write a synthetic dataset in the Kaggle layout, with its truth.

    Layout: ``train/{ID}_{red,green,blue,yellow}.png``, ``train.csv`` (``ID,Label``),
    ``test/…``, ``sample_submission.csv``, ``masks/{ID}_cells.png`` and ``masks/{ID}_nuclei.png``
    (uint16 label images, shared ids), ``truth.csv`` (test split) and ``train_truth.csv`` with one
    row per cell: ``ID,ImageWidth,ImageHeight,CellId,Label``.

    ``size`` may be a list: each image then draws its side from it (like the competition's mix of
    1728, 2048 and 3072 px). ``bit16_test`` writes the test split as 16-bit PNG, as the hidden test
    set is. ``field_labels`` fixes the classes of the training fields (field ``i`` gets
    ``field_labels[i % len(field_labels)]``) instead of drawing them; ``test_labels[i]`` those of
    test field ``i`` (None or beyond the list: drawn), e.g. ``covering_labels(n_test)``. Returns a
    summary dict.
    """
    sizes = [int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    # checked before any folder exists: a refused start leaves nothing behind
    if n_train < 0 or n_test < 0:
        raise ValueError(f"field counts must be at least 0, got n_train={n_train}, n_test={n_test}")
    if not sizes or min(sizes) < MIN_SIZE:
        raise ValueError(f"field sizes must be at least {MIN_SIZE} px, got {sizes}")
    if not 0.0 <= cell_dropout <= 1.0:
        raise ValueError(f"cell_dropout must be in [0, 1], got {cell_dropout}")
    class_weights(weights)
    out = Path(out)
    for sub in ("train", "test", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    size_rng = np.random.default_rng([seed, 99])
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            s = sizes[int(size_rng.integers(len(sizes)))]
            labels = field_labels[i % len(field_labels)] if field_labels and split == "train" else None
            if split == "test" and test_labels is not None and i < len(test_labels):
                labels = test_labels[i]
            jobs.append((str(out), split, i, _image_id(seed, split, i), seed, s,
                         bit16_test and split == "test", cell_dropout, weights, labels))
    t0 = time.perf_counter()
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synthetic fields", unit="field")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_make_one, jobs):
                results.append(r)
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            results.append(_make_one(job))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    with atomic_open(out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Label"])
        for split, image_id, _, _, image_labels in results:
            if split == "train":
                w.writerow([image_id, format_labels(image_labels)])
    with atomic_open(out / "sample_submission.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "ImageWidth", "ImageHeight", "PredictionString"])
        for split, image_id, s, _, _ in results:
            if split == "test":
                w.writerow([image_id, s, s, ""])
    n_cells = 0
    for split, name in (("test", "truth.csv"), ("train", "train_truth.csv")):
        with atomic_open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ID", "ImageWidth", "ImageHeight", "CellId", "Label"])
            for sp, image_id, s, cell_labels, _ in results:
                if sp != split:
                    continue
                for cid, lab in sorted(cell_labels.items()):
                    w.writerow([image_id, s, s, cid, format_labels(lab)])
                    n_cells += 1
    summary = {
        "train": n_train, "test": n_test, "sizes": sizes, "seed": seed, "cells": n_cells,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("synthetic dataset written to %s: %s", out, summary)
    return summary


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (``prog``: the name its usage shows)."""
    from hpa_tf.settings import fraction, int_at_least, int_list

    p = argparse.ArgumentParser(
        prog=prog or "python -m hpa_tf.synthetic",
        description="Write an HPA-like synthetic dataset (Kaggle layout plus cell-level truth).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int_at_least(0), default=64, help="number of training fields (default: 64)")
    p.add_argument("--test", type=int_at_least(0), default=16, help="number of test fields (default: 16)")
    p.add_argument("--size", type=int_list(MIN_SIZE), default=[1024],
                   help=f"field side in px (at least {MIN_SIZE}), or a comma list to draw from, e.g. 1728,2048,3072 "
                        "(default: 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything drawn; the same seed writes the same "
                                                       "dataset (default: 0)")
    p.add_argument("--bit16-test", action="store_true", help="write the test split as 16-bit PNG")
    p.add_argument("--cell-dropout", type=fraction, default=0.2,
                   help="chance a cell lacks one of its image's labels (default: 0.2)")
    p.add_argument("--class-weights", default="default", choices=["default", "competition", "uniform"],
                   help="how image classes are drawn: competition = the competition's image-level frequencies, "
                        "default = the same flattened by a square root (rare classes less rare), uniform = all equal (default: default)")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="worker processes (default: 1)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.train + a.test == 0:
        p.error("--train and --test are both 0: nothing to write")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = write_dataset(a.out, a.train, a.test, a.size, a.seed, a.bit16_test, a.cell_dropout, a.class_weights,
                            a.workers, progress=True)
    print(f"wrote {summary['train']} train + {summary['test']} test fields, {summary['cells']} cells, "
          f"to {a.out} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
