"""The image-level half: whole-field records (crop spec kind ``field``), the field model trained by
``hpa_tf.train`` under a two-replica MirroredStrategy, and its class activation maps (``hpa_tf.cam``)."""

import json

import cv2
import keras
import numpy as np
import pytest
from conftest import FIELD_SIZE, SHARD_FIELD_LABELS

from hpa_tf import distribute, shardset, train
from hpa_tf.backbones import build_classifier
from hpa_tf.cam import cam_model, cell_area_weights, cell_cam_scores, sigmoid
from hpa_tf.config import TrainConfig
from hpa_tf.crops import CropSpec, CropSpecError, field_image
from hpa_tf.io import read_rgby
from hpa_tf.labels import parse_labels
from hpa_tf.model import load_model
from hpa_tf.records import FIELD_CELL_ID, parse_example
from tfrecord_builder import verify
from tfrecord_builder.__main__ import main as builder_main


def test_field_spec_round_trips_has_no_margin_and_crops_no_cells():
    spec = CropSpec(kind="field", size=32)
    assert spec.margin == 0.0 and spec.is_field and CropSpec.from_dict(spec.to_dict()) == spec
    assert CropSpec.from_dict({"kind": "field", "size": 32, "margin": 0.3, "mask_neighbors": False}) == spec
    with pytest.raises(CropSpecError, match="mask_neighbors"):
        CropSpec(kind="field", size=32, mask_neighbors=True)
    with pytest.raises(CropSpecError, match="kind"):
        CropSpec(kind="tile", size=32)
    image = np.random.default_rng(0).integers(0, 255, (96, 80, 4), dtype=np.uint8)
    with pytest.raises(CropSpecError, match="crops no cells"):
        spec.crop(image, np.ones((96, 80), np.int32))
    with pytest.raises(CropSpecError, match="needs kind 'field'"):
        CropSpec(size=32).field(image)
    out = spec.field(image)
    assert out.shape == (32, 32, 4) and out.dtype == np.uint8
    assert np.array_equal(out, cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))
    assert np.array_equal(field_image(image[..., :1], 128)[..., 0], cv2.resize(image[..., 0], (128, 128)))


def test_field_records_one_per_field_with_image_labels_and_the_cell_sets_folds(shard_set, field_shard_set):
    from pathlib import Path

    assert verify(field_shard_set).ok
    config = shardset.read_build_config(field_shard_set)
    assert shardset.read_crop_spec(field_shard_set) == CropSpec(kind="field", size=FIELD_SIZE)
    assert config["segmenter"] == "none" and config["masks_dir"] is None
    manifest = shardset.read_manifest(Path(field_shard_set) / shardset.MANIFEST)
    assert len(manifest) == len(SHARD_FIELD_LABELS) and set(manifest.cell_id.tolist()) == {FIELD_CELL_ID}
    # the same folds as the cell records of the same fields
    cells = shardset.read_manifest(Path(shard_set) / shardset.MANIFEST)
    cell_folds = dict(zip(cells.image_id.tolist(), cells.fold.tolist()))
    assert all(cell_folds[i] == f for i, f in zip(manifest.image_id.tolist(), manifest.fold.tolist()))
    # a record is the whole field resized, with the field's labels
    data = Path(shard_set).parent / "data"
    labels = dict(line.split(",") for line in (data / "train.csv").read_text().split()[1:])
    import tensorflow as tf

    shard = shardset.list_shards(field_shard_set)[0]
    ex = parse_example(next(iter(tf.data.TFRecordDataset(shard))), crop_size=FIELD_SIZE)
    image_id = ex["image_id"].numpy().decode()
    assert np.array_equal(ex["image"].numpy(), field_image(read_rgby(data / "train", image_id), FIELD_SIZE))
    assert ex["label_ids"].numpy().tolist() == sorted(parse_labels(labels[image_id]))
    assert ex["bbox"].numpy().tolist() == [0, 0, 384, 384] and int(ex["mask"].numpy().min()) == 255


def test_builder_command_line_makes_field_records(shard_set, tmp_path, capsys):
    from pathlib import Path

    data = Path(shard_set).parent / "data"
    rc = builder_main(["--data-dir", str(data / "train"), "--labels", str(data / "train.csv"), "--out",
                       str(tmp_path / "f"), "--kind", "field", "--size", "24", "--folds", "4", "--seed", "1",
                       "--limit", "6", "--no-progress", "-q"])
    assert rc == 0 and "6 fields, 6 cells" in capsys.readouterr().out
    assert shardset.read_crop_spec(str(tmp_path / "f")) == CropSpec(kind="field", size=24)
    rc = builder_main(["--data-dir", str(data / "train"), "--labels", str(data / "train.csv"), "--out",
                       str(tmp_path / "g"), "--kind", "field", "--mask-neighbors", "--no-progress", "-q"])
    assert rc == 2 and "mask_neighbors" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_field_model_trains_under_two_replicas_and_records_its_kind(field_shard_set, shard_set, tmp_path):
    strategy = distribute.get_strategy("cpu", devices=["/cpu:0", "/cpu:1"])
    config = TrainConfig(data=field_shard_set, out=str(tmp_path / "run"), task="field", backbone="tiny_cnn",
                         image_size=32, batch_size=2, epochs=1, lr=3e-3, warmup_epochs=0.5, strategy="cpu",
                         tensorboard=False, verbose=0, val_fold=0)
    result = train.train(config, strategy=strategy)
    assert result.replicas == 2 and result.global_batch == 4 and result.epochs_completed == 1
    assert result.n_train + result.n_val == len(SHARD_FIELD_LABELS)
    assert all(np.isfinite(result.history["loss"]))
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert CropSpec.from_dict(info["crop"]) == CropSpec(kind="field", size=FIELD_SIZE)
    assert info["training"]["task"] == "field"
    model, _ = load_model(result.last_path)
    probs, maps = cam_model(model)(np.zeros((1, 32, 32, 4), np.float32))
    assert probs.shape == (1, 19) and maps.shape == (1, 4, 4, 19)
    # the task must match the records
    with pytest.raises(shardset.DataError, match="holds field records"):
        train.train(TrainConfig(data=field_shard_set, out=str(tmp_path / "x"), task="cell", backbone="tiny_cnn",
                                image_size=32, strategy="cpu", tensorboard=False, verbose=0))


def test_cell_scores_are_the_area_resized_mask_means_and_the_whole_field_gives_the_image_probability():
    rng = np.random.default_rng(0)
    cells = np.zeros((64, 48), np.int32)
    cells[2:30, 3:20], cells[30:60, 10:45], cells[5:12, 25:47] = 4, 9, 2
    ids, weights = cell_area_weights(cells, (16, 12))
    assert ids.tolist() == [2, 4, 9]
    for k, cid in enumerate(ids):  # integer ratios: exactly cv2's area resize of the one-hot mask
        area = cv2.resize((cells == cid).astype(np.float32), (12, 16), interpolation=cv2.INTER_AREA)
        assert np.allclose(weights[k].reshape(16, 12) / 16.0, area)
    maps = rng.normal(size=(16, 12, 19))
    got_ids, scores = cell_cam_scores(maps, cells, cell_ids=[9, 2])
    assert got_ids.tolist() == [9, 2]
    want = sigmoid((weights[2] @ maps.reshape(-1, 19)) / weights[2].sum())
    assert np.allclose(scores[0], want)
    # the CAM of the model: its maps' mean is the image logit; one cell over the whole field scores it
    model = build_classifier("tiny_cnn", 32, 4, dropout=0.0)
    x = rng.uniform(0, 255, (2, 32, 32, 4)).astype(np.float32)
    probs, cmaps = (np.asarray(t) for t in cam_model(model)(x))
    assert np.allclose(probs, np.asarray(model(x)), atol=1e-6)
    assert np.allclose(sigmoid(cmaps.mean(axis=(1, 2))), probs, atol=1e-5)
    whole = cell_cam_scores(cmaps[0], np.ones((100, 100), np.int32))[1][0]
    assert np.allclose(whole, probs[0], atol=1e-5)


GRID, CELL = 3, 24


def _cam_fields(rng, n):
    """Fields of 3 × 3 square cells: every cell has a nucleus (blue); class 0 fills the green of 1-3
    of a positive field's cells, class 2 puts a dot lattice in them; the others are blank in green.
    Image labels only, as in the competition; ``shows[f, k, j]``: cell k shows class j (0 or 2)."""
    size = GRID * CELL
    cells = np.zeros((size, size), np.int32)
    for k in range(GRID * GRID):
        i, j = divmod(k, GRID)
        cells[i * CELL + 2:(i + 1) * CELL - 2, j * CELL + 2:(j + 1) * CELL - 2] = k + 1
    inner = CELL - 4
    yy, xx = np.mgrid[:inner, :inner]
    nucleus = 120.0 * (((yy - inner / 2) ** 2 + (xx - inner / 2) ** 2) < 25)
    dots = np.zeros((inner, inner))
    dots[::4, ::4] = 255
    images = np.zeros((n, size, size, 4), np.uint8)
    labels = np.zeros((n, 19), np.float32)
    shows = np.zeros((n, GRID * GRID, 2), bool)
    for f in range(n):
        img = rng.normal(10, 4, (size, size, 4))
        for k in range(GRID * GRID):
            sl = cells == k + 1
            img[sl, 2] += nucleus.ravel()
            img[sl, 0] += 40
        for j, pattern in enumerate((np.full((inner, inner), 100.0), dots)):
            if rng.random() < 0.5:
                for k in rng.choice(GRID * GRID, size=int(rng.integers(1, 4)), replace=False):
                    img[cells == k + 1, 1] += pattern.ravel()
                    shows[f, k, j] = True
                labels[f, 2 * j] = 1
        images[f] = np.clip(img, 0, 255)
    return images, labels, shows, cells


def test_cam_scores_a_cell_showing_the_class_above_a_blank_cell_of_the_same_field():
    keras.utils.set_random_seed(0)
    images, labels, _, _ = _cam_fields(np.random.default_rng(0), 240)
    model = build_classifier("tiny_cnn", GRID * CELL, 4, dropout=0.0)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    model.fit(images, labels, batch_size=32, epochs=6, verbose=0)  # image labels only

    images, labels, shows, cells = _cam_fields(np.random.default_rng(1), 40)
    _, maps = cam_model(model).predict(images, verbose=0)
    for j, cls in enumerate((0, 2)):
        wins, pairs = 0, 0
        for f in np.flatnonzero(labels[:, cls]):
            _, scores = cell_cam_scores(maps[f], cells)
            shown, blank = scores[shows[f, :, j], cls], scores[~shows[f, :, j], cls]
            wins += int((shown[:, None] > blank[None, :]).sum())
            pairs += shown.size * blank.size
        assert pairs > 50 and wins / pairs > 0.9, (cls, wins, pairs)
