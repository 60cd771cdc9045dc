"""Class activation maps of the image-level (field) model, and the cell scores they give.

The field model (``train_tpu.py`` on a shard set of ``field`` records) is the classifier of
``hpa_tf.model``/``hpa_tf.backbones``: a backbone's last feature map ``F`` (h × w × D), global
average pooling (layer ``avg_pool``), dropout, and a Dense head (layer ``predictions``, weights
``W`` (D × 19), bias ``b``) with sigmoids. Pooling and the head are linear, so the image logit of
class k is the spatial mean of the class map

    ``M_k = F · W[:, k] + b_k``   (h × w; CAM, Zhou et al. 2016, without gradients)

and ``sigmoid(mean(M_k)) `` is the model's image probability exactly (dropout is off at inference).
``cam_model`` returns a Keras model with both outputs; ``cell_cam_scores`` averages each class map
inside each cell's mask, resized to the map's size by area, and applies the sigmoid:
``sigmoid(mean of M_k over the cell)``. A cell covering the whole field gets the image
probability; a cell whose region drives the class gets more than one that does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from hpa_tf.crops import find_cells

#: The layer whose input is the last feature map (before pooling) and the classifier head.
POOL_LAYER: str = "avg_pool"
HEAD_LAYER: str = "predictions"
MAPS_LAYER: str = "class_maps"


def cam_model(model: keras.Model) -> keras.Model:
    """A model with the field model's input and two outputs: image probabilities ``(B, 19)`` and
    class maps ``(B, h, w, 19)`` (logits at the last feature resolution, float32).

    The maps come from a Dense layer holding a copy of the head's weights applied to the feature map
    before pooling; the image probabilities are the field model's own output.

    Raises
    ------
    ValueError : the model has no ``avg_pool`` layer on a 4-D feature map or no Dense ``predictions`` head.
    """
    try:
        pool = model.get_layer(POOL_LAYER)
        head = model.get_layer(HEAD_LAYER)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no {POOL_LAYER!r} and {HEAD_LAYER!r} layers: not a classifier "
                         "of hpa_tf.model / hpa_tf.backbones") from None
    features = pool.input
    if len(features.shape) != 4 or not isinstance(head, keras.layers.Dense):
        raise ValueError(f"model {model.name!r}: {POOL_LAYER!r} must pool a (B, h, w, D) feature map into a Dense "
                         f"{HEAD_LAYER!r} head")
    dense = keras.layers.Dense(int(head.units), dtype="float32", name=MAPS_LAYER)
    maps = dense(features)
    dense.set_weights(head.get_weights())
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.outputs[0], maps], name=f"{model.name}_cam")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def cell_area_weights(cells: np.ndarray, map_shape: Sequence[int], cell_ids: Sequence[int] | np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(cell_ids (N,), weights (N, h * w))``: the pixels of each cell falling in each map cell.

    Each field pixel ``(y, x)`` of an ``H × W`` label image belongs to map cell
    ``(floor((y + 0.5) h / H), floor((x + 0.5) w / W))``; row ``i`` counts cell ``cell_ids[i]``'s pixels
    per map cell. This is the cell's mask resized to ``h × w`` by area (``cv2.INTER_AREA`` of the
    one-hot mask, up to a factor, when ``H/h`` and ``W/w`` are integers), computed for every cell at
    once with one ``bincount``. ``cell_ids`` default: every cell, ascending.
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"label image must be (H, W), got shape {cells.shape}")
    h, w = int(map_shape[0]), int(map_shape[1])
    height, width = cells.shape
    ids = find_cells(cells, cell_ids=cell_ids).cell_ids.astype(np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, h * w), np.float64)
    row = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    col = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    where = (row[:, None] * w + col[None, :]).ravel()
    lookup = np.full(int(cells.max()) + 1, -1, np.int64)
    lookup[ids] = np.arange(len(ids))
    index = lookup[cells.ravel()]
    keep = index >= 0
    counts = np.bincount(index[keep] * (h * w) + where[keep], minlength=len(ids) * h * w)
    return ids.astype(np.int32), counts.reshape(len(ids), h * w).astype(np.float64)


def cell_cam_scores(maps: np.ndarray, cells: np.ndarray, cell_ids: Sequence[int] | np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell CAM scores of one field: ``(cell_ids (N,), scores (N, K))`` in [0, 1].

    ``maps``: (h, w, K) class maps (logits) of the field (``cam_model``'s second output for it);
    ``cells``: the field's (H, W) label image at any resolution (the map covers the whole field).
    ``scores[i, k] = sigmoid(mean of maps[..., k] over cell i)``, the mean weighted by the cell's
    area in each map cell (``cell_area_weights``).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"class maps must be (h, w, K), got shape {maps.shape}")
    ids, weights = cell_area_weights(cells, maps.shape[:2], cell_ids)
    if len(ids) == 0:
        return ids, np.zeros((0, maps.shape[2]), np.float64)
    mean_logits = (weights @ maps.reshape(-1, maps.shape[2])) / weights.sum(axis=1, keepdims=True)
    return ids, sigmoid(mean_logits)
