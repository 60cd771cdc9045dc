"""The cell classifier: a Keras EfficientNet backbone, global average pooling, dropout, 19 sigmoids.

Input is float32 pixels on the 0..255 scale (uint8 crops cast to float), NHWC with ``channels``
channels (RGBY = 4 by default). The per-channel normalisation lives inside the model and is
explicit (:func:`default_normalization`, :func:`get_normalization`)::

    y[..., c] = (x[..., c] * scale - mean[c]) / std[c],   scale = 1/255

Normalisation in Keras 3 EfficientNets (read from keras/src/applications, Keras 3.15):

* V1 (B0..B7) always starts with ``Rescaling(1/255)`` and an *adaptive* ``Normalization`` layer
  whose mean/variance are weights (zeros/ones = identity when ``weights=None``, any channel
  count; set them, then call ``finalize_state()``, or the layer keeps computing with the old
  values). With ``weights="imagenet"`` the file holds variance = ImageNet *std* (not std**2),
  so Keras adds a third ``Rescaling(1/sqrt(std))`` layer only in that case (Keras' comment,
  tensorflow#49930): a V1 built with ``weights=None`` that then loads the ImageNet file
  divides by sqrt(std) instead of std (about 2x too small an input).
* V2 has ``include_preprocessing``; for the B0..B3 variants with exactly 3 channels it is
  ImageNet mean/std, otherwise (4 channels, or S/M/L) silently ``x/128 - 1``.

Here both families get the same treatment: V1 keeps its ``Rescaling`` + ``Normalization`` layers
and we *set* the Normalization weights to our stats; V2 is built with
``include_preprocessing=False`` and the same two layers are put in front. Weights loaded from a
3-channel file never bring their normalisation along (see :func:`load_backbone_weights`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import keras
import numpy as np

from hpa_tf import fileutil
from hpa_tf.augment import RandomAugment, augment_settings, model_augment_settings
from hpa_tf.crops import CropSpec
from hpa_tf.io import channel_indices
from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES

logger = logging.getLogger(__name__)

#: Canonical backbone name -> ``keras.applications`` constructor name.
BACKBONES: dict[str, str] = {
    **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)},
    **{f"efficientnet_v2_b{i}": f"EfficientNetV2B{i}" for i in range(4)},
    "efficientnet_v2_s": "EfficientNetV2S",
    "efficientnet_v2_m": "EfficientNetV2M",
    "efficientnet_v2_l": "EfficientNetV2L",
}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PIXEL_SCALE: float = 1.0 / 255.0
STEM_CONV = "stem_conv"
CONFIG_FORMAT = "hpa_tf.model"
#: 2: the crop spec is one ``crop`` entry (``hpa_tf.crops.CropSpec``).
CONFIG_VERSION = 2
#: Channel letter → name.
LETTER_NAMES: dict[str, str] = {"r": "red", "g": "green", "b": "blue", "y": "yellow"}


class LoadedModel(NamedTuple):
    """A model read by :func:`load_model` and its ``model.json`` (``None`` when absent)."""

    model: keras.Model
    config: dict[str, Any] | None


# --------------------------------------------------------------------------- names


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


_BY_SQUASHED = {_squash(k): k for k in BACKBONES} | {_squash(v): k for k, v in BACKBONES.items()}


def resolve_backbone(name: str) -> str:
    """Canonical backbone name (``"efficientnet_b0"``) for a spelling such as ``"EfficientNetB0"``,
    ``"efficientnetv2-s"`` or ``"efficientnet_v2_s"``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    key = _squash(str(name))
    if key not in _BY_SQUASHED:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return _BY_SQUASHED[key]


def _is_v2(canonical: str) -> bool:
    return canonical.startswith("efficientnet_v2_")


def _constructor(canonical: str):
    return getattr(keras.applications, BACKBONES[canonical])


# --------------------------------------------------------------------------- normalisation


def default_normalization(backbone: str = "efficientnet_b0", channels: int = 4) -> dict[str, Any]:
    """The per-channel normalisation the backbone's ImageNet weights expect, extended to ``channels``.

    * V1 (B0..B7) and V2-B0..B3: ImageNet RGB mean/std for channels 0..2; any further channel
      (yellow) and a single channel get the mean of the RGB stats (mean 0.449, std 0.226), so
      an RGB-like extra channel lands on the same scale as the others.
    * V2-S/M/L: Keras' ``x / 128 - 1`` for every channel (mean = std = 128/255).

    Returns
    -------
    dict
        ``{"scale": 1/255, "mean": [C floats], "std": [C floats], "formula": ...}``.
    """
    canonical = resolve_backbone(backbone)
    _check_channels(channels)
    if canonical in ("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"):
        mean = std = [128.0 / 255.0] * channels
    else:
        extra_mean, extra_std = float(np.mean(IMAGENET_MEAN)), float(np.mean(IMAGENET_STD))
        mean = [IMAGENET_MEAN[c] if c < 3 and channels > 1 else extra_mean for c in range(channels)]
        std = [IMAGENET_STD[c] if c < 3 and channels > 1 else extra_std for c in range(channels)]
    return _normalization_dict(mean, std)


def _normalization_dict(mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    return {
        "scale": PIXEL_SCALE,
        "mean": [round(float(m), 7) for m in mean],
        "std": [round(float(s), 7) for s in std],
        "formula": "y[..., c] = (x[..., c] * scale - mean[c]) / std[c], x float32 on the 0..255 scale",
    }


def _check_normalization(norm: Mapping[str, Any], channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(norm.get("mean", ()), dtype=np.float64)
    std = np.asarray(norm.get("std", ()), dtype=np.float64)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"normalization needs {channels} 'mean' and 'std' values, got mean={mean.tolist()} "
                         f"std={std.tolist()}")
    if not np.all(std > 0):
        raise ValueError(f"normalization std must be > 0, got {std.tolist()}")
    scale = float(norm.get("scale", PIXEL_SCALE))
    if not math.isclose(scale, PIXEL_SCALE, rel_tol=1e-6):
        raise ValueError(f"normalization scale is fixed at 1/255 (input on the 0..255 scale), got {scale}")
    return mean, std


def _normalization_layer(model: keras.Model) -> keras.layers.Normalization:
    """The input Normalization layer: in the V1 backbone, or in front of a V2 backbone."""
    found = [layer for layer in _walk_layers(model) if isinstance(layer, keras.layers.Normalization)]
    if len(found) != 1:
        raise ValueError(f"model {model.name!r} has {len(found)} Normalization layers, expected 1")
    return found[0]


def _walk_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


def set_normalization(model: keras.Model, normalization: Mapping[str, Any]) -> None:
    """Write ``normalization`` (``{"mean": [...], "std": [...]}``) into the model's input layer."""
    layer = _normalization_layer(model)
    channels = int(layer.adapt_mean.shape[-1])
    mean, std = _check_normalization(normalization, channels)
    layer.adapt_mean.assign(mean.astype(np.float32))
    layer.adapt_variance.assign((std**2).astype(np.float32))
    layer.finalize_state()  # the layer computes from tensors snapshotted here, not from the variables


def get_normalization(model: keras.Model) -> dict[str, Any]:
    """The normalisation a built or loaded model applies (same form as :func:`default_normalization`)."""
    layer = _normalization_layer(model)
    if layer.input_mean is not None:  # constant-stat layer (not built by this module)
        mean = np.ravel(layer.input_mean)
        std = np.sqrt(np.ravel(layer.input_variance))
    else:
        mean = keras.ops.convert_to_numpy(layer.adapt_mean)
        std = np.sqrt(keras.ops.convert_to_numpy(layer.adapt_variance).astype(np.float64))
    scales = [lay.scale for lay in _walk_layers(model) if isinstance(lay, keras.layers.Rescaling)]
    if len(scales) != 1 or not math.isclose(float(scales[0]), PIXEL_SCALE):
        raise ValueError(f"model {model.name!r}: expected one Rescaling(1/255) layer, found scales {scales}")
    return _normalization_dict(mean, std)


# --------------------------------------------------------------------------- build


def _check_channels(channels: int) -> None:
    if not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")


def _make_backbone(canonical: str, image_size: int, channels: int, weights: str | None = None) -> keras.Model:
    """A ``keras.applications`` backbone without top; V2 without its built-in preprocessing.

    Keras' own model name is kept (``efficientnetb0``, ``efficientnetv2-s``): V2 looks its block
    arguments up by that name, and :func:`resolve_backbone` maps it back to ours.
    """
    kwargs: dict[str, Any] = {"include_top": False, "weights": weights, "input_shape": (image_size, image_size, channels)}
    if _is_v2(canonical):
        kwargs["include_preprocessing"] = weights == "imagenet" and channels == 3
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        return _constructor(canonical)(**kwargs)


def build_model(
    backbone: str = "efficientnet_b0",
    image_size: int = 256,
    channels: int = 4,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.2,
    num_classes: int = NUM_CLASSES,
    normalization: Mapping[str, Any] | None = None,
    augment: Mapping[str, Any] | None = None,
) -> keras.Model:
    """EfficientNet classifier: ``(B, S, S, C)`` float32 0..255 -> ``(B, num_classes)`` float32 sigmoid.

    Call it inside ``strategy.scope()`` when training distributed. Layers follow the global
    mixed-precision policy; the output ``Dense`` is float32 so scores stay float32.

    Parameters
    ----------
    backbone
        A name from :data:`BACKBONES` (``efficientnet_b0``..``b7``, ``efficientnet_v2_b0``..``b3``,
        ``efficientnet_v2_s/m/l``) or Keras' spelling (``EfficientNetB0``).
    image_size
        Side ``S`` of the square input in pixels (>= 32).
    channels
        Input channels ``C`` (4 = RGBY; 1 and 3 also work).
    weights
        ``None`` (random init), ``"imagenet"`` (downloaded by Keras, needs the internet or
        Keras' cache), or a path to 3-channel (or ``C``-channel) weights of the same backbone:
        ``.weights.h5``/``.h5`` without top, or a ``.keras`` model containing the backbone.
        See :func:`load_backbone_weights`.
    dropout
        Dropout rate before the classifier.
    num_classes
        Number of sigmoid outputs.
    normalization
        ``{"mean": [C], "std": [C]}`` on the 0..1 scale; default :func:`default_normalization`.
    augment
        None, or settings of an on-device training augmentation block placed right after the
        input (:func:`augment_block`): ``{"flip", "rotate90", "brightness", "contrast", "seed"}``,
        missing keys default as in :data:`hpa_tf.augment.DEFAULTS`. Identity at inference.

    Raises
    ------
    ValueError
        Unknown backbone, bad sizes, or a weights file that does not fit.
    FileNotFoundError
        ``weights`` is a path that does not exist.
    """
    canonical = resolve_backbone(backbone)
    _check_channels(channels)
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    norm = dict(normalization) if normalization is not None else default_normalization(canonical, channels)
    _check_normalization(norm, channels)

    inputs = keras.Input((image_size, image_size, channels), dtype="float32", name="image")
    x = augment_block(inputs, augment)
    if _is_v2(canonical):  # V1 carries the same two layers inside the backbone
        x = keras.layers.Rescaling(PIXEL_SCALE, name="pixel_rescaling")(x)
        x = keras.layers.Normalization(axis=-1, name="pixel_normalization")(x)
    x = _make_backbone(canonical, image_size, channels)(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(float(dropout), name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", dtype="float32", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=f"hpa_{canonical}")
    set_normalization(model, norm)
    if weights is not None:
        load_backbone_weights(model, weights)
    logger.info("built %s: %dx%dx%d -> %d, weights=%s, %.2fM params", canonical, image_size, image_size,
                channels, num_classes, weights, model.count_params() / 1e6)
    return model


def augment_block(inputs: Any, augment: Mapping[str, Any] | None) -> Any:
    """``inputs`` through a :class:`hpa_tf.augment.RandomAugment` layer named ``augment`` (None: unchanged).

    The one place models get their on-device augmentation (``build_model`` and ``hpa_tf.backbones``).
    """
    settings = augment_settings(augment)
    if settings is None:
        return inputs
    return RandomAugment(**settings, name="augment")(inputs)


def backbone_layer(model: keras.Model) -> keras.Model:
    """The nested EfficientNet of a model from :func:`build_model` (e.g. to freeze it)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _squash(layer.name) in _BY_SQUASHED:
            return layer
    raise ValueError(f"model {model.name!r} has no nested EfficientNet backbone")


# --------------------------------------------------------------------------- pretrained weights


def adapt_input_conv(kernel: np.ndarray, in_chans: int) -> np.ndarray:
    """A 3-channel stem kernel made ``in_chans``-channel, as timm's ``adapt_input_conv``.

    Parameters
    ----------
    kernel
        ``(kH, kW, 3, Cout)`` Keras conv kernel (already ``in_chans`` channels: returned as is).
    in_chans
        Wanted input channels ``N``.

    Returns
    -------
    np.ndarray
        ``(kH, kW, N, Cout)``, same dtype: for ``N == 1`` the sum over the RGB kernels; for
        ``N > 3`` ``W'[:, :, c] = W[:, :, c % 3] * 3 / N`` (so an input whose channels repeat
        the RGB image ``N/3`` times gives the RGB response).
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"expected a (kH, kW, Cin, Cout) conv kernel, got shape {kernel.shape}")
    _check_channels(in_chans)
    cin = kernel.shape[2]
    if cin == in_chans:
        return kernel.copy()
    if cin != 3:
        raise ValueError(f"can only adapt a 3-channel stem kernel, got {cin} input channels for {in_chans}")
    if in_chans == 1:
        return kernel.sum(axis=2, keepdims=True, dtype=kernel.dtype)
    repeats = math.ceil(in_chans / 3)
    adapted = np.tile(kernel, (1, 1, repeats, 1))[:, :, :in_chans, :]
    return (adapted * np.asarray(3.0 / in_chans, dtype=kernel.dtype)).astype(kernel.dtype)


def _find_backbone(model: keras.Model) -> keras.Model | None:
    """``model`` itself if it is an EfficientNet (has ``stem_conv``), else a nested one."""
    names = {layer.name for layer in model.layers}
    if STEM_CONV in names:
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found = _find_backbone(layer)
            if found is not None:
                return found
    return None


def _source_backbone(canonical: str, image_size: int, weights: str | os.PathLike) -> keras.Model:
    """A backbone holding the pretrained weights (3-channel unless the file says otherwise)."""
    if weights == "imagenet":
        try:
            return _make_backbone(canonical, image_size, 3, weights="imagenet")
        except Exception as err:  # noqa: BLE001 - keras' get_file raises a bare Exception when offline
            raise RuntimeError(
                f"could not get the ImageNet weights of {canonical} ({BACKBONES[canonical]}): {_brief(err)}. Offline? "
                "Download the '*_notop.h5' file of keras.applications elsewhere (it lands in ~/.keras/models/) "
                "and pass its path as weights=..."
            ) from None
    path = os.fspath(weights)
    if not fileutil.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist (expected 'imagenet', None or a local file)")
    if path.endswith(".keras"):
        try:
            loaded = keras.saving.load_model(path, compile=False)
        except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read weights from {path}: {_brief(err)}") from None
        source = _find_backbone(loaded)
        if source is None:
            raise ValueError(f"{path} contains no EfficientNet backbone (no layer named {STEM_CONV!r})")
        return source
    twin = _make_backbone(canonical, image_size, 3)
    problem = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            twin.load_weights(path)
        except (ValueError, OSError, KeyError, TypeError) as err:
            problem = _brief(err)
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message) or "not be loaded" in str(w.message)]
    if problem is None and skipped:  # Keras loaded part of the file and kept fresh weights elsewhere
        problem = f"{len(skipped)} parts skipped, e.g. {skipped[0][:200]}"
    if problem is not None:
        raise ValueError(f"cannot load {path} into a 3-channel {canonical} without top "
                         f"({BACKBONES[canonical]}(include_top=False)): {problem}")
    return twin


def _innermost(err: BaseException, limit: int = 200) -> str:
    """The innermost cause Keras' deserialisation errors carry (their last 'Exception encountered:' line)."""
    causes = [ln.split(":", 1)[1].strip() for ln in str(err).splitlines() if ln.startswith("Exception encountered:")]
    return causes[-1][:limit] if causes and causes[-1] else _brief(err, limit)


def _brief(err: BaseException, limit: int = 300) -> str:
    """First line of an error message, cut to ``limit`` characters (Keras embeds whole tensors)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def copy_backbone_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy weights layer by layer (matched by name); the stem conv goes through :func:`adapt_input_conv`.

    Normalization layers are skipped: the target keeps its explicit normalisation.
    """
    in_chans = int(target.get_layer(STEM_CONV).kernel.shape[2])
    src_layers = {
        layer.name: layer for layer in source.layers
        if layer.weights and not isinstance(layer, keras.layers.Normalization)
    }
    copied = 0
    for layer in target.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        src = src_layers.pop(layer.name, None)
        if src is None:
            raise ValueError(f"source backbone {source.name!r} has no layer {layer.name!r}; is it a {target.name}?")
        values = src.get_weights()
        if layer.name == STEM_CONV:
            values[0] = adapt_input_conv(values[0], in_chans)
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            raise ValueError(f"layer {layer.name!r}: source shapes {[v.shape for v in values]} != target {shapes}; "
                             f"is the source a {target.name} without top?")
        layer.set_weights(values)
        copied += 1
    if src_layers:
        raise ValueError(f"source backbone {source.name!r} has layers the target lacks: {sorted(src_layers)[:5]}")
    logger.debug("copied %d layers from %s into %s", copied, source.name, target.name)


def load_backbone_weights(model: keras.Model, weights: str | os.PathLike) -> None:
    """Load pretrained backbone weights into a model from :func:`build_model`, in place.

    A backbone of the same architecture is built with 3 input channels (or read from the
    ``.keras`` file), the weights are loaded into it, and every layer is copied into
    ``model``'s backbone; the stem conv is adapted to the model's channel count. The source's
    input normalisation is *not* copied (the Keras ImageNet file stores std as variance); the
    model keeps its explicit normalisation. The head is left as initialised.
    """
    target = backbone_layer(model)
    canonical = resolve_backbone(target.name)
    image_size = int(target.input_shape[1])
    source = _source_backbone(canonical, image_size, weights)
    copy_backbone_weights(source, target)
    logger.info("loaded %s backbone weights from %s (stem %d -> %d channels)", canonical, weights,
                int(source.get_layer(STEM_CONV).kernel.shape[2]), int(target.get_layer(STEM_CONV).kernel.shape[2]))


# --------------------------------------------------------------------------- config, save, load


def model_backbone(model: keras.Model) -> str:
    """The backbone name of a classifier from :func:`build_model` or ``hpa_tf.backbones``.

    Both name their models ``hpa_<backbone>`` (``hpa_efficientnet_b0``, ``hpa_tiny_cnn``); a model
    named otherwise is recognised by its nested EfficientNet.
    """
    if model.name.startswith("hpa_"):
        name = model.name[len("hpa_"):]
        return resolve_backbone(name) if _squash(name) in _BY_SQUASHED else name
    return resolve_backbone(backbone_layer(model).name)


def default_channels(n: int) -> str:
    """The channel letters of an ``n``-channel model when not given: ``rgby`` (4) or ``rgb`` (3)."""
    if n not in (3, 4):
        raise ValueError(f"a {n}-channel model needs its channel letters (e.g. channels='gy')")
    return "rgby"[:n]


def model_config(
    model: keras.Model,
    crop: CropSpec | None = None,
    channels: str | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    **extra: Any,
) -> dict[str, Any]:
    """The description that goes into ``model.json`` beside the ``.keras`` file: THE one writer of it,
    for every backbone (EfficientNets and ``tiny_cnn``).

    Everything about the network is read from ``model`` itself (backbone, input size, channel count,
    normalisation, on-device augmentation, outputs), so the description cannot disagree with it.

    Parameters
    ----------
    model : a classifier from :func:`build_model` or ``hpa_tf.backbones.build_classifier``.
    crop : the crop spec of the shard set it was trained on (``hpa_tf.crops.CropSpec``), recorded
        as ``crop`` (None: recorded as null, and the predictor refuses the model).
    channels : the input's channel letters, e.g. ``rgby``, ``gy`` (default: ``default_channels``).
    class_names : one per output.
    extra : added as is (e.g. ``training``, ``val_metrics``); may not replace a described key.

    Keys: ``format``, ``format_version``, ``backbone``, ``image_size``, ``channels`` (count),
    ``channel_letters``, ``channel_names``, ``input``, ``normalization``, ``augment``, ``num_classes``,
    ``class_names``, ``activation``, ``crop``, ``keras_version``, then ``extra``.
    """
    _, image_size, width, n_channels = model.input_shape
    if image_size != width:
        raise ValueError(f"model {model.name!r} takes {image_size}x{width} inputs; classifiers take squares")
    letters = default_channels(int(n_channels)) if channels is None else str(channels).lower()
    if len(channel_indices(letters)) != n_channels:
        raise ValueError(f"{len(letters)} channel letters {letters!r} for a {n_channels}-channel model")
    num_classes = int(model.output_shape[-1])
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} outputs")
    if crop is not None and not isinstance(crop, CropSpec):
        raise TypeError(f"crop must be a hpa_tf.crops.CropSpec, got {type(crop).__name__}")
    config = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "backbone": model_backbone(model),
        "image_size": int(image_size),
        "channels": int(n_channels),
        "channel_letters": letters,
        "channel_names": [LETTER_NAMES[c] for c in letters],
        "input": {"dtype": "float32", "range": [0, 255], "layout": "NHWC"},
        "normalization": get_normalization(model),
        "augment": model_augment_settings(model),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "activation": "sigmoid",
        "crop": None if crop is None else crop.to_dict(),
        "keras_version": keras.__version__,
    }
    clash = sorted(set(extra) & set(config))
    if clash:
        raise ValueError(f"extra keys {clash} would replace the model's own description")
    config.update(extra)
    return config


class ModelConfigError(ValueError):
    """A ``model.json`` that lacks what the predictor needs (the message names the file)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a predictor needs from ``model.json``, read strictly (no key is filled in by a default).

    Attributes
    ----------
    backbone : e.g. ``efficientnet_b0``, ``tiny_cnn``.
    image_size : model input side in pixels.
    channels : the input's channel letters, e.g. ``rgby``.
    crop : the crop spec the model was trained on: how to crop cells for it.
    num_classes : outputs.
    """

    backbone: str
    image_size: int
    channels: str
    crop: CropSpec
    num_classes: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "model.json") -> ModelSpec:
        """Read a :func:`model_config` dict. Raises ``ModelConfigError`` naming ``where``."""
        if not isinstance(config, Mapping):
            raise ModelConfigError(f"{where}: not a JSON object")
        missing = [k for k in ("backbone", "image_size", "channel_letters", "crop", "num_classes") if k not in config]
        if missing:
            raise ModelConfigError(f"{where}: lacks {missing} (not written by hpa_tf.model.model_config?)")
        if config["crop"] is None:
            raise ModelConfigError(f"{where}: no crop spec (the model was saved without one): cannot crop cells for it")
        try:
            crop = CropSpec.from_dict(config["crop"], where=f"{where} 'crop'")
            letters = str(config["channel_letters"])
            channel_indices(letters)
            return cls(str(config["backbone"]), int(config["image_size"]), letters, crop, int(config["num_classes"]))
        except (ValueError, TypeError) as e:
            raise ModelConfigError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None


def config_path(model_path: str | os.PathLike) -> str:
    """``.../name.keras`` -> ``.../name.json`` (so ``model.keras`` pairs with ``model.json``)."""
    path = os.fspath(model_path)
    return (path[: -len(".keras")] if path.endswith(".keras") else path) + ".json"


def write_config(json_path: str | os.PathLike, config: Mapping[str, Any]) -> str:
    """Write a :func:`model_config` description as JSON, atomically; returns the path."""
    fileutil.write_json(json_path, dict(config), indent=2)
    return os.fspath(json_path)


def save_model(model: keras.Model, path: str | os.PathLike, crop: CropSpec | None = None, channels: str | None = None,
               **extra: Any) -> str:
    """Write ``model`` to ``path`` (``.keras``) and ``model_config(model, crop, channels, **extra)`` to
    :func:`config_path`, each atomically. Returns the JSON path.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"model path must end with .keras, got {path}")
    config = model_config(model, crop=crop, channels=channels, **extra)
    parent = os.path.dirname(path)
    if parent:
        fileutil.makedirs(parent)
    with fileutil.atomic_path(path) as tmp:
        model.save(tmp)
    return write_config(config_path(path), config)


def load_model(path: str | os.PathLike, compile: bool = False) -> LoadedModel:
    """Read a ``.keras`` model and its sibling config (``name.json``, else ``model.json``).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a readable Keras model, or the config disagrees with the model's input.
    """
    path = os.fspath(path)
    if not fileutil.exists(path):
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.endswith(".keras") and not fileutil.is_remote(path) and not zipfile.is_zipfile(path):
        # Keras says "File not found" for a file that is there but is not a .keras (zip) archive
        raise ValueError(f"cannot load Keras model {path}: not a .keras model file (not a zip archive; "
                         f"{os.path.getsize(path)} bytes)")
    json_path = find_config(path)
    config = _read_config(json_path) if json_path is not None else None
    try:
        model = keras.saving.load_model(path, compile=compile)
    except zipfile.BadZipFile as err:
        raise ValueError(f"cannot load Keras model {path}: {_brief(err)}") from None
    except (ValueError, OSError, KeyError, TypeError) as err:
        if config is None:
            raise ValueError(f"cannot load Keras model {path}: {_brief(err)}") from None
        model = rebuild_model(path, config, err)
    if json_path is not None:
        _check_config(model, config, json_path, path)
    else:
        logger.warning("no config beside %s (looked for %s)", path, " and ".join(config_candidates(path)))
    return LoadedModel(model, config)


def rebuild_model(path: str, config: Mapping[str, Any], err: BaseException | None = None) -> keras.Model:
    """The classifier that ``config`` (its ``model.json``) describes, built by this Keras, with the weights of
    the ``.keras`` file at ``path``.

    For a file this Keras cannot read whole: a model saved by a newer Keras writes settings an older one
    does not know (Keras 3.15's initializers carry ``input_axes``, which Keras 3.8 refuses), as when a
    model trained on a TPU VM is used in a Kaggle image with an older Keras. The weights are stored by
    layer structure, which the same builder reproduces. Raises ValueError naming the file when they do
    not fit.
    """
    from hpa_tf.backbones import build_classifier

    why = f" ({_innermost(err)})" if err is not None else ""
    try:
        model = build_classifier(str(config["backbone"]), int(config["image_size"]), int(config["channels"]),
                                 normalization=config.get("normalization"), augment=config.get("augment"))
        model.load_weights(path)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"cannot load Keras model {path}{why}, nor rebuild it from its model.json and load its "
                         f"weights: {_brief(e)}") from None
    logger.warning("%s: saved by Keras %s, not readable whole by Keras %s%s; rebuilt from its model.json and "
                   "loaded its weights", path, config.get("keras_version", "?"), keras.__version__, why)
    return model


def config_candidates(model_path: str | os.PathLike) -> list[str]:
    """Where a model's description is looked for, in order: ``name.json`` (``save_model``), then
    ``model.json`` in the same folder (a training run's)."""
    path = os.fspath(model_path)
    return [config_path(path), fileutil.join(os.path.dirname(path) or ".", "model.json")]


def find_config(model_path: str | os.PathLike) -> str | None:
    """The description :func:`load_model` reads for ``model_path`` (first of :func:`config_candidates`
    that exists), or None."""
    for json_path in config_candidates(model_path):
        if fileutil.exists(json_path):
            return json_path
    return None


def _read_config(json_path: str) -> dict[str, Any]:
    try:
        config = fileutil.read_json(json_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read model config {json_path}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model config {json_path} is not a JSON object")
    return config


def _check_config(model: keras.Model, config: Mapping[str, Any], json_path: str, model_path: str = "the model") -> None:
    shape = model.input_shape
    want = (config.get("image_size"), config.get("image_size"), config.get("channels"))
    if tuple(shape[1:]) != want:
        raise ValueError(f"{json_path} says input {want} (image_size, image_size, channels) but {model_path} takes "
                         f"{tuple(shape[1:])}: the description is not this model's")
    if "num_classes" in config and int(model.output_shape[-1]) != config["num_classes"]:
        raise ValueError(f"{json_path} says {config['num_classes']} classes but {model_path} has "
                         f"{model.output_shape[-1]} outputs: the description is not this model's")
