"""The competition metric on small hand-computed cases (expected APs worked out from the definition)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpa_tf.io import CsvFormatError, ImageReadError, write_label_image
from hpa_tf.metric import (
    BaselineResult,
    ImageTruth,
    MetricError,
    average_precision,
    evaluate,
    evaluate_rescorings,
    evaluate_with_baselines,
    load_truth,
    main,
    mask_iou,
)
from hpa_tf.submission import (
    Prediction,
    SubmissionRow,
    coco_to_text,
    encode_cells,
    encode_mask,
    mask_to_coco,
    write_submission,
)

H, W = 40, 60


def _cells() -> np.ndarray:
    """Three 10x10 cells (ids 1, 2, 3) in a 40 x 60 field."""
    cells = np.zeros((H, W), np.int32)
    cells[2:12, 2:12] = 1
    cells[20:30, 5:15] = 2
    cells[5:15, 40:50] = 3
    return cells


CELLS = _cells()
TEXT = encode_cells(CELLS)


def _truth(image_id: str, cell_labels: dict[int, list[int]], cells: np.ndarray = CELLS) -> ImageTruth:
    return ImageTruth.from_label_image(image_id, cells, cell_labels)


def _row(image_id: str, *predictions: tuple[int, float, str]) -> SubmissionRow:
    return SubmissionRow(image_id, W, H, [Prediction(*p) for p in predictions])


def _mask_text(mask: np.ndarray) -> str:
    return encode_mask(mask)


def test_perfect_submission_scores_one():
    truth = {"a": _truth("a", {1: [0], 2: [0, 16], 3: [5]}), "b": _truth("b", {1: [16], 2: [18]})}
    rows = [
        _row("a", (0, 0.9, TEXT[1]), (0, 0.8, TEXT[2]), (16, 0.7, TEXT[2]), (5, 0.6, TEXT[3])),
        _row("b", (16, 0.9, TEXT[1]), (18, 0.95, TEXT[2])),
    ]
    result = evaluate(rows, truth)
    assert result.mean_ap == 1.0 and result.macro_f1 == 1.0
    assert result.classes_with_truth == [0, 5, 16, 18]
    assert result.n_truth[[0, 5, 16, 18]].tolist() == [2, 1, 2, 1]
    assert result.n_detections.sum() == 6 and result.n_true_positives.sum() == 6
    assert math.isnan(result.per_class_ap[1])


def test_all_nineteen_classes_per_cell_still_perfect_for_true_classes():
    """Emitting every class for every cell costs nothing: other classes are ignored or ranked lower."""
    truth = {"a": _truth("a", {1: [0], 2: [3]})}
    preds = [(c, 0.9 if (cell, c) in {(1, 0), (2, 3)} else 0.1, TEXT[cell]) for cell in (1, 2) for c in range(19)]
    result = evaluate([_row("a", *preds)], truth)
    # class 0: TP at 0.9 then FP (cell 2 as class 0) at 0.1 -> AP 1; same for class 3
    assert result.mean_ap == 1.0
    assert result.n_ignored_detections == 2 * 17


def test_duplicates_are_false_positives():
    truth = {"a": _truth("a", {1: [0], 2: [0]})}
    rows = [_row("a", (0, 0.9, TEXT[1]), (0, 0.8, TEXT[1]), (0, 0.7, TEXT[2]))]
    result = evaluate(rows, truth)
    # ranked TP, FP, TP; precision 1, 1/2, 2/3; recall 1/2, 1/2, 1
    # envelope: 1 at recall 1/2, 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    assert result.per_class_ap[0] == pytest.approx(0.5 + 1 / 3)
    assert result.n_true_positives[0] == 2 and result.n_detections[0] == 3
    # F1 at 0.5: TP 2, FP 1, FN 0 -> 4 / 5
    assert result.per_class_f1[0] == pytest.approx(0.8)


def test_pooled_ranking_across_images():
    truth = {"a": _truth("a", {1: [0], 2: [0]}), "b": _truth("b", {3: [0]})}
    rows = [_row("a", (0, 0.9, TEXT[1]), (0, 0.8, TEXT[3])), _row("b", (0, 0.6, TEXT[3]))]
    result = evaluate(rows, truth)
    # pooled: 0.9 TP, 0.8 FP (cell 3 is not class 0 in image a), 0.6 TP; 3 truth cells
    # precision 1, 1/2, 2/3; recall 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3
    assert result.per_class_ap[0] == pytest.approx(1 / 3 + 2 / 9)
    # F1 at 0.5: TP 2, FP 1, FN 1 -> 4 / 6
    assert result.macro_f1 == pytest.approx(2 / 3)


def test_wrong_class_is_ignored_unless_absent_classes_count():
    truth = {"a": _truth("a", {1: [1]}), "b": _truth("b", {1: [0]})}
    rows = [_row("a", (1, 0.5, TEXT[1])), _row("b", (1, 0.9, TEXT[1]), (0, 0.4, TEXT[1]))]
    result = evaluate(rows, truth)
    # class 1 is not in image b's truth: its detection there is ignored
    assert result.per_class_ap[1] == 1.0 and result.mean_ap == 1.0
    assert result.n_ignored_detections == 1 and result.n_detections[1] == 1
    counted = evaluate(rows, truth, count_absent_classes=True)
    # class 1 ranked: FP 0.9 (image b), TP 0.5 -> precision 0, 1/2; recall 0, 1 -> AP 1/2
    assert counted.per_class_ap[1] == pytest.approx(0.5)
    assert counted.mean_ap == pytest.approx(0.75)
    assert counted.n_ignored_detections == 0 and counted.n_detections[1] == 2


def test_wrong_class_within_the_image_is_a_false_positive():
    truth = {"a": _truth("a", {1: [0], 2: [3]})}
    rows = [_row("a", (3, 0.9, TEXT[1]), (3, 0.5, TEXT[2]), (0, 0.7, TEXT[1]))]
    result = evaluate(rows, truth)
    # class 3: FP 0.9 (cell 1 is class 0), TP 0.5 -> AP 1/2; class 0 -> AP 1
    assert result.per_class_ap[3] == pytest.approx(0.5)
    assert result.mean_ap == pytest.approx(0.75)


@pytest.mark.parametrize(
    "inside, outside, is_tp",
    [(60, 0, True), (59, 0, False), (100, 66, True), (100, 67, False)],
)  # cell 1 has 100 px: IoU 0.6, 0.59, 100/166 = 0.6024, 100/167 = 0.5988
def test_iou_threshold_boundary(inside, outside, is_tp):
    mask = np.zeros((H, W), bool)
    ys, xs = np.nonzero(CELLS == 1)
    mask[ys[:inside], xs[:inside]] = True
    free_y, free_x = np.nonzero(CELLS == 0)
    mask[free_y[:outside], free_x[:outside]] = True
    truth = {"a": _truth("a", {1: [0]})}
    result = evaluate([_row("a", (0, 0.9, _mask_text(mask)))], truth)
    assert result.per_class_ap[0] == (1.0 if is_tp else 0.0)
    lower = evaluate([_row("a", (0, 0.9, _mask_text(mask)))], truth, iou_threshold=0.5)
    assert lower.per_class_ap[0] == 1.0


def test_images_without_predictions_count_their_cells_as_missed():
    truth = {"a": _truth("a", {1: [0]}), "b": _truth("b", {1: [0]}), "c": _truth("c", {1: [0]})}
    rows = [_row("a", (0, 0.9, TEXT[1])), _row("b")]  # b: empty PredictionString; c: no row
    result = evaluate(rows, truth)
    # one TP of three cells: precision 1 at recall 1/3 -> AP 1/3
    assert result.per_class_ap[0] == pytest.approx(1 / 3)
    assert result.n_images == 3 and result.n_images_without_submission == 1
    # F1 at 0.5: TP 1, FP 0, FN 2 -> 2 / 4
    assert result.macro_f1 == pytest.approx(0.5)


def test_classes_without_truth_are_excluded_from_the_mean():
    truth = {"a": _truth("a", {1: [0], 2: [2]})}
    rows = [_row("a", (0, 0.9, TEXT[1]), (5, 0.9, TEXT[3]))]
    result = evaluate(rows, truth)
    # class 0: AP 1; class 2: truth but no detections -> AP 0; class 5: no truth -> NaN, not in the mean
    assert result.per_class_ap[2] == 0.0 and math.isnan(result.per_class_ap[5])
    assert result.mean_ap == pytest.approx(0.5)
    assert math.isnan(result.per_class_f1[5]) and result.per_class_f1[2] == 0.0


def test_submission_ids_without_truth_are_ignored():
    truth = {"a": _truth("a", {1: [0]})}
    rows = [_row("a", (0, 0.9, TEXT[1])), _row("zzz", (0, 0.99, TEXT[2]))]
    result = evaluate(rows, truth)
    assert result.mean_ap == 1.0 and result.n_images_without_truth == 1 and result.n_ignored_detections == 1


def test_ties_follow_the_reference_double_sort():
    # the reference sorts per image and again after pooling, both by argsort(scores)[::-1]:
    # tied detections of one image keep their listed order ...
    truth = {"a": _truth("a", {1: [0], 2: [0]})}
    tp_first = evaluate([_row("a", (0, 0.5, TEXT[1]), (0, 0.5, TEXT[3]))], truth)
    # ranked TP, FP: precision 1, 1/2 at recall 1/2 -> AP 1/2
    assert tp_first.per_class_ap[0] == pytest.approx(0.5)
    fp_first = evaluate([_row("a", (0, 0.5, TEXT[3]), (0, 0.5, TEXT[1]))], truth)
    # ranked FP, TP: precision 0, 1/2; recall 0, 1/2 -> AP 1/2 * 1/2
    assert fp_first.per_class_ap[0] == pytest.approx(0.25)
    # ... and across images the later image comes first
    truth = {"a": _truth("a", {1: [0]}), "b": _truth("b", {1: [0]})}
    rows = [_row("a", (0, 0.5, TEXT[1])), _row("b", (0, 0.5, TEXT[3]))]
    assert evaluate(rows, truth).per_class_ap[0] == pytest.approx(0.25)


def test_average_precision_definition():
    assert math.isnan(average_precision(np.array([0.5]), np.array([True]), 0))
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0
    # ranked TP, FP, FP, TP of 4 truths: precision 1, .5, 1/3, .5; recall .25, .25, .25, .5
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, np.array([True, False, False, True]), 4) == pytest.approx(0.25 + 0.25 * 0.5)


def test_mask_iou_matches_dense_computation():
    rng = np.random.default_rng(0)
    preds = [rng.random((23, 31)) < p for p in (0.1, 0.5, 0.9)] + [np.zeros((23, 31), bool)]
    truths = [rng.random((23, 31)) < p for p in (0.3, 0.7)]
    iou = mask_iou([mask_to_coco(m) for m in preds], [mask_to_coco(m) for m in truths], 23, 31)
    for i, p in enumerate(preds):
        for j, t in enumerate(truths):
            union = (p | t).sum()
            assert iou[i, j] == pytest.approx((p & t).sum() / union if union else 0.0)
    assert mask_iou([], [mask_to_coco(truths[0])], 23, 31).shape == (0, 1)


def test_size_mismatch_and_bad_mask_are_errors():
    truth = {"a": _truth("a", {1: [0]})}
    with pytest.raises(MetricError, match="ID a: submission size"):
        evaluate([SubmissionRow("a", W + 1, H, [Prediction(0, 0.5, TEXT[1])])], truth)
    with pytest.raises(MetricError, match="ID a: mask"):
        evaluate([_row("a", (0, 0.5, encode_mask(np.ones((3, 3), bool))))], truth)
    with pytest.raises(MetricError, match="cell 7"):
        _truth("a", {7: [0]})


def _write_truth_files(root: Path) -> tuple[Path, dict[str, ImageTruth]]:
    """truth.csv + masks/ for two fields; returns the CSV path and the same truth in memory."""
    other = np.zeros((H, W), np.int32)
    other[0:H, 30:40] = 5  # a full-height cell
    other[10:20, 0:10] = 6
    layout = {"img1": (CELLS, {1: [0], 2: [0, 16], 3: [2]}), "img2": (other, {5: [16], 6: [18]})}
    (root / "masks").mkdir()
    lines = ["ID,ImageWidth,ImageHeight,CellId,Label"]
    truth = {}
    for image_id, (cells, labels) in layout.items():
        write_label_image(root / "masks" / f"{image_id}_cells.png", cells)
        lines += [f"{image_id},{W},{H},{cell},{'|'.join(map(str, cl))}" for cell, cl in labels.items()]
        truth[image_id] = _truth(image_id, labels, cells)
    (root / "truth.csv").write_text("\n".join(lines) + "\n")
    return root / "truth.csv", truth


def _submission_rows(truth: dict[str, ImageTruth]) -> list[SubmissionRow]:
    rng = np.random.default_rng(5)
    rows = []
    for image_id, t in truth.items():
        preds = []
        for mask, labels in zip(t.masks, t.labels):
            text = coco_to_text(mask)
            preds += [
                (c, float(rng.random()) if c not in labels else 0.5 + 0.5 * float(rng.random()), text)
                for c in range(19)
            ]
        rows.append(SubmissionRow(image_id, t.width, t.height, [Prediction(*p) for p in preds]))
    return rows


def test_truth_sources_agree_and_cli(tmp_path: Path, capsys):
    truth_csv, truth = _write_truth_files(tmp_path)
    loaded = load_truth(truth_csv)
    assert loaded == truth
    rows = _submission_rows(truth)
    sub = tmp_path / "submission.csv"
    write_submission(sub, rows)
    in_memory = evaluate(rows, truth)
    from_files = evaluate(sub, truth_csv)
    assert from_files.to_dict() == in_memory.to_dict()
    assert in_memory.mean_ap == pytest.approx(np.nanmean(in_memory.per_class_ap))

    # (b) a CSV of encoded masks gives the same truth
    lines = ["ID,ImageWidth,ImageHeight,Label,Mask"]
    for image_id, t in truth.items():
        lines += [
            f"{image_id},{W},{H},{'|'.join(map(str, lab))},{coco_to_text(m)}" for m, lab in zip(t.masks, t.labels)
        ]
    masks_csv = tmp_path / "truth_masks.csv"
    masks_csv.write_text("\n".join(lines) + "\n")
    assert evaluate(sub, masks_csv).to_dict() == in_memory.to_dict()

    # restricting to some IDs: only img1 is scored, the other's label image is not needed
    only = evaluate(rows[:1], truth_csv, image_ids=["img1"])
    assert only.n_images == 1 and only.to_dict() == evaluate(rows[:1], {"img1": truth["img1"]}).to_dict()
    assert load_truth(truth_csv, image_ids=["img2"]) == {"img2": truth["img2"]}

    out = tmp_path / "result.json"
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Nucleoplasm" in printed and "mAP@IoU0.6" in printed
    assert json.loads(out.read_text())["mAP"] == pytest.approx(in_memory.mean_ap)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_truth_file_errors_name_the_file(tmp_path: Path, capsys):
    truth_csv, _ = _write_truth_files(tmp_path)
    (tmp_path / "masks" / "img2_cells.png").unlink()
    with pytest.raises(ImageReadError, match="img2_cells.png"):
        load_truth(truth_csv)
    sub = tmp_path / "s.csv"
    write_submission(sub, [])
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--quiet"]) == 2
    assert "img2_cells.png" in capsys.readouterr().err
    write_submission(sub, [SubmissionRow("img1", W, H, [Prediction(0, 0.5, TEXT[1])])])
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--quiet", "--only-submitted"]) == 0
    assert "1 images" in capsys.readouterr().out
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("ID,ImageWidth,ImageHeight,CellId,Label\nimg1,61,40,1,0\n")
    with pytest.raises(MetricError, match="img1_cells.png.*60x40"):
        load_truth(wrong, masks_dir=tmp_path / "masks")


def _reference_restatement(rows, truth, iou_threshold=0.6):
    """A minimal loop-by-loop re-implementation of the OpenImages instance-segmentation challenge
    evaluator's algorithm (tensorflow/models object_detection: oid_challenge_evaluation,
    OpenImagesChallengeEvaluator, PerImageEvaluation, metrics.compute_precision_recall /
    compute_average_precision), on dense masks, with its float32 IoU and its sort
    ``np.argsort(scores)[::-1]`` taken as a stable sort.

    ``rows``: {ID: [(label, score, dense mask)]}; ``truth``: {ID: [(dense mask, classes)]}.
    """
    scores, flags, n_gt = defaultdict(list), defaultdict(list), np.zeros(19)
    for image_id in sorted(truth):  # pandas groupby: sorted ImageID
        cells = truth[image_id]
        evaluatable = {c for _, classes in cells for c in classes}  # every ground-truth row counts
        for mask, classes in cells:
            if mask.any():  # ignore boxes without masks
                for c in classes:
                    n_gt[c] += 1
        if image_id not in rows:
            continue
        dets = [d for d in rows[image_id] if d[0] in evaluatable]  # allowed_classes
        dets = [d for d in dets if d[2].any()]  # _remove_invalid_boxes: an empty mask has an empty box
        for c in range(19):
            det_c = [d for d in dets if d[0] == c]
            gt_c = [m for m, classes in cells if c in classes and m.any()]
            if not det_c:
                continue
            s = np.array([d[1] for d in det_c])
            order = np.argsort(s, kind="stable")[::-1]  # non_max_suppression → sort_by_field
            tp = np.zeros(len(det_c), bool)
            if gt_c:
                taken = np.zeros(len(gt_c), bool)
                for rank, i in enumerate(order):
                    m = det_c[i][2]
                    inter = np.array([np.minimum(m, g).sum() for g in gt_c], np.float32)
                    union = np.float32(m.sum()) + np.array([g.sum() for g in gt_c], np.float32) - inter
                    iou = inter / np.maximum(union, np.float32(1e-7))
                    best = int(np.argmax(iou))
                    if iou[best] >= iou_threshold and not taken[best]:
                        tp[rank] = taken[best] = True
            scores[c].append(s[order])
            flags[c].append(tp)
    ap = np.full(19, np.nan)
    for c in range(19):
        if n_gt[c] == 0:
            continue
        if not scores[c]:
            ap[c] = 0.0
            continue
        s, t = np.concatenate(scores[c]), np.concatenate(flags[c]).astype(float)
        t = t[np.argsort(s, kind="stable")[::-1]]
        cum_tp, cum_fp = np.cumsum(t), np.cumsum(t <= 0)
        precision = cum_tp / (cum_tp + cum_fp)
        recall = np.concatenate([[0], cum_tp / n_gt[c], [1]])
        precision = np.concatenate([[0], precision, [0]])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        steps = np.where(recall[1:] != recall[:-1])[0] + 1
        ap[c] = np.sum((recall[steps] - recall[steps - 1]) * precision[steps])
    return ap


def _random_case(rng, n_images=6, n_classes=4, score_levels=None):
    """Random fields (IDs listed unsorted) with overlapping-IoU predictions, empty masks and ties."""
    truth, truth_dense, rows, rows_dense = {}, {}, [], {}
    for _ in range(n_images):
        image_id = f"{int(rng.integers(0, 16**4)):04x}"
        cells = np.zeros((H, W), np.int32)
        for cell in range(1, 7):
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            cells[y : y + rng.integers(4, 12), x : x + rng.integers(4, 12)] = cell
        dense = []
        for cell in [int(i) for i in np.unique(cells) if i]:
            mask = cells == cell if rng.random() > 0.15 else np.zeros((H, W), bool)  # some empty truth masks
            dense.append((mask, sorted(set(rng.choice(n_classes, rng.integers(1, 3)).tolist()))))
        truth_dense[image_id] = dense
        truth[image_id] = ImageTruth(
            image_id, W, H, tuple(mask_to_coco(m) for m, _ in dense), tuple(tuple(c) for _, c in dense)
        )
        predicted = np.roll(cells, rng.integers(-2, 3, 2), axis=(0, 1))  # shifted: IoU around the threshold
        pmasks = [predicted == cell for cell in np.unique(predicted) if cell] + [np.zeros((H, W), bool)]
        dets = []
        for m in pmasks:
            for c in range(n_classes):
                score = float(rng.integers(0, score_levels) / score_levels) if score_levels else float(rng.random())
                dets.append((c, score, m))
        dets = [dets[i] for i in rng.permutation(len(dets))]
        rows_dense[image_id] = dets
        rows.append(SubmissionRow(image_id, W, H, [Prediction(c, s, encode_mask(m)) for c, s, m in dets]))
    return truth, truth_dense, rows, rows_dense


@pytest.mark.parametrize("score_levels", [None, 4])  # continuous confidences; four levels: many ties
def test_equals_a_restatement_of_the_reference_algorithm(score_levels):
    rng = np.random.default_rng(11 if score_levels else 12)
    truth, truth_dense, rows, rows_dense = _random_case(rng, score_levels=score_levels)
    result = evaluate(rows, truth)
    assert 0.05 < result.mean_ap < 0.95
    assert result.n_empty_masks > 0 and result.n_empty_truth_cells > 0
    expected = _reference_restatement(rows_dense, truth_dense)
    np.testing.assert_array_equal(result.per_class_ap, expected)  # bit for bit, NaN where no truth
    assert list(truth) != sorted(truth)


def test_cross_image_ties_rank_the_later_image_in_sorted_id_order_first():
    # image "a" holds a true positive at 0.7, image "b" a false positive at 0.7; truth lists "b" first
    truth = {"b": _truth("b", {1: [0]}), "a": _truth("a", {1: [0]})}
    rows = [_row("a", (0, 0.7, TEXT[1])), _row("b", (0, 0.7, TEXT[3]))]
    # images are visited a, b: the later one (b, the FP) ranks first: precision 0, 1/2 at recall 0, 1/2
    assert evaluate(rows, truth).per_class_ap[0] == pytest.approx(0.25)
    assert evaluate(rows[::-1], dict(reversed(truth.items()))).per_class_ap[0] == pytest.approx(0.25)
    # with the IDs swapped the true positive is in the later image: TP, FP -> 1/2
    truth = {"a": _truth("a", {1: [0]}), "b": _truth("b", {1: [0]})}
    rows = [_row("b", (0, 0.7, TEXT[1])), _row("a", (0, 0.7, TEXT[3]))]
    assert evaluate(rows, truth).per_class_ap[0] == pytest.approx(0.5)


def test_tied_duplicates_in_one_image_match_later_listed_first():
    # two detections of cell 1 at 0.5: the matching takes the later-listed one (the per-image
    # argsort(scores)[::-1]), the ranking restores the listed order: FP then TP -> precision 1/2
    truth = {"a": _truth("a", {1: [0]})}
    rows = [_row("a", (0, 0.5, TEXT[1]), (0, 0.5, TEXT[1]))]
    result = evaluate(rows, truth)
    assert result.per_class_ap[0] == pytest.approx(0.5)
    assert result.n_true_positives[0] == 1 and result.n_detections[0] == 2


def test_empty_predicted_mask_is_dropped():
    truth = {"a": _truth("a", {1: [0], 2: [0]})}
    empty = encode_mask(np.zeros((H, W), bool))
    rows = [_row("a", (0, 0.9, empty), (0, 0.8, TEXT[1]), (0, 0.7, TEXT[2]), (3, 0.9, empty))]
    result = evaluate(rows, truth)
    # the empty mask is neither TP nor FP: TP, TP -> AP 1 (counted as a FP it would be 2/3)
    assert result.per_class_ap[0] == 1.0
    assert result.n_detections[0] == 2 and result.n_empty_masks == 1
    assert result.n_ignored_detections == 1  # class 3 is not in the image's truth: ignored first
    assert "1 detections with an empty mask dropped" in result.format_table()


def test_empty_truth_mask_is_ignored(tmp_path: Path):
    empty = encode_mask(np.zeros((H, W), bool))
    lines = [
        "ID,ImageWidth,ImageHeight,Label,Mask",
        f"a,{W},{H},0,{TEXT[1]}",
        f"a,{W},{H},0|5,{empty}",  # a cell without pixels
        f"b,{W},{H},7,{empty}",  # an image whose only cell has no pixels
    ]
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("\n".join(lines) + "\n")
    rows = [_row("a", (0, 0.9, TEXT[1]), (5, 0.4, TEXT[2])), _row("b", (7, 0.3, TEXT[1]))]
    result = evaluate(rows, truth_csv)
    # class 0: one truth cell (the empty one does not count), found -> 1 (counted, 1/2)
    assert result.per_class_ap[0] == 1.0 and result.n_truth[0] == 1
    # classes 5 and 7 have no truth cell with pixels: NaN, out of the mean; their detections are
    # still evaluated (false positives), not ignored
    assert math.isnan(result.per_class_ap[5]) and math.isnan(result.per_class_ap[7])
    assert result.n_detections[[5, 7]].tolist() == [1, 1] and result.n_true_positives[[5, 7]].tolist() == [0, 0]
    assert result.mean_ap == 1.0 and result.n_ignored_detections == 0
    assert result.n_empty_truth_cells == 2


def test_best_cell_only_even_when_another_cell_would_match():
    # overlapping truth cells (possible in encoded-mask truth): A = rows 0-9 x cols 0-9, B = cols 1-10
    a, b, d = (np.zeros((H, W), bool) for _ in range(3))
    a[0:10, 0:10] = True
    b[0:10, 1:11] = True
    d[1:11, 0:10] = True  # IoU 90/110 = 0.82 with A, 81/119 = 0.68 with B
    truth = {"x": ImageTruth("x", W, H, (mask_to_coco(a), mask_to_coco(b)), ((0,), (0,)))}
    rows = [_row("x", (0, 0.9, encode_mask(a)), (0, 0.8, encode_mask(d)), (0, 0.7, encode_mask(b)))]
    result = evaluate(rows, truth)
    # d's best cell A is taken -> FP although B >= 0.6: TP, FP, TP -> 1/2 * 1 + 1/2 * 2/3
    assert result.per_class_ap[0] == pytest.approx(0.5 + 1 / 3)
    assert result.n_true_positives[0] == 2


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def test_ceiling_is_the_share_of_truth_cells_the_segmentation_finds():
    shifted = np.zeros((H, W), bool)
    shifted[2:12, 6:16] = True  # cell 1 shifted by 4 px: IoU 60/140 < 0.6
    truth = {
        "a": _truth("a", {1: [0], 2: [0, 16], 3: [2]}),
        "b": _truth("b", {1: [16], 3: [0]}),
    }
    rows = [
        # a: cells 1 and 2 found, cell 3 not predicted; classes deliberately wrong
        _row("a", (2, 0.9, TEXT[1]), (0, 0.1, TEXT[1]), (0, 0.2, TEXT[2])),
        # b: cell 1 predicted too far off, cell 3 found (only with a class absent from b's truth)
        _row("b", (16, 0.9, encode_mask(shifted)), (5, 0.9, TEXT[3])),
    ]
    result = evaluate_with_baselines(rows, truth, n_seeds=3)
    # class 0: a1, a2 found, b3 found -> 3/3; class 16: a2 found, b1 missed -> 1/2; class 2: a3 missed -> 0
    assert result.per_class_ceiling[[0, 16, 2]].tolist() == [1.0, 0.5, 0.0]
    assert result.ceiling_map == pytest.approx(0.5)
    assert result.n_predicted_cells == 4 and result.n_matched_cells == 3
    assert math.isnan(result.per_class_ceiling[5])
    # the submission itself: class 0 ranks a2 (TP) 0.2 then a1 (TP) 0.1 of 3 cells -> 2/3
    assert result.per_class_ap[0] == pytest.approx(2 / 3)
    assert result.mean_ap == evaluate(rows, truth).mean_ap


def test_ceiling_lists_other_classes_at_zero():
    # overlapping truth (encoded masks): the predicted cell matches A (class 1) one-to-one, and B
    # (class 0, same pixels) only through the metric: class 0 at confidence 0 still finds B
    a = np.zeros((H, W), bool)
    a[0:10, 0:10] = True
    truth = {"x": ImageTruth("x", W, H, (mask_to_coco(a), mask_to_coco(a)), ((1,), (0,)))}
    result = evaluate_with_baselines([_row("x", (1, 0.5, encode_mask(a)))], truth, n_seeds=1)
    assert result.per_class_ceiling[[0, 1]].tolist() == [1.0, 1.0]


def test_random_baseline_averages_random_rankings():
    # one truth cell, a TP and a FP detection: a random order gives AP 1 or 1/2, each half the time
    truth = {"a": _truth("a", {1: [0]})}
    rows = [_row("a", (0, 0.9, TEXT[1]), (0, 0.1, TEXT[3]))]
    result = evaluate_with_baselines(rows, truth, n_seeds=400, seed=3)
    assert set(np.round(result.random_maps, 12)) == {0.5, 1.0}
    assert result.random_map == pytest.approx(0.75, abs=0.05)
    assert result.random_map == pytest.approx(result.per_class_random[0])
    # the submission ranks the TP first: AP 1 = ceiling -> skill 1
    assert result.mean_ap == 1.0 and result.ceiling_map == 1.0 and result.skill == pytest.approx(1.0)
    # ranked the other way: AP 1/2, below chance -> negative skill
    worse = evaluate_with_baselines([_row("a", (0, 0.1, TEXT[1]), (0, 0.9, TEXT[3]))], truth, n_seeds=400, seed=3)
    assert worse.mean_ap == 0.5
    assert worse.skill == pytest.approx((0.5 - worse.random_map) / (1.0 - worse.random_map))
    assert worse.skill < 0
    same = evaluate_with_baselines(rows, truth, n_seeds=400, seed=3)
    np.testing.assert_array_equal(same.random_maps, result.random_maps)  # seeded


def test_skill_per_class_and_overall_and_report_forms():
    rng = np.random.default_rng(4)
    truth, _, rows, _ = _random_case(rng, n_images=5, score_levels=None)
    result = evaluate_with_baselines(rows, truth, n_seeds=5, seed=1)
    assert isinstance(result, BaselineResult) and result.random_maps.shape == (5,)
    with_truth = result.n_truth > 0
    with np.errstate(invalid="ignore"):
        expected = (result.per_class_ap - result.per_class_random) / (result.per_class_ceiling - result.per_class_random)
    np.testing.assert_allclose(result.per_class_skill[with_truth], expected[with_truth])
    assert np.isnan(result.per_class_skill[~with_truth]).all()
    assert result.skill == pytest.approx(
        (result.mean_ap - result.random_map) / (result.ceiling_map - result.random_map)
    )
    assert result.random_map == pytest.approx(np.mean(result.per_class_random[with_truth]))
    assert (result.per_class_random[with_truth] <= result.per_class_ceiling[with_truth] + 1e-12).all()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["mAP"] == pytest.approx(result.mean_ap) and data["skill"] == pytest.approx(result.skill)
    assert len(data["classes"]) == 19 and data["classes"][18]["skill"] is None
    table = result.format_table()
    assert "ceiling" in table and f"skill {result.skill:.4f}" in table
    with pytest.raises(ValueError, match="n_seeds"):
        evaluate_with_baselines(rows, truth, n_seeds=0)


# ----------------------------------------------------------------------------------------------
# files and command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def default_csv_field_limit():
    """Python's default csv field limit (128 KiB), as in a fresh process; restored afterwards."""
    old = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(old)


def test_large_masks_read_in_a_fresh_process(tmp_path: Path, default_csv_field_limit):
    noise = np.random.default_rng(0).random((900, 900)) < 0.5  # a ~200 kB mask text
    text = encode_mask(noise)
    assert len(text) > 180_000
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text(f"ID,ImageWidth,ImageHeight,Label,Mask\nn,900,900,3,{text}\n")
    sub = tmp_path / "submission.csv"
    sub.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\nn,900,900,3 0.5 {text}\n")
    csv.field_size_limit(131072)
    assert evaluate(sub, truth_csv).mean_ap == 1.0


def test_non_utf8_truth_names_the_file(tmp_path: Path, capsys):
    truth_csv = tmp_path / "latin1.csv"
    truth_csv.write_bytes(b"ID,ImageWidth,ImageHeight,CellId,Label\nimg\xe9,60,40,1,0\n")
    with pytest.raises(CsvFormatError, match=r"latin1\.csv line 2: not UTF-8 text"):
        load_truth(truth_csv)
    truth_csv.write_bytes(b"\xff\xfeI\x00D\x00")  # UTF-16
    with pytest.raises(CsvFormatError, match=r"latin1\.csv line 1: not UTF-8 text"):
        load_truth(truth_csv)
    sub = tmp_path / "s.csv"
    write_submission(sub, [])
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "latin1.csv" in err and "\n" not in err


def test_image_level_labels_are_refused_with_a_reason(tmp_path: Path):
    labels = tmp_path / "train.csv"
    labels.write_text("ID,Label\na,0|1\n")
    with pytest.raises(CsvFormatError, match="image-level labels only.*cell-level truth"):
        load_truth(labels)


def test_cli_baselines_and_json_into_a_new_folder(tmp_path: Path, capsys):
    truth_csv, truth = _write_truth_files(tmp_path)
    sub = tmp_path / "submission.csv"
    write_submission(sub, _submission_rows(truth))
    out = tmp_path / "new" / "deeper" / "result.json"
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--baselines", "--seeds", "3",
                 "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "random" in printed and "ceiling" in printed and "skill" in printed
    data = json.loads(out.read_text())
    expected = evaluate_with_baselines(sub, truth_csv, n_seeds=3, seed=0)
    assert data["baselines"] == json.loads(json.dumps(expected.to_dict()))
    assert data["mAP"] == pytest.approx(expected.mean_ap)
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # nothing half-written beside it

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["--submission", str(sub), "--truth", str(truth_csv), "--json", str(blocker / "r.json"),
                 "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "mAP@IoU" in captured.out  # the table came first
    err = captured.err.strip()
    assert err.startswith("error: cannot write") and "a_file" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["--submission", str(sub), "--truth", str(truth_csv), "--baselines", "--seeds", "0"])


def test_rescorings_share_one_preparation_and_the_baselines():
    rng = np.random.default_rng(7)
    truth, _, rows, _ = _random_case(rng, n_images=5, score_levels=None)

    def rescored(seed):
        r = np.random.default_rng(seed)
        return [SubmissionRow(row.image_id, row.width, row.height,
                              [type(p)(p.label, float(r.random()), p.mask) for p in row.predictions]) for row in rows]

    subs = {"given": rows, "other": rescored(1), "third": rescored(2)}
    together = evaluate_rescorings(subs, truth, n_seeds=3, seed=5)
    for name, sub in subs.items():
        alone = evaluate_with_baselines(sub, truth, n_seeds=3, seed=5)
        assert together[name].mean_ap == pytest.approx(alone.mean_ap)
        np.testing.assert_allclose(together[name].per_class_ap, alone.per_class_ap, equal_nan=True)
        np.testing.assert_allclose(together[name].per_class_ceiling, alone.per_class_ceiling, equal_nan=True)
        assert together[name].random_map == pytest.approx(together["given"].random_map)
    assert len({round(r.mean_ap, 9) for r in together.values()}) > 1  # the confidences do matter
    shuffled = [SubmissionRow(r.image_id, r.width, r.height, r.predictions[::-1]) for r in rows]
    with pytest.raises(MetricError, match="same order"):
        evaluate_rescorings({"given": rows, "shuffled": shuffled}, truth)
