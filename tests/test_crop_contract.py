"""The crop spec travels as one object from the builder through training to the predictor: a shard set
built by ``python -m tfrecord_builder`` with a non-default margin AND neighbour masking, a model
trained on it by the training command line, and the prediction command line: the predictor's crops
of the same cells (same saved masks) equal the builder's records byte for byte."""

import csv
import json

import numpy as np
import tensorflow as tf

from hpa_tf import predict as hp
from hpa_tf.cli import predict as predict_cli
from hpa_tf.cli import train as train_cli
from hpa_tf.crops import CropSpec
from hpa_tf.io import read_label_image, read_rgby, read_sample_submission
from hpa_tf.records import parse_example
from hpa_tf.shardset import list_shards, read_crop_spec
from hpa_tf.submission import validate_submission
from hpa_tf.synthetic import write_dataset
from tfrecord_builder.__main__ import main as builder_cli

SPEC = CropSpec(size=40, margin=0.0, mask_neighbors=True)  # margin 0.0: a falsy value that must survive


def test_builder_spec_reaches_the_predictor_byte_for_byte(tmp_path, capsys):
    data, shards, run = tmp_path / "data", tmp_path / "shards", tmp_path / "run"
    write_dataset(data, n_train=8, n_test=0, size=256, seed=2)
    train_dir, masks = str(data / "train"), str(data / "masks")

    # 1. the builder's command line
    assert builder_cli(["--data-dir", train_dir, "--labels", str(data / "train.csv"), "--out", str(shards),
                        "--crop-size", str(SPEC.size), "--margin", str(SPEC.margin), "--mask-neighbors",
                        "--masks-dir", masks, "--folds", "2", "--images-per-shard", "4", "--no-progress", "-q"]) == 0
    assert read_crop_spec(str(shards)) == SPEC

    # 2. the training command line: model.json copies the shard set's spec
    assert train_cli.main(["--data", str(shards), "--out", str(run), "--val-fold", "0", "--backbone", "tiny_cnn",
                           "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "2",
                           "--strategy", "cpu", "--no-tensorboard", "--verbose", "0"]) == 0
    model_json = json.loads((run / "model.json").read_text())
    assert CropSpec.from_dict(model_json["crop"]) == SPEC
    model = str(run / "best.keras")

    # 3. the prediction command line, on training fields with the builder's masks
    with open(shards / "manifest.csv", newline="") as f:
        ids = sorted({r["image_id"] for r in csv.DictReader(f)})[:2]
    argv = ["--test-dir", train_dir, "--model", model, "--masks-dir", masks, "--ids", *ids, "--no-progress"]
    submission = tmp_path / "submission.csv"
    assert predict_cli.main([*argv, "--out", str(submission)]) == 0
    assert validate_submission(submission, expected_ids=ids) == []
    assert [r.image_id for r in read_sample_submission(submission)] == ids

    # the crops the predictor gives the model, for the same command line (a fresh cache)
    seen: dict[tuple[str, int], tuple[CropSpec, np.ndarray, np.ndarray]] = {}

    def on_crops(image_id, spec, batch):
        for k, cell_id in enumerate(batch.cell_ids):
            seen[(image_id, int(cell_id))] = (spec, batch.crops[k], batch.masks[k])

    hp.run(predict_cli.parse_config([*argv, "--out", str(tmp_path / "again.csv")]), on_crops=on_crops)
    assert {spec for spec, _, _ in seen.values()} == {SPEC}

    records = {}
    for serialized in tf.data.TFRecordDataset(list_shards(str(shards))):
        ex = parse_example(serialized, crop_size=SPEC.size)
        key = (ex["image_id"].numpy().decode(), int(ex["cell_id"]))
        if key[0] in ids:
            records[key] = (ex["image"].numpy(), ex["mask"].numpy()[..., 0])
    assert records and set(records) == set(seen)
    for key, (image, mask) in records.items():
        _, crop, crop_mask = seen[key]
        assert crop.dtype == image.dtype and crop.shape == image.shape == (SPEC.size, SPEC.size, 4)
        assert crop.tobytes() == image.tobytes(), key
        assert crop_mask.tobytes() == mask.tobytes(), key
    # the check has teeth: the default margin, or no masking, would have given other crops
    image = read_rgby(train_dir, ids[0])
    cells = read_label_image(data / "masks" / f"{ids[0]}_cells.png")
    built = np.stack([records[(ids[0], int(c))][0] for c in SPEC.crop(image, cells).cell_ids])
    for other in (CropSpec(size=SPEC.size, mask_neighbors=True), CropSpec(size=SPEC.size, margin=0.0)):
        assert not np.array_equal(other.crop(image, cells).crops, built), other
    capsys.readouterr()
