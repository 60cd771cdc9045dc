"""The one label table of the project: the 19 HPA single-cell classes.

Label strings are the competition's ``"0|5|16"`` form. ``parse_labels`` turns one into a
sorted list of unique class ids; ``multi_hot`` and ``format_labels`` go the other way.
``class_of_name`` and ``classes_of_names`` map the Human Protein Atlas's location names (as the
public HPA images are labelled) to the 19 classes.
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


#: HPA subcellular location names that are not one of the 19 class names but belong to a class,
#: as the competition's organisers grouped them for its public-HPA image list (its notebook
#: "HPA public data download", the ``all_locations`` table): focal adhesion sites count as actin
#: filaments, the centriolar satellite as the centrosome, cell junctions as the plasma membrane,
#: vesicle-like compartments as "Vesicles and punctate cytosolic patterns", no staining as Negative.
#: Names are compared case-insensitively with runs of spaces collapsed (``normalize_name``).
LOCATION_ALIASES: dict[str, int] = {
    "Focal adhesion sites": 9,
    "Centriolar satellite": 12,
    "Centriolar satellites": 12,
    "Cell Junctions": 13,
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    "Cytoplasmic bodies": 17,
    "No staining": 18,
    # British spelling of class 3
    "Nucleoli fibrillar centre": 3,
}


def normalize_name(name: str) -> str:
    """A location name folded for lookup: case-insensitive, runs of whitespace collapsed.

    >>> normalize_name("  Nucleoli   Fibrillar center ")
    'nucleoli fibrillar center'
    """
    return " ".join(str(name).split()).casefold()


_NAME_TO_CLASS: dict[str, int] = {normalize_name(n): i for i, n in enumerate(CLASS_NAMES)}
_NAME_TO_CLASS.update({normalize_name(n): i for n, i in LOCATION_ALIASES.items()})


def class_of_name(name: str) -> int | None:
    """Class id of an HPA location name or class name, ``None`` for a name outside the 19 classes.

    >>> class_of_name("Cytosol"), class_of_name("cell junctions"), class_of_name("Midbody")
    (16, 13, None)
    """
    return _NAME_TO_CLASS.get(normalize_name(name))


def classes_of_names(names: Iterable[str]) -> tuple[list[int], list[str]]:
    """Map location names to ``(sorted unique class ids, names outside the 19 classes)``.

    Empty names are ignored; unknown names are returned as given (stripped), in order, once each.

    >>> classes_of_names(["Nucleoplasm", "Vesicles", "Midbody", "Peroxisomes"])
    ([0, 17], ['Midbody'])
    """
    ids: set[int] = set()
    unknown: list[str] = []
    for name in names:
        name = " ".join(str(name).split())
        if not name:
            continue
        cls = class_of_name(name)
        if cls is None:
            if name not in unknown:
                unknown.append(name)
        else:
            ids.add(cls)
    return sorted(ids), unknown


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
