"""Stage 1: cell segmentation of RGBY fields of view.

A segmenter takes a field ``(H, W, 4) uint8`` (R, G, B, Y) and returns ``(cells, nuclei)``, two
``(H, W) int32`` label images (0 = background) in which a cell and its nucleus share one id and
the ids are ``1..N``. Backends are chosen by name::

    seg = get_segmenter("builtin")                      # classical, no weights, CPU (default)
    seg = get_segmenter("hpacellseg", nuclei_model="nuclei.pth", cell_model="cell.pth",
                        device="auto")                  # the official HPA U-Nets (optional)
    cells, nuclei = seg.segment(image)
    results = seg.segment_batch([image1, image2])

A backend that cannot be created raises one of ``SEGMENTER_ERRORS`` with a one-line message that
says what to do. A process that uses the hpacellseg backend and TensorFlow calls
``preload("hpacellseg")`` before TensorFlow is imported (see ``hpacellseg_backend.preload``).

``draw_overlay`` draws the outlines over an RGB composite for a person to look at.
Command line: ``python -m hpa_tf.segmentation --help``.
"""

from __future__ import annotations

from typing import Any, Protocol

import cv2
import numpy as np

BACKENDS: tuple[str, ...] = ("builtin", "hpacellseg")

__all__ = [
    "BACKENDS", "SEGMENTER_ERRORS", "Segmenter", "SegmenterError", "get_segmenter", "preload", "draw_overlay",
    "label_outlines",
]


class SegmenterError(RuntimeError):
    """A segmentation backend cannot be created: a model file it cannot load, a device it lacks."""


#: What ``get_segmenter`` raises for a backend that cannot be created; each message is one line
#: naming the file or package and the fix (missing package: ImportError; missing model file:
#: FileNotFoundError; bad option: ValueError).
SEGMENTER_ERRORS: tuple[type[Exception], ...] = (SegmenterError, ImportError, OSError, ValueError)


class Segmenter(Protocol):
    """What every backend provides."""

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]: ...


def get_segmenter(name: str = "builtin", **options: Any) -> Segmenter:
    """Create a segmenter by backend name.

    Parameters
    ----------
    name : one of ``BACKENDS``: ``"builtin"`` (``BuiltinSegmenter(**options)``) or
        ``"hpacellseg"`` (``HpaCellSegmenter(nuclei_model=..., cell_model=..., device=...)``;
        needs the hpacellseg package and local model files).
    options : keyword arguments for the backend's constructor.

    Raises
    ------
    ValueError : an unknown backend name or option.
    ImportError, FileNotFoundError, SegmenterError : the backend cannot be created (a missing
        package or model file, an unreadable model file, no GPU); see ``SEGMENTER_ERRORS``.
    """
    key = str(name).strip().lower()
    if key == "builtin":
        from hpa_tf.segmentation.builtin import BuiltinSegmenter

        cls: Any = BuiltinSegmenter
    elif key == "hpacellseg":
        from hpa_tf.segmentation.hpacellseg_backend import HpaCellSegmenter

        cls = HpaCellSegmenter
    else:
        raise ValueError(f"unknown segmentation backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        return cls(**options)
    except TypeError as e:  # unexpected keyword
        raise ValueError(f"bad options for segmentation backend {key!r}: {e}") from None


def preload(name: str) -> None:
    """Import what backend ``name`` must import before TensorFlow (hpacellseg: PyTorch's stack).

    Call it early in a process that may also import TensorFlow; a no-op for other backends and
    where the packages are missing.
    """
    if str(name).strip().lower() == "hpacellseg":
        from hpa_tf.segmentation.hpacellseg_backend import preload as preload_torch

        preload_torch()


def label_outlines(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of an object whose right/left/up/down neighbour has another label."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    return edge & (labels > 0)


def composite_rgb(image: np.ndarray, stretch: bool = True) -> np.ndarray:
    """RGB view of an RGBY field: R = red + Y/2, G = green + Y/2, B = blue, (H, W, 3) uint8.

    With ``stretch`` each channel is divided by its 99.5th percentile first (dim fields become
    visible; the relative brightness of the channels is not kept).
    """
    from hpa_tf.io import to_uint8

    image = to_uint8(np.asarray(image)).astype(np.float32)
    if stretch:
        high = np.percentile(image.reshape(-1, image.shape[-1]), 99.5, axis=0)
        image = image * (255.0 / np.maximum(high, 1.0))
    r, g, b, y = (image[..., i] for i in range(4))
    rgb = np.stack([r + 0.5 * y, g + 0.5 * y, b], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def draw_overlay(
    image: np.ndarray,
    cells: np.ndarray,
    nuclei: np.ndarray,
    max_size: int | None = None,
    stretch: bool = True,
    cell_color: tuple[int, int, int] = (255, 255, 255),
    nucleus_color: tuple[int, int, int] = (0, 255, 255),
) -> np.ndarray:
    """Cell and nucleus outlines over the RGB composite of a field.

    Parameters
    ----------
    image : (H, W, 4) RGBY field (uint8 or uint16).
    cells, nuclei : (H, W) label images.
    max_size : if given, the longer side of the result (the field is shrunk first, so outlines
        stay one pixel wide).
    stretch : contrast-stretch each channel (see ``composite_rgb``).
    cell_color, nucleus_color : RGB outline colours (white and cyan by default).

    Returns
    -------
    (h, w, 3) uint8 RGB (convert to BGR before ``cv2.imwrite``).
    """
    rgb = composite_rgb(image, stretch=stretch)
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    h, w = rgb.shape[:2]
    if cells.shape != (h, w) or nuclei.shape != (h, w):
        raise ValueError(f"label images {cells.shape}, {nuclei.shape} do not match the field {(h, w)}")
    if max_size is not None and max(h, w) > max_size:
        f = max_size / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        cells = cv2.resize(cells.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
        nuclei = cv2.resize(nuclei.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
    rgb = rgb.copy()
    rgb[label_outlines(nuclei)] = nucleus_color
    rgb[label_outlines(cells)] = cell_color
    return rgb
