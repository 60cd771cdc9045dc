import csv

import cv2
import numpy as np
import pytest

from hpa_tf.io import list_image_ids, read_label_image, read_labels, read_rgby, read_sample_submission
from hpa_tf.labels import NEGATIVE
from hpa_tf.synthetic import class_weights, generate_field, write_dataset


def _green_signal(f):
    g = f.image[..., 1].astype(np.float64)
    background = np.median(g[f.cells == 0])
    return np.clip(g - background - 3, 0, None)  # 3 ≈ one noise sigma above the background


def _edge_band(cells, width=7):
    edge = np.zeros(cells.shape, np.uint8)
    edge[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    edge[1:] |= cells[1:] != cells[:-1]
    return cv2.dilate(edge, np.ones((width, width), np.uint8)) > 0


@pytest.fixture(scope="module")
def fields():
    return {c: [generate_field(9000 + s, 512, labels=[c], cell_dropout=0.0) for s in range(2)] for c in (0, 13, 16, 18)}


def test_same_seed_same_field_and_shapes():
    a, b = generate_field(3, 256), generate_field(3, 256)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.cells, b.cells)
    assert a.image.shape == (256, 256, 4) and a.image.dtype == np.uint8
    assert a.cells.dtype == np.int32 and a.nuclei.dtype == np.int32
    assert not np.array_equal(a.image, generate_field(4, 256).image)


def test_cells_touch_have_one_nucleus_each_and_ids_are_consecutive():
    f = generate_field(11, 1024)
    ids = np.unique(f.cells[f.cells > 0])
    assert len(ids) >= 10
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    np.testing.assert_array_equal(np.unique(f.nuclei[f.nuclei > 0]), ids)
    # nucleus pixels lie inside their own cell
    assert (f.cells[f.nuclei > 0] == f.nuclei[f.nuclei > 0]).all()
    # some cells touch another cell (not only background around every cell)
    touching = (f.cells[:, 1:] != f.cells[:, :-1]) & (f.cells[:, 1:] > 0) & (f.cells[:, :-1] > 0)
    assert touching.sum() > 50
    # varied sizes
    areas = np.bincount(f.cells.ravel())[1:]
    assert areas.max() > 2 * np.median(areas) or areas.min() < 0.5 * np.median(areas)


def test_nucleoplasm_lies_in_the_nucleus(fields):
    for f in fields[0]:
        g = _green_signal(f)
        assert g[f.nuclei > 0].sum() / g.sum() >= 0.9


def test_plasma_membrane_lies_on_the_cell_outline(fields):
    for f in fields[13]:
        g = _green_signal(f)
        assert g[_edge_band(f.cells)].sum() / g.sum() >= 0.9


def test_cytosol_lies_outside_the_nucleus(fields):
    for f in fields[16]:
        g = _green_signal(f)
        assert g[(f.cells > 0) & (f.nuclei == 0)].sum() / g.sum() >= 0.95


def test_negative_has_no_specific_signal(fields):
    neg = np.mean([_green_signal(f)[f.cells > 0].mean() for f in fields[18]])
    cyt = np.mean([_green_signal(f)[f.cells > 0].mean() for f in fields[16]])
    assert neg < 0.05 * cyt


def test_weak_labels_image_is_union_of_cells_and_some_cells_differ():
    f = generate_field(21, 512, labels=[0, 14, 16], cell_dropout=0.3)
    union = sorted({c for lab in f.cell_labels.values() for c in lab} - {NEGATIVE})
    assert f.image_labels == union == [0, 14, 16]
    assert any(lab != [0, 14, 16] for lab in f.cell_labels.values())
    assert all(lab for lab in f.cell_labels.values())
    neg = generate_field(22, 256, labels=[NEGATIVE])
    assert neg.image_labels == [NEGATIVE] and all(v == [NEGATIVE] for v in neg.cell_labels.values())


def test_mitotic_spindle_only_on_dividing_cells():
    f = generate_field(5, 512, labels=[11, 0])
    spindle = [i for i, lab in f.cell_labels.items() if 11 in lab]
    assert 1 <= len(spindle) <= 2 and set(spindle) == f.dividing


def test_default_frequencies_are_imbalanced_like_the_competition():
    w = class_weights("default")
    assert w[0] > w[16] > w[11] and w[0] > 5 * w[15] and w[NEGATIVE] == w.min()
    with pytest.raises(ValueError):
        class_weights("bogus")


def test_16bit_output_uses_the_full_range():
    f = generate_field(8, 256, bit16=True)
    assert f.image.dtype == np.uint16 and f.image.max() > 20000


def test_write_dataset_kaggle_layout(tmp_path):
    summary = write_dataset(tmp_path, n_train=3, n_test=2, size=[256, 320], seed=1, bit16_test=True)
    assert summary["train"] == 3 and summary["test"] == 2
    labels = read_labels(tmp_path / "train.csv")
    assert len(labels) == 3 and sorted(labels) == list_image_ids(tmp_path / "train")
    sample = read_sample_submission(tmp_path / "sample_submission.csv")
    assert [r.image_id for r in sample] == list_image_ids(tmp_path / "test")
    for r in sample:
        native = read_rgby(tmp_path / "test", r.image_id, native=True)
        assert native.dtype == np.uint16 and native.shape[:2] == (r.height, r.width)
    with open(tmp_path / "truth.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["ID"] for r in rows} == {r.image_id for r in sample}
    for image_id in {r["ID"] for r in rows}:
        cells = read_label_image(tmp_path / "masks" / f"{image_id}_cells.png")
        assert sorted(int(r["CellId"]) for r in rows if r["ID"] == image_id) == list(range(1, cells.max() + 1))
    # deterministic: same seed, same files
    again = tmp_path / "again"
    write_dataset(again, n_train=3, n_test=2, size=[256, 320], seed=1, bit16_test=True)
    assert (again / "train.csv").read_text() == (tmp_path / "train.csv").read_text()
    first = sorted(labels)[0]
    np.testing.assert_array_equal(read_rgby(again / "train", first), read_rgby(tmp_path / "train", first))


def test_covering_labels_put_every_class_in_some_field():
    from hpa_tf.synthetic import covering_labels

    for n in (2, 8, 19, 48):
        labels = covering_labels(n)
        assert len(labels) == n
        fixed = [set(x) for x in labels if x is not None]
        assert set().union(*fixed) == set(range(19))
        assert [18] in [sorted(x) for x in fixed] and all(18 not in x or x == {18} for x in fixed)
    assert covering_labels(48)[19:] == [None] * 29


def test_a_mitotic_spindle_field_keeps_its_dividing_cells():
    # their condensed nuclei used to fall under the visibility cut, leaving the field Negative
    from hpa_tf.synthetic import generate_field

    for s in range(12):
        f = generate_field([0, 1, s], size=512, labels=[11])  # seeds 5 and 11 lost them
        assert f.dividing and f.image_labels == [11], s
        assert {c for c, labels in f.cell_labels.items() if 11 in labels} == f.dividing


@pytest.mark.parametrize("args, message", [
    (["--size", "10"], "argument --size: must be an integer of at least 32, got '10'"),
    (["--size", "abc"], "argument --size: must be an integer of at least 32, got 'abc'"),
    (["--size", "512,16"], "argument --size: must be an integer of at least 32, got '16'"),
    (["--train", "-1"], "argument --train: must be an integer of at least 0, got '-1'"),
    (["--workers", "0"], "argument --workers: must be an integer of at least 1, got '0'"),
    (["--cell-dropout", "1.5"], "argument --cell-dropout: must be a number in [0, 1], got '1.5'"),
    (["--train", "0", "--test", "0"], "--train and --test are both 0: nothing to write"),
])
def test_bad_arguments_are_one_argparse_line_and_leave_no_folder(tmp_path, capsys, args, message):
    from hpa_tf.__main__ import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["synthetic", "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m hpa_tf synthetic: error: {message}" in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_write_dataset_refuses_bad_sizes_before_making_folders(tmp_path):
    for kw in ({"size": 10}, {"n_train": -1}, {"cell_dropout": 2.0}, {"weights": "nope"}):
        with pytest.raises(ValueError):
            write_dataset(tmp_path / "out", **{"n_test": 0, **kw})
        assert not (tmp_path / "out").exists()
