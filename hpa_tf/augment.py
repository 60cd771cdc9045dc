"""On-device training augmentation: a Keras layer that runs inside the training step.

:class:`RandomAugment` sits right after a model's ``Input`` (``build_model(..., augment={...})``)
and, per example of a batch of float32 0..255 images ``(B, S, S, C)``, applies a random one of the
8 symmetries of the square (flips + 90° rotations) and a per-channel gain ``1 ± contrast`` and
offset ``± brightness × 255``, clipped to 0..255 — the same transforms as the host path
(``hpa_tf.data.AugmentConfig``), but batched on the accelerator instead of per example on a CPU
core. With ``training`` False/None (``model.predict``, ``model(x, training=False)``) it is the
identity, so a saved model predicts exactly as one built without it.

Random numbers come from ``keras.random`` with a ``keras.random.SeedGenerator`` (a state variable
stepped every call: works under ``tf.function``, XLA and ``tf.distribute``). Under a multi-replica
strategy each replica takes its own slice of one draw, so replicas never share transforms.

Keras' own ``RandomFlip``/``RandomRotation``/``RandomBrightness``/``RandomContrast`` do not fit:
rotation interpolates arbitrary angles (not exact 90° turns), brightness is one offset per image,
and contrast stretches around the image mean instead of a per-channel gain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

#: The 8 symmetries of a square, indexed as in ``hpa_tf.data``: bit 2 transposes first, then bit 0
#: flips left-right and bit 1 flips up-down. 0-3: flips only; (0, 5, 3, 6): the four rotations.
D4_ALL = tuple(range(8))
D4_FLIPS = (0, 1, 2, 3)
D4_ROTATIONS = (0, 5, 3, 6)

#: Settings :func:`augment_settings` accepts (and ``model.json`` records), with their defaults.
DEFAULTS: dict[str, Any] = {"flip": True, "rotate90": True, "brightness": 0.05, "contrast": 0.1, "seed": None}


def augment_settings(augment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Checked, complete settings for :class:`RandomAugment` from a partial dict (None stays None).

    Raises
    ------
    ValueError
        An unknown key, or brightness/contrast outside [0, 1).
    """
    if augment is None:
        return None
    unknown = set(augment) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown augment settings {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **augment}
    out["flip"], out["rotate90"] = bool(out["flip"]), bool(out["rotate90"])
    for key in ("brightness", "contrast"):
        out[key] = float(out[key])
        if not 0.0 <= out[key] < 1.0:
            raise ValueError(f"augment {key} must be in [0, 1), got {augment[key]!r}")
    out["seed"] = None if out["seed"] is None else int(out["seed"])
    return out


def _replica() -> tuple[int, Any]:
    """(number of replicas, this replica's index) of the current ``tf.distribute`` context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context (e.g. building under strategy.scope())
        return 1, 0
    return int(ctx.num_replicas_in_sync), ctx.replica_id_in_sync_group


@keras.saving.register_keras_serializable(package="hpa_tf")
class RandomAugment(keras.layers.Layer):
    """Training-only per-example D4 symmetry + per-channel intensity jitter of ``(B, S, S, C)`` float32 0..255.

    Parameters
    ----------
    flip
        Random left-right and up-down flips.
    rotate90
        Random multiple of 90° (needs square inputs). With ``flip`` too: one of the 8 symmetries,
        uniformly; with one of them: one of 4.
    brightness
        Per-channel offset drawn uniformly from ``± brightness × 255``.
    contrast
        Per-channel gain drawn uniformly from ``1 ± contrast``.
    seed
        Seed of the layer's ``SeedGenerator`` (None: random).

    The output is clipped to 0..255 when brightness or contrast is on; geometry alone moves pixels
    exactly. Computes in float32 whatever the global mixed-precision policy.
    """

    def __init__(self, flip: bool = True, rotate90: bool = True, brightness: float = 0.05, contrast: float = 0.1,
                 seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        settings = augment_settings({"flip": flip, "rotate90": rotate90, "brightness": brightness,
                                     "contrast": contrast, "seed": seed})
        self.flip, self.rotate90 = settings["flip"], settings["rotate90"]
        self.brightness, self.contrast, self.seed = settings["brightness"], settings["contrast"], settings["seed"]
        self.seed_generator = keras.random.SeedGenerator(seed, name="augment_seed")
        self.supports_masking = True

    @property
    def choices(self) -> tuple[int, ...]:
        """The D4 indices drawn from (``()`` when geometry is off)."""
        if self.flip and self.rotate90:
            return D4_ALL
        return D4_FLIPS if self.flip else D4_ROTATIONS if self.rotate90 else ()

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 4:
            raise ValueError(f"{self.name}: expected (B, H, W, C) images, got shape {input_shape}")
        h, w = input_shape[1], input_shape[2]
        if self.rotate90 and h is not None and w is not None and h != w:
            raise ValueError(f"{self.name}: 90° rotations need square images, got {h}x{w}")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or (not self.choices and not self.brightness and not self.contrast):
            return inputs
        x = keras.ops.cast(inputs, "float32")
        shape = keras.ops.shape(x)
        batch, channels = shape[0], x.shape[-1] if x.shape[-1] is not None else shape[-1]
        replicas, replica = _replica()
        # one draw for all replicas, each takes its slice: replicas get different transforms
        u = keras.random.uniform((replicas, batch, 1 + 2 * channels), seed=self.seed_generator)[replica]
        if self.choices:
            x = self._geometry(x, u[:, 0])
        if self.brightness or self.contrast:
            u = keras.ops.reshape(u[:, 1:] * 2.0 - 1.0, (batch, 1, 1, 2, channels))
            gain = 1.0 + self.contrast * u[..., 0, :]
            offset = (self.brightness * 255.0) * u[..., 1, :]
            x = keras.ops.clip(x * gain + offset, 0.0, 255.0)
        return x

    def _geometry(self, x: Any, u: Any) -> Any:
        """Per example the D4 symmetry ``choices[floor(u × n)]``; selected over the batch with ``where``."""
        n = len(self.choices)
        k = keras.ops.minimum(keras.ops.cast(u * n, "int32"), n - 1)
        index = keras.ops.take(keras.ops.convert_to_tensor(self.choices, dtype="int32"), k)

        def bit(b: int) -> Any:
            return keras.ops.reshape(keras.ops.not_equal(keras.ops.bitwise_and(index, b), 0), (-1, 1, 1, 1))

        if any(i & 4 for i in self.choices):
            x = keras.ops.where(bit(4), keras.ops.transpose(x, (0, 2, 1, 3)), x)
        if any(i & 1 for i in self.choices):
            x = keras.ops.where(bit(1), keras.ops.flip(x, axis=2), x)
        if any(i & 2 for i in self.choices):
            x = keras.ops.where(bit(2), keras.ops.flip(x, axis=1), x)
        return x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "flip": self.flip, "rotate90": self.rotate90,
                "brightness": self.brightness, "contrast": self.contrast, "seed": self.seed}


def find_augment(model: keras.Model) -> RandomAugment | None:
    """The model's :class:`RandomAugment` layer (top level), or None."""
    found = [layer for layer in model.layers if isinstance(layer, RandomAugment)]
    return found[0] if found else None


def model_augment_settings(model: keras.Model) -> dict[str, Any] | None:
    """The augment settings of a model (as ``build_model(augment=...)`` takes them), None without the layer."""
    layer = find_augment(model)
    if layer is None:
        return None
    return {"flip": layer.flip, "rotate90": layer.rotate90, "brightness": layer.brightness,
            "contrast": layer.contrast, "seed": layer.seed}
