"""Training augmentation: the one implementation of the 8 symmetries of the square (``dihedral``),
the per-example host ops that ``hpa_tf.data`` maps over ``tf.data``, and the on-device Keras layer
``RandomAugment``. Their settings and the defaults: ``hpa_tf.config.AugmentConfig`` (one place).

Transforms (all label-preserving for cell crops): a random one of the 8 symmetries of the square
(flips + 90° rotations), a per-channel gain ``1 ± contrast`` and offset ``± brightness × 255``
(clipped to 0..255), and, on the host only, a random square sub-crop (``scale``) before the resize.

Host (``augment_geometry``, ``augment_intensity``, ``random_scale_crop``): per example inside
``tf.data``, with stateless random numbers from a (2,) seed, so a map function gives the same result
eagerly and inside ``tf.data`` for the same seed.

Device (:class:`RandomAugment`): a layer right after a model's ``Input``
(``build_model(..., augment={...})``) that transforms each example of a batch of float32 0..255
images ``(B, S, S, C)`` inside the training step, on the accelerator instead of a CPU core. With
``training`` False/None (``model.predict``, ``model(x, training=False)``) it is the identity, so a
saved model predicts exactly as one built without it. Random numbers come from ``keras.random``
with a ``keras.random.SeedGenerator`` (a state variable stepped every call: works under
``tf.function``, XLA and ``tf.distribute``). Under a multi-replica strategy each replica takes its
own slice of one draw, so replicas never share transforms.

Keras' own ``RandomFlip``/``RandomRotation``/``RandomBrightness``/``RandomContrast`` do not fit:
rotation interpolates arbitrary angles (not exact 90° turns), brightness is one offset per image,
and contrast stretches around the image mean instead of a per-channel gain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hpa_tf.config import DEFAULT_AUGMENT, AugmentConfig

#: The 8 symmetries of a square (dihedral group D4), indexed by bits (see :func:`dihedral`): 4
#: transposes first, then 1 flips left-right and 2 flips up-down. 0-3: flips only; (0, 5, 3, 6):
#: the four rotations.
D4_ALL = tuple(range(8))
D4_FLIPS = (0, 1, 2, 3)
D4_ROTATIONS = (0, 5, 3, 6)


def d4_choices(flip: bool, rotate90: bool) -> tuple[int, ...]:
    """The D4 indices drawn from: all 8 with both, the flips or the rotations with one, ``()`` with none."""
    if flip and rotate90:
        return D4_ALL
    return D4_FLIPS if flip else D4_ROTATIONS if rotate90 else ()


#: Settings :func:`augment_settings` accepts (and ``model.json`` records), with their defaults.
DEFAULTS: dict[str, Any] = {**{k: v for k, v in asdict(DEFAULT_AUGMENT).items() if k != "scale"}, "seed": None}


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
    checked = AugmentConfig(flip=bool(out["flip"]), rotate90=bool(out["rotate90"]),
                            brightness=float(out["brightness"]), contrast=float(out["contrast"]))
    return {**{k: v for k, v in asdict(checked).items() if k != "scale"},
            "seed": None if out["seed"] is None else int(out["seed"])}


# ---------------------------------------------------------------------------------------------
# the 8 symmetries of the square
# ---------------------------------------------------------------------------------------------


def dihedral(x: tf.Tensor, index: int | tf.Tensor, spatial_axes: tuple[int, int] = (0, 1), bits: int = 7) -> tf.Tensor:
    """Symmetry ``index`` (0..7) of the square: bit 4 transposes the two spatial axes first, then bit
    1 reverses the second spatial axis (left-right) and bit 2 the first (up-down).

    ``index`` is a Python int (one transform of ``x``, as one transpose and/or one reverse) or an
    integer tensor of shape (B,), one index per example of a batch ``x`` whose axis 0 is the batch
    (then ``spatial_axes`` are e.g. ``(1, 2)``; each step is selected per example with ``tf.where``,
    and steps whose bit is not in ``bits`` are skipped). Square inputs when transposing.
    """
    h, w = spatial_axes
    rank = x.shape.rank
    perm = list(range(rank))
    perm[h], perm[w] = perm[w], perm[h]
    if isinstance(index, (int, np.integer)):
        if index & 4:
            x = tf.transpose(x, perm)
        axes = [a for a, bit in ((w, 1), (h, 2)) if index & bit]
        return tf.reverse(x, axes) if axes else x
    index = tf.cast(index, tf.int32)

    def has(bit: int) -> tf.Tensor:
        return tf.reshape(tf.not_equal(tf.bitwise.bitwise_and(index, bit), 0), [-1] + [1] * (rank - 1))

    if bits & 4:
        x = tf.where(has(4), tf.transpose(x, perm), x)
    if bits & 1:
        x = tf.where(has(1), tf.reverse(x, [w]), x)
    if bits & 2:
        x = tf.where(has(2), tf.reverse(x, [h]), x)
    return x


# ---------------------------------------------------------------------------------------------
# host: per example inside tf.data (stateless, seeded)
# ---------------------------------------------------------------------------------------------


def uniform(seed: tf.Tensor, n: int | tf.Tensor) -> tf.Tensor:
    """(n,) float32 uniform in [0, 1) from a (2,) integer seed (stateless: same seed, same values)."""
    return tf.random.stateless_uniform([n], tf.cast(seed, tf.int64))


def scale_crop(image: tf.Tensor, u: tf.Tensor, scale: tuple[float, float]) -> tf.Tensor:
    """Square sub-crop of side ``scale[0] + u[0] × (scale[1] - scale[0])`` of the side, at offsets u[1], u[2]."""
    size = tf.shape(image)[0]
    frac = scale[0] + u[0] * (scale[1] - scale[0])
    side = tf.clip_by_value(tf.cast(tf.round(frac * tf.cast(size, tf.float32)), tf.int32), 1, size)
    room = tf.cast(size - side + 1, tf.float32)
    y0 = tf.minimum(tf.cast(u[1] * room, tf.int32), size - side)
    x0 = tf.minimum(tf.cast(u[2] * room, tf.int32), size - side)
    return image[y0:y0 + side, x0:x0 + side]


def random_scale_crop(image: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float]) -> tf.Tensor:
    """A random square sub-crop of side ``U(scale) × S`` of an (S, S, C) image (shape becomes dynamic)."""
    return scale_crop(image, uniform(seed, 3), scale)


def geometry(image: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """The symmetry ``d4_choices(...)[floor(u × n)]`` of a square (S, S, C) image; shape kept.

    A (S, S, 4) uint8 crop is moved as (S, S) uint32 pixels (bitcast): 3-4x faster on CPU.
    """
    choices = d4_choices(config.flip, config.rotate90)
    if not choices:
        return image
    shape = image.shape
    packed = image.dtype == tf.uint8 and shape.rank == 3 and shape[-1] == 4
    work = tf.bitcast(image, tf.uint32) if packed else image
    k = tf.minimum(tf.cast(u * len(choices), tf.int32), len(choices) - 1)
    out = tf.switch_case(k, [lambda i=i: dihedral(work, i) for i in choices])
    if packed:
        out = tf.bitcast(out, tf.uint8)
    return tf.ensure_shape(out, shape)


def augment_geometry(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Random flips and 90° rotations of a square (S, S, C) image (any dtype); shape kept.

    With both enabled, one of the 8 symmetries of the square, uniformly (= random left-right and
    up-down flips then a random multiple of 90°), applied as one transpose and/or one reverse.
    """
    return geometry(image, uniform(seed, 1)[0], config)


def intensity(image: tf.Tensor, u: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Per-channel gain and offset of an (S, S, C) float32 image from ``2C`` uniforms ``u``."""
    if not config.brightness and not config.contrast:
        return image
    shape = tf.shape(image)
    u = tf.reshape(u, [2, -1]) * 2.0 - 1.0
    gain, offset = 1.0 + config.contrast * u[0], (config.brightness * 255.0) * u[1]
    # on (S, S·C) rows against the gains tiled S times: TensorFlow's CPU kernels broadcast a long
    # row far faster than a C-vector (3x here)
    rows = tf.reshape(image, [shape[0], -1])
    out = tf.clip_by_value(rows * tf.tile(gain, [shape[1]]) + tf.tile(offset, [shape[1]]), 0.0, 255.0)
    return tf.ensure_shape(tf.reshape(out, shape), image.shape)


def augment_intensity(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Per-channel gain (1 ± contrast) and offset (± brightness × 255) of an (S, S, C) float32 0..255
    image, clipped to 0..255."""
    c = image.shape[-1] if image.shape[-1] is not None else tf.shape(image)[-1]
    return intensity(image, uniform(seed, 2 * c), config)


# ---------------------------------------------------------------------------------------------
# device: a Keras layer in the training step
# ---------------------------------------------------------------------------------------------


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

    def __init__(self, flip: bool = DEFAULT_AUGMENT.flip, rotate90: bool = DEFAULT_AUGMENT.rotate90,
                 brightness: float = DEFAULT_AUGMENT.brightness, contrast: float = DEFAULT_AUGMENT.contrast,
                 seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        settings = augment_settings({"flip": flip, "rotate90": rotate90, "brightness": brightness,
                                     "contrast": contrast, "seed": seed})
        self.flip, self.rotate90 = settings["flip"], settings["rotate90"]
        self.brightness, self.contrast, self.seed = settings["brightness"], settings["contrast"], settings["seed"]
        try:
            self.seed_generator = keras.random.SeedGenerator(seed, name="augment_seed")
        except ValueError:  # Keras 3.0 takes no name
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    @property
    def choices(self) -> tuple[int, ...]:
        """The D4 indices drawn from (``()`` when geometry is off)."""
        return d4_choices(self.flip, self.rotate90)

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
        """Per example the D4 symmetry ``choices[floor(u × n)]`` (:func:`dihedral` over the batch)."""
        choices = self.choices
        n = len(choices)
        k = tf.minimum(tf.cast(u * n, tf.int32), n - 1)
        index = tf.gather(tf.constant(choices, tf.int32), k)
        bits = 0
        for i in choices:
            bits |= i
        return dihedral(x, index, spatial_axes=(1, 2), bits=bits)

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
