"""The one label table of the project: the 19 HPA single-cell classes.

Label strings are the competition's ``"0|5|16"`` form. ``parse_labels`` turns one into a
sorted list of unique class ids; ``multi_hot`` and ``format_labels`` go the other way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES: int = len(CLASS_NAMES)
NEGATIVE: int = 18

#: Short names for plots and tables (same order as CLASS_NAMES).
SHORT_NAMES: tuple[str, ...] = (
    "Nucleopl", "NucMemb", "Nucleoli", "FibCtr", "Speckles", "NucBodies", "ER", "Golgi",
    "IntFil", "Actin", "Microtub", "Spindle", "Centros", "PlasMemb", "Mito", "Aggres",
    "Cytosol", "Vesicles", "Negative",
)


class LabelError(ValueError):
    """A label string that is malformed or names an unknown class."""


def parse_labels(text: str, where: str | None = None) -> list[int]:
    """Parse a ``"0|5|16"`` label string into sorted unique class ids.

    Parameters
    ----------
    text : the label string; ids separated by ``|`` (surrounding spaces allowed).
    where : a description of the source (e.g. ``"train.csv line 12"``) used in errors.

    Raises
    ------
    LabelError : empty string, non-integer token, or an id outside 0..18.
    """
    at = f" ({where})" if where else ""
    if text is None or not str(text).strip():
        raise LabelError(f"empty label string{at}")
    ids: set[int] = set()
    for token in str(text).split("|"):
        token = token.strip()
        if not token.isdigit():
            raise LabelError(f"malformed label {token!r} in {text!r}{at}: expected integers 0..18 separated by '|'")
        value = int(token)
        if value >= NUM_CLASSES:
            raise LabelError(f"unknown label {value} in {text!r}{at}: classes are 0..{NUM_CLASSES - 1}")
        ids.add(value)
    return sorted(ids)


def format_labels(ids: Iterable[int]) -> str:
    """Format class ids as a ``"0|5|16"`` string (sorted, unique)."""
    ids = sorted({int(i) for i in ids})
    for i in ids:
        if not 0 <= i < NUM_CLASSES:
            raise LabelError(f"unknown label {i}: classes are 0..{NUM_CLASSES - 1}")
    return "|".join(str(i) for i in ids)


def multi_hot(ids: Iterable[int] | str, dtype=np.float32) -> np.ndarray:
    """``(19,)`` multi-hot vector from class ids or a label string."""
    if isinstance(ids, str):
        ids = parse_labels(ids)
    vec = np.zeros(NUM_CLASSES, dtype=dtype)
    for i in ids:
        if not 0 <= int(i) < NUM_CLASSES:
            raise LabelError(f"unknown label {i}: classes are 0..{NUM_CLASSES - 1}")
        vec[int(i)] = 1
    return vec


def from_multi_hot(vec: Sequence[float] | np.ndarray, threshold: float = 0.5) -> list[int]:
    """Class ids whose entry is at least ``threshold``."""
    vec = np.asarray(vec)
    if vec.shape != (NUM_CLASSES,):
        raise LabelError(f"expected a ({NUM_CLASSES},) vector, got shape {vec.shape}")
    return [int(i) for i in np.flatnonzero(vec >= threshold)]
