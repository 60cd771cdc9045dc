"""Cross-validation folds per image, by multilabel iterative stratification.

All cells of an image share its fold (no image leaks between training and validation). Folds
come from ``iterstrat.ml_stratifiers.MultilabelStratifiedKFold`` (Sechidis et al. 2011) with
``shuffle=True`` and the given seed, over the images sorted by ID, so the assignment depends
only on the set of (ID, labels) pairs, ``n_folds`` and ``seed`` — not on the input order.

``folds.csv`` has the columns ``ID,fold`` (``write_folds_csv`` / ``read_folds_csv``).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from hpa_tf import fileutil
from hpa_tf.labels import NUM_CLASSES, multi_hot


def _label_matrix(image_ids: Sequence[str], labels: Mapping[str, Sequence[int]] | np.ndarray) -> np.ndarray:
    """(N, 19) uint8 multi-hot rows in the order of ``image_ids``."""
    if isinstance(labels, Mapping):
        missing = [i for i in image_ids if i not in labels]
        if missing:
            raise ValueError(f"no labels for {len(missing)} image(s), e.g. {missing[:3]}")
        return np.stack([multi_hot(labels[i], dtype=np.uint8) for i in image_ids]) if image_ids else np.zeros(
            (0, NUM_CLASSES), np.uint8
        )
    y = np.asarray(labels)
    if y.ndim != 2 or y.shape[0] != len(image_ids):
        raise ValueError(f"multi-hot labels must be ({len(image_ids)}, C), got shape {y.shape}")
    return (y > 0.5).astype(np.uint8)


def assign_folds(
    image_ids: Sequence[str],
    labels: Mapping[str, Sequence[int]] | np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, int]:
    """Assign each image to one of ``n_folds`` folds, stratified over its labels.

    Parameters
    ----------
    image_ids : N unique image IDs (any order; the result does not depend on it).
    labels : ``{ID: [class ids]}`` (extra keys are ignored), or an (N, C) multi-hot array whose
        rows follow ``image_ids``.
    n_folds : number of folds (>= 1; 1 puts every image in fold 0).
    seed : seed of the stratifier's shuffle.

    Returns
    -------
    ``{ID: fold}`` with folds ``0..n_folds-1``.

    Raises
    ------
    ValueError : duplicate IDs, missing labels, ``n_folds < 1``, or fewer images than folds.
    """
    ids = [str(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate image ID(s) {dup[:5]}")
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    y = _label_matrix(ids, labels)
    if n_folds == 1:
        return dict.fromkeys(sorted(ids), 0)
    if len(ids) < n_folds:
        raise ValueError(f"cannot split {len(ids)} image(s) into {n_folds} folds: need at least one image per fold")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    sorted_ids = [ids[k] for k in order]
    y = y[order]

    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # here: keeps `import hpa_tf.folds` light

    kfold = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    for fold, (_, test_idx) in enumerate(kfold.split(np.zeros((len(sorted_ids), 1)), y)):
        for k in test_idx:
            folds[sorted_ids[k]] = fold
    return {i: folds[i] for i in sorted_ids}


def fold_counts(folds: Mapping[str, int], labels: Mapping[str, Sequence[int]], n_folds: int) -> np.ndarray:
    """(n_folds, 19) int64: images per fold that carry each class."""
    counts = np.zeros((n_folds, NUM_CLASSES), np.int64)
    for image_id, fold in folds.items():
        for c in labels[image_id]:
            counts[fold, int(c)] += 1
    return counts


def write_folds_csv(path: str | os.PathLike, folds: Mapping[str, int]) -> None:
    """Write ``ID,fold`` rows (sorted by ID) atomically; ``path`` may be local or ``gs://``."""
    with fileutil.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "fold"])
        for image_id in sorted(folds):
            w.writerow([image_id, int(folds[image_id])])


def read_folds_csv(path: str | os.PathLike) -> dict[str, int]:
    """Read a ``folds.csv`` written by ``write_folds_csv`` into ``{ID: fold}``."""
    rows: dict[str, int] = {}
    fileutil.raise_csv_field_size_limit()
    with fileutil.open_read(path, "r", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ID", "fold"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns ID,fold, got {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            try:
                rows[row["ID"]] = int(row["fold"])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {line_no}: fold must be an integer, got {row.get('fold')!r}") from None
    return rows
