"""The competition metric on small hand-computed cases (expected APs worked out from the definition)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpa_tf.io import ImageReadError, write_label_image
from hpa_tf.metric import (
    ImageTruth,
    MetricError,
    average_precision,
    evaluate,
    load_truth,
    main,
    mask_iou,
    match_detections,
)
from hpa_tf.submission import (
    Prediction,
    SubmissionRow,
    coco_to_text,
    decode_mask,
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


def test_match_detections_best_cell_only():
    iou = np.array([[0.9, 0.1], [0.7, 0.65], [0.2, 0.61], [0.3, 0.62]])
    # det 1's best cell (0) is taken -> FP even though cell 1 has 0.65; det 2 takes cell 1; det 3 duplicate
    assert match_detections(iou, 0.6).tolist() == [True, False, True, False]
    assert match_detections(np.zeros((0, 3)), 0.6).tolist() == []


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


def _dense_reference(rows, truth_cells, iou_threshold=0.6):
    """A loop-by-loop restatement of the OpenImages evaluation on dense masks (float32 IoU)."""
    scores, flags, n_truth = defaultdict(list), defaultdict(list), np.zeros(19, int)
    for image_id, (cells, cell_labels) in truth_cells.items():
        gt = defaultdict(list)
        for cell, classes in cell_labels.items():
            for c in classes:
                gt[c].append(cells == cell)
                n_truth[c] += 1
        row = rows.get(image_id)
        for c in gt if row else []:
            dets = [(p.confidence, decode_mask(p.mask, H, W)) for p in row.predictions if p.label == c]
            order = np.argsort(np.array([d[0] for d in dets]), kind="stable")[::-1]
            taken = np.zeros(len(gt[c]), bool)
            for i in order:
                inter = np.array([(dets[i][1] & g).sum() for g in gt[c]], np.float32)
                union = np.array([(dets[i][1] | g).sum() for g in gt[c]], np.float32)
                iou = inter / union
                best = int(np.argmax(iou))
                tp = bool(iou[best] >= iou_threshold and not taken[best])
                taken[best] |= tp
                scores[c].append(dets[i][0])
                flags[c].append(tp)
    aps = []
    for c in range(19):
        if n_truth[c]:
            aps.append(average_precision(np.array(scores[c]), np.array(flags[c], bool), int(n_truth[c])))
    return float(np.mean(aps))


def test_agrees_with_dense_loop_reference():
    rng = np.random.default_rng(11)
    truth_cells, truth, rows = {}, {}, {}
    for k in range(6):
        cells = np.zeros((H, W), np.int32)
        for cell in range(1, 7):
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            cells[y : y + rng.integers(4, 12), x : x + rng.integers(4, 12)] = cell
        present = [int(i) for i in np.unique(cells) if i]
        labels = {cell: sorted(set(rng.choice(4, rng.integers(1, 3)).tolist())) for cell in present}
        image_id = f"f{k}"
        truth_cells[image_id] = (cells, labels)
        truth[image_id] = _truth(image_id, labels, cells)
        predicted = np.roll(cells, rng.integers(-2, 3, 2), axis=(0, 1))  # shifted: IoU around the threshold
        texts = encode_cells(predicted)
        preds = [
            Prediction(c, float(np.round(rng.random(), 1)), texts[cell]) for cell in texts for c in range(4)
        ]  # rounded scores: many ties
        rows[image_id] = SubmissionRow(image_id, W, H, preds)
    result = evaluate(list(rows.values()), truth)
    assert 0.05 < result.mean_ap < 0.95
    assert result.mean_ap == pytest.approx(_dense_reference(rows, truth_cells), abs=1e-12)
