"""Small non-EfficientNet classifiers for tests and quick CPU runs (``backbone="tiny_cnn"``).

They follow ``hpa_tf.model.build_model``'s contract: input ``(B, S, S, C)`` float32 on the 0..255
scale, one ``Rescaling(1/255)`` and one ``Normalization`` layer in front (so
``hpa_tf.model.get_normalization``/``set_normalization`` work on them), output ``(B, 19)`` float32
sigmoid, standard Keras layers only (a ``.keras`` file loads without custom objects), except the
optional on-device augmentation block (``augment=...``, ``hpa_tf.augment.RandomAugment``, registered
when ``hpa_tf.model`` is imported).
``build_classifier`` dispatches: a name here, else ``hpa_tf.model.build_model``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras

from hpa_tf import model as hpa_model
from hpa_tf.labels import NUM_CLASSES

log = logging.getLogger(__name__)

#: Backbones defined here (name → default stage widths).
TINY_BACKBONES: dict[str, tuple[int, ...]] = {"tiny_cnn": (16, 32, 64)}


def is_tiny(backbone: str) -> bool:
    """True for a backbone defined in this module."""
    return str(backbone).lower() in TINY_BACKBONES


def backbone_names() -> list[str]:
    """Every backbone name ``build_classifier`` takes (``hpa_tf.model.BACKBONES``, then these)."""
    return [*hpa_model.BACKBONES, *TINY_BACKBONES]


def check_backbone(backbone: str) -> str:
    """The canonical name of a backbone ``build_classifier`` takes (cheap: nothing is built).

    Raises ValueError for an unknown name, listing every valid one (``tiny_cnn`` included).
    """
    if is_tiny(backbone):
        return str(backbone).lower()
    try:
        return hpa_model.resolve_backbone(backbone)
    except ValueError:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(backbone_names())}") from None


def build_tiny_cnn(
    image_size: int = 64,
    channels: int = 4,
    dropout: float = 0.1,
    widths: Sequence[int] = TINY_BACKBONES["tiny_cnn"],
    num_classes: int = NUM_CLASSES,
    normalization: Mapping[str, Any] | None = None,
    augment: Mapping[str, Any] | None = None,
) -> keras.Model:
    """A small VGG-like conv net: per stage a stride-2 3×3 conv and a 3×3 conv (BN, ReLU), then
    global average pooling, dropout and ``num_classes`` float32 sigmoids.

    ``(B, S, S, C)`` float32 0..255 → ``(B, num_classes)``. About 70k parameters with the default widths.
    ``augment``: settings of an on-device training augmentation block after the input, as in
    ``hpa_tf.model.build_model`` (None: none).
    """
    norm = dict(normalization) if normalization is not None else hpa_model.default_normalization("efficientnet_b0", channels)
    inputs = keras.Input((image_size, image_size, channels), dtype="float32", name="image")
    x = hpa_model.augment_block(inputs, augment)
    x = keras.layers.Rescaling(hpa_model.PIXEL_SCALE, name="pixel_rescaling")(x)
    x = keras.layers.Normalization(axis=-1, name="pixel_normalization")(x)
    for i, width in enumerate(widths):
        for j, stride in enumerate((2, 1)):
            x = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i}_{j}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}_{j}")(x)
            x = keras.layers.ReLU(name=f"relu{i}_{j}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(float(dropout), name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", dtype="float32", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="hpa_tiny_cnn")
    hpa_model.set_normalization(model, norm)
    return model


def build_classifier(
    backbone: str,
    image_size: int,
    channels: int,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.2,
    normalization: Mapping[str, Any] | None = None,
    augment: Mapping[str, Any] | None = None,
) -> keras.Model:
    """``build_tiny_cnn`` for a name in ``TINY_BACKBONES``, else ``hpa_tf.model.build_model``."""
    check_backbone(backbone)
    if is_tiny(backbone):
        if weights is not None:
            raise ValueError(f"backbone {backbone!r} has no pretrained weights (got weights={weights!r})")
        return build_tiny_cnn(image_size, channels, dropout, TINY_BACKBONES[str(backbone).lower()],
                              normalization=normalization, augment=augment)
    return hpa_model.build_model(backbone, image_size=image_size, channels=channels, weights=weights, dropout=dropout,
                                 normalization=normalization, augment=augment)
