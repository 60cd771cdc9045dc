"""predict.py / hpa_tf.predict: every field gets a row, masks are exact, runs offline and resumes."""

import csv
import os
import socket

import numpy as np
import pytest

from hpa_tf import predict as hp
from hpa_tf.backbones import build_classifier
from hpa_tf.cli import predict as predict_cli
from hpa_tf.crops import CropSpec
from hpa_tf.io import read_label_image, read_rgby
from hpa_tf.labels import NUM_CLASSES
from hpa_tf.model import save_model
from hpa_tf.segmentation import get_segmenter
from hpa_tf.submission import decode_mask, read_submission, validate_submission
from hpa_tf.synthetic import write_dataset

CROP, SIZE = 64, 48


def _save_tiny(path, seed, crop=CropSpec(size=CROP), channels="rgby", size=SIZE):
    import keras

    keras.utils.set_random_seed(seed)
    model = build_classifier("tiny_cnn", image_size=size, channels=len(channels))
    save_model(model, str(path), crop=crop, channels=channels)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_data")
    write_dataset(root, n_train=0, n_test=3, size=[256, 288], seed=5, bit16_test=True)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return [_save_tiny(folder / "a.keras", 1), _save_tiny(folder / "b.keras", 2, channels="gby")]


def _config(dataset, models, out, **kw):
    return hp.PredictConfig(test_dir=str(dataset / "test"), models=models, out=str(out),
                            sample_submission=str(dataset / "sample_submission.csv"), progress=False, **kw)


def test_submission_masks_equal_the_segmenters_masks(dataset, models, tmp_path, monkeypatch):
    # offline: any attempt to open a network connection fails the run
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "submission.csv"
    summary = hp.run(_config(dataset, models, out))
    assert summary["failed"] == [] and summary["fields"] == 3
    ids = [r["ID"] for r in csv.DictReader(open(dataset / "sample_submission.csv"))]
    assert validate_submission(out, expected_ids=ids) == []
    seg = get_segmenter("builtin")
    for row in read_submission(out):
        image = read_rgby(dataset / "test", row.image_id)  # 16-bit files
        cells, _ = seg.segment(image)
        assert (row.height, row.width) == cells.shape
        by_mask: dict[str, list] = {}
        for p in row.predictions:
            by_mask.setdefault(p.mask, []).append(p)
        assert len(by_mask) == cells.max() > 0
        for preds in by_mask.values():
            assert sorted(p.label for p in preds) == list(range(NUM_CLASSES))  # all 19 classes per cell
            assert all(0.0 <= p.confidence <= 1.0 for p in preds)
        decoded = {tuple(np.flatnonzero(decode_mask(m, row.height, row.width))) for m in by_mask}
        expected = {tuple(np.flatnonzero(cells == i)) for i in range(1, cells.max() + 1)}
        assert decoded == expected


def test_two_models_are_averaged_and_fused(dataset, models):
    image = read_rgby(dataset / "test", read_submission_ids(dataset)[0])
    cells = read_label_image(dataset / "masks" / f"{read_submission_ids(dataset)[0]}_cells.png")
    clfs = [hp.Classifier(m, 8) for m in hp.load_models(models)]
    ids, both = hp.predict_field(image, cells, clfs, image_weight=0.0)
    _, a = hp.predict_field(image, cells, clfs[:1], image_weight=0.0)
    _, b = hp.predict_field(image, cells, clfs[1:], image_weight=0.0)
    np.testing.assert_allclose(both, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert list(ids) == list(range(1, cells.max() + 1))
    fused = hp.fuse_scores(both, 0.5)
    np.testing.assert_allclose(fused, 0.5 * both + 0.5 * both.max(0, keepdims=True))
    _, tta = hp.predict_field(image, cells, clfs[:1], tta=True, image_weight=0.0)
    assert tta.shape == a.shape and not np.allclose(tta, a)  # the flipped views do count


def read_submission_ids(dataset):
    return [r["ID"] for r in csv.DictReader(open(dataset / "sample_submission.csv"))]


def test_killed_run_resumes_and_does_only_the_rest(dataset, models, tmp_path, monkeypatch):
    out = tmp_path / "sub.csv"
    calls = []
    real = hp._one_field

    def dies_on_second(config, image_id, *args):
        calls.append(image_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while the second field is in flight
        return real(config, image_id, *args)

    monkeypatch.setattr(hp, "_one_field", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        hp.run(_config(dataset, models[:1], out))
    assert not out.exists()  # nothing half-written under the final name
    calls.clear()
    monkeypatch.setattr(hp, "_one_field", lambda config, image_id, *a: (calls.append(image_id), real(config, image_id, *a))[1])
    summary = hp.run(_config(dataset, models[:1], out))
    ids = read_submission_ids(dataset)
    assert calls == ids[1:] and summary["cached"] == 1
    clean = tmp_path / "clean.csv"
    hp.run(_config(dataset, models[:1], clean, cache_dir=str(tmp_path / "other-cache")))
    assert out.read_text() == clean.read_text()


def test_unreadable_and_empty_fields_get_empty_rows_and_a_failing_status(dataset, models, tmp_path, capsys):
    import shutil

    import cv2

    test = tmp_path / "test"
    shutil.copytree(dataset / "test", test)
    ids = sorted({p.name.rsplit("_", 1)[0] for p in test.iterdir()})
    (test / f"{ids[0]}_green.png").unlink()  # missing channel
    for ch in ("red", "green", "blue", "yellow"):  # all dark: no cells
        cv2.imwrite(str(test / f"dark_{ch}.png"), np.zeros((128, 128), np.uint8))
    out = tmp_path / "s.csv"
    code = predict_cli.main(["--test-dir", str(test), "--model", models[0], "--out", str(out), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert ids[0] in err and "green" in err
    rows = {r.image_id: r for r in read_submission(out)}
    assert set(rows) == set(ids) | {"dark"}
    assert rows[ids[0]].predictions == [] and rows["dark"].predictions == []
    assert rows[ids[1]].predictions


def test_masks_dir_is_reused_and_bad_arguments_are_clear(dataset, models, tmp_path, capsys):
    out = tmp_path / "m.csv"
    hp.run(_config(dataset, models[:1], out, masks_dir=str(dataset / "masks")))
    for row in read_submission(out):
        truth = read_label_image(dataset / "masks" / f"{row.image_id}_cells.png")
        assert len({p.mask for p in row.predictions}) == truth.max()
    assert predict_cli.main(["--test-dir", str(dataset / "test"), "--model", str(tmp_path / "none.keras"),
                             "--out", str(out)]) == 2
    assert "none.keras" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_cli.parse_config(["--help"])
    with pytest.raises(ValueError):
        hp.fuse_scores(np.zeros((2, NUM_CLASSES)), 1.5)


def test_the_predictor_feeds_a_model_what_validation_feeds_it(shard_set, tmp_path):
    """The same stored crops through the predictor's Classifier and through the training pipeline's
    evaluation dataset give the same scores: same channel selection, resize and pixel scale,
    whether the model shrinks, keeps or enlarges the crops."""
    import tensorflow as tf

    from hpa_tf import data, shardset
    from hpa_tf.records import parse_example

    split = shardset.split_folds(shard_set, val_fold=0)
    shard = split.val_shards[:1]
    crops = np.stack([parse_example(r)["image"].numpy() for r in tf.data.TFRecordDataset(shard)])
    for k, (channels, size) in enumerate((("gby", 48), ("rgby", split.crop.size), ("yr", 96))):
        path = _save_tiny(tmp_path / f"m{k}.keras", k, crop=split.crop, channels=channels, size=size)
        loaded = hp.load_models([path])[0]
        predicted = hp.Classifier(loaded, 16)(crops, tta=False)
        inputs = data.InputConfig(crop_size=split.crop.size, image_size=size, batch_size=16, channels=channels)
        ds = data.make_dataset(shard, inputs, training=False, pad_last=False, n_examples=len(crops))
        ds = ds.map(lambda x, y: x)
        validated = loaded.model.predict(ds, verbose=0)
        assert predicted.shape == validated.shape == (len(crops), NUM_CLASSES)
        assert np.std(validated) > 1e-4  # the scores do depend on the input
        np.testing.assert_allclose(predicted, validated, atol=2e-5)


def test_a_model_without_its_crop_spec_is_refused(models, tmp_path):
    import json
    import shutil

    for name, edit in (("no_json", None), ("no_crop", lambda c: c.pop("crop")),
                       ("partial", lambda c: c["crop"].pop("mask_neighbors"))):
        path = tmp_path / f"{name}.keras"
        shutil.copy(models[0], path)
        if edit is not None:
            config = json.loads(open(models[0].replace(".keras", ".json")).read())
            edit(config)
            (tmp_path / f"{name}.json").write_text(json.dumps(config))
        with pytest.raises(hp.PredictError, match=f"{name}.keras"):
            hp.load_models([str(path)])


def test_a_margin_of_zero_is_used_as_zero(dataset, tmp_path):
    """model.json's margin 0.0 is a real margin (a falsy value must not fall back to the default)."""
    tight = CropSpec(size=CROP, margin=0.0, mask_neighbors=True)
    loaded = hp.load_models([_save_tiny(tmp_path / "tight.keras", 3, crop=tight)])[0]
    assert loaded.spec.crop == tight
    image_id = read_submission_ids(dataset)[0]
    image = read_rgby(dataset / "test", image_id)
    cells = read_label_image(dataset / "masks" / f"{image_id}_cells.png")
    seen = []
    hp.predict_field(image, cells, [hp.Classifier(loaded, 8)], on_crops=lambda spec, batch: seen.append((spec, batch)))
    assert {spec for spec, _ in seen} == {tight}
    got = np.concatenate([b.crops for _, b in seen])
    np.testing.assert_array_equal(got, tight.crop(image, cells).crops)
    assert not np.array_equal(got, CropSpec(size=CROP, mask_neighbors=True).crop(image, cells).crops)


def test_fusion_rules_weigh_the_components_present():
    rng = np.random.default_rng(0)
    cell, image, cam = (rng.uniform(size=(5, NUM_CLASSES)) for _ in range(3))
    both = {"cell": cell, "image": image, "cam": cam}
    np.testing.assert_allclose(hp.fuse_components(both, "mean", (1, 2, 1)), (cell + 2 * image + cam) / 4)
    np.testing.assert_allclose(hp.fuse_components(both, "product", (3, 1, 1)), image * (3 * cell + cam) / 4)
    np.testing.assert_allclose(hp.fuse_components(both, "product", (1, 0, 0)), cell)  # image^0: the cell alone
    field_only = {"image": image, "cam": cam}
    np.testing.assert_allclose(hp.fuse_components(field_only), image * cam)  # default with no cell model
    np.testing.assert_allclose(hp.fuse_components({"cell": cell}, None, (2, 5, 5)), cell)
    np.testing.assert_allclose(hp.fuse_components(both), (cell + image + cam) / 3)
    for comps, fusion, weights, message in ((both, "sum", (1, 1, 1), "unknown fusion"),
                                            ({"cell": cell}, "product", (1, 1, 1), "needs a field model"),
                                            (field_only, "product", (1, 1, 0), "no weight"),
                                            ({"x": cell}, "mean", (1, 1, 1), "components must be")):
        with pytest.raises(ValueError, match=message):
            hp.fuse_components(comps, fusion, weights)


@pytest.fixture(scope="module")
def field_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("field") / "field.keras", 3, crop=CropSpec(kind="field", size=64))


def test_field_model_alone_and_fused_with_a_cell_model_scores_every_cell(dataset, models, field_model, tmp_path,
                                                                           capsys):
    masks = str(dataset / "masks")
    # the field model alone: image probability × CAM score, per cell
    alone = tmp_path / "alone.csv"
    summary = hp.run(_config(dataset, None, alone, field_models=[field_model], masks_dir=masks,
                             component_scores=True))
    assert summary["components"] == str(tmp_path / "alone.components.json") and not summary["failed"]
    comps = hp.read_components(summary["components"])
    rows = read_submission(alone)
    assert validate_submission(alone) == []
    for row in rows:
        entry = comps[row.image_id]
        truth = read_label_image(dataset / "masks" / f"{row.image_id}_cells.png")
        assert entry["cell_ids"].tolist() == sorted(np.unique(truth[truth > 0]).tolist())
        assert set(entry) == {"cell_ids", "image", "cam"} and np.ptp(entry["cam"]) > 0
        assert np.allclose(entry["image"], entry["image"][0])  # one image probability per field
        conf = np.array([p.confidence for p in row.predictions]).reshape(-1, NUM_CLASSES)
        np.testing.assert_allclose(conf, entry["image"] * entry["cam"], atol=1e-5)
    # both models, weighted mean; each component can be rescored on the same cells
    both = tmp_path / "both.csv"
    summary = hp.run(_config(dataset, models[:1], both, field_models=[field_model], masks_dir=masks,
                             fusion="mean", fusion_weights="2,1,1", component_scores=True))
    comps = hp.read_components(summary["components"])
    rows = read_submission(both)
    for row in rows:
        entry = comps[row.image_id]
        conf = np.array([p.confidence for p in row.predictions]).reshape(-1, NUM_CLASSES)
        np.testing.assert_allclose(conf, (2 * entry["cell"] + entry["image"] + entry["cam"]) / 4, atol=1e-5)
    cam_rows = hp.component_rows(rows, comps, lambda e: e["cam"])
    for row, cam_row in zip(rows, cam_rows):
        assert [p.mask for p in row.predictions] == [p.mask for p in cam_row.predictions]
        np.testing.assert_allclose([p.confidence for p in cam_row.predictions], comps[row.image_id]["cam"].ravel())
    # the cell model's scores are the same with or without the field model beside it
    cell_only = hp.run(_config(dataset, models[:1], tmp_path / "cell.csv", masks_dir=masks, image_weight=0.0,
                               component_scores=True))
    cell_comps = hp.read_components(cell_only["components"])
    for image_id, entry in cell_comps.items():
        np.testing.assert_allclose(entry["cell"], comps[image_id]["cell"], atol=1e-5)
    # each model by its own flag; no model, bad weights: clear errors
    with pytest.raises(hp.PredictError, match="--field-model"):
        hp.run(_config(dataset, [field_model], tmp_path / "x.csv", masks_dir=masks))
    with pytest.raises(hp.PredictError, match="--model"):
        hp.run(_config(dataset, None, tmp_path / "x.csv", field_models=models[:1], masks_dir=masks))
    assert predict_cli.main(["--test-dir", str(dataset / "test"), "--out", str(tmp_path / "y.csv")]) == 2
    assert "no model given" in capsys.readouterr().err
    assert predict_cli.main(["--test-dir", str(dataset / "test"), "--model", models[0], "--fusion", "product",
                             "--out", str(tmp_path / "y.csv")]) == 2
    assert "needs a field model" in capsys.readouterr().err
    assert not (tmp_path / "y.csv").exists()


def _predict_argv(dataset, model, out):
    return ["--test-dir", str(dataset / "test"), "--model", str(model), "--out", str(out), "--no-progress",
            "--sample-submission", str(dataset / "sample_submission.csv")]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error:" in line or "Traceback" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_a_missing_model_is_one_line_and_leaves_no_cache_folder(dataset, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert predict_cli.main(_predict_argv(dataset, tmp_path / "nope.keras", out), prog="python -m hpa_tf predict") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"python -m hpa_tf predict: error: model file not found: {tmp_path / 'nope.keras'}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["garbage", "zip", "empty"])
def test_a_file_that_is_not_a_model_is_one_line_naming_it(dataset, models, tmp_path, capsys, kind):
    import shutil
    import zipfile

    bad = tmp_path / "bad.keras"
    if kind == "garbage":
        bad.write_bytes(b"this is not a model\n" * 10)
    elif kind == "zip":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("notes.txt", "no model here")
    else:
        bad.write_bytes(b"")
    shutil.copy(models[0].replace(".keras", ".json"), tmp_path / "bad.json")
    out = tmp_path / "sub.csv"
    assert predict_cli.main(_predict_argv(dataset, bad, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot load Keras model {bad}" in line, line
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "bad.keras"]  # no cache, no submission


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(image_size=64), "says input (64, 64, 4)"),
    (lambda c: c.update(channels=3, channel_letters="rgb"), "says input (48, 48, 3)"),
    (lambda c: c.update(num_classes=18), "says 18 classes"),
])
def test_a_model_json_that_disagrees_with_its_model_is_one_line_naming_both(dataset, models, tmp_path, capsys, edit,
                                                                            message):
    import json
    import shutil

    path = tmp_path / "m.keras"
    shutil.copy(models[0], path)
    config = json.loads(open(models[0].replace(".keras", ".json")).read())
    edit(config)
    (tmp_path / "m.json").write_text(json.dumps(config))
    assert predict_cli.main(_predict_argv(dataset, path, tmp_path / "sub.csv")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'm.json'} {message}" in line and str(path) in line, line
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.keras"]


def test_a_full_disk_while_writing_the_submission_leaves_no_half_file(dataset, models, tmp_path, capsys, monkeypatch):
    import csv as csv_module
    import errno

    real_writer = csv_module.writer

    def filling_writer(f, *args, **kw):
        writer = real_writer(f, *args, **kw)

        class Writer:
            rows = 0

            def writerow(self, row):
                if Writer.rows == 2:  # the header and one row fit, then the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                Writer.rows += 1
                return writer.writerow(row)

        return Writer()

    out = tmp_path / "sub.csv"
    monkeypatch.setattr(csv_module, "writer", filling_writer)
    assert predict_cli.main(_predict_argv(dataset, models[0], out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "disk full" in line, line
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    monkeypatch.undo()
    assert predict_cli.main(_predict_argv(dataset, models[0], out)) == 0  # room again: the rest from the cache
    assert len(read_submission(out)) == 3
