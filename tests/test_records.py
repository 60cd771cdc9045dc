"""hpa_tf.records: encode with OpenCV, parse with TF (eagerly AND inside tf.data.map), shards."""

import os

import numpy as np
import pytest
import tensorflow as tf

from hpa_tf.labels import LabelError
from hpa_tf.records import (
    FEATURE_SPEC,
    ShardWriter,
    decode_image,
    encode_example,
    parse_example,
    write_shard,
)
from hpa_tf.shardset import parse_shard_name, shard_name

SIZE = 32


def _crop(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A smooth RGBY crop whose channels differ (so a plane swap fails the round trip)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    planes = [40 + 150 * xx, 40 + 150 * yy, 120 + 100 * np.sin(6 * xx) * yy, 200 - 150 * xx * yy]
    crop = np.stack(planes, axis=-1) + rng.normal(0, 2, (size, size, 4))
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def _mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[5:25, 8:28] = 255
    return mask


def _example(encoding: str = "png", labels=(0, 16), **kwargs) -> bytes:
    return encode_example(
        _crop(),
        _mask(),
        labels,
        image_id="abc-123",
        cell_id=7,
        bbox=(10, 20, 110, 140),
        image_size=(2048, 3072),
        fold=3,
        source="hpa-public",
        encoding=encoding,
        **kwargs,
    )


def _parse_both(serialized: bytes, **kwargs) -> list[dict]:
    """The parsed example eagerly and from inside tf.data.Dataset.map (graph mode), as numpy."""
    eager = {k: v.numpy() for k, v in parse_example(tf.constant(serialized), **kwargs).items()}
    ds = tf.data.Dataset.from_tensors(serialized).map(lambda s: parse_example(s, **kwargs))
    graph = {k: v.numpy() for k, v in next(iter(ds)).items()}
    return [eager, graph]


def test_png_round_trip_is_exact_in_rgby_order():
    for out in _parse_both(_example("png"), crop_size=SIZE):
        assert out["image"].dtype == np.uint8 and out["image"].shape == (SIZE, SIZE, 4)
        np.testing.assert_array_equal(out["image"], _crop())
        np.testing.assert_array_equal(out["mask"][..., 0], _mask())
        assert out["encoding"] == b"png" and out["crop_size"] == SIZE


def test_png_is_rgba_for_decode_png():
    raw = parse_example(tf.constant(_example("png")), decode=False)
    assert raw["image"].shape == (1,)
    decoded = tf.io.decode_png(raw["image"][0], channels=4).numpy()
    np.testing.assert_array_equal(decoded, _crop())  # plane 0 is R, plane 3 is Y


def test_jpeg_round_trip_is_close():
    serialized = _example("jpeg", jpeg_quality=95)
    for out in _parse_both(serialized, crop_size=SIZE):
        assert out["image"].shape == (SIZE, SIZE, 4) and out["image"].dtype == np.uint8
        error = np.abs(out["image"].astype(float) - _crop().astype(float)).mean(axis=(0, 1))
        assert np.all(error < 3.0), error  # per channel: a plane swap would give tens
        np.testing.assert_array_equal(out["mask"][..., 0], _mask())  # the mask is always PNG
        assert out["encoding"] == b"jpeg"


def test_labels_and_provenance():
    for out in _parse_both(_example("png", labels=[16, 0, 16])):
        expected = np.zeros(19, np.float32)
        expected[[0, 16]] = 1
        np.testing.assert_array_equal(out["labels"], expected)
        assert out["labels"].dtype == np.float32
        assert out["label_ids"].tolist() == [0, 16]
        assert out["image_id"] == b"abc-123" and out["cell_id"] == 7
        assert out["bbox"].tolist() == [10, 20, 110, 140]
        assert out["image_size"].tolist() == [2048, 3072]
        assert out["fold"] == 3 and out["source"] == b"hpa-public"


def test_unlabelled_example_has_zero_multi_hot():
    for out in _parse_both(_example("png", labels=[])):
        assert out["labels"].shape == (19,) and not out["labels"].any()
        assert out["label_ids"].shape == (0,)


def test_mixed_encodings_batch_in_one_dataset():
    examples = [_example("png"), _example("jpeg")]
    ds = tf.data.Dataset.from_tensor_slices(examples).map(lambda s: parse_example(s, crop_size=SIZE)).batch(2)
    batch = next(iter(ds))
    assert batch["image"].shape == (2, SIZE, SIZE, 4)
    assert batch["labels"].shape == (2, 19)


def test_static_shapes_when_crop_size_given():
    spec = tf.data.Dataset.from_tensors(_example()).map(lambda s: parse_example(s, crop_size=SIZE)).element_spec
    assert spec["image"].shape == (SIZE, SIZE, 4) and spec["mask"].shape == (SIZE, SIZE, 1)
    assert spec["labels"].shape == (19,) and spec["bbox"].shape == (4,)


def test_decode_false_then_decode_later():
    for raw in _parse_both(_example("jpeg"), decode=False):
        assert raw["image"].shape == (4,) and raw["image"].dtype == object
    raw = parse_example(tf.constant(_example("jpeg")), decode=False)
    image = decode_image(raw["image"], raw["encoding"], crop_size=SIZE)
    assert image.shape == (SIZE, SIZE, 4)


def test_unknown_label_is_refused_at_encode_time():
    with pytest.raises(LabelError, match=r"abc-123.*unknown label id\(s\) \[19\]"):
        _example(labels=[3, 19])


def test_malformed_inputs_are_refused():
    with pytest.raises(ValueError, match="crop must be"):
        encode_example(_crop()[..., :3], _mask(), [0], "x", 1, (0, 0, 1, 1), (10, 10))
    with pytest.raises(ValueError, match="mask must be"):
        encode_example(_crop(), _mask()[:-1], [0], "x", 1, (0, 0, 1, 1), (10, 10))
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_example(_crop(), _mask(), [0], "x", 1, (0, 0, 1, 1), (10, 10), encoding="webp")


def test_the_writer_writes_exactly_the_features_the_parser_reads():
    """encode_example and FEATURE_SPEC describe the same schema: every feature written is parsed (none
    ignored) and every parsed feature is written (no silent default), with the spec's types."""
    for encoding in ("png", "jpeg"):
        written = tf.train.Example.FromString(_example(encoding)).features.feature
        assert set(written) == set(FEATURE_SPEC)
        for name, spec in FEATURE_SPEC.items():
            kind = written[name].WhichOneof("kind")
            assert kind == {tf.string: "bytes_list", tf.int64: "int64_list"}[spec.dtype], name
            if isinstance(spec, tf.io.FixedLenFeature):
                n = len(getattr(written[name], kind).value)
                assert n == int(np.prod(spec.shape)), (name, n, spec.shape)


def test_shard_name_round_trip():
    assert shard_name(2, 7, 1000) == "fold2-00007-n1000.tfrec"
    assert parse_shard_name("gs://bucket/records/fold2-00007-n1000.tfrec") == (2, 7, 1000)
    assert parse_shard_name(shard_name(-1, 123456, 5)) == (-1, 123456, 5)
    with pytest.raises(ValueError, match="not a shard name"):
        parse_shard_name("fold2-7-n1000.tfrec")


def test_write_shard_round_trip(tmp_path):
    path = tmp_path / shard_name(0, 0, 3)
    assert write_shard(str(path), [_example(), _example("jpeg"), _example()]) == 3
    ds = tf.data.TFRecordDataset(str(path)).map(parse_example)
    assert [int(x["cell_id"]) for x in ds] == [7, 7, 7]
    assert os.listdir(tmp_path) == [path.name]


def test_write_shard_leaves_nothing_on_error(tmp_path):
    def examples():
        yield _example()
        raise RuntimeError("crash mid-shard")

    path = tmp_path / shard_name(0, 0, 2)
    with pytest.raises(RuntimeError, match="crash mid-shard"):
        write_shard(str(path), examples())
    assert os.listdir(tmp_path) == []


def test_shard_writer_splits_names_and_aborts(tmp_path):
    with ShardWriter(tmp_path, max_per_shard=2) as writer:
        for fold in (0, 0, 0, 1):
            writer.write(_example(), fold=fold)
    assert sorted(os.path.basename(p) for p in writer.paths) == [
        "fold0-00000-n2.tfrec",
        "fold0-00001-n1.tfrec",
        "fold1-00000-n1.tfrec",
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in writer.paths)
    for path in writer.paths:
        assert sum(1 for _ in tf.data.TFRecordDataset(path)) == parse_shard_name(path)[2]

    out = tmp_path / "aborted"
    with pytest.raises(RuntimeError), ShardWriter(out, max_per_shard=10) as writer:
        writer.write(_example(), fold=0)
        raise RuntimeError("crash")
    assert os.listdir(out) == []
