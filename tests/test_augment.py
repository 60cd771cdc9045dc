"""hpa_tf.augment: the on-device augmentation layer — identity at inference, exactly the 8 square
symmetries and bounded per-channel intensity in training, tf.function / 2-replica MirroredStrategy,
save/load through hpa_tf.model."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from hpa_tf import distribute
from hpa_tf.augment import RandomAugment, augment_settings
from hpa_tf.backbones import build_tiny_cnn
from hpa_tf.model import load_model, model_config, save_model

S, C = 8, 3


def _image() -> np.ndarray:
    """An (S, S, C) float32 image with all-distinct values: no symmetry maps it to itself."""
    return np.arange(S * S * C, dtype=np.float32).reshape(S, S, C)


def _d4_set(image: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of an (S, S, C) image (numpy reference)."""
    out = []
    for im in (image, np.transpose(image, (1, 0, 2))):
        for k in range(4):
            out.append(np.rot90(im, k, axes=(0, 1)))
    return out


def _which(out: np.ndarray, refs: list[np.ndarray]) -> int:
    hits = [i for i, r in enumerate(refs) if np.array_equal(out, r)]
    assert len(hits) == 1, "output is not exactly one of the symmetries of the input"
    return hits[0]


def test_identity_at_inference():
    layer = RandomAugment(seed=1)
    x = np.random.default_rng(0).uniform(0, 255, (4, S, S, C)).astype(np.float32)
    for training in (None, False):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=training)), x)


def test_training_draws_each_of_the_eight_symmetries_exactly():
    layer = RandomAugment(brightness=0.0, contrast=0.0, seed=3)
    image = _image()
    refs = _d4_set(image)
    batch = np.repeat(image[None], 64, axis=0)
    seen = []
    for _ in range(3):
        out = keras.ops.convert_to_numpy(layer(batch, training=True))
        seen += [_which(o, refs) for o in out]
    counts = np.bincount(seen, minlength=8)
    assert (counts > 0).all(), counts  # every symmetry, each an exact pixel move
    assert counts.max() < 3 * 64 * 0.3


@pytest.mark.parametrize("flip,rotate90", [(True, False), (False, True)])
def test_flips_only_or_rotations_only(flip, rotate90):
    layer = RandomAugment(flip=flip, rotate90=rotate90, brightness=0.0, contrast=0.0, seed=5)
    image = _image()
    refs = _d4_set(image)
    out = keras.ops.convert_to_numpy(layer(np.repeat(image[None], 128, axis=0), training=True))
    seen = {_which(o, refs) for o in out}
    if flip:  # identity, left-right, up-down, both
        wanted = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    else:  # the four rotations
        wanted = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    assert seen == {_which(w, refs) for w in wanted}


def test_per_channel_intensity_within_bounds():
    brightness, contrast = 0.05, 0.1
    layer = RandomAugment(flip=False, rotate90=False, brightness=brightness, contrast=contrast, seed=7)
    x = np.full((256, S, S, C), 100.0, np.float32)
    x[:, :, :, 1] = 200.0
    x[:, 0, 0, :] = 0.0
    x[:, 0, 1, :] = 255.0
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    assert out.min() >= 0.0 and out.max() <= 255.0
    # a constant channel stays constant (one gain and offset per example and channel) ...
    flat = out[:, 1:, :, :].reshape(256, -1, C)
    np.testing.assert_allclose(flat.min(axis=1), flat.max(axis=1), atol=1e-4)
    # ... within gain × value + offset bounds, and the draws differ across examples and channels
    values = flat[:, 0, :]
    for c, v in enumerate((100.0, 200.0, 100.0)):
        lo = v * (1 - contrast) - brightness * 255
        hi = v * (1 + contrast) + brightness * 255
        assert (values[:, c] >= lo - 1e-3).all() and (values[:, c] <= hi + 1e-3).all()
        assert values[:, c].std() > 3.0
    assert not np.allclose(values[:, 0], values[:, 2])
    # gain and offset: black (0) gets the offset only, white may clip
    assert np.abs(out[:, 0, 0, :]).max() <= brightness * 255 + 1e-3


def test_labels_unaffected_and_runs_inside_tf_function():
    model = build_tiny_cnn(image_size=S * 4, channels=C, augment={"seed": 0})
    x = tf.random.uniform((4, S * 4, S * 4, C), 0, 255, seed=1)
    y = tf.one_hot([0, 1, 2, 3], 19)

    @tf.function
    def step(images, labels):
        augmented = model.get_layer("augment")(images, training=True)
        return augmented, labels, model(images, training=True)

    a1, labels, scores = step(x, y)
    a2, _, _ = step(x, y)
    np.testing.assert_array_equal(labels.numpy(), y.numpy())  # the layer only sees images
    assert scores.shape == (4, 19)
    assert not np.array_equal(a1.numpy(), a2.numpy())  # the seed state advances under tf.function
    assert not np.array_equal(a1.numpy(), x.numpy())


def test_xla_and_mixed_precision():
    layer = RandomAugment(seed=9)
    x = tf.random.uniform((4, S, S, C), 0, 255, seed=2)
    out = tf.function(lambda t: layer(t, training=True), jit_compile=True)(x).numpy()
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255 and not np.array_equal(out, x.numpy())
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_tiny_cnn(image_size=16, channels=C, augment={"seed": 1})
        assert model.get_layer("augment").compute_dtype == "float32"  # pixels stay exact 0..255 floats
        scores = model(tf.random.uniform((2, 16, 16, C), 0, 255), training=True)
        assert scores.dtype == "float32" and np.isfinite(scores.numpy()).all()
    finally:
        keras.config.set_dtype_policy(previous)


def test_two_replica_mirrored_strategy_fit_and_distinct_replica_draws():
    strategy = distribute.get_strategy("cpu", devices=["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        layer = RandomAugment(brightness=0.0, contrast=0.0, seed=11)
        model = build_tiny_cnn(image_size=16, channels=C, augment={"seed": 2})
        model.compile(optimizer="adam", loss="binary_crossentropy")
    image = np.arange(16 * 16 * C, dtype=np.float32).reshape(16, 16, C) % 256
    refs = _d4_set(image)
    batch = tf.constant(np.repeat(image[None], 32, axis=0))

    @tf.function
    def run(images):
        return strategy.run(lambda im: layer(im, training=True), args=(images,))

    dist = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).unbatch().batch(32))))
    per_replica = [t.numpy() for t in strategy.experimental_local_results(run(dist))]
    assert len(per_replica) == 2
    picks = [[_which(o, refs) for o in part] for part in per_replica]
    assert picks[0] != picks[1]  # each replica its own transforms
    # and a model with the block trains under the strategy
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 16, 16, C)).astype(np.float32)
    y = (rng.random((32, 19)) < 0.2).astype(np.float32)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))


def test_saved_model_loads_and_predicts_identically(tmp_path):
    settings = {"flip": True, "rotate90": True, "brightness": 0.05, "contrast": 0.1, "seed": 4}
    model = build_tiny_cnn(image_size=32, channels=4, augment=settings)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 4)).astype(np.float32)
    before = model.predict(x, verbose=0)
    config = model_config(model)
    assert config["augment"] == settings and config["backbone"] == "tiny_cnn"
    save_model(model, tmp_path / "m.keras")
    loaded, cfg = load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("augment"), RandomAugment)
    assert loaded.get_layer("augment").get_config()["contrast"] == 0.1
    assert cfg["augment"] == settings and json.loads((tmp_path / "m.json").read_text())["augment"] == settings
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    # eager call (the predictor's model(x, training=False)): same up to float32 rounding of eager vs graph
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), before, atol=1e-6)
    # weights of a fresh model with the block load as they are (resume path)
    fresh = build_tiny_cnn(image_size=32, channels=4, augment=settings)
    fresh.load_weights(tmp_path / "m.keras")
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), before)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown augment settings"):
        augment_settings({"flips": True})
    with pytest.raises(ValueError, match="brightness"):
        RandomAugment(brightness=1.5)
    with pytest.raises(ValueError, match="square"):
        RandomAugment()(keras.Input((8, 12, 3)))


def test_one_dihedral_implementation_serves_the_host_and_the_device():
    """``dihedral`` with a static index (tf.data, per example) and with per-example indices (the
    layer, per batch) gives the same 8 distinct symmetries, with the documented bit meanings."""
    from hpa_tf.augment import dihedral

    image = _image()
    refs = _d4_set(image)
    singles = [dihedral(tf.constant(image), i).numpy() for i in range(8)]
    assert sorted(_which(o, refs) for o in singles) == list(range(8))
    np.testing.assert_array_equal(singles[1], image[:, ::-1])  # bit 1: left-right
    np.testing.assert_array_equal(singles[2], image[::-1])  # bit 2: up-down
    np.testing.assert_array_equal(singles[4], np.transpose(image, (1, 0, 2)))  # bit 4: transpose
    batched = dihedral(tf.constant(np.repeat(image[None], 8, axis=0)), tf.range(8), spatial_axes=(1, 2)).numpy()
    for i in range(8):
        np.testing.assert_array_equal(batched[i], singles[i])
