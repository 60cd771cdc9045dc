"""hpa_tf.shardset and hpa_tf.data, on a shard set the builder made: shard discovery, fold split and
counts from the manifest, the crop spec from the build config, map functions (eager AND inside
tf.data), channels, augmentation, padding of the evaluation batches, class balance, errors."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import SHARD_CROP as CROP

from hpa_tf import data, shardset
from hpa_tf.balance import example_repeat, repeat_factors
from hpa_tf.config import AugmentConfig
from hpa_tf.crops import CropSpec
from hpa_tf.records import parse_example, write_shard
from hpa_tf.shardset import DataError, parse_shard_name

RARE = 15  # Aggresome: in one field of the shard set only


@pytest.fixture(scope="module")
def shards(shard_set) -> str:
    return shard_set


def _inputs(**kw) -> data.InputConfig:
    base = dict(crop_size=CROP, image_size=CROP, batch_size=8)
    base.update(kw)
    return data.InputConfig(**base)


@pytest.fixture
def shard_copy(shards, tmp_path) -> str:
    """A private copy of the shard folder, for tests that damage it."""
    return shutil.copytree(shards, tmp_path / "copy")


def _manifest_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "manifest.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _write_manifest(folder, rows) -> None:
    with open(os.path.join(folder, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _records(shards, n=4) -> list[bytes]:
    paths = shardset.list_shards(shards)
    return [r.numpy() for r in tf.data.TFRecordDataset(paths[:1]).take(n)]


# ---------------------------------------------------------------------------------------------
# shards, manifest, folds
# ---------------------------------------------------------------------------------------------


def test_list_shards_from_folder_glob_and_list_ignoring_temp_files(shard_copy):
    all_shards = shardset.list_shards(shard_copy)
    assert all_shards and all(os.path.basename(p).startswith("fold") for p in all_shards)
    # unfinished files of a writer are never picked up
    open(os.path.join(shard_copy, ".tmp-1234abcd-fold0-00009-n5.tfrec"), "wb").close()
    open(os.path.join(shard_copy, "fold0.partial"), "wb").close()
    assert shardset.list_shards(shard_copy) == all_shards
    fold1 = shardset.list_shards(os.path.join(shard_copy, "fold1-*.tfrec"))
    assert fold1 == [p for p in all_shards if os.path.basename(p).startswith("fold1-")]
    assert shardset.list_shards(fold1) == fold1
    assert [parse_shard_name(p)[0] for p in all_shards] == sorted(parse_shard_name(p)[0] for p in all_shards)


@pytest.mark.parametrize(
    "make_arg, message",
    [
        (lambda d: [], "empty shard list"),
        (lambda d: os.path.join(d, "nothing-*.tfrec"), "glob matches no shard"),
        (lambda d: os.path.join(d, "*.csv"), "none is named"),
        (lambda d: os.path.join(d, "missing"), "no such file or folder"),
        (lambda d: os.path.join(d, "empty_dir"), "holds no shard files"),
    ],
)
def test_list_shards_errors_are_clear(shard_copy, make_arg, message):
    os.makedirs(os.path.join(shard_copy, "empty_dir"))
    with pytest.raises(DataError, match=message):
        shardset.list_shards(make_arg(shard_copy))


def test_split_counts_come_from_the_manifest_not_the_shards(shards, monkeypatch):
    rows = _manifest_rows(shards)
    per_fold = {f: sum(r["fold"] == str(f) for r in rows) for f in range(4)}

    def no_reading(*args, **kwargs):
        raise AssertionError("split_folds read a shard")

    monkeypatch.setattr(tf.data, "TFRecordDataset", no_reading)
    split = shardset.split_folds(shards, val_fold=2)
    assert split.val_folds == [2] and split.train_folds == [0, 1, 3]
    assert split.n_val == per_fold[2]
    assert split.n_train == per_fold[0] + per_fold[1] + per_fold[3]
    assert all(parse_shard_name(p)[0] == 2 for p in split.val_shards)
    assert all(parse_shard_name(p)[0] != 2 for p in split.train_shards)
    # the crop spec is the builder's, read from the build config (the pipeline's size and model.json's copy)
    assert split.crop == CropSpec(size=CROP)
    with open(os.path.join(shards, shardset.BUILD_CONFIG)) as f:
        assert CropSpec.from_dict(json.load(f)["crop"]) == split.crop
    expected = np.zeros(19, np.int64)
    for r in rows:
        if r["fold"] != "2":
            for c in r["labels"].split("|"):
                expected[int(c)] += 1
    np.testing.assert_array_equal(split.class_counts, expected)


def test_split_without_validation_and_with_explicit_folds(shards):
    everything = shardset.split_folds(shards, val_fold=None)
    assert everything.val_shards == [] and everything.n_val == 0
    assert everything.n_train == len(_manifest_rows(shards))
    some = shardset.split_folds(shards, val_fold=0, train_folds=[1])
    assert some.train_folds == [1]


def test_fold_with_no_examples_is_a_clear_error(shard_copy):
    with pytest.raises(DataError, match="fold 7 has no shards"):
        shardset.split_folds(shard_copy, val_fold=7)
    # a fold whose only shard is empty
    write_shard(os.path.join(shard_copy, "fold5-00000-n0.tfrec"), [])
    with pytest.raises(DataError, match=r"validation fold\(s\) \[5\] hold no examples"):
        shardset.split_folds(shard_copy, val_fold=5)
    with pytest.raises(DataError, match="no training folds"):
        shardset.split_folds(shard_copy, val_fold=0, train_folds=[])


def test_manifest_that_disagrees_with_the_shard_names_is_a_clear_error(shard_copy):
    rows = _manifest_rows(shard_copy)
    dropped = rows.pop(0)
    _write_manifest(shard_copy, rows)
    with pytest.raises(DataError, match=rf"disagrees with the shards: {dropped['shard']}: \d+ manifest rows, \d+ in its name"):
        shardset.split_folds(shard_copy, val_fold=0)


def test_manifest_pointing_at_a_missing_shard_is_a_clear_error(shard_copy):
    victim = shardset.list_shards(shard_copy)[-1]
    os.remove(victim)
    with pytest.raises(DataError, match=rf"{os.path.basename(victim)}: \d+ manifest rows but no such shard file"):
        shardset.split_folds(shard_copy, val_fold=0)


def test_manifest_with_wrong_fold_or_missing_column_is_a_clear_error(shard_copy):
    rows = _manifest_rows(shard_copy)
    rows[0]["fold"] = "3" if rows[0]["fold"] != "3" else "0"
    _write_manifest(shard_copy, rows)
    with pytest.raises(DataError, match="manifest rows say fold"):
        shardset.split_folds(shard_copy, val_fold=None)
    _write_manifest(shard_copy, [{k: v for k, v in r.items() if k != "labels"} for r in rows])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['labels'\]"):
        shardset.split_folds(shard_copy, val_fold=None)
    with pytest.raises(DataError, match="manifest not found"):
        shardset.read_manifest(os.path.join(shard_copy, "nope.csv"))


def _edit_build_config(folder, edit) -> None:
    path = os.path.join(folder, shardset.BUILD_CONFIG)
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


def test_the_crop_spec_is_required_and_read_strictly(shard_copy):
    _edit_build_config(shard_copy, lambda c: c["crop"].update(margin=0.0))
    assert shardset.split_folds(shard_copy, val_fold=0).crop.margin == 0.0  # 0.0 stays 0.0
    _edit_build_config(shard_copy, lambda c: c["crop"].pop("margin"))
    with pytest.raises(DataError, match=r"build_config.json: crop spec lacks key\(s\) \['margin'\]"):
        shardset.split_folds(shard_copy, val_fold=0)
    _edit_build_config(shard_copy, lambda c: c["crop"].update(margin=0.1, shape="square"))
    with pytest.raises(DataError, match=r"unknown key\(s\) \['shape'\]"):
        shardset.split_folds(shard_copy, val_fold=0)
    _edit_build_config(shard_copy, lambda c: c.pop("crop"))
    with pytest.raises(DataError, match="no 'crop' entry"):
        shardset.split_folds(shard_copy, val_fold=0)
    os.remove(os.path.join(shard_copy, shardset.BUILD_CONFIG))
    with pytest.raises(DataError, match="no build_config.json"):
        shardset.split_folds(shard_copy, val_fold=0)


def test_shards_of_two_shard_sets_with_different_crop_specs_are_refused(shards, tmp_path):
    other = shutil.copytree(shards, tmp_path / "other")
    _edit_build_config(other, lambda c: c["crop"].update(mask_neighbors=True))
    mixed = shardset.select_shards(shardset.list_shards(shards), [0]) + shardset.select_shards(
        shardset.list_shards(other), [1])
    with pytest.raises(DataError, match="different crop specs"):
        shardset.split_folds(mixed, val_fold=None, manifest=os.path.join(shards, "manifest.csv"))


# ---------------------------------------------------------------------------------------------
# map functions: eager == tf.data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [None, AugmentConfig(), AugmentConfig(scale=(0.6, 0.9), brightness=0.1)])
def test_preprocess_gives_the_same_result_eagerly_and_inside_tf_data(shards, augment):
    records = _records(shards, 4)
    seeds = np.array([[i, 99] for i in range(len(records))], np.int64)

    def fn(serialized, seed):
        return data.preprocess(parse_example(serialized, crop_size=CROP), 48, "rgby", augment, seed)

    eager = [fn(tf.constant(r), tf.constant(s)) for r, s in zip(records, seeds)]
    ds = tf.data.Dataset.from_tensor_slices((records, seeds)).map(fn)
    graph = list(ds)
    for (xe, ye), (xg, yg) in zip(eager, graph):
        assert xe.shape == xg.shape == (48, 48, 4) and xe.dtype == xg.dtype == tf.float32
        np.testing.assert_allclose(xe.numpy(), xg.numpy(), atol=1e-3)
        np.testing.assert_array_equal(ye.numpy(), yg.numpy())


def test_preprocess_without_resize_keeps_the_pixels(shards):
    record = _records(shards, 1)[0]
    example = parse_example(tf.constant(record), crop_size=CROP)
    image, labels = data.preprocess(example, CROP, "rgby")
    np.testing.assert_array_equal(image.numpy(), example["image"].numpy().astype(np.float32))
    np.testing.assert_array_equal(labels.numpy(), example["labels"].numpy())


@pytest.mark.parametrize("channels", ["rgby", "g", "rgb", "gy", "yr"])
def test_channel_selection_picks_the_named_planes(shards, channels):
    example = parse_example(tf.constant(_records(shards, 1)[0]), crop_size=CROP)
    image, _ = data.preprocess(example, CROP, channels)
    rgby = example["image"].numpy()
    expected = np.stack([rgby[..., "rgby".index(c)] for c in channels], axis=-1)
    np.testing.assert_array_equal(image.numpy(), expected.astype(np.float32))
    ds = data.make_dataset(shardset.list_shards(shards), _inputs(batch_size=4, channels=channels, seed=0))
    assert ds.element_spec[0].shape == (4, CROP, CROP, len(channels))


@pytest.mark.parametrize("bad", ["", "rgbx", "rr", "RGBYY"])
def test_bad_channel_strings_are_clear_errors(shards, bad):
    with pytest.raises(DataError, match="channels"):
        data.make_dataset(shardset.list_shards(shards), _inputs(channels=bad))


def test_geometric_augmentation_permutes_pixels_and_keeps_labels(shards):
    example = parse_example(tf.constant(_records(shards, 1)[0]), crop_size=CROP)
    original = example["image"].numpy()
    geometry = AugmentConfig(brightness=0.0, contrast=0.0)
    outputs = []
    for i in range(12):
        image, labels = data.preprocess(example, CROP, "rgby", geometry, tf.constant([i, 5], tf.int64))
        assert image.shape == (CROP, CROP, 4) and image.dtype == tf.float32
        np.testing.assert_array_equal(labels.numpy(), example["labels"].numpy())
        # flips and 90° turns only move pixels: per channel the same multiset of values
        np.testing.assert_array_equal(np.sort(image.numpy().reshape(-1, 4), 0), np.sort(original.reshape(-1, 4), 0))
        outputs.append(image.numpy())
    assert len({o.tobytes() for o in outputs}) > 2  # the seeds give different views


def test_intensity_and_scale_augmentation_stay_in_range(shards):
    example = parse_example(tf.constant(_records(shards, 1)[0]), crop_size=CROP)
    config = AugmentConfig(brightness=0.2, contrast=0.3, scale=(0.5, 0.8))
    for i in range(5):
        image, _ = data.preprocess(example, 40, "gy", config, tf.constant([i, 1], tf.int64))
        assert image.shape == (40, 40, 2)
        values = image.numpy()
        assert values.min() >= 0.0 and values.max() <= 255.0


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def test_training_dataset_has_static_batches_and_valid_labels(shards):
    split = shardset.split_folds(shards, val_fold=0)
    ds = data.make_dataset(split.train_shards, _inputs(image_size=24, seed=1, augment=AugmentConfig()))
    assert ds.element_spec[0].shape == (8, 24, 24, 4) and ds.element_spec[1].shape == (8, 19)
    label_rows = {tuple(np.asarray(r)) for r in split.manifest.labels[split.manifest.fold != 0].astype(np.float32)}
    n_batches = 0
    for images, labels in ds.take(2 * split.n_train // 8 + 3):  # more than two epochs: it repeats
        assert images.dtype == tf.float32 and 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
        assert all(tuple(r) in label_rows for r in labels.numpy())
        n_batches += 1
    assert n_batches == 2 * split.n_train // 8 + 3


def test_evaluation_dataset_keeps_every_example_in_padded_batches(shards):
    split = shardset.split_folds(shards, val_fold=1)
    batch = 16
    ds = data.make_dataset(split.val_shards, _inputs(batch_size=batch), training=False, n_examples=split.n_val)
    assert int(ds.cardinality()) == data.steps_for(split.n_val, batch, drop_remainder=False)
    assert ds.element_spec[0].shape == (batch, CROP, CROP, 4)
    labels, weights = [], []
    for _ in range(2):  # deterministic: two passes give the same order
        got = [(y.numpy(), w.numpy()) for _, y, w in ds]
        labels.append(np.concatenate([g[0] for g in got]))
        weights.append(np.concatenate([g[1] for g in got]))
    np.testing.assert_array_equal(labels[0], labels[1])
    w = weights[0]
    assert w.sum() == split.n_val and len(w) % batch == 0 and np.all(w[: split.n_val] == 1)
    np.testing.assert_array_equal(labels[0][w > 0], data.eval_labels(split.val_shards))
    short = data.make_dataset(split.val_shards, _inputs(batch_size=batch), training=False, pad_last=False)
    assert sum(int(x.shape[0]) for x, _ in short) == split.n_val


def test_repeat_factors_follow_the_square_root_rule():
    counts = np.zeros(19, np.int64)
    counts[0], counts[11], counts[18] = 500, 4, 1
    r = repeat_factors(counts, 1000, threshold=0.1)
    assert r[0] == 1.0 and r[5] == 1.0  # common and absent classes are not repeated
    np.testing.assert_allclose(r[11], np.sqrt(0.1 / 0.004), rtol=1e-6)
    np.testing.assert_allclose(r[18], np.sqrt(0.1 / 0.001), rtol=1e-6)
    labels = tf.constant(np.eye(19, dtype=np.float32)[11])
    draws = [int(example_repeat(labels, tf.constant(r), tf.constant([i, 0], tf.int64))) for i in range(400)]
    assert set(draws) <= {int(np.floor(r[11])), int(np.ceil(r[11]))}
    assert abs(np.mean(draws) - r[11]) < 0.15  # stochastic rounding keeps the expected count


def test_balanced_sampling_raises_the_share_of_rare_classes(shards):
    split = shardset.split_folds(shards, val_fold=None)
    rare = RARE
    factors = repeat_factors(split.class_counts, split.n_train, threshold=0.4)
    assert factors[rare] > 2 * factors[0] and factors[5] == 1.0  # rare > common > absent (1)

    def share(balance) -> float:
        ds = data.make_dataset(split.train_shards, _inputs(batch_size=32, image_size=8, balance=balance, seed=4))
        labels = np.concatenate([y.numpy() for _, y in ds.take(60)])
        return float(labels[:, rare].mean())

    plain, balanced = share(None), share(factors)
    labels = split.manifest.labels.astype(np.float32)
    natural = labels[:, rare].mean()
    copies = np.maximum((labels * factors).max(axis=1), 1.0)  # expected copies of each example
    expected = (copies * labels[:, rare]).sum() / copies.sum()
    assert expected > 1.3 * natural  # the rule favours the rare class (others get repeated too)
    assert abs(plain - natural) < 0.04
    assert abs(balanced - expected) < 0.04
    assert balanced > 1.3 * plain


def test_make_dataset_rejects_bad_arguments(shards):
    with pytest.raises(DataError, match="empty shard list"):
        data.make_dataset([], _inputs())
    with pytest.raises(DataError, match="per-class repeat factors"):
        _inputs(balance=np.ones(3))


def test_manifest_rows_without_labels_read_as_unlabelled(shard_copy):
    rows = _manifest_rows(shard_copy)
    rows[0]["labels"] = ""
    _write_manifest(shard_copy, rows)
    table = shardset.read_manifest(os.path.join(shard_copy, "manifest.csv"))
    assert table.labels[0].sum() == 0 and table.labels[1:].sum(axis=1).min() >= 1
