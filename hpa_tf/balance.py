"""Class balance by repeat-factor sampling (LVIS, Gupta et al. 2019), for the training input.

A class of frequency ``f_c`` (fraction of training examples holding it) gets
``r_c = max(1, sqrt(t / f_c))``; an example is emitted ``r = max_c r_c`` times over its labels on
average (stochastic rounding), so Mitotic spindle, Aggresome and Negative cells come round more
often and nothing is dropped. ``hpa_tf.data.make_dataset`` applies it before the shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from hpa_tf.labels import NUM_CLASSES
from hpa_tf.shardset import DataError


def repeat_factors(class_counts: Sequence[int] | np.ndarray, n_examples: int, threshold: float = 0.05) -> np.ndarray:
    """(19,) float32 per-class repeat factors ``max(1, sqrt(threshold / f_c))``, ``f_c = count_c / n``.

    Classes at or above ``threshold`` frequency get 1; a class at ``threshold / 25`` gets 5.
    Absent classes get 1.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (NUM_CLASSES,):
        raise ValueError(f"class_counts must be ({NUM_CLASSES},), got {counts.shape}")
    if n_examples <= 0:
        raise DataError("cannot balance classes over zero examples")
    freq = counts / float(n_examples)
    with np.errstate(divide="ignore"):
        r = np.where(freq > 0, np.sqrt(threshold / np.maximum(freq, 1e-12)), 1.0)
    return np.maximum(r, 1.0).astype(np.float32)


def example_repeat(labels: tf.Tensor, factors: tf.Tensor, seed: tf.Tensor, scale: tf.Tensor | float = 1.0) -> tf.Tensor:
    """How many copies of an example to emit: ``max`` of its classes' factors times ``scale`` (the
    weight of its source; 0 drops it), stochastically rounded (expected value = factor × scale);
    int64 scalar. ``labels`` (19,) multi-hot; unlabelled → 1 × scale."""
    r = tf.maximum(tf.reduce_max(labels * factors), 1.0) * tf.cast(scale, tf.float32)
    base = tf.floor(r)
    extra = tf.cast(tf.random.stateless_uniform([], seed) < (r - base), tf.float32)
    return tf.cast(base + extra, tf.int64)
