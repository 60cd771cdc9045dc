"""Mask text codec (byte-identical to the pycocotools path) and the submission CSV."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np
import pytest
from pycocotools import _mask as coco_mask_c

from hpa_tf.io import CsvFormatError
from hpa_tf.submission import (
    MaskFormatError,
    Prediction,
    SubmissionRow,
    _counts_to_coco,
    coco_counts,
    decode_mask,
    encode_cells,
    encode_mask,
    format_confidence,
    format_prediction_string,
    mask_counts,
    parse_prediction_string,
    read_submission,
    validate_submission,
    write_submission,
)


def reference_text(mask: np.ndarray) -> str:
    """The competition's own path (pycocotools encode of the Fortran-ordered uint8 mask)."""
    fortran = np.asfortranarray(mask[..., None].astype(np.uint8))
    rle = coco_mask_c.encode(fortran)[0]["counts"]
    return base64.b64encode(zlib.compress(rle, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def _blob(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[:height, :width]
    return (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 < 1


def _masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    masks: dict[str, np.ndarray] = {}
    for p in (0.05, 0.5, 0.95):
        masks[f"random_{p}"] = rng.random((37, 53)) < p
    masks["empty"] = np.zeros((20, 30), bool)
    masks["full"] = np.ones((20, 30), bool)
    for y, x in ((0, 0), (19, 29), (0, 29), (19, 0), (7, 11)):
        m = np.zeros((20, 30), bool)
        m[y, x] = True
        masks[f"pixel_{y}_{x}"] = m
    rows = np.zeros((21, 17), bool)
    rows[::2] = True
    masks["stripes_rows"] = rows
    masks["stripes_cols"] = rows.T.copy()
    masks["checker"] = (np.indices((15, 15)).sum(axis=0) % 2).astype(bool)
    wrap = np.zeros((10, 10), bool)
    wrap[:, 0] = True
    wrap[:4, 1] = True
    wrap[6:, 3:6] = True
    masks["column_wrap"] = wrap  # runs that continue from one column's bottom into the next's top
    masks["one_by_one_set"] = np.ones((1, 1), bool)
    masks["one_by_one_clear"] = np.zeros((1, 1), bool)
    masks["row_vector"] = rng.random((1, 41)) < 0.5
    masks["col_vector"] = rng.random((41, 1)) < 0.5
    masks["odd_blob"] = _blob(333, 517, 150, 260, 60, 90)
    masks["border_blob"] = _blob(64, 48, 0, 47, 30, 20)
    return masks


MASKS = _masks()


@pytest.mark.parametrize("name", sorted(MASKS))
def test_encode_mask_matches_pycocotools(name):
    mask = MASKS[name]
    text = encode_mask(mask)
    assert text == reference_text(mask)
    assert text.isascii()
    decoded = decode_mask(text, *mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_encode_mask_many_random_small_masks():
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = rng.integers(1, 9, 2)
        mask = rng.random((h, w)) < rng.random()
        assert encode_mask(mask) == reference_text(mask)


def test_encode_mask_3072_field():
    mask = _blob(3072, 3072, 1500, 2000, 110, 90) | _blob(3072, 3072, 3000, 100, 150, 150)
    assert encode_mask(mask) == reference_text(mask)


def test_encode_mask_non_bool_input_means_nonzero():
    mask = MASKS["odd_blob"]
    assert encode_mask(mask.astype(np.uint8)) == encode_mask(mask)
    assert encode_mask(mask.astype(np.int32) * 7) == encode_mask(mask)


def test_encode_mask_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((4, 4, 1), bool))


def test_mask_counts_are_column_major_zero_first():
    mask = np.array([[0, 1], [1, 1], [0, 0]], bool)  # column-major: 0 1 0 | 1 1 0
    np.testing.assert_array_equal(mask_counts(mask), [1, 1, 1, 2, 1])
    np.testing.assert_array_equal(mask_counts(np.ones((2, 2), bool)), [0, 4])
    np.testing.assert_array_equal(mask_counts(np.zeros((2, 3), bool)), [6])


def test_coco_counts_inverts_pycocotools_string():
    rng = np.random.default_rng(2)
    for _ in range(200):
        counts = rng.integers(0, 2 ** rng.integers(1, 28), rng.integers(1, 40))
        counts[1:][counts[1:] == 0] = 1  # only the first count may be zero
        coco = _counts_to_coco(counts, 1, int(counts.sum()))
        np.testing.assert_array_equal(coco_counts(coco), counts)


def _label_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    cells = np.zeros((90, 70), np.int32)
    cells[:, :5] = 4  # full-height cell on the left border (runs wrap across columns)
    cells[0:30, 5:9] = 4
    cells[10:40, 20:50] = 1
    cells[40:89, 20:50] = 2
    cells[60:90, 60:70] = 9
    cells[5:8, 60:63] = 3
    noise = rng.random(cells.shape) < 0.05
    cells[noise] = rng.integers(1, 10, int(noise.sum()))
    return cells


def test_encode_cells_equals_per_cell_encode_mask():
    cells = _label_image()
    encoded = encode_cells(cells)
    present = sorted(int(i) for i in np.unique(cells) if i)
    assert list(encoded) == present
    for cell_id, text in encoded.items():
        assert text == encode_mask(cells == cell_id) == reference_text(cells == cell_id)


def test_encode_cells_subset_absent_id_and_uint16():
    cells = _label_image().astype(np.uint16)
    encoded = encode_cells(cells, ids=[9, 2, 77])
    assert list(encoded) == [9, 2, 77]
    assert encoded[9] == reference_text(cells == 9)
    assert encoded[77] == reference_text(np.zeros(cells.shape, bool))
    with pytest.raises(ValueError, match="background"):
        encode_cells(cells, ids=[0])


def test_decode_mask_rejects_bad_text():
    good = encode_mask(MASKS["odd_blob"])
    with pytest.raises(MaskFormatError, match="base64"):
        decode_mask("not base64!", 10, 10)
    with pytest.raises(MaskFormatError, match="zlib"):
        decode_mask(base64.b64encode(b"plain").decode(), 10, 10)
    with pytest.raises(MaskFormatError, match="pixels"):
        decode_mask(good, 333, 518)  # wrong size: counts do not cover the image
    bad_alphabet = base64.b64encode(zlib.compress(b"62~O")).decode()
    with pytest.raises(MaskFormatError, match="characters"):
        decode_mask(bad_alphabet, 5, 4)


# ----------------------------------------------------------------------------------------------
# Submission file
# ----------------------------------------------------------------------------------------------


def _rows() -> list[SubmissionRow]:
    cells = _label_image()
    texts = encode_cells(cells)
    preds = [Prediction(label, conf, texts[cell]) for cell, label, conf in ((1, 0, 0.9), (1, 16, 0.25), (9, 18, 1.0))]
    return [
        SubmissionRow("a1", width=70, height=90, predictions=preds),
        SubmissionRow("b2", width=70, height=90, predictions=[]),
    ]


def test_write_read_round_trip(tmp_path: Path):
    rows = _rows()
    path = tmp_path / "submission.csv"
    assert write_submission(path, rows) == 2
    text = path.read_text()
    assert text.splitlines()[0] == "ID,ImageWidth,ImageHeight,PredictionString"
    assert text.splitlines()[2] == "b2,70,90,"
    assert read_submission(path) == rows
    assert validate_submission(path, expected_ids={"a1": (70, 90), "b2": (70, 90)}) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_format_prediction_string_and_confidence():
    assert format_confidence(0.5) == "0.5"
    assert format_confidence(1.0) == "1"
    assert format_confidence(0.1234567) == "0.123457"
    assert format_confidence(0.0) == "0"
    assert format_prediction_string([(3, 0.25, "abc="), (18, 1, "x")]) == "3 0.25 abc= 18 1 x"
    assert format_prediction_string([]) == ""
    assert parse_prediction_string("3 0.25 abc= 18 1 x") == [Prediction(3, 0.25, "abc="), Prediction(18, 1.0, "x")]


@pytest.mark.parametrize(
    "prediction, message",
    [((19, 0.5, "m"), "label"), ((-1, 0.5, "m"), "label"), ((1, 1.5, "m"), "confidence"),
     ((1, float("nan"), "m"), "confidence"), ((1, 0.5, "a b"), "whitespace"), ((1, 0.5, ""), "whitespace")],
)  # fmt: skip
def test_writer_rejects_bad_predictions(tmp_path: Path, prediction, message):
    path = tmp_path / "s.csv"
    with pytest.raises(ValueError, match=message):
        write_submission(path, [SubmissionRow("a", 10, 10, [Prediction(*prediction)])])
    assert not path.exists() and not list(tmp_path.iterdir())  # atomic: nothing left behind


def test_writer_rejects_duplicate_id(tmp_path: Path):
    with pytest.raises(ValueError, match="duplicate"):
        write_submission(tmp_path / "s.csv", [SubmissionRow("a", 10, 10), SubmissionRow("a", 10, 10)])


def test_reader_names_the_line(tmp_path: Path):
    path = tmp_path / "s.csv"
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\na,10,10,\nb,10,10,1 0.5\n")
    with pytest.raises(CsvFormatError, match="line 3.*triples"):
        read_submission(path)
    path.write_text("ID,Width,Height,PredictionString\n")
    with pytest.raises(CsvFormatError, match="header"):
        read_submission(path)


def test_reader_handles_huge_prediction_strings(tmp_path: Path):
    mask = encode_mask(MASKS["random_0.5"])
    preds = [Prediction(c % 19, 0.5, mask) for c in range(600)]  # > csv's default 128 KiB field limit
    rows = [SubmissionRow("big", 53, 37, preds)]
    path = tmp_path / "s.csv"
    write_submission(path, rows)
    assert read_submission(path) == rows


def test_validator_reports_each_problem_by_line(tmp_path: Path):
    good = encode_mask(MASKS["odd_blob"])  # 517 x 333
    wrong_size = encode_mask(np.ones((5, 5), bool))
    lines = [
        "ID,ImageWidth,ImageHeight,PredictionString",
        f"a,517,333,0 0.5 {good} 19 0.5 {good}",  # 2: label 19
        f"b,517,333,1 1.5 {good} 2 nan {good}",  # 3: confidences
        f"c,517,333,1 0.5 {wrong_size} 1 0.5 garbage!",  # 4: two bad masks
        "a,517,333,",  # 5: duplicate
        f"d,517,333,1 0.5 {good} 2",  # 6: not whole triples
        "e,x,333,",  # 7: bad size
        "f,500,333,",  # 8: size differs from the expected one
    ]
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    expected = {i: (517, 333) for i in "abcdefg"}
    problems = validate_submission(path, expected_ids=expected)
    text = "\n".join(problems)
    assert "line 2 triple 2: label '19'" in text
    assert "line 3 triple 1: confidence 1.5" in text
    assert "line 3 triple 2: confidence nan" in text
    assert "line 4 triple 1: mask covers 25 pixels" in text
    assert "line 4 triple 2: mask is not valid base64" in text
    assert "line 5: duplicate ID 'a' (first on line 2)" in text
    assert "line 6: 4 PredictionString tokens" in text
    assert "line 7: ImageWidth/ImageHeight must be integers" in text
    assert "line 8: ID f: size 500x333, expected 517x333" in text
    assert "missing ID 'g'" in text
    assert len(problems) == 10, text
    problems = validate_submission(path, expected_ids=["a", "b", "c", "d", "e", "z"], check_masks=False)
    assert "missing ID 'z'" in problems and "line 8: unexpected ID 'f'" in problems
    assert not any("mask" in p for p in problems)


def test_validator_unexpected_id_and_bad_header(tmp_path: Path):
    path = tmp_path / "s.csv"
    write_submission(path, [SubmissionRow("a", 4, 4), SubmissionRow("q", 4, 4)])
    assert validate_submission(path, expected_ids=["a"]) == ["line 3: unexpected ID 'q'"]
    path.write_text("ID,PredictionString\n")
    (problem,) = validate_submission(path)
    assert "header" in problem


def test_undecodable_file_is_a_format_error(tmp_path: Path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"ID,ImageWidth,ImageHeight,PredictionString\na,4,4,\n\xff\xfe,4,4,\n")
    with pytest.raises(CsvFormatError, match="unreadable"):
        read_submission(path)
    (problem,) = validate_submission(path)
    assert "unreadable" in problem
