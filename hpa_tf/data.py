"""The training input pipeline: TFRecord shards of cell crops → batches of (image, multi-hot labels).

Which shards, their counts and their crop spec come from ``hpa_tf.shardset`` (``split_folds``);
``make_dataset`` turns shard paths and an ``InputConfig`` into a ``tf.data.Dataset``:

training   files (shuffled) → interleave → [sources] → [repeat-factor and source-weight resampling]
           → shuffle → repeat → map
           (parse, decode, channels, augment, resize, float32 0..255) → batch(drop_remainder) → prefetch
           elements ``(images (B, S, S, C) float32, labels (B, 19) float32)``
evaluation files → interleave (deterministic) → [sources] → map → batch → pad the last batch → prefetch
           elements ``(images, labels, weights (B,) float32)``: padded rows have weight 0, so that
           TPUs see static shapes and metrics ignore the padding (big_vision's pad-and-mask)

Pixels stay on the 0..255 scale: the model normalises its own input. Random augmentation
(``hpa_tf.augment``) uses stateless ops seeded per example from ``tf.data.Dataset.random``, so a
map function gives the same result eagerly and inside ``tf.data`` for the same seed (tested), and
every epoch differs. Class balance: ``hpa_tf.balance``.

Sources: every record carries where its field came from (``source``: ``train`` for the
competition's fields, ``hpa-public`` for the downloaded ones, …). ``InputConfig.sources`` keeps
only the records of those sources (training and evaluation; ``hpa_tf.shardset.split_folds``
counts them from the manifest the same way); ``InputConfig.source_weights`` draws a training
record of a weighted source that many times on average (0.5: every other one, 2: twice; 1 for
sources not named), on top of the class balance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hpa_tf.augment import AugmentConfig, geometry, intensity, scale_crop, uniform
from hpa_tf.balance import example_repeat
from hpa_tf.io import channel_indices as io_channel_indices
from hpa_tf.labels import NUM_CLASSES
from hpa_tf.records import CHANNELS, FEATURE_SPEC, decode_image, labels_to_multi_hot
from hpa_tf.shardset import DataError

AUTOTUNE = tf.data.AUTOTUNE
#: Channel letters in the order they are stored in a crop.
CHANNEL_ORDER: str = "rgby"
#: Read buffer per open shard (bytes); large reads matter on GCS.
READ_BUFFER: int = 4 << 20


@dataclass(frozen=True)
class InputConfig:
    """How stored crops become model inputs (``make_dataset``); the same for training and evaluation.

    Attributes
    ----------
    crop_size : S of the stored crops (``FoldSplit.crop.size``): static shapes.
    image_size : model input side in pixels (crops are resized when it differs).
    batch_size : GLOBAL batch size (``per_replica × replicas``).
    channels : which planes, e.g. ``rgby``, ``g``, ``rgb``.
    augment : host (tf.data) augmentation when training (None: none; never when evaluating).
    balance : (19,) per-class repeat factors (``hpa_tf.balance.repeat_factors``) when training.
    sources : keep only the records of these sources (None: all), in training and evaluation.
    source_weights : ``((source, weight), …)``: a training record of that source is drawn
        ``weight`` times on average (stochastic rounding; 0 leaves it out); others once.
    shuffle_buffer : examples (still encoded: ~S² × 4 × 0.4 bytes each) in the shuffle buffer.
    seed : seeds file order, shuffling, augmentation and resampling (None: random).
    cycle_length : shards read in parallel.
    """

    crop_size: int
    image_size: int
    batch_size: int
    channels: str = CHANNEL_ORDER
    augment: AugmentConfig | None = None
    balance: tuple[float, ...] | None = None
    sources: tuple[str, ...] | None = None
    source_weights: tuple[tuple[str, float], ...] = ()
    shuffle_buffer: int = 1024
    seed: int | None = None
    cycle_length: int = 16

    def __post_init__(self) -> None:
        if min(self.batch_size, self.image_size, self.crop_size) < 1:
            raise DataError(f"batch_size, image_size and crop_size must be >= 1, got {self.batch_size}, "
                            f"{self.image_size}, {self.crop_size}")
        channel_indices(self.channels)  # validate early
        if self.balance is not None:
            factors = tuple(float(f) for f in np.asarray(self.balance, dtype=np.float64).ravel())
            if len(factors) != NUM_CLASSES or np.asarray(self.balance).ndim != 1:
                raise DataError(f"balance needs ({NUM_CLASSES},) per-class repeat factors, got {np.shape(self.balance)}")
            object.__setattr__(self, "balance", factors)
        if self.sources is not None:
            sources = tuple(dict.fromkeys(str(x) for x in self.sources))
            if not sources:
                raise DataError("sources: an empty list keeps no record (None keeps all)")
            object.__setattr__(self, "sources", sources)
        pairs = tuple((str(k), float(v)) for k, v in dict(self.source_weights).items())
        bad = [f"{k}={v}" for k, v in pairs if not (v >= 0.0 and math.isfinite(v))]
        if bad:
            raise DataError(f"source weights must be finite and >= 0, got {bad}")
        object.__setattr__(self, "source_weights", pairs)


# ---------------------------------------------------------------------------------------------
# map functions (each works eagerly and inside tf.data.Dataset.map)
# ---------------------------------------------------------------------------------------------


def channel_indices(channels: str) -> list[int]:
    """Indices into the stored RGBY planes for a channel string such as ``rgby``, ``g``, ``rgb``, ``gy``
    (``hpa_tf.io.channel_indices``, the one letter → plane map shared with prediction).

    Raises
    ------
    DataError : an empty string, a letter outside r, g, b, y, or a repeated letter.
    """
    try:
        return io_channel_indices(str(channels))
    except ValueError as exc:
        raise DataError(str(exc)) from None


def select_channels(image: tf.Tensor, channels: str = CHANNEL_ORDER) -> tf.Tensor:
    """(S, S, 4) RGBY → (S, S, len(channels)) in the order of ``channels``."""
    idx = channel_indices(channels)
    if idx == list(range(CHANNELS)):
        return image
    return tf.gather(image, idx, axis=-1)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """(h, w, C) or a batch (B, h, w, C), any dtype → (…, size, size, C) float32 on the input's
    value scale: bilinear, antialiased when shrinking (or when the input size is unknown); a cast
    only when the size already matches. Training and prediction both resize with this function.

    Enlarging skips the antialias kernel: the same values (to 1e-4) at half the cost.
    """
    h, w = image.shape[-3], image.shape[-2]
    if h == size and w == size:
        return tf.cast(image, tf.float32)
    enlarging = h is not None and w is not None and h <= size and w <= size
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=not enlarging)
    return tf.ensure_shape(out, [*image.shape[:-3], size, size, image.shape[-1]])


def preprocess(
    example: dict[str, tf.Tensor],
    image_size: int,
    channels: str = CHANNEL_ORDER,
    augment: AugmentConfig | None = None,
    seed: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """A parsed example (``hpa_tf.records.parse_example``) → ``(image, labels)``.

    ``image`` is (image_size, image_size, len(channels)) float32 on the 0..255 scale (the model
    normalises); ``labels`` (19,) float32 multi-hot. ``augment`` needs ``seed``, a (2,) integer
    tensor: the same seed gives the same result eagerly and inside ``tf.data``.
    """
    image = example["image"]
    if augment is not None:
        if seed is None:
            raise ValueError("augment needs a (2,) seed tensor")
        c = len(channel_indices(channels))
        u = uniform(seed, 4 + 2 * c)  # one random draw per example: geometry, scale crop, intensity
        image = geometry(image, u[0], augment)  # on the stored RGBY uint8 crop: the fast path
        if augment.scale is not None:
            image = scale_crop(image, u[1:4], augment.scale)
    image = resize(select_channels(image, channels), image_size)
    if augment is not None:
        image = intensity(image, u[4:], augment)
    return image, example["labels"]


_IMAGE_LABELS_SPEC = {k: FEATURE_SPEC[k] for k in ("image", "encoding", "labels")}


def parse_image_labels(serialized: tf.Tensor, crop_size: int | None = None) -> dict[str, tf.Tensor]:
    """The lean parse of the training pipeline: ``{"image": (S, S, 4) uint8 RGBY, "labels": (19,) float32}``
    (``hpa_tf.records`` decoding; no mask, no provenance: less work per example than ``parse_example``)."""
    parsed = tf.io.parse_single_example(serialized, _IMAGE_LABELS_SPEC)
    image = decode_image(tf.sparse.to_dense(parsed["image"]), parsed["encoding"], crop_size)
    return {"image": image, "labels": labels_to_multi_hot(tf.sparse.to_dense(parsed["labels"]))}


def _label_only(serialized: tf.Tensor) -> tf.Tensor:
    parsed = tf.io.parse_single_example(serialized, {"labels": FEATURE_SPEC["labels"]})
    return labels_to_multi_hot(tf.sparse.to_dense(parsed["labels"]))


_LABELS_SOURCE_SPEC = {k: FEATURE_SPEC[k] for k in ("labels", "source")}


def _labels_source(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    parsed = tf.io.parse_single_example(serialized, _LABELS_SOURCE_SPEC)
    return labels_to_multi_hot(tf.sparse.to_dense(parsed["labels"])), parsed["source"]


def _source_filter(sources: Sequence[str]):
    """A ``Dataset.filter`` predicate: the record's source is one of ``sources``."""
    wanted = tf.constant(list(sources))

    def keep(serialized: tf.Tensor) -> tf.Tensor:
        parsed = tf.io.parse_single_example(serialized, {"source": FEATURE_SPEC["source"]})
        return tf.reduce_any(tf.equal(parsed["source"], wanted))

    return keep


def _source_weight(source: tf.Tensor, weights: Sequence[tuple[str, float]]) -> tf.Tensor:
    """float32 weight of a record's source (1 for sources not in ``weights``)."""
    weight = tf.constant(1.0, tf.float32)
    for name, value in weights:
        weight = tf.where(tf.equal(source, name), tf.constant(value, tf.float32), weight)
    return weight


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _records(shards: Sequence[str], training: bool, seed: int | None, cycle_length: int) -> tf.data.Dataset:
    """Serialized records of the shards, interleaved (shuffled files and free order when training)."""
    files = tf.data.Dataset.from_tensor_slices([str(s) for s in shards])
    if training:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)

    def read(path: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER)

    return files.interleave(
        read,
        cycle_length=max(1, min(cycle_length, len(shards))),
        num_parallel_calls=AUTOTUNE,
        deterministic=not training,
    )


def _pad_batch(batch_size: int):
    def pad(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        n = tf.shape(images)[0]
        extra = batch_size - n
        images = tf.pad(images, [[0, extra], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(labels, [[0, extra], [0, 0]])
        weights = tf.concat([tf.ones([n], tf.float32), tf.zeros([extra], tf.float32)], axis=0)
        return (
            tf.ensure_shape(images, [batch_size, *images.shape[1:]]),
            tf.ensure_shape(labels, [batch_size, NUM_CLASSES]),
            tf.ensure_shape(weights, [batch_size]),
        )

    return pad


def make_dataset(
    shards: Sequence[str],
    config: InputConfig,
    training: bool = True,
    n_examples: int | None = None,
    pad_last: bool = True,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of cell crops from TFRecord shards (local or ``gs://``).

    Parameters
    ----------
    shards : shard paths (``hpa_tf.shardset.split_folds``).
    config : crop and input sizes, batch, channels, augmentation, balance, seed (``InputConfig``).
    training : shuffle, repeat forever, augment, balance, ``drop_remainder=True``, free element
        order. Otherwise one deterministic pass, no augmentation, and the last batch padded.
    n_examples : evaluation only; the example count (manifest), asserted as the batch count.
    pad_last : evaluation only; pad the last batch to ``batch_size`` and yield ``(images, labels,
        weights)`` with weight 0 on padding; False: ``(images, labels)`` with a short last batch.

    Returns
    -------
    tf.data.Dataset of ``(images (B, S, S, C) float32 0..255, labels (B, 19) float32)`` when
    training, ``(images, labels, weights (B,))`` for evaluation with ``pad_last``.

    Raises
    ------
    DataError : no shards.
    """
    shards = [str(s) for s in shards]
    if not shards:
        raise DataError("empty shard list: nothing to read")
    augment = config.augment if training and config.augment is not None and config.augment.active else None
    rng = np.random.default_rng(config.seed)

    def new_seed() -> int | None:
        return int(rng.integers(0, 2**31 - 1)) if config.seed is not None else None

    # Order (why): interleave the files first (parallel reads); resample for balance BEFORE the
    # shuffle so that copies of one example spread over many batches; shuffle the still-encoded
    # records (4-10x smaller than decoded crops, so the buffer holds more examples); repeat after
    # the shuffle so that epochs do not blend (each pass reshuffles files and buffer); map
    # (parse, decode, augment, resize) in parallel after the repeat so the work never stalls at an
    # epoch boundary; batch with drop_remainder for static shapes (TPU); prefetch last to overlap
    # input with the training step.
    ds = _records(shards, training, new_seed(), config.cycle_length)
    if config.sources is not None:
        ds = ds.filter(_source_filter(config.sources))
    weighted = [(k, v) for k, v in config.source_weights if v != 1.0]
    if training and (config.balance is not None or weighted):
        factors_t = tf.constant(config.balance if config.balance is not None else [1.0] * NUM_CLASSES, tf.float32)
        draws = tf.data.Dataset.random(seed=new_seed(), rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws)

        def copies(serialized: tf.Tensor, draw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            seed_ = tf.stack([draw, tf.constant(7, tf.int64)])
            labels, source = _labels_source(serialized)
            return serialized, example_repeat(labels, factors_t, seed_, _source_weight(source, weighted))

        def emit(serialized: tf.Tensor, count: tf.Tensor) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensors(serialized).repeat(count)

        ds = ds.map(copies, num_parallel_calls=AUTOTUNE, deterministic=False).flat_map(emit)
    if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=new_seed(), reshuffle_each_iteration=True).repeat()

    crop_size, image_size, channels = config.crop_size, config.image_size, config.channels

    def train_map(serialized: tf.Tensor, draw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess(parse_image_labels(serialized, crop_size), image_size, channels, augment,
                          tf.stack([draw, tf.constant(11, tf.int64)]))

    def plain_map(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess(parse_image_labels(serialized, crop_size), image_size, channels)

    if augment is not None:
        draws = tf.data.Dataset.random(seed=new_seed(), rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws).map(train_map, num_parallel_calls=AUTOTUNE, deterministic=False)
    else:
        ds = ds.map(plain_map, num_parallel_calls=AUTOTUNE, deterministic=not training)
    if training:
        ds = ds.batch(config.batch_size, drop_remainder=True)
    else:
        ds = ds.batch(config.batch_size, drop_remainder=False)
        if pad_last:
            ds = ds.map(_pad_batch(config.batch_size))
        if n_examples is not None:  # known from the manifest: lets Keras see the end without a warning
            steps = steps_for(n_examples, config.batch_size, drop_remainder=False)
            ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = not training
    return ds.with_options(options)


#: Dataset ops that call back into Python: a TPU worker cannot run them (and they hold the GIL).
PYTHON_OPS: frozenset[str] = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


def dataset_ops(dataset: tf.data.Dataset) -> set[str]:
    """Names of every op in the graph of ``dataset``, map/filter/interleave functions included."""
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())  # noqa: SLF001 - tf.data's own graph
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def tpu_problems(dataset: tf.data.Dataset) -> list[str]:
    """Why ``dataset`` cannot feed a TPU (empty when it can): a dimension of an element that is not
    static (the batch dimension too: batch with ``drop_remainder=True``), or an op that calls Python
    (``tf.py_function``, ``tf.numpy_function``)."""
    problems = []
    for spec in tf.nest.flatten(dataset.element_spec):
        if not spec.shape.is_fully_defined():
            problems.append(f"element shape {spec.shape} is not static")
    python = sorted(dataset_ops(dataset) & PYTHON_OPS)
    if python:
        problems.append(f"Python ops in the pipeline: {', '.join(python)}")
    return problems


def eval_labels(shards: Sequence[str], cycle_length: int = 16, sources: Sequence[str] | None = None) -> np.ndarray:
    """(N, 19) float32 labels of every example (of ``sources``; None: all), in the order
    ``make_dataset(..., training=False)`` yields them (the same deterministic interleave; images are
    not decoded)."""
    ds = _records([str(s) for s in shards], False, None, cycle_length)
    if sources is not None:
        ds = ds.filter(_source_filter(sources))
    ds = ds.map(_label_only, num_parallel_calls=AUTOTUNE)
    chunks = [b.numpy() for b in ds.batch(8192)]
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, NUM_CLASSES), np.float32)


def steps_for(n_examples: int, global_batch: int, drop_remainder: bool = True) -> int:
    """Batches in one pass over ``n_examples``: floor (training) or ceil (evaluation, padded)."""
    if drop_remainder:
        return n_examples // global_batch
    return math.ceil(n_examples / global_batch)
