"""The competition metric: mAP of cell masks at mask IoU 0.6, as the OpenImages challenge scores it.

Definition (that of tensorflow/models ``object_detection`` — ``OpenImagesChallengeEvaluator``
with masks, ``per_image_evaluation.PerImageEvaluation``, ``metrics.compute_average_precision``):

1. Evaluatable classes. Per image, only the classes of its ground-truth cells are evaluated;
   detections of any other class are ignored (the reference keeps detections of the image's
   "verified" labels only, and our truth has no verified negatives). ``count_absent_classes=True``
   counts them as false positives instead. Submission IDs without truth are ignored (logged).
2. Empty masks. A detection whose mask has no pixel is dropped: the reference removes detections
   whose box (the mask's bounding box) is empty before anything else, so it is neither a true
   nor a false positive. A truth cell whose mask has no pixel (possible in encoded-mask truth) is
   ignored: it is not counted among the class's truth cells and no detection can match it (the
   reference scores such a cell by its box, which for an empty mask is empty and matches
   nothing); its classes still make the image's detections of those classes evaluatable.
3. Per image and class, detections are sorted by confidence (descending). Each one is matched to
   the ground-truth cell of that class with the highest mask IoU (``argmax``: the first cell on a
   tie); if that IoU ≥ ``iou_threshold`` and the cell is not matched yet, the detection is a true
   positive and the cell becomes matched, otherwise it is a false positive (so duplicates are
   false positives, even if a second cell would have matched).
4. Per class, detections of all images are pooled and sorted by confidence; precision and recall
   (over the number of truth cells of that class, in all evaluated images) are accumulated down the
   list; AP is the VOC all-point area: precision made non-increasing from the right, summed over
   the recall steps. A class with truth but no detections has AP 0.
5. mAP is the mean AP over classes that have ground truth (others are NaN and excluded).

Order of tied confidences. The reference visits images in sorted ImageID order (pandas
``groupby``) and sorts twice with ``np.argsort(scores)[::-1]``: each image's detections of a class
(step 3, the matching order), then the pooled list (step 4, the ranking). With a stable sort that
gives: in the matching, tied detections of one image are taken later-listed first; in the
ranking, tied detections of different images come later image (in sorted ID order) first, and
tied detections of one image in their listed order. This project uses exactly that order, always.
The reference's own order is that only where numpy's default ``argsort`` (quicksort) keeps ties
in place: in numpy's classic introsort that is any run of at most 16 elements (it finishes with an
insertion sort), but a longer list is partitioned first and ties land in an order set by the
pivots, and numpy ≥ 1.25's AVX-512 sort does not keep tied items in place even for 4 elements. So
on ties the reference's figure depends on the scoring machine, and the stable order is the one
order that is the same everywhere and equals the reference wherever the reference's is defined.
Confidences drawn from a continuous model output rarely tie; rounded ones (``0.5``) do.

IoU is ``intersection / union`` from pycocotools' RLE ``iou`` in float64; the reference's
float32 gives the same decisions at the 0.6 threshold for any mask under ~5 million pixels.

Second figure, macro F1 at a confidence threshold (default 0.5): per class with truth, TP = the
detections with confidence ≥ threshold that are true positives under the matching above (the
matching is greedy in confidence order, so it is the same as matching only those detections),
FP = the other evaluated detections with confidence ≥ threshold, FN = truth cells − TP;
F1 = 2TP / (2TP + FP + FN); macro F1 is the mean over classes with truth.

Baselines (``evaluate_with_baselines``, ``--baselines``): the same predicted cells scored
(a) with random confidences (mean over seeds), (b) with perfect classification (each cell's true
classes at confidence 1, every other class at 0: the ceiling that segmentation allows), and the
skill ``(mAP − random) / (ceiling − random)``; see ``evaluate_with_baselines``.

Ground truth
    (a) ``truth.csv`` with ``ID,ImageWidth,ImageHeight,CellId,Label`` (one row per cell, Label like
    ``0|16``) and label images ``{masks_dir}/{ID}_cells.png`` (default ``masks/`` beside the CSV);
    cells of the label image not listed in the CSV are not truth (a detection on one is a false
    positive). (b) A CSV ``ID,ImageWidth,ImageHeight,Label,Mask`` with one row per cell and the
    mask as competition text. (c) In memory: ``{ID: ImageTruth}``. Both are cell-level truth; an
    image-level file (``ID,Label``, like ``train.csv``) cannot be scored.

IoU cost: each distinct predicted mask text is decoded once per image (to COCO bytes; a cell's
mask is shared by its 19 class detections) and one (masks × truth cells) IoU matrix is computed
from run lengths by pycocotools (bounding-box pruned, in C). From it, each mask's candidate cell
per class (best IoU ≥ threshold) is kept; scoring with any confidences is then two sorts over all
detections (numpy), so the baselines rescore without touching a mask again.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from hpa_tf.fileutil import atomic_open, makedirs
from hpa_tf.io import CsvFormatError, read_label_image
from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES, parse_labels
from hpa_tf.submission import (
    MaskFormatError,
    SubmissionRow,
    _cells_counts,
    _counts_to_coco,
    check_coco,
    raise_csv_field_size_limit,
    read_submission,
    text_to_coco,
)

log = logging.getLogger(__name__)


class MetricError(ValueError):
    """Inconsistent ground truth or submission (the message names the file / image)."""


@dataclass(frozen=True)
class ImageTruth:
    """Ground truth of one field: its cells as COCO bytes and their class ids.

    Attributes
    ----------
    image_id : the field's ID.
    width, height : original image size in pixels.
    masks : one COCO compressed counts string (bytes) per cell (an empty mask: the cell is ignored).
    labels : class ids of each cell, aligned with ``masks``.
    cell_ids : the cells' ids in the label image (informational; may be empty).
    """

    image_id: str
    width: int
    height: int
    masks: tuple[bytes, ...]
    labels: tuple[tuple[int, ...], ...]
    cell_ids: tuple[int, ...] = ()

    @classmethod
    def from_label_image(
        cls, image_id: str, cells: np.ndarray, cell_labels: Mapping[int, Sequence[int]], where: str | None = None
    ) -> ImageTruth:
        """Truth from an (H, W) int label image and ``{cell id: [class ids]}``.

        Only the cells in ``cell_labels`` are truth; MetricError if one of them is not in the image.
        """
        counts = _cells_counts(cells)
        height, width = cells.shape
        masks, labels, ids = [], [], []
        for cell_id, classes in cell_labels.items():
            if int(cell_id) not in counts:
                raise MetricError(f"{where or image_id}: cell {cell_id} is not in the label image")
            masks.append(_counts_to_coco(counts[int(cell_id)], height, width))
            labels.append(tuple(sorted({int(c) for c in classes})))
            ids.append(int(cell_id))
        return cls(image_id, int(width), int(height), tuple(masks), tuple(labels), tuple(ids))


def _clean(x: float) -> float | None:
    """NaN → None (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def _fmt(x: float, width: int = 7) -> str:
    return f"{'-' if math.isnan(x) else f'{x:.4f}':>{width}}"


@dataclass
class MetricResult:
    """Scores of a submission; per-class arrays have shape (19,) in class-id order.

    ``per_class_ap`` and ``per_class_f1`` are NaN for classes without truth. ``n_empty_masks``
    counts evaluated detections dropped for an empty mask, ``n_empty_truth_cells`` truth cells
    ignored for an empty mask (module docstring, step 2).
    """

    mean_ap: float
    per_class_ap: np.ndarray
    n_truth: np.ndarray
    n_detections: np.ndarray
    n_true_positives: np.ndarray
    macro_f1: float
    per_class_f1: np.ndarray
    iou_threshold: float
    f1_threshold: float
    n_images: int
    n_images_without_submission: int
    n_images_without_truth: int
    n_ignored_detections: int
    n_empty_masks: int = 0
    n_empty_truth_cells: int = 0

    @property
    def classes_with_truth(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(self.n_truth > 0)]

    def to_dict(self) -> dict:
        """JSON-friendly form (NaN → None), with class names."""
        return {
            "mAP": _clean(self.mean_ap),
            "macro_f1": _clean(self.macro_f1),
            "iou_threshold": self.iou_threshold,
            "f1_threshold": self.f1_threshold,
            "n_images": self.n_images,
            "n_images_without_submission": self.n_images_without_submission,
            "n_images_without_truth": self.n_images_without_truth,
            "n_ignored_detections": self.n_ignored_detections,
            "n_empty_masks": self.n_empty_masks,
            "n_empty_truth_cells": self.n_empty_truth_cells,
            "classes": [
                {
                    "id": c,
                    "name": CLASS_NAMES[c],
                    "n_truth": int(self.n_truth[c]),
                    "n_detections": int(self.n_detections[c]),
                    "n_true_positives": int(self.n_true_positives[c]),
                    "ap": _clean(self.per_class_ap[c]),
                    "f1": _clean(self.per_class_f1[c]),
                }
                for c in range(NUM_CLASSES)
            ],
        }

    def format_table(self) -> str:
        """Plain-text table: class, truth cells, detections, TP, AP, F1; then mAP and macro F1."""
        lines = [f"{'id':>2}  {'class':<41} {'truth':>7} {'dets':>8} {'TP':>7} {'AP':>7} {'F1':>7}"]
        for c in range(NUM_CLASSES):
            lines.append(
                f"{c:>2}  {CLASS_NAMES[c]:<41} {int(self.n_truth[c]):>7} {int(self.n_detections[c]):>8} "
                f"{int(self.n_true_positives[c]):>7} {_fmt(self.per_class_ap[c])} {_fmt(self.per_class_f1[c])}"
            )
        lines.append(
            f"mAP@IoU{self.iou_threshold:g} = {self.mean_ap:.4f} over {len(self.classes_with_truth)} classes; "
            f"macro F1@conf{self.f1_threshold:g} = {self.macro_f1:.4f}; {self.n_images} images"
        )
        dropped = []
        if self.n_empty_masks:
            dropped.append(f"{self.n_empty_masks} detections with an empty mask dropped")
        if self.n_empty_truth_cells:
            dropped.append(f"{self.n_empty_truth_cells} truth cells with an empty mask ignored")
        if dropped:
            lines.append("; ".join(dropped))
        return "\n".join(lines)


def _skill(score: np.ndarray | float, random: np.ndarray | float, ceiling: np.ndarray | float) -> np.ndarray:
    """(score − random) / (ceiling − random); NaN where the ceiling does not exceed random."""
    score, random, ceiling = (np.asarray(x, float) for x in (score, random, ceiling))
    span = ceiling - random
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(span > 1e-9, (score - random) / np.where(span > 1e-9, span, 1.0), np.nan)


@dataclass
class BaselineResult:
    """A submission's score beside what chance and segmentation allow on the same cells.

    Per-class arrays have shape (19,) in class-id order and are NaN for classes without truth.

    Attributes
    ----------
    metric : the submission's own ``MetricResult`` (mAP, per-class AP and F1, counts).
    per_class_random : per-class AP of the same detections (cells, masks and classes) with
        uniform random confidences, mean over the seeds.
    random_maps : (n_seeds,) mAP of each random rescoring.
    per_class_ceiling : per-class AP of the same predicted cells, each given the classes of the
        true cell it matches (best IoU ≥ the threshold, one-to-one) at confidence 1 and every
        other class at 0: the most the metric allows with this segmentation.
    n_predicted_cells : distinct non-empty predicted masks in images with truth.
    n_matched_cells : those matched to a true cell.
    seed : seed of the random confidences (``numpy.random.default_rng``).

    Properties give ``mean_ap``, ``random_map``, ``ceiling_map``, ``skill`` (overall, from the
    three means) and ``per_class_ap`` / ``per_class_skill``.
    """

    metric: MetricResult
    per_class_random: np.ndarray
    random_maps: np.ndarray
    per_class_ceiling: np.ndarray
    n_predicted_cells: int
    n_matched_cells: int
    seed: int

    @property
    def mean_ap(self) -> float:
        return self.metric.mean_ap

    @property
    def per_class_ap(self) -> np.ndarray:
        return self.metric.per_class_ap

    @property
    def n_truth(self) -> np.ndarray:
        return self.metric.n_truth

    @property
    def n_seeds(self) -> int:
        return int(self.random_maps.size)

    @property
    def random_map(self) -> float:
        """Mean over seeds of the random rescorings' mAP (= mean over classes of ``per_class_random``)."""
        return float(np.mean(self.random_maps)) if self.random_maps.size else float("nan")

    @property
    def ceiling_map(self) -> float:
        with_truth = self.n_truth > 0
        return float(np.mean(self.per_class_ceiling[with_truth])) if with_truth.any() else float("nan")

    @property
    def skill(self) -> float:
        """(mAP − random mAP) / (ceiling mAP − random mAP): 0 = chance, 1 = the segmentation's ceiling."""
        return float(_skill(self.mean_ap, self.random_map, self.ceiling_map))

    @property
    def per_class_skill(self) -> np.ndarray:
        return _skill(self.per_class_ap, self.per_class_random, self.per_class_ceiling)

    def to_dict(self) -> dict:
        """JSON-friendly form (NaN → None): overall and per-class mAP, random, ceiling, skill."""
        skill = self.per_class_skill
        return {
            "mAP": _clean(self.mean_ap),
            "random": _clean(self.random_map),
            "random_per_seed": [float(x) for x in self.random_maps],
            "random_seed": self.seed,
            "ceiling": _clean(self.ceiling_map),
            "skill": _clean(self.skill),
            "iou_threshold": self.metric.iou_threshold,
            "n_predicted_cells": self.n_predicted_cells,
            "n_matched_cells": self.n_matched_cells,
            "classes": [
                {
                    "id": c,
                    "name": CLASS_NAMES[c],
                    "n_truth": int(self.n_truth[c]),
                    "ap": _clean(self.per_class_ap[c]),
                    "random": _clean(self.per_class_random[c]),
                    "ceiling": _clean(self.per_class_ceiling[c]),
                    "skill": _clean(skill[c]),
                }
                for c in range(NUM_CLASSES)
            ],
        }

    def format_table(self) -> str:
        """Plain-text table: class, truth cells, AP, random, ceiling, skill; then the overall line."""
        skill = self.per_class_skill
        lines = [f"{'id':>2}  {'class':<41} {'truth':>7} {'AP':>7} {'random':>7} {'ceiling':>7} {'skill':>7}"]
        for c in range(NUM_CLASSES):
            lines.append(
                f"{c:>2}  {CLASS_NAMES[c]:<41} {int(self.n_truth[c]):>7} {_fmt(self.per_class_ap[c])} "
                f"{_fmt(self.per_class_random[c])} {_fmt(self.per_class_ceiling[c])} {_fmt(skill[c])}"
            )
        spread = f", sd {np.std(self.random_maps):.4f}" if self.n_seeds > 1 else ""
        lines.append(
            f"mAP {self.mean_ap:.4f}; random {self.random_map:.4f} ({self.n_seeds} seeds{spread}); "
            f"ceiling {self.ceiling_map:.4f} ({self.n_matched_cells} of {self.n_predicted_cells} predicted cells "
            f"match a true cell); skill {_fmt(self.skill, 0).strip()}"
        )
        lines.append("skill = (mAP - random) / (ceiling - random): 0 = chance ranking, 1 = perfect classification")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


def _first_undecodable_line(path: str | os.PathLike) -> int:
    """1-based number of the first line of ``path`` that is not UTF-8 (0: none)."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 0


def _not_utf8(path: str | os.PathLike, exc: UnicodeDecodeError) -> CsvFormatError:
    return CsvFormatError(
        f"{path} line {_first_undecodable_line(path)}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
    )


def _read_csv(path: str | os.PathLike) -> tuple[list[str], Iterable[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` of a UTF-8 CSV (a BOM is allowed); fields of any size.

    Text that is not UTF-8, or broken quoting → CsvFormatError naming the file and line.
    """
    raise_csv_field_size_limit()
    f = open(path, newline="", encoding="utf-8-sig")
    reader = csv.DictReader(f)
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except UnicodeDecodeError as exc:  # the text is decoded by blocks: the header read meets it first
        f.close()
        raise _not_utf8(path, exc) from None
    except csv.Error as exc:
        f.close()
        raise CsvFormatError(f"{path} line 1: unreadable CSV ({exc})") from None
    reader.fieldnames = header

    def rows():
        with f:
            try:
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc) from None
            except csv.Error as exc:
                raise CsvFormatError(f"{path} line {reader.line_num + 1}: unreadable CSV ({exc})") from None

    return header, rows()


def _int_field(row: Mapping[str, str], name: str, where: str) -> int:
    try:
        return int(row[name])
    except (TypeError, ValueError):
        raise CsvFormatError(f"{where}: {name} must be an integer, got {row.get(name)!r}") from None


def load_truth(
    path: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    image_ids: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, ImageTruth]:
    """Read ground truth from ``truth.csv`` + label images, or from a CSV of encoded masks.

    Parameters
    ----------
    path : ``ID,ImageWidth,ImageHeight,CellId,Label`` (label images ``{masks_dir}/{ID}_cells.png``)
        or ``ID,ImageWidth,ImageHeight,Label,Mask`` (mask = competition text).
    masks_dir : folder of the label images (default: ``masks/`` beside ``path``).
    image_ids : keep only these IDs (others are skipped, their label images not read).
    progress : show a tqdm bar while reading label images.

    Raises
    ------
    CsvFormatError / LabelError / MetricError / ImageReadError naming the file and line.
    """
    header, rows = _read_csv(path)
    base = ["ID", "ImageWidth", "ImageHeight", "Label"]
    if all(c in header for c in [*base, "CellId"]):
        mode = "cells"
    elif all(c in header for c in [*base, "Mask"]):
        mode = "masks"
    elif "ID" in header and "Label" in header:
        raise CsvFormatError(
            f"{path}: image-level labels only (header {header}); the metric needs cell-level truth: "
            "ID,ImageWidth,ImageHeight,CellId,Label with label images, or ID,ImageWidth,ImageHeight,Label,Mask"
        )
    else:
        raise CsvFormatError(
            f"{path}: header {header} is neither ID,ImageWidth,ImageHeight,CellId,Label nor "
            "ID,ImageWidth,ImageHeight,Label,Mask"
        )
    sizes: dict[str, tuple[int, int]] = {}
    cells: dict[str, list[tuple[object, tuple[int, ...]]]] = defaultdict(list)
    keep = None if image_ids is None else set(image_ids)
    for line_no, row in rows:
        where = f"{path} line {line_no}"
        image_id = (row.get("ID") or "").strip()
        if not image_id:
            raise CsvFormatError(f"{where}: empty ID")
        if keep is not None and image_id not in keep:
            continue
        size = (_int_field(row, "ImageWidth", where), _int_field(row, "ImageHeight", where))
        if sizes.setdefault(image_id, size) != size:
            raise CsvFormatError(f"{where}: ID {image_id} size {size[0]}x{size[1]} differs from its earlier rows")
        labels = tuple(parse_labels(row.get("Label") or "", where=where))
        if mode == "cells":
            key: object = _int_field(row, "CellId", where)
            if key == 0:
                raise CsvFormatError(f"{where}: CellId 0 is the background")
        else:
            try:
                key = check_coco_text((row.get("Mask") or "").strip(), size[1], size[0])
            except MaskFormatError as exc:
                raise CsvFormatError(f"{where}: {exc}") from None
        cells[image_id].append((key, labels))

    truth: dict[str, ImageTruth] = {}
    if mode == "masks":
        for image_id, items in cells.items():
            width, height = sizes[image_id]
            truth[image_id] = ImageTruth(
                image_id, width, height, tuple(k for k, _ in items), tuple(lab for _, lab in items)
            )
        return truth

    masks_dir = Path(masks_dir) if masks_dir is not None else Path(path).resolve().parent / "masks"
    items_iter = cells.items()
    if progress:
        from tqdm import tqdm

        items_iter = tqdm(items_iter, total=len(cells), desc="truth", unit="image")
    for image_id, items in items_iter:
        width, height = sizes[image_id]
        label_path = masks_dir / f"{image_id}_cells.png"
        label_image = read_label_image(label_path)
        if label_image.shape != (height, width):
            raise MetricError(
                f"{label_path}: label image is {label_image.shape[1]}x{label_image.shape[0]} but {path} "
                f"gives {width}x{height}"
            )
        cell_labels: dict[int, tuple[int, ...]] = {}
        for cell_id, labels in items:
            if cell_id in cell_labels:
                raise CsvFormatError(f"{path}: ID {image_id} lists cell {cell_id} twice")
            cell_labels[cell_id] = labels
        truth[image_id] = ImageTruth.from_label_image(image_id, label_image, cell_labels, where=str(label_path))
    return truth


def check_coco_text(text: str, height: int, width: int) -> bytes:
    """COCO bytes of competition mask text, checked to cover height × width (MaskFormatError)."""
    coco = text_to_coco(text)
    check_coco(coco, height, width)
    return coco


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` high → low; ties: later index first (stable ``argsort(scores)[::-1]``)."""
    return np.argsort(np.asarray(scores), kind="stable")[::-1]


def _ranked_ap(tp: np.ndarray, n_truth: int) -> float:
    """VOC all-point AP of detections already ranked (best first), as ``metrics.compute_average_precision``."""
    if n_truth == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    cum_tp = np.cumsum(tp, dtype=float)
    precision = cum_tp / np.arange(1, tp.size + 1)
    recall = cum_tp / float(n_truth)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def average_precision(scores: np.ndarray, tp: np.ndarray, n_truth: int) -> float:
    """VOC all-point AP of pooled detections (NaN when ``n_truth`` is 0, 0 with no detections).

    Parameters
    ----------
    scores : (D,) confidences, ranked by ``descending_order``; tp : (D,) bool true-positive flags;
    n_truth : truth cells.
    """
    tp = np.asarray(tp, bool)
    return _ranked_ap(tp[descending_order(np.asarray(scores, float))], n_truth)


def mask_iou(pred: Sequence[bytes], truth: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """(P, G) float64 mask IoU between COCO-bytes masks of one image (pycocotools, run lengths)."""
    if not pred or not truth:
        return np.zeros((len(pred), len(truth)))
    size = [int(height), int(width)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        iou = coco_mask.iou(
            [{"size": size, "counts": c} for c in pred],
            [{"size": size, "counts": c} for c in truth],
            [0] * len(truth),
        )
    return np.asarray(iou, float).reshape(len(pred), len(truth))


def _coco_areas(masks: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """(N,) int64 pixel counts of COCO-bytes masks."""
    if not masks:
        return np.zeros(0, np.int64)
    size = [int(height), int(width)]
    return np.asarray(coco_mask.area([{"size": size, "counts": c} for c in masks]), np.int64)


def _as_rows(submission: str | os.PathLike | Iterable[SubmissionRow]) -> list[SubmissionRow]:
    if isinstance(submission, (str, os.PathLike)):
        return read_submission(submission)
    return list(submission)


@dataclass
class _Prepared:
    """What scoring needs, computed once from the masks (see ``_prepare``).

    Truth cells and predicted masks of all images carry global ids (offsets per image).
    Images are numbered in visit order (sorted IDs).
    """

    n_images: int
    n_truth: np.ndarray  # (19,) int64: non-empty truth cells per class
    image_classes: np.ndarray  # (I, 19) bool: evaluatable classes of each image
    cell_classes: np.ndarray  # (C, 19) bool: classes of every truth cell
    mask_image: np.ndarray  # (M,) int64: image of each non-empty predicted mask
    mask_best: np.ndarray  # (M, 19) int64: cell a detection of class c on the mask would take, or -1
    mask_cell: np.ndarray  # (M,) int64: true cell matched one-to-one (best IoU ≥ threshold), or -1
    det_image: np.ndarray  # (D,) evaluated detections: image, position in its row, class, score, mask
    det_pos: np.ndarray
    det_label: np.ndarray
    det_score: np.ndarray
    det_mask: np.ndarray
    n_images_without_submission: int
    n_images_without_truth: int
    n_ignored_detections: int
    n_empty_masks: int
    n_empty_truth_cells: int
    image_ids: tuple[str, ...] = ()  # the truth IDs in visit order (det_image indexes them)


def _cat(parts: list[np.ndarray], dtype, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0, *shape), dtype)


def _one_to_one(iou: np.ndarray, iou_threshold: float) -> np.ndarray:
    """(P,) index of the truth column matched to each row (-1: none): greedy by IoU, pairs ≥ threshold."""
    matched = np.full(iou.shape[0], -1, np.int64)
    rows, cols = np.nonzero(iou >= iou_threshold)
    taken: set[int] = set()
    for k in np.argsort(-iou[rows, cols], kind="stable"):
        r, c = int(rows[k]), int(cols[k])
        if matched[r] < 0 and c not in taken:
            matched[r] = c
            taken.add(c)
    return matched


def _prepare(
    submission: str | os.PathLike | Iterable[SubmissionRow],
    truth: str | os.PathLike | Mapping[str, ImageTruth],
    iou_threshold: float,
    count_absent_classes: bool,
    masks_dir: str | os.PathLike | None,
    image_ids: Iterable[str] | None,
    progress: bool,
) -> _Prepared:
    """Read and check the inputs; per image, decode masks and compute the IoU work once."""
    keep = None if image_ids is None else set(image_ids)
    if not isinstance(truth, Mapping):
        truth = load_truth(truth, masks_dir=masks_dir, image_ids=keep, progress=progress)
    elif keep is not None:
        truth = {k: v for k, v in truth.items() if k in keep}
    if keep is not None and keep - truth.keys():
        log.warning("%d requested IDs have no ground truth", len(keep - truth.keys()))
    by_id: dict[str, SubmissionRow] = {}
    for row in _as_rows(submission):
        if row.image_id in by_id:
            raise MetricError(f"submission lists ID {row.image_id!r} twice")
        by_id[row.image_id] = row
    extra = by_id.keys() - truth.keys()
    if extra:
        log.warning("%d submission IDs have no ground truth; their detections are ignored", len(extra))
    missing = truth.keys() - by_id.keys()
    if missing:
        log.warning("%d truth images have no submission row; their cells count as missed", len(missing))

    order = sorted(truth)  # the reference's visit order; it decides the ranking of tied confidences
    n_truth = np.zeros(NUM_CLASSES, np.int64)
    image_classes = np.zeros((len(order), NUM_CLASSES), bool)
    cell_classes: list[np.ndarray] = []
    mask_image: list[np.ndarray] = []
    mask_best: list[np.ndarray] = []
    mask_cell: list[np.ndarray] = []
    dets: list[tuple[np.ndarray, ...]] = []
    n_ignored = sum(len(by_id[i].predictions) for i in extra)
    n_empty_masks = n_empty_cells = 0
    n_cells = n_masks = 0

    items: Iterable[str] = order
    if progress:
        from tqdm import tqdm

        items = tqdm(order, desc="evaluate", unit="image")
    for k, image_id in enumerate(items):
        image_truth = truth[image_id]
        classes = np.zeros((len(image_truth.masks), NUM_CLASSES), bool)
        for i, labels in enumerate(image_truth.labels):
            classes[i, list(labels)] = True
        present = np.flatnonzero(_coco_areas(image_truth.masks, image_truth.height, image_truth.width) > 0)
        n_empty_cells += classes.shape[0] - present.size
        n_truth += classes[present].sum(axis=0)
        image_classes[k] = classes.any(axis=0)
        cell_classes.append(classes)
        offset, n_cells = n_cells, n_cells + classes.shape[0]
        row = by_id.get(image_id)
        if row is None or not row.predictions:
            continue
        if (row.width, row.height) != (image_truth.width, image_truth.height):
            raise MetricError(
                f"ID {image_id}: submission size {row.width}x{row.height} differs from the truth's "
                f"{image_truth.width}x{image_truth.height}"
            )

        # detections and their distinct masks
        mask_index: dict[str, int] = {}
        n_det = len(row.predictions)
        det_label = np.empty(n_det, np.int64)
        det_score = np.empty(n_det, float)
        det_mask = np.empty(n_det, np.int64)
        for j, (label, confidence, text) in enumerate(row.predictions):
            det_label[j] = label
            det_score[j] = confidence
            det_mask[j] = mask_index.setdefault(text, len(mask_index))
        masks: list[bytes] = []
        for text in mask_index:
            try:
                masks.append(check_coco_text(text, image_truth.height, image_truth.width))
            except MaskFormatError as exc:
                raise MetricError(f"ID {image_id}: {exc} (run hpa_tf.submission.validate_submission)") from None
        nonempty = _coco_areas(masks, image_truth.height, image_truth.width) > 0
        evaluated = np.ones(n_det, bool) if count_absent_classes else image_classes[k][det_label]
        n_ignored += int(np.sum(~evaluated))
        n_empty_masks += int(np.sum(evaluated & ~nonempty[det_mask]))
        used = np.flatnonzero(evaluated & nonempty[det_mask])

        # the IoU work: each non-empty mask against each non-empty truth cell, once
        kept = np.flatnonzero(nonempty)
        iou = mask_iou([masks[i] for i in kept], [image_truth.masks[i] for i in present],
                       image_truth.height, image_truth.width)
        best = np.full((kept.size, NUM_CLASSES), -1, np.int64)
        for c in np.flatnonzero(classes[present].any(axis=0)):
            cols = np.flatnonzero(classes[present, c])
            sub = iou[:, cols]
            top = sub.argmax(axis=1)  # the first cell on a tie, as the reference's argmax
            hit = sub[np.arange(kept.size), top] >= iou_threshold
            best[:, c] = np.where(hit, offset + present[cols[top]], -1)
        matched = _one_to_one(iou, iou_threshold)
        renumber = np.cumsum(nonempty) - 1 + n_masks
        mask_image.append(np.full(kept.size, k, np.int64))
        mask_best.append(best)
        true_cell = np.full(kept.size, -1, np.int64)
        true_cell[matched >= 0] = offset + present[matched[matched >= 0]]
        mask_cell.append(true_cell)
        n_masks += kept.size
        dets.append((np.full(used.size, k), used, det_label[used], det_score[used], renumber[det_mask[used]]))

    columns = list(zip(*dets)) if dets else [[]] * 5
    return _Prepared(
        n_images=len(order),
        n_truth=n_truth,
        image_classes=image_classes,
        cell_classes=_cat(cell_classes, bool, (NUM_CLASSES,)),
        mask_image=_cat(mask_image, np.int64),
        mask_best=_cat(mask_best, np.int64, (NUM_CLASSES,)),
        mask_cell=_cat(mask_cell, np.int64),
        det_image=_cat(list(columns[0]), np.int64),
        det_pos=_cat(list(columns[1]), np.int64),
        det_label=_cat(list(columns[2]), np.int64),
        det_score=_cat(list(columns[3]), float),
        det_mask=_cat(list(columns[4]), np.int64),
        n_images_without_submission=len(missing),
        n_images_without_truth=len(extra),
        n_ignored_detections=int(n_ignored),
        n_empty_masks=n_empty_masks,
        n_empty_truth_cells=int(n_empty_cells),
        image_ids=tuple(order),
    )


def _match(cell: np.ndarray, label: np.ndarray, score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """True-positive flags of detections (any images, any classes).

    ``cell[d]`` is the truth cell (global id) detection d would take, or -1 (best IoU below the
    threshold, or no truth cell of its class). Per cell and class, the first detection in the
    matching order takes it: descending confidence, ties later-listed first (the reference's
    per-image ``argsort(scores)[::-1]`` with a stable sort); later ones are duplicates.
    """
    tp = np.zeros(label.size, bool)
    cand = np.flatnonzero(cell >= 0)
    if cand.size:
        key = cell[cand] * NUM_CLASSES + label[cand]
        order = np.lexsort((-pos[cand], -score[cand], key))
        key = key[order]
        first = np.r_[True, key[1:] != key[:-1]]
        tp[cand[order[first]]] = True
    return tp


def _per_class(
    image: np.ndarray, pos: np.ndarray, label: np.ndarray, score: np.ndarray, tp: np.ndarray, n_truth: np.ndarray,
    f1_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (AP, F1, detections, true positives) of pooled detections.

    Ranking per class: descending confidence; ties: later image first, then listed order within an
    image (what the reference's two ``argsort(scores)[::-1]`` give with a stable sort).
    """
    order = np.lexsort((pos, -image, -score, label))
    label, score, tp = label[order], score[order], tp[order]
    bounds = np.searchsorted(label, np.arange(NUM_CLASSES + 1))
    ap = np.full(NUM_CLASSES, np.nan)
    f1 = np.full(NUM_CLASSES, np.nan)
    n_det = np.diff(bounds).astype(np.int64)
    n_tp = np.bincount(label[tp], minlength=NUM_CLASSES).astype(np.int64)
    for c in range(NUM_CLASSES):
        t = tp[bounds[c] : bounds[c + 1]]
        ap[c] = _ranked_ap(t, int(n_truth[c]))
        if n_truth[c] and f1_threshold is not None:
            above = score[bounds[c] : bounds[c + 1]] >= f1_threshold
            tp_at = int(np.sum(t & above))
            fp_at = int(np.sum(~t & above))
            f1[c] = 2 * tp_at / (2 * tp_at + fp_at + (int(n_truth[c]) - tp_at))
    return ap, f1, n_det, n_tp


def _mean_over_truth(values: np.ndarray, n_truth: np.ndarray) -> float:
    with_truth = n_truth > 0
    return float(np.mean(values[with_truth])) if with_truth.any() else float("nan")


def _metric_result(prep: _Prepared, iou_threshold: float, f1_threshold: float) -> MetricResult:
    cell = prep.mask_best[prep.det_mask, prep.det_label]
    tp = _match(cell, prep.det_label, prep.det_score, prep.det_pos)
    ap, f1, n_det, n_tp = _per_class(
        prep.det_image, prep.det_pos, prep.det_label, prep.det_score, tp, prep.n_truth, f1_threshold
    )
    return MetricResult(
        mean_ap=_mean_over_truth(ap, prep.n_truth),
        per_class_ap=ap,
        n_truth=prep.n_truth,
        n_detections=n_det,
        n_true_positives=n_tp,
        macro_f1=_mean_over_truth(f1, prep.n_truth),
        per_class_f1=f1,
        iou_threshold=float(iou_threshold),
        f1_threshold=float(f1_threshold),
        n_images=prep.n_images,
        n_images_without_submission=prep.n_images_without_submission,
        n_images_without_truth=prep.n_images_without_truth,
        n_ignored_detections=prep.n_ignored_detections,
        n_empty_masks=prep.n_empty_masks,
        n_empty_truth_cells=prep.n_empty_truth_cells,
    )


def evaluate(
    submission: str | os.PathLike | Iterable[SubmissionRow],
    truth: str | os.PathLike | Mapping[str, ImageTruth],
    iou_threshold: float = 0.6,
    count_absent_classes: bool = False,
    f1_threshold: float = 0.5,
    masks_dir: str | os.PathLike | None = None,
    image_ids: Iterable[str] | None = None,
    progress: bool = False,
) -> MetricResult:
    """Score a submission against ground truth (definition in the module docstring).

    Parameters
    ----------
    submission : a submission CSV path, or ``SubmissionRow``s.
    truth : a truth CSV path (see ``load_truth``) or ``{ID: ImageTruth}``.
    iou_threshold : minimum mask IoU of a true positive.
    count_absent_classes : count detections of classes absent from an image's truth as false
        positives (default: ignore them, as the OpenImages challenge does).
    f1_threshold : confidence threshold of the macro F1.
    masks_dir : label-image folder for a ``CellId`` truth CSV.
    image_ids : score only these truth images (e.g. the test IDs when the truth file also holds
        the training fields, or one validation fold); default: every truth image. Truth images
        without a submission row count as missed.
    progress : tqdm bars.

    Raises
    ------
    MetricError : a submission row whose size differs from the truth's, or a malformed mask.
    """
    prep = _prepare(submission, truth, iou_threshold, count_absent_classes, masks_dir, image_ids, progress)
    return _metric_result(prep, iou_threshold, f1_threshold)


def evaluate_with_baselines(
    submission: str | os.PathLike | Iterable[SubmissionRow],
    truth: str | os.PathLike | Mapping[str, ImageTruth],
    iou_threshold: float = 0.6,
    count_absent_classes: bool = False,
    f1_threshold: float = 0.5,
    masks_dir: str | os.PathLike | None = None,
    image_ids: Iterable[str] | None = None,
    n_seeds: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> BaselineResult:
    """Score a submission and, on the same predicted cells, a random and a perfect classifier.

    Parameters are those of ``evaluate``, plus

    n_seeds : random rescorings averaged for the random baseline (≥ 1).
    seed : seed of ``numpy.random.default_rng`` drawing the random confidences.

    Baselines
    ---------
    random
        The submission's own detections (the same cells, masks and classes) with confidences
        drawn uniformly from [0, 1), mean AP over ``n_seeds`` draws. For a submission that lists
        every class for every cell (as ``predict.py`` writes) this is the score-blind ranking:
        per class, about the share of positive cells among the cells it is scored on.
    ceiling
        The same predicted cells (every distinct non-empty mask of each image with truth), each
        listed with all 19 classes: the classes of the true cell it matches (best IoU ≥
        ``iou_threshold``, one-to-one, greedy by IoU) at confidence 1, every other class at 0.
        Detections below every confidence-1 detection can only add recall, never lower the
        precision envelope, so listing the other classes at 0 scores at least as high as leaving
        them out. With truth cells that do not overlap (label-image truth) and a threshold ≥ 0.5,
        each confidence-1 detection is a true positive, so a class's ceiling AP is the share of
        its truth cells that some predicted cell matches: the most any confidences can reach
        with this segmentation.
    skill
        ``(AP − random) / (ceiling − random)`` per class, and overall from the three means;
        NaN where the ceiling does not exceed random.

    The masks are decoded and the IoU matrices computed once; each rescoring is two sorts over
    the detections.
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    prep = _prepare(submission, truth, iou_threshold, count_absent_classes, masks_dir, image_ids, progress)
    return _with_baselines(prep, _metric_result(prep, iou_threshold, f1_threshold), count_absent_classes, n_seeds,
                           seed)


def _with_baselines(prep: _Prepared, metric: MetricResult, count_absent_classes: bool, n_seeds: int,
                    seed: int) -> BaselineResult:
    """``metric`` beside the random and ceiling baselines of ``prep``'s cells (``evaluate_with_baselines``)."""

    cell = prep.mask_best[prep.det_mask, prep.det_label]
    rng = np.random.default_rng(seed)
    random_aps = []
    for _ in range(n_seeds):
        score = rng.random(prep.det_label.size)
        tp = _match(cell, prep.det_label, score, prep.det_pos)
        random_aps.append(_per_class(prep.det_image, prep.det_pos, prep.det_label, score, tp, prep.n_truth)[0])
    random_aps = np.array(random_aps)
    with_truth = prep.n_truth > 0
    random_maps = random_aps[:, with_truth].mean(axis=1) if with_truth.any() else np.full(n_seeds, np.nan)

    # every predicted cell with every class: its true cell's classes at 1, the rest at 0
    n_masks = prep.mask_image.size
    mask = np.repeat(np.arange(n_masks), NUM_CLASSES)
    label = np.tile(np.arange(NUM_CLASSES), n_masks)
    image = prep.mask_image[mask]
    true_cell = prep.mask_cell[mask]
    score = ((true_cell >= 0) & prep.cell_classes[np.maximum(true_cell, 0), label]).astype(float)
    if not count_absent_classes:
        evaluated = prep.image_classes[image, label]
        mask, label, image, score = mask[evaluated], label[evaluated], image[evaluated], score[evaluated]
    pos = mask * NUM_CLASSES + label
    tp = _match(prep.mask_best[mask, label], label, score, pos)
    ceiling = _per_class(image, pos, label, score, tp, prep.n_truth)[0]

    return BaselineResult(
        metric=metric,
        per_class_random=random_aps.mean(axis=0),
        random_maps=random_maps,
        per_class_ceiling=ceiling,
        n_predicted_cells=int(n_masks),
        n_matched_cells=int(np.sum(prep.mask_cell >= 0)),
        seed=int(seed),
    )


def evaluate_rescorings(
    submissions: Mapping[str, Iterable[SubmissionRow]],
    truth: str | os.PathLike | Mapping[str, ImageTruth],
    iou_threshold: float = 0.6,
    count_absent_classes: bool = False,
    f1_threshold: float = 0.5,
    masks_dir: str | os.PathLike | None = None,
    image_ids: Iterable[str] | None = None,
    n_seeds: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, BaselineResult]:
    """``evaluate_with_baselines`` of several submissions that list the same detections and differ
    only in their confidences (the same IDs, and per ID the same classes and masks in the same
    order: e.g. each component of a prediction and their fusions, ``hpa_tf.predict.component_rows``).

    The masks are decoded, the IoUs computed and the random and ceiling baselines drawn once, on
    the first submission's cells, so every result shares them. Returns ``{name: BaselineResult}``.

    Raises
    ------
    MetricError : a submission whose detections differ from the first's (other than in confidence).
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    named = {name: _as_rows(rows) for name, rows in submissions.items()}
    if not named:
        raise ValueError("no submission to score")
    first = next(iter(named.values()))
    prep = _prepare(first, truth, iou_threshold, count_absent_classes, masks_dir, image_ids, progress)
    base = _with_baselines(prep, _metric_result(prep, iou_threshold, f1_threshold), count_absent_classes, n_seeds,
                           seed)
    out: dict[str, BaselineResult] = {}
    for name, rows in named.items():
        by_id = {row.image_id: row for row in rows}
        score = np.empty(prep.det_label.size, float)
        for d, (k, pos) in enumerate(zip(prep.det_image.tolist(), prep.det_pos.tolist())):
            row = by_id.get(prep.image_ids[k])
            if row is None or pos >= len(row.predictions) or row.predictions[pos].label != prep.det_label[d]:
                raise MetricError(f"submission {name!r}: ID {prep.image_ids[k]} does not list the first "
                                  "submission's detections in the same order")
            score[d] = row.predictions[pos].confidence
        metric = _metric_result(dataclasses.replace(prep, det_score=score), iou_threshold, f1_threshold)
        out[name] = dataclasses.replace(base, metric=metric)
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _write_json(path: str, data: dict) -> None:
    """Write JSON atomically, creating the folder if needed (OSError if it cannot)."""
    parent = os.path.dirname(str(path))
    if parent:
        makedirs(parent)
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (``prog``: the name its usage shows)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m hpa_tf.metric",
        description="Score an HPA submission CSV: per-class AP at mask IoU, mAP and macro F1 "
        "(OpenImages instance-segmentation challenge rules); with --baselines also the same cells "
        "scored by random confidences and by perfect classification, and the skill between them.",
    )
    parser.add_argument(
        "--submission", required=True, help="submission CSV (ID,ImageWidth,ImageHeight,PredictionString)"
    )
    parser.add_argument(
        "--truth",
        required=True,
        help="cell-level truth: truth.csv (ID,ImageWidth,ImageHeight,CellId,Label + label images) or "
        "a CSV of encoded masks (ID,ImageWidth,ImageHeight,Label,Mask)",
    )
    parser.add_argument("--masks-dir", default=None, help="folder of {ID}_cells.png (default: masks/ beside --truth)")
    parser.add_argument("--iou", type=float, default=0.6, help="IoU threshold of a match (default: 0.6)")
    parser.add_argument(
        "--f1-threshold", type=float, default=0.5, help="confidence threshold of the macro F1, the second figure (default: 0.5)"
    )
    parser.add_argument(
        "--count-absent-classes",
        action="store_true",
        help="count detections of classes absent from an image's truth as false positives (default: ignore)",
    )
    parser.add_argument(
        "--only-submitted",
        action="store_true",
        help="score only the truth images that have a submission row (e.g. a truth.csv that also lists "
        "training fields); default: every truth image, missing rows count as missed cells",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also score the same cells with random confidences (mean of --seeds draws) and with perfect "
        "classification (ceiling), and print skill = (mAP - random) / (ceiling - random) per class",
    )
    parser.add_argument("--seeds", type=int, default=5, help="random rescorings averaged by --baselines (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random confidences of --baselines (default: 0)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path (its folder is created; default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python -m hpa_tf.metric --submission S --truth T``: print per-class AP, mAP and macro F1."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = dict(
        iou_threshold=args.iou,
        count_absent_classes=args.count_absent_classes,
        f1_threshold=args.f1_threshold,
        masks_dir=args.masks_dir,
        progress=not args.quiet,
    )
    try:
        rows = read_submission(args.submission)
        image_ids = [r.image_id for r in rows] if args.only_submitted else None
        if args.baselines:
            baselines = evaluate_with_baselines(
                rows, args.truth, image_ids=image_ids, n_seeds=args.seeds, seed=args.seed, **options
            )
            result = baselines.metric
        else:
            result = evaluate(rows, args.truth, image_ids=image_ids, **options)
    except (OSError, ValueError) as exc:  # CsvFormatError, LabelError, MetricError, ImageReadError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.format_table())
    data = result.to_dict()
    if args.baselines:
        print()
        print(baselines.format_table())
        data["baselines"] = baselines.to_dict()
    if args.json:
        try:
            _write_json(args.json, data)
        except OSError as exc:
            print(f"error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
