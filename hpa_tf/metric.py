"""The competition metric: mAP of cell masks at mask IoU 0.6, as the OpenImages challenge scores it.

Definition (that of tensorflow/models ``object_detection`` — ``OpenImagesChallengeEvaluator``
with masks, ``per_image_evaluation.PerImageEvaluation``, ``metrics.compute_average_precision``):

1. Evaluatable classes. Per image, only the classes of its ground-truth cells are evaluated;
   detections of any other class are ignored (the reference keeps detections of the image's
   "verified" labels only, and our truth has no verified negatives). ``count_absent_classes=True``
   counts them as false positives instead. Submission IDs without truth are ignored (logged).
2. Per image and class, detections are sorted by confidence (descending). Each one is matched to
   the ground-truth cell of that class with the highest mask IoU (``argmax``: the first cell on a
   tie); if that IoU ≥ ``iou_threshold`` and the cell is not matched yet, the detection is a true
   positive and the cell becomes matched, otherwise it is a false positive (so duplicates are
   false positives, even if a second cell would have matched).
3. Per class, detections of all images are pooled and sorted by confidence; precision and recall
   (over the number of truth cells of that class, in all evaluated images) are accumulated down the
   list; AP is the VOC all-point area: precision made non-increasing from the right, summed over
   the recall steps. A class with truth but no detections has AP 0.
4. mAP is the mean AP over classes that have ground truth (others are NaN and excluded).

Ties in confidence are ordered as the reference orders them: it sorts each image's detections
and later the pooled list, both times by ``argsort(scores)[::-1]``. With a stable sort (the
reference's default sort is not stable beyond 16 elements, so its order on ties is not fully
defined) tied detections of one image keep their listed order and, across images, the later
image's detection comes first.
IoU is ``intersection / union`` from pycocotools' RLE ``iou`` in float64; the reference's
float32 gives the same decisions at the 0.6 threshold for any mask under ~5 million pixels.

Second figure, macro F1 at a confidence threshold (default 0.5): per class with truth, TP = the
detections with confidence ≥ threshold that are true positives under the matching above (the
matching is greedy in confidence order, so it is the same as matching only those detections),
FP = the other evaluated detections with confidence ≥ threshold, FN = truth cells − TP;
F1 = 2TP / (2TP + FP + FN); macro F1 is the mean over classes with truth.

Ground truth
    (a) ``truth.csv`` with ``ID,ImageWidth,ImageHeight,CellId,Label`` (one row per cell, Label like
    ``0|16``) and label images ``{masks_dir}/{ID}_cells.png`` (default ``masks/`` beside the CSV);
    cells of the label image not listed in the CSV are not truth (a detection on one is a false
    positive). (b) A CSV ``ID,ImageWidth,ImageHeight,Label,Mask`` with one row per cell and the
    mask as competition text. (c) In memory: ``{ID: ImageTruth}``.

IoU cost: each distinct predicted mask text is decoded once per image (to COCO bytes; a cell's
mask is shared by its 19 class detections) and one (masks × truth cells) IoU matrix is computed
from run lengths by pycocotools (bounding-box pruned, in C), then reused for every class.
"""

from __future__ import annotations

import argparse
import csv
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

from hpa_tf.fileutil import atomic_open
from hpa_tf.io import CsvFormatError, read_label_image
from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES, parse_labels
from hpa_tf.submission import (
    MaskFormatError,
    SubmissionRow,
    _cells_counts,
    _counts_to_coco,
    check_coco,
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
    masks : one COCO compressed counts string (bytes) per cell.
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


@dataclass
class MetricResult:
    """Scores of a submission; per-class arrays have shape (19,) in class-id order.

    ``per_class_ap`` and ``per_class_f1`` are NaN for classes without truth.
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

    @property
    def classes_with_truth(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(self.n_truth > 0)]

    def to_dict(self) -> dict:
        """JSON-friendly form (NaN → None), with class names."""

        def clean(x):
            return None if isinstance(x, float) and math.isnan(x) else x

        return {
            "mAP": clean(float(self.mean_ap)),
            "macro_f1": clean(float(self.macro_f1)),
            "iou_threshold": self.iou_threshold,
            "f1_threshold": self.f1_threshold,
            "n_images": self.n_images,
            "n_images_without_submission": self.n_images_without_submission,
            "n_images_without_truth": self.n_images_without_truth,
            "n_ignored_detections": self.n_ignored_detections,
            "classes": [
                {
                    "id": c,
                    "name": CLASS_NAMES[c],
                    "n_truth": int(self.n_truth[c]),
                    "n_detections": int(self.n_detections[c]),
                    "n_true_positives": int(self.n_true_positives[c]),
                    "ap": clean(float(self.per_class_ap[c])),
                    "f1": clean(float(self.per_class_f1[c])),
                }
                for c in range(NUM_CLASSES)
            ],
        }

    def format_table(self) -> str:
        """Plain-text table: class, truth cells, detections, TP, AP, F1; then mAP and macro F1."""
        lines = [f"{'id':>2}  {'class':<41} {'truth':>7} {'dets':>8} {'TP':>7} {'AP':>7} {'F1':>7}"]
        for c in range(NUM_CLASSES):
            ap = "-" if math.isnan(self.per_class_ap[c]) else f"{self.per_class_ap[c]:.4f}"
            f1 = "-" if math.isnan(self.per_class_f1[c]) else f"{self.per_class_f1[c]:.4f}"
            lines.append(
                f"{c:>2}  {CLASS_NAMES[c]:<41} {int(self.n_truth[c]):>7} {int(self.n_detections[c]):>8} "
                f"{int(self.n_true_positives[c]):>7} {ap:>7} {f1:>7}"
            )
        lines.append(
            f"mAP@IoU{self.iou_threshold:g} = {self.mean_ap:.4f} over {len(self.classes_with_truth)} classes; "
            f"macro F1@conf{self.f1_threshold:g} = {self.macro_f1:.4f}; {self.n_images} images"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


def _read_csv(path: str | os.PathLike) -> tuple[list[str], Iterable[tuple[int, dict[str, str]]]]:
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header

    def rows():
        with f:
            yield from enumerate(reader, start=2)

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


def match_detections(iou: np.ndarray, iou_threshold: float) -> np.ndarray:
    """True-positive flags of detections already sorted by confidence (descending).

    Parameters
    ----------
    iou : (D, G) float, IoU of each detection with each truth cell of the class (G ≥ 1).
    iou_threshold : minimum IoU of a match.

    Returns
    -------
    (D,) bool: a detection is a TP iff its best-IoU cell (first on ties) has IoU ≥ threshold and
    no earlier detection took that cell.
    """
    tp = np.zeros(iou.shape[0], bool)
    if iou.size == 0:
        return tp
    best = np.argmax(iou, axis=1)
    candidates = np.flatnonzero(iou[np.arange(iou.shape[0]), best] >= iou_threshold)
    _, first = np.unique(best[candidates], return_index=True)
    tp[candidates[first]] = True
    return tp


def average_precision(scores: np.ndarray, tp: np.ndarray, n_truth: int) -> float:
    """VOC all-point AP of pooled detections (NaN when ``n_truth`` is 0, 0 with no detections).

    Parameters
    ----------
    scores : (D,) confidences; tp : (D,) bool true-positive flags; n_truth : truth cells.
    """
    if n_truth == 0:
        return float("nan")
    scores = np.asarray(scores, float)
    if scores.size == 0:
        return 0.0
    tp = np.asarray(tp, bool)[descending_order(scores)]
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, tp.size + 1)
    recall = cum_tp / n_truth
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


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


def _as_rows(submission: str | os.PathLike | Iterable[SubmissionRow]) -> list[SubmissionRow]:
    if isinstance(submission, (str, os.PathLike)):
        return read_submission(submission)
    return list(submission)


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
    keep = None if image_ids is None else set(image_ids)
    if not isinstance(truth, Mapping):
        truth = load_truth(truth, masks_dir=masks_dir, image_ids=keep, progress=progress)
    elif keep is not None:
        truth = {k: v for k, v in truth.items() if k in keep}
    if keep is not None and keep - truth.keys():
        log.warning("%d requested IDs have no ground truth", len(keep - truth.keys()))
    rows = _as_rows(submission)
    by_id: dict[str, SubmissionRow] = {}
    for row in rows:
        if row.image_id in by_id:
            raise MetricError(f"submission lists ID {row.image_id!r} twice")
        by_id[row.image_id] = row
    extra = by_id.keys() - truth.keys()
    if extra:
        log.warning("%d submission IDs have no ground truth; their detections are ignored", len(extra))
    missing = truth.keys() - by_id.keys()
    if missing:
        log.warning("%d truth images have no submission row; their cells count as missed", len(missing))

    n_truth = np.zeros(NUM_CLASSES, np.int64)
    scores: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    flags: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    n_ignored = sum(len(by_id[i].predictions) for i in extra)

    items = truth.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(truth), desc="evaluate", unit="image")
    for image_id, image_truth in items:
        truth_classes = np.zeros((len(image_truth.masks), NUM_CLASSES), bool)
        for i, labels in enumerate(image_truth.labels):
            truth_classes[i, list(labels)] = True
        n_truth += truth_classes.sum(axis=0)
        row = by_id.get(image_id)
        if row is None or not row.predictions:
            continue
        n_ignored += _evaluate_image(
            row, image_truth, truth_classes, iou_threshold, count_absent_classes, scores, flags
        )

    per_class_ap = np.full(NUM_CLASSES, np.nan)
    per_class_f1 = np.full(NUM_CLASSES, np.nan)
    n_detections = np.zeros(NUM_CLASSES, np.int64)
    n_tp = np.zeros(NUM_CLASSES, np.int64)
    for c in range(NUM_CLASSES):
        s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
        t = np.concatenate(flags[c]) if flags[c] else np.zeros(0, bool)
        n_detections[c] = s.size
        n_tp[c] = int(t.sum())
        per_class_ap[c] = average_precision(s, t, int(n_truth[c]))
        if n_truth[c]:
            above = s >= f1_threshold
            tp_at = int(np.sum(t & above))
            fp_at = int(np.sum(~t & above))
            per_class_f1[c] = 2 * tp_at / (2 * tp_at + fp_at + (int(n_truth[c]) - tp_at))
    with_truth = n_truth > 0
    mean_ap = float(np.mean(per_class_ap[with_truth])) if with_truth.any() else float("nan")
    macro_f1 = float(np.mean(per_class_f1[with_truth])) if with_truth.any() else float("nan")
    return MetricResult(
        mean_ap=mean_ap,
        per_class_ap=per_class_ap,
        n_truth=n_truth,
        n_detections=n_detections,
        n_true_positives=n_tp,
        macro_f1=macro_f1,
        per_class_f1=per_class_f1,
        iou_threshold=float(iou_threshold),
        f1_threshold=float(f1_threshold),
        n_images=len(truth),
        n_images_without_submission=len(missing),
        n_images_without_truth=len(extra),
        n_ignored_detections=int(n_ignored),
    )


def _evaluate_image(
    row: SubmissionRow,
    image_truth: ImageTruth,
    truth_classes: np.ndarray,
    iou_threshold: float,
    count_absent_classes: bool,
    scores: list[list[np.ndarray]],
    flags: list[list[np.ndarray]],
) -> int:
    """Append one image's per-class (scores, TP flags); returns the number of ignored detections."""
    image_id = row.image_id
    if (row.width, row.height) != (image_truth.width, image_truth.height):
        raise MetricError(
            f"ID {image_id}: submission size {row.width}x{row.height} differs from the truth's "
            f"{image_truth.width}x{image_truth.height}"
        )
    mask_index: dict[str, int] = {}
    det_label = np.empty(len(row.predictions), np.int64)
    det_score = np.empty(len(row.predictions), float)
    det_mask = np.empty(len(row.predictions), np.int64)
    for k, (label, confidence, text) in enumerate(row.predictions):
        det_label[k] = label
        det_score[k] = confidence
        det_mask[k] = mask_index.setdefault(text, len(mask_index))

    ignored = 0
    evaluated = np.flatnonzero(truth_classes.any(axis=0))
    present = np.unique(det_label)
    needed = present if count_absent_classes else np.intersect1d(present, evaluated)
    for c in np.setdiff1d(present, needed):
        ignored += int(np.sum(det_label == c))
    if needed.size == 0:
        return ignored
    iou = np.zeros((len(mask_index), len(image_truth.masks)))
    if np.intersect1d(needed, evaluated).size:
        masks: list[bytes] = []
        for text in mask_index:
            try:
                masks.append(check_coco_text(text, image_truth.height, image_truth.width))
            except MaskFormatError as exc:
                raise MetricError(f"ID {image_id}: {exc} (run hpa_tf.submission.validate_submission)") from None
        iou = mask_iou(masks, image_truth.masks, image_truth.height, image_truth.width)
    for c in needed:
        dets = np.flatnonzero(det_label == c)
        dets = dets[descending_order(det_score[dets])]
        cells = np.flatnonzero(truth_classes[:, c])
        if cells.size:
            tp = match_detections(iou[np.ix_(det_mask[dets], cells)], iou_threshold)
        else:
            tp = np.zeros(dets.size, bool)
        scores[c].append(det_score[dets])
        flags[c].append(tp)
    return ignored


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpa_tf.metric --submission S --truth T``: print per-class AP, mAP and macro F1."""
    parser = argparse.ArgumentParser(
        prog="python -m hpa_tf.metric",
        description="Score an HPA submission CSV: per-class AP at mask IoU, mAP and macro F1 "
        "(OpenImages instance-segmentation challenge rules).",
    )
    parser.add_argument(
        "--submission", required=True, help="submission CSV (ID,ImageWidth,ImageHeight,PredictionString)"
    )
    parser.add_argument(
        "--truth",
        required=True,
        help="truth.csv (ID,ImageWidth,ImageHeight,CellId,Label + label images) or "
        "a CSV of encoded masks (ID,ImageWidth,ImageHeight,Label,Mask)",
    )
    parser.add_argument("--masks-dir", default=None, help="folder of {ID}_cells.png (default: masks/ beside --truth)")
    parser.add_argument("--iou", type=float, default=0.6, help="IoU threshold of a match (default 0.6)")
    parser.add_argument("--f1-threshold", type=float, default=0.5, help="confidence threshold of the macro F1")
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
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = read_submission(args.submission)
        result = evaluate(
            rows,
            args.truth,
            iou_threshold=args.iou,
            count_absent_classes=args.count_absent_classes,
            f1_threshold=args.f1_threshold,
            masks_dir=args.masks_dir,
            image_ids=[r.image_id for r in rows] if args.only_submitted else None,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as exc:  # CsvFormatError, LabelError, MetricError, ImageReadError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.format_table())
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
