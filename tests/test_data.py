"""hpa_tf.data: shard discovery, fold split and counts from the manifest, map functions (eager AND
inside tf.data), channels, augmentation, padding of the evaluation batches, class balance, errors."""

import csv
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from hpa_tf import data
from hpa_tf.data import AugmentConfig, DataError
from hpa_tf.records import parse_example, parse_shard_name, write_shard

CROP = 32
# class 15 (Aggresome) only in field 3 (fold 3): the rare class of the balance test
FIELD_LABELS = [[0], [14], [0, 16], [15], [0], [2], [0], [13]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    data.write_synthetic_shards(out, n_fields=8, field_size=256, crop_size=CROP, n_folds=4, per_shard=20, seed=3,
                                field_labels=FIELD_LABELS)
    return str(out)


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
    paths = data.list_shards(shards)
    return [r.numpy() for r in tf.data.TFRecordDataset(paths[:1]).take(n)]


# ---------------------------------------------------------------------------------------------
# shards, manifest, folds
# ---------------------------------------------------------------------------------------------


def test_list_shards_from_folder_glob_and_list_ignoring_temp_files(shard_copy):
    all_shards = data.list_shards(shard_copy)
    assert all_shards and all(os.path.basename(p).startswith("fold") for p in all_shards)
    # unfinished files of a writer are never picked up
    open(os.path.join(shard_copy, ".tmp-1234abcd-fold0-00009-n5.tfrec"), "wb").close()
    open(os.path.join(shard_copy, "fold0.partial"), "wb").close()
    assert data.list_shards(shard_copy) == all_shards
    fold1 = data.list_shards(os.path.join(shard_copy, "fold1-*.tfrec"))
    assert fold1 == [p for p in all_shards if os.path.basename(p).startswith("fold1-")]
    assert data.list_shards(fold1) == fold1
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
        data.list_shards(make_arg(shard_copy))


def test_split_counts_come_from_the_manifest_not_the_shards(shards, monkeypatch):
    rows = _manifest_rows(shards)
    per_fold = {f: sum(r["fold"] == str(f) for r in rows) for f in range(4)}

    def no_reading(*args, **kwargs):
        raise AssertionError("split_folds read a shard")

    monkeypatch.setattr(tf.data, "TFRecordDataset", no_reading)
    split = data.split_folds(shards, val_fold=2)
    assert split.val_folds == [2] and split.train_folds == [0, 1, 3]
    assert split.n_val == per_fold[2]
    assert split.n_train == per_fold[0] + per_fold[1] + per_fold[3]
    assert all(parse_shard_name(p)[0] == 2 for p in split.val_shards)
    assert all(parse_shard_name(p)[0] != 2 for p in split.train_shards)
    assert split.crop_size == CROP and split.build_config["crop_size"] == CROP
    expected = np.zeros(19, np.int64)
    for r in rows:
        if r["fold"] != "2":
            for c in r["labels"].split("|"):
                expected[int(c)] += 1
    np.testing.assert_array_equal(split.class_counts, expected)


def test_split_without_validation_and_with_explicit_folds(shards):
    everything = data.split_folds(shards, val_fold=None)
    assert everything.val_shards == [] and everything.n_val == 0
    assert everything.n_train == len(_manifest_rows(shards))
    some = data.split_folds(shards, val_fold=0, train_folds=[1])
    assert some.train_folds == [1]


def test_fold_with_no_examples_is_a_clear_error(shard_copy):
    with pytest.raises(DataError, match="fold 7 has no shards"):
        data.split_folds(shard_copy, val_fold=7)
    # a fold whose only shard is empty
    write_shard(os.path.join(shard_copy, "fold5-00000-n0.tfrec"), [])
    with pytest.raises(DataError, match=r"validation fold\(s\) \[5\] hold no examples"):
        data.split_folds(shard_copy, val_fold=5)
    with pytest.raises(DataError, match="no training folds"):
        data.split_folds(shard_copy, val_fold=0, train_folds=[])


def test_manifest_that_disagrees_with_the_shard_names_is_a_clear_error(shard_copy):
    rows = _manifest_rows(shard_copy)
    dropped = rows.pop(0)
    _write_manifest(shard_copy, rows)
    with pytest.raises(DataError, match=rf"disagrees with the shards: {dropped['shard']}: \d+ manifest rows, \d+ in its name"):
        data.split_folds(shard_copy, val_fold=0)


def test_manifest_pointing_at_a_missing_shard_is_a_clear_error(shard_copy):
    victim = data.list_shards(shard_copy)[-1]
    os.remove(victim)
    with pytest.raises(DataError, match=rf"{os.path.basename(victim)}: \d+ manifest rows but no such shard file"):
        data.split_folds(shard_copy, val_fold=0)


def test_manifest_with_wrong_fold_or_missing_column_is_a_clear_error(shard_copy):
    rows = _manifest_rows(shard_copy)
    rows[0]["fold"] = "3" if rows[0]["fold"] != "3" else "0"
    _write_manifest(shard_copy, rows)
    with pytest.raises(DataError, match="manifest rows say fold"):
        data.split_folds(shard_copy, val_fold=None)
    _write_manifest(shard_copy, [{k: v for k, v in r.items() if k != "labels"} for r in rows])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['labels'\]"):
        data.split_folds(shard_copy, val_fold=None)
    with pytest.raises(DataError, match="manifest not found"):
        data.read_manifest(os.path.join(shard_copy, "nope.csv"))


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
    ds = data.make_dataset(data.list_shards(shards), 4, CROP, channels, training=True, seed=0)
    assert ds.element_spec[0].shape == (4, CROP, CROP, len(channels))


@pytest.mark.parametrize("bad", ["", "rgbx", "rr", "RGBYY"])
def test_bad_channel_strings_are_clear_errors(shards, bad):
    with pytest.raises(DataError, match="channels"):
        data.make_dataset(data.list_shards(shards), 4, CROP, bad)


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
    split = data.split_folds(shards, val_fold=0)
    ds = data.make_dataset(split.train_shards, 8, 24, training=True, seed=1, crop_size=CROP)
    assert ds.element_spec[0].shape == (8, 24, 24, 4) and ds.element_spec[1].shape == (8, 19)
    label_rows = {tuple(np.asarray(r)) for r in split.manifest.labels[split.manifest.fold != 0].astype(np.float32)}
    n_batches = 0
    for images, labels in ds.take(2 * split.n_train // 8 + 3):  # more than two epochs: it repeats
        assert images.dtype == tf.float32 and 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
        assert all(tuple(r) in label_rows for r in labels.numpy())
        n_batches += 1
    assert n_batches == 2 * split.n_train // 8 + 3


def test_evaluation_dataset_keeps_every_example_in_padded_batches(shards):
    split = data.split_folds(shards, val_fold=1)
    batch = 16
    ds = data.make_dataset(split.val_shards, batch, CROP, training=False, n_examples=split.n_val)
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
    short = data.make_dataset(split.val_shards, batch, CROP, training=False, pad_last=False)
    assert sum(int(x.shape[0]) for x, _ in short) == split.n_val


def test_repeat_factors_follow_the_square_root_rule():
    counts = np.zeros(19, np.int64)
    counts[0], counts[11], counts[18] = 500, 4, 1
    r = data.repeat_factors(counts, 1000, threshold=0.1)
    assert r[0] == 1.0 and r[5] == 1.0  # common and absent classes are not repeated
    np.testing.assert_allclose(r[11], np.sqrt(0.1 / 0.004), rtol=1e-6)
    np.testing.assert_allclose(r[18], np.sqrt(0.1 / 0.001), rtol=1e-6)
    labels = tf.constant(np.eye(19, dtype=np.float32)[11])
    draws = [int(data.example_repeat(labels, tf.constant(r), tf.constant([i, 0], tf.int64))) for i in range(400)]
    assert set(draws) <= {int(np.floor(r[11])), int(np.ceil(r[11]))}
    assert abs(np.mean(draws) - r[11]) < 0.15  # stochastic rounding keeps the expected count


def test_balanced_sampling_raises_the_share_of_rare_classes(shards):
    split = data.split_folds(shards, val_fold=None)
    rare = 15
    factors = data.repeat_factors(split.class_counts, split.n_train, threshold=0.4)
    assert factors[rare] > 1.5 and factors[0] == 1.0

    def share(balance) -> float:
        ds = data.make_dataset(split.train_shards, 32, 8, training=True, balance=balance, seed=4, crop_size=CROP,
                               augment=AugmentConfig(flip=False, rotate90=False, brightness=0, contrast=0))
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
        data.make_dataset([], 4, CROP)
    with pytest.raises(DataError, match="per-class repeat factors"):
        data.make_dataset(data.list_shards(shards), 4, CROP, balance=np.ones(3))


def test_manifest_rows_without_labels_read_as_unlabelled(shard_copy):
    rows = _manifest_rows(shard_copy)
    rows[0]["labels"] = ""
    _write_manifest(shard_copy, rows)
    table = data.read_manifest(os.path.join(shard_copy, "manifest.csv"))
    assert table.labels[0].sum() == 0 and table.labels[1:].sum(axis=1).min() >= 1
