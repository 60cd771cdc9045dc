"""Pictures a person would rather look at than read: training curves, per-class AP bars,
segmentation overlays and montages of cell crops with their predicted labels.

Every function writes one PNG (matplotlib's Agg backend; no display needed) and returns its path.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hpa_tf.labels import NUM_CLASSES, SHORT_NAMES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a Keras CSVLogger file as float lists (missing or blank cells become NaN)."""
    from hpa_tf.fileutil import raise_csv_field_size_limit

    raise_csv_field_size_limit()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def plot_training_curves(log: Mapping[str, Sequence[float]], out: str | os.PathLike) -> str:
    """Loss (train/val) and the validation metrics per epoch, side by side."""
    plt = _pyplot()
    epochs = np.asarray(log.get("epoch", range(1, len(next(iter(log.values()), [])) + 1)), float)  # from 1
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("loss", "-o"), ("val_loss", "--o")):
        if key in log:
            a.plot(epochs, log[key], style, label=key, ms=3)
    a.set_xlabel("epoch")
    a.set_ylabel("focal loss")
    a.set_title("loss")
    a.legend()
    a.grid(alpha=0.3)
    for key in ("val_map", "val_macro_auc", "f1", "val_f1"):
        if key in log:
            b.plot(epochs, log[key], "-o", label=key, ms=3)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.set_title("metrics")
    b.legend(loc="lower right")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def plot_per_class_ap(per_class_ap: Sequence[float], n_truth: Sequence[int], out: str | os.PathLike,
                      title: str = "per-class AP") -> str:
    """Horizontal bars of AP per class (classes without truth shown as 'no truth')."""
    plt = _pyplot()
    ap = np.asarray(per_class_ap, float)
    fig, ax = plt.subplots(figsize=(7, 6))
    y = np.arange(NUM_CLASSES)
    shown = np.nan_to_num(ap, nan=0.0)
    colors = ["#4c72b0" if not math.isnan(v) else "#cccccc" for v in ap]
    ax.barh(y, shown, color=colors)
    for i, (v, n) in enumerate(zip(ap, n_truth)):
        ax.text(shown[i] + 0.01, i, "no truth" if math.isnan(v) else f"{v:.2f} (n={n})", va="center",
                fontsize=8)
    ax.set_yticks(y, [f"{i} {SHORT_NAMES[i]}" for i in range(NUM_CLASSES)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.22)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("average precision (IoU ≥ 0.6)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def save_rgb(rgb: np.ndarray, out: str | os.PathLike) -> str:
    """Write an (H, W, 3) uint8 RGB array as PNG."""
    import cv2

    if not cv2.imwrite(str(out), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{out}: could not write PNG")
    return str(out)


def plot_crop_montage(
    crops: np.ndarray,
    scores: np.ndarray,
    truth: Sequence[Sequence[int]] | None,
    out: str | os.PathLike,
    columns: int = 6,
    top: int = 2,
    masks: np.ndarray | None = None,
) -> str:
    """A grid of cell crops (RGB composite of RGBY, each contrast-stretched for display) titled with
    their top predicted labels.

    ``crops``: (N, S, S, 4) uint8; ``scores``: (N, 19); ``truth``: each cell's true class ids, shown
    beneath (green when the top prediction is among them); ``masks``: (N, S, S) the target cell's
    mask in each crop, outlined in white.
    """
    import cv2

    from hpa_tf.segmentation import composite_rgb

    plt = _pyplot()
    n = len(crops)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.6))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        ax = axes[i]
        rgb = np.ascontiguousarray(composite_rgb(crops[i], stretch=True))
        if masks is not None:
            contours, _ = cv2.findContours((np.asarray(masks[i]) > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, contours, -1, (255, 255, 255), 1)
        ax.imshow(rgb)
        best = np.argsort(-scores[i])[:top]
        pred = "\n".join(f"{SHORT_NAMES[c]} {scores[i, c]:.2f}" for c in best)
        ax.set_title(pred, fontsize=7)
        if truth is not None:
            ok = int(best[0]) in set(truth[i])
            ax.text(0.5, -0.06, "true: " + ",".join(SHORT_NAMES[c] for c in truth[i]), transform=ax.transAxes,
                    ha="center", va="top", fontsize=6.5, color="green" if ok else "firebrick")
    note = "crops contrast-stretched for display" + ("; target cell outlined in white" if masks is not None else "")
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)
