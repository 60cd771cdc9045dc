"""Sources: the label file's Source column reaches the records and the manifest, and training can keep
only some sources (--sources) or draw a source's records more or less often (--source-weights)."""

import csv
import os

import numpy as np
import pytest

from hpa_tf import data, shardset
from hpa_tf.cli.train import build_parser, parse_config
from hpa_tf.config import TrainConfig
from hpa_tf.crops import CropSpec
from hpa_tf.shardset import DataError
from hpa_tf.synthetic import write_dataset
from tfrecord_builder import BuildOptions, build

CROP = 32
#: competition-like fields carry class 0, downloaded ones class 2: a batch's labels tell the sources apart
LABELS = {"train": 0, "hpa-public": 2}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """A shard set of 8 synthetic 256 px fields, every other one from ``hpa-public`` (by the label
    file's Source column), the others without a Source value (the build's default ``train``)."""
    root = tmp_path_factory.mktemp("sources")
    write_dataset(root, n_train=8, n_test=0, size=256, seed=5, cell_dropout=0.0,
                  field_labels=[[LABELS["train"]], [LABELS["hpa-public"]]])
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Label", "Source"])
        for row in rows:
            w.writerow([row["ID"], row["Label"], "hpa-public" if row["Label"] == str(LABELS["hpa-public"]) else ""])
    out = root / "shards"
    result = build(BuildOptions(data_dir=str(root / "train"), labels=str(root / "train.csv"), out=str(out),
                                crop=CropSpec(size=CROP), masks_dir=str(root / "masks"), folds=2, seed=0,
                                images_per_shard=2))
    assert result.complete and result.fields == 8
    return str(out)


def test_the_manifest_and_the_records_carry_each_fields_source(mixed):
    table = shardset.read_manifest(os.path.join(mixed, "manifest.csv"))
    assert table.sources() == ["hpa-public", "train"]
    labels = np.argmax(table.labels, axis=1)
    assert np.all((table.source == "hpa-public") == (labels == LABELS["hpa-public"]))
    split = shardset.split_folds(mixed, val_fold=None)
    got = data.eval_labels(split.train_shards, sources=["hpa-public"])
    assert len(got) == int((table.source == "hpa-public").sum()) > 0
    assert np.all(got[:, LABELS["hpa-public"]] == 1)  # the filter read each record's own source


def test_sources_restrict_counts_and_the_records_read(mixed):
    table = shardset.read_manifest(os.path.join(mixed, "manifest.csv"))
    split = shardset.split_folds(mixed, val_fold=1, sources=["train"])
    assert split.n_train == int(((table.fold == 0) & (table.source == "train")).sum())
    assert split.n_val == int(((table.fold == 1) & (table.source == "train")).sum())
    assert split.class_counts[LABELS["hpa-public"]] == 0 and split.class_counts[LABELS["train"]] == split.n_train
    inputs = data.InputConfig(crop_size=CROP, image_size=8, batch_size=4, sources=split.sources, seed=0)
    val = data.make_dataset(split.val_shards, inputs, training=False, n_examples=split.n_val)
    labels = np.concatenate([y.numpy()[w.numpy() > 0] for _, y, w in val])
    assert len(labels) == split.n_val and np.all(labels[:, LABELS["train"]] == 1)
    batches = [y.numpy() for _, y in data.make_dataset(split.train_shards, inputs).take(10)]
    assert np.all(np.concatenate(batches)[:, LABELS["train"]] == 1)
    with pytest.raises(DataError, match=r"no record of source\(s\) \['competition'\].*present: \['hpa-public', 'train'\]"):
        shardset.split_folds(mixed, val_fold=1, sources=["competition"])


def test_source_weights_set_the_share_of_a_source(mixed):
    split = shardset.split_folds(mixed, val_fold=None)
    table = split.manifest
    public = float((table.source == "hpa-public").mean())

    def share(weights) -> float:
        inputs = data.InputConfig(crop_size=CROP, image_size=8, batch_size=32, source_weights=weights, seed=3)
        labels = np.concatenate([y.numpy() for _, y in data.make_dataset(split.train_shards, inputs).take(40)])
        return float(labels[:, LABELS["hpa-public"]].mean())

    expected = 0.25 * public / (0.25 * public + (1 - public))
    assert abs(share({"hpa-public": 0.25}) - expected) < 0.05
    assert abs(share(()) - public) < 0.05
    assert share({"hpa-public": 0.0}) == 0.0
    n, counts = table.weighted_counts(sources=None, source_weights={"hpa-public": 0.25})
    assert n == pytest.approx((table.source == "train").sum() + 0.25 * (table.source == "hpa-public").sum())
    assert counts[LABELS["hpa-public"]] == pytest.approx(0.25 * (table.source == "hpa-public").sum())
    with pytest.raises(DataError, match="source weights must be finite and >= 0"):
        data.InputConfig(crop_size=CROP, image_size=8, batch_size=4, source_weights={"hpa-public": -1})


def test_train_flags_for_sources(mixed, tmp_path, capsys):
    config = parse_config(["--data", mixed, "--out", str(tmp_path / "run"), "--sources", "train,hpa-public",
                           "--source-weights", "hpa-public=0.5", "train=2"])
    assert config.sources == ("train", "hpa-public")
    assert config.source_weights == (("hpa-public", 0.5), ("train", 2.0))
    assert TrainConfig(data=mixed, out="x").sources is None
    help_text = build_parser().format_help()
    assert "--sources SOURCE[,SOURCE]" in help_text and "--source-weights SOURCE=W[,SOURCE=W]" in help_text
    for bad in (["--source-weights", "hpa-public"], ["--source-weights", "hpa-public=-1"], ["--sources", ","]):
        with pytest.raises(SystemExit) as e:
            parse_config(["--data", mixed, "--out", "x", *bad])
        assert e.value.code == 2
    assert "expected SOURCE=WEIGHT" in capsys.readouterr().err


def test_train_uses_the_sources_and_counts_the_weighted_records(mixed, tmp_path):
    from hpa_tf.train import train

    table = shardset.read_manifest(os.path.join(mixed, "manifest.csv"))
    base = dict(data=mixed, val_fold=1, backbone="tiny_cnn", image_size=16, batch_size=4, epochs=1,
                strategy="cpu", tensorboard=False, verbose=0)
    result = train(TrainConfig(out=str(tmp_path / "a"), sources=("train",), source_weights=(("train", 0.5),), **base))
    n = int(round(0.5 * ((table.fold == 0) & (table.source == "train")).sum()))
    assert result.steps_per_epoch == n // 4 and result.n_val == int(((table.fold == 1) & (table.source == "train")).sum())
    with pytest.raises(DataError, match=r"no record of source\(s\) \['hpa_public'\]"):
        train(TrainConfig(out=str(tmp_path / "b"), source_weights=(("hpa_public", 0.5),), **base))
