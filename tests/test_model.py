"""hpa_tf.model: shapes and dtypes, explicit normalisation, 3 -> N channel weight adaptation, save/load."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from hpa_tf import model as M
from hpa_tf.crops import CropSpec
from hpa_tf.labels import CLASS_NAMES

SIZE = 32


def _rng_images(n: int, channels: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


def _norm_layer(backbone: keras.Model) -> keras.layers.Normalization:
    (layer,) = [lay for lay in backbone.layers if isinstance(lay, keras.layers.Normalization)]
    return layer


@pytest.fixture(scope="module")
def model4() -> keras.Model:
    keras.utils.set_random_seed(0)
    return M.build_model("efficientnet_b0", image_size=SIZE, channels=4)


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    """A 3-channel B0 without top whose every weight differs from its initial value, saved locally."""
    keras.utils.set_random_seed(1)
    twin = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(1)
    for layer in twin.layers:
        values = []
        for w in layer.get_weights():
            if w.dtype.kind == "f" and np.all(w == 0):  # biases, BN beta/mean, Normalization mean
                w = rng.uniform(-0.1, 0.1, w.shape).astype(w.dtype)
            elif w.dtype.kind == "f" and np.all(w == 1):  # BN gamma/variance, Normalization variance
                w = rng.uniform(0.8, 1.2, w.shape).astype(w.dtype)
            values.append(w)
        layer.set_weights(values)
    path = tmp_path_factory.mktemp("weights") / "b0_notop.weights.h5"
    twin.save_weights(str(path))
    return str(path), twin


@pytest.fixture(scope="module")
def model4_pretrained(rgb_weights) -> keras.Model:
    path, _ = rgb_weights
    return M.build_model("efficientnet_b0", image_size=2 * SIZE, channels=4, weights=path)


# ----------------------------------------------------------------------------- names


def test_backbone_names_resolve_to_keras_constructors():
    assert M.resolve_backbone("EfficientNetB0") == "efficientnet_b0"
    assert M.resolve_backbone("efficientnetv2-s") == "efficientnet_v2_s"
    assert M.resolve_backbone("efficientnet_v2_b3") == "efficientnet_v2_b3"
    assert len(M.BACKBONES) == 15
    for keras_name in M.BACKBONES.values():
        assert callable(getattr(keras.applications, keras_name))


def test_unknown_backbone_raises_naming_valid_ones():
    with pytest.raises(ValueError, match=r"resnet50.*efficientnet_b0.*efficientnet_v2_l"):
        M.build_model("resnet50", image_size=SIZE)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="image_size"):
        M.build_model(image_size=16)
    with pytest.raises(ValueError, match="channels"):
        M.build_model(image_size=SIZE, channels=0)
    with pytest.raises(ValueError, match="normalization needs 4"):
        M.build_model(image_size=SIZE, channels=4, normalization={"mean": [0.5] * 3, "std": [0.2] * 3})


# ----------------------------------------------------------------------------- outputs


def test_output_is_float32_probabilities(model4):
    out = keras.ops.convert_to_numpy(model4(_rng_images(3, 4), training=False))
    assert out.shape == (3, 19)
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    assert model4.input_shape == (None, SIZE, SIZE, 4)


def test_output_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = M.build_model("efficientnet_b0", image_size=SIZE, channels=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert M.backbone_layer(model).get_layer("stem_conv").compute_dtype == "float16"
    out = model(_rng_images(2, 4), training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert keras.ops.convert_to_numpy(out).shape == (2, 19)


# ----------------------------------------------------------------------------- normalisation


def test_default_normalization_is_imagenet_plus_mean_for_yellow():
    norm = M.default_normalization("efficientnet_b0", 4)
    assert norm["mean"][:3] == list(M.IMAGENET_MEAN)
    assert norm["std"][:3] == list(M.IMAGENET_STD)
    assert norm["mean"][3] == pytest.approx(np.mean(M.IMAGENET_MEAN))
    assert norm["std"][3] == pytest.approx(np.mean(M.IMAGENET_STD))
    assert norm["scale"] == pytest.approx(1 / 255)
    assert M.default_normalization("efficientnet_b0", 1)["mean"] == [pytest.approx(0.449)]
    assert M.default_normalization("efficientnet_v2_s", 4)["std"] == [pytest.approx(128 / 255)] * 4


def test_model_applies_the_recorded_normalization(model4):
    norm = M.get_normalization(model4)
    assert norm["mean"] == M.default_normalization("efficientnet_b0", 4)["mean"]
    assert norm["std"] == pytest.approx(M.default_normalization("efficientnet_b0", 4)["std"], abs=1e-7)
    backbone = M.backbone_layer(model4)
    normalized = keras.Model(backbone.input, _norm_layer(backbone).output)
    x = _rng_images(2, 4)
    want = (x * np.float32(1 / 255) - np.float32(norm["mean"])) / np.float32(norm["std"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normalized(x)), want, rtol=1e-5, atol=1e-5)


def test_v2_backbone_gets_the_same_explicit_normalization():
    model = M.build_model("efficientnet_v2_b0", image_size=SIZE, channels=4, dropout=0.0)
    assert M.get_normalization(model)["mean"] == M.default_normalization("efficientnet_v2_b0", 4)["mean"]
    assert [layer.name for layer in model.layers][:3] == ["image", "pixel_rescaling", "pixel_normalization"]
    assert M.model_config(model)["backbone"] == "efficientnet_v2_b0"


# ----------------------------------------------------------------------------- stem adaptation


def test_adapt_input_conv_formula():
    w = np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype("float32")
    w4 = M.adapt_input_conv(w, 4)
    assert w4.shape == (3, 3, 4, 8) and w4.dtype == np.float32
    for c in range(4):
        np.testing.assert_array_equal(w4[:, :, c], w[:, :, c % 3] * np.float32(3 / 4))
    np.testing.assert_array_equal(M.adapt_input_conv(w, 1)[:, :, 0], w.sum(axis=2))
    np.testing.assert_array_equal(M.adapt_input_conv(w, 3), w)
    # channels repeating the RGB input give the RGB response (up to float rounding)
    x = np.random.default_rng(1).normal(size=3).astype("float32")
    np.testing.assert_allclose(np.tensordot(np.tile(x, 2), M.adapt_input_conv(w, 6), axes=([0], [2])),
                               np.tensordot(x, w, axes=([0], [2])), rtol=1e-5)
    with pytest.raises(ValueError, match="3-channel"):
        M.adapt_input_conv(w4, 6)


def test_pretrained_weights_copied_exactly_except_the_stem(rgb_weights, model4_pretrained):
    _, twin = rgb_weights
    target = M.backbone_layer(model4_pretrained)
    n_checked = 0
    for layer in target.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization) or layer.name == "stem_conv":
            continue
        for got, want in zip(layer.get_weights(), twin.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(got, want, err_msg=layer.name)
            n_checked += 1
    assert n_checked > 300
    w = twin.get_layer("stem_conv").get_weights()[0]
    expected = np.concatenate([w, w[:, :, :1]], axis=2) * np.float32(3 / 4)
    np.testing.assert_array_equal(target.get_layer("stem_conv").get_weights()[0], expected)
    # the source's (random) normalisation stats are not carried over: ours stays explicit
    assert M.get_normalization(model4_pretrained)["mean"] == M.default_normalization("efficientnet_b0", 4)["mean"]


def test_adapted_stem_equals_rgb_stem_on_folded_input(rgb_weights, model4_pretrained):
    """conv(W', z) == 3/4 * conv(W, (z_R + z_Y, z_G, z_B)) for the normalised 4-channel input z."""
    _, twin = rgb_weights
    backbone = M.backbone_layer(model4_pretrained)
    probe = keras.Model(backbone.input, [_norm_layer(backbone).output, backbone.get_layer("stem_conv").output])
    x = _rng_images(2, 4, size=2 * SIZE, seed=3)
    z, stem4 = (keras.ops.convert_to_numpy(t) for t in probe(x))
    norm = M.get_normalization(model4_pretrained)
    np.testing.assert_allclose(z, (x / 255 - np.float32(norm["mean"])) / np.float32(norm["std"]), rtol=1e-5, atol=1e-5)
    folded = np.stack([z[..., 0] + z[..., 3], z[..., 1], z[..., 2]], axis=-1)
    stem3 = twin.get_layer("stem_conv")(twin.get_layer("stem_conv_pad")(folded))
    np.testing.assert_allclose(stem4, 0.75 * keras.ops.convert_to_numpy(stem3), rtol=1e-4, atol=1e-4)


def test_repeated_rgb_input_gives_rgb_features(rgb_weights):
    """timm's check: a 6-channel model fed (RGB, RGB) matches the 3-channel model fed RGB."""
    path, _ = rgb_weights
    rgb_norm = {"mean": list(M.IMAGENET_MEAN), "std": list(M.IMAGENET_STD)}
    m3 = M.build_model("efficientnet_b0", SIZE, channels=3, weights=path, normalization=rgb_norm)
    m6 = M.build_model("efficientnet_b0", SIZE, channels=6, weights=path,
                       normalization={k: v * 2 for k, v in rgb_norm.items()})
    x = _rng_images(2, 3, seed=4)
    f3 = keras.Model(m3.input, m3.get_layer("avg_pool").output)(x)
    f6 = keras.Model(m6.input, m6.get_layer("avg_pool").output)(np.concatenate([x, x], axis=-1))
    f3, f6 = keras.ops.convert_to_numpy(f3), keras.ops.convert_to_numpy(f6)
    assert np.std(f3) > 1e-3  # features are not trivially constant
    np.testing.assert_allclose(f6, f3, rtol=1e-3, atol=1e-4)


def test_weights_from_a_keras_model_file(tmp_path, rgb_weights):
    path, twin = rgb_weights
    source = M.build_model("efficientnet_b0", SIZE, channels=3, weights=path)
    keras_path = str(tmp_path / "rgb.keras")
    M.save_model(source, keras_path)
    model = M.build_model("efficientnet_b0", SIZE, channels=4, weights=keras_path)
    got = M.backbone_layer(model).get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(got, M.adapt_input_conv(twin.get_layer("stem_conv").get_weights()[0], 4))
    np.testing.assert_array_equal(M.backbone_layer(model).get_layer("top_conv").get_weights()[0],
                                  twin.get_layer("top_conv").get_weights()[0])


def test_weights_from_a_legacy_h5_file(tmp_path, rgb_weights):
    """The format of keras.applications' own ``*_notop.h5`` downloads (the offline route)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    _, twin = rgb_weights
    h5_path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(h5_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, twin)
    model = M.build_model("efficientnet_b0", SIZE, channels=4, weights=h5_path)
    backbone = M.backbone_layer(model)
    for name in ("stem_bn", "block4a_dwconv", "top_conv", "top_bn"):
        for got, want in zip(backbone.get_layer(name).get_weights(), twin.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0],
                                  M.adapt_input_conv(twin.get_layer("stem_conv").get_weights()[0], 4))


def test_bad_weights_raise_clear_errors(tmp_path, rgb_weights, monkeypatch):
    path, _ = rgb_weights
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        M.build_model("efficientnet_b0", SIZE, weights=str(tmp_path / "nope.weights.h5"))
    with pytest.raises(ValueError, match=r"b0_notop.weights.h5.*efficientnet_b1") as err:
        M.build_model("efficientnet_b1", SIZE, weights=path)
    assert len(str(err.value)) < 800  # Keras' own message embeds whole tensors

    from keras.src.utils import file_utils  # where keras.applications fetches from

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match=r"ImageNet weights of efficientnet_b0.*Offline\?.*weights="):
        M.build_model("efficientnet_b0", SIZE, weights="imagenet")


# ----------------------------------------------------------------------------- config, save, load


def test_model_config_describes_the_model(model4):
    crop = CropSpec(size=96, margin=0.0, mask_neighbors=True)
    config = M.model_config(model4, crop=crop, run="unit")
    assert config["backbone"] == "efficientnet_b0"
    assert (config["image_size"], config["channels"], config["num_classes"]) == (SIZE, 4, 19)
    assert config["channel_letters"] == "rgby" and config["channel_names"] == ["red", "green", "blue", "yellow"]
    assert config["class_names"] == list(CLASS_NAMES)
    assert config["normalization"] == M.get_normalization(model4)
    assert config["run"] == "unit"
    spec = M.ModelSpec.from_config(json.loads(json.dumps(config)))
    assert spec == M.ModelSpec("efficientnet_b0", SIZE, "rgby", crop, 19)
    with pytest.raises(ValueError, match="would replace"):
        M.model_config(model4, backbone="resnet")
    with pytest.raises(ValueError, match="3 channel letters"):
        M.model_config(model4, channels="rgb")


def test_one_writer_for_every_backbone(tmp_path):
    """tiny_cnn is described by the same function as the EfficientNets (read from the model)."""
    from hpa_tf.backbones import build_classifier

    tiny = build_classifier("tiny_cnn", 32, 2, augment={"seed": 1})
    config = M.model_config(tiny, crop=CropSpec(size=40), channels="gy")
    assert (config["backbone"], config["image_size"], config["channels"], config["channel_letters"]) == (
        "tiny_cnn", 32, 2, "gy")
    assert config["normalization"] == M.get_normalization(tiny) and config["augment"]["seed"] == 1
    assert set(config) == set(M.model_config(build_classifier("efficientnet_b0", 32, 2), channels="gy"))
    json_path = M.save_model(tiny, tmp_path / "tiny.keras", crop=CropSpec(size=40), channels="gy")
    assert json.loads(open(json_path).read()) == config


def test_save_load_round_trip_gives_identical_predictions(model4, tmp_path):
    path = tmp_path / "model.keras"
    json_path = M.save_model(model4, path, crop=CropSpec(size=64), run="unit")
    assert json_path == str(tmp_path / "model.json")
    loaded, config = M.load_model(path)
    assert config == M.model_config(model4, crop=CropSpec(size=64), run="unit")
    assert M.get_normalization(loaded) == M.get_normalization(model4)
    x = _rng_images(4, 4, seed=5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)),
                                  keras.ops.convert_to_numpy(model4(x, training=False)))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_load_model_errors(model4, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        M.load_model(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.keras"):
        M.load_model(junk)
    path = tmp_path / "m.keras"
    M.save_model(model4, path)
    (tmp_path / "m.json").write_text(json.dumps({"image_size": 64, "channels": 4}))
    with pytest.raises(ValueError, match=r"m.json says input"):
        M.load_model(path)


def _as_if_from_a_newer_keras(src, dst) -> None:
    """A copy of a ``.keras`` file whose initializers carry a setting this Keras does not know, as a newer Keras
    writes them (Keras 3.15's ``input_axes`` stops Keras 3.8)."""
    import zipfile

    def mark(node):
        if isinstance(node, dict):
            if node.get("module") == "keras.initializers" and isinstance(node.get("config"), dict):
                node["config"]["setting_of_a_newer_keras"] = None
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                mark(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def test_a_model_from_a_newer_keras_is_rebuilt_from_model_json(tmp_path, caplog):
    from hpa_tf.backbones import build_classifier

    keras.utils.set_random_seed(3)
    tiny = build_classifier("tiny_cnn", SIZE, 3, augment={"seed": 2})
    M.save_model(tiny, tmp_path / "saved.keras", crop=CropSpec(size=40), channels="gby")
    _as_if_from_a_newer_keras(tmp_path / "saved.keras", tmp_path / "newer.keras")
    (tmp_path / "newer.json").write_text((tmp_path / "saved.json").read_text())
    with pytest.raises(Exception, match="setting_of_a_newer_keras"):
        keras.saving.load_model(tmp_path / "newer.keras", compile=False)  # this Keras cannot read it whole
    with caplog.at_level("WARNING", logger="hpa_tf.model"):
        loaded, config = M.load_model(tmp_path / "newer.keras")
    assert "rebuilt from its model.json" in caplog.text and config["channel_letters"] == "gby"
    x = _rng_images(3, 3, seed=7)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)),
                                  keras.ops.convert_to_numpy(tiny(x, training=False)))
    # a model.json that does not describe the file: one clear error
    wrong = json.loads((tmp_path / "saved.json").read_text())
    (tmp_path / "newer.json").write_text(json.dumps({**wrong, "channels": 4, "channel_letters": "rgby"}))
    with pytest.raises(ValueError, match=r"newer.keras.*nor rebuild it from its model.json"):
        M.load_model(tmp_path / "newer.keras")
