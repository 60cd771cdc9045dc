import numpy as np
import pytest

from hpa_tf.labels import (
    CLASS_NAMES,
    NEGATIVE,
    NUM_CLASSES,
    SHORT_NAMES,
    LabelError,
    class_of_name,
    classes_of_names,
    format_labels,
    from_multi_hot,
    multi_hot,
    parse_labels,
)


def test_the_tables_agree_with_each_other():
    """The label table's parts are consistent: unique names, short names aligned with the long ones
    (each short name starts like a word of its class), NEGATIVE pointing at "Negative", and every
    class id round-tripping through the label-string and multi-hot codecs."""
    assert NUM_CLASSES == len(CLASS_NAMES) == len(SHORT_NAMES) == 19
    assert len(set(CLASS_NAMES)) == len(set(SHORT_NAMES)) == NUM_CLASSES
    assert CLASS_NAMES[NEGATIVE] == "Negative" and (CLASS_NAMES[0], CLASS_NAMES[11]) == ("Nucleoplasm", "Mitotic spindle")
    for long, short in zip(CLASS_NAMES, SHORT_NAMES):
        assert any(word[0].lower() == short[0].lower() for word in long.split()), (long, short)
    for c in range(NUM_CLASSES):
        assert parse_labels(format_labels([c])) == [c] == from_multi_hot(multi_hot([c]))


def test_parse_sorts_and_collapses_repeats():
    assert parse_labels("16|0|5") == [0, 5, 16]
    assert parse_labels("17|17") == [17]
    assert parse_labels(" 3 | 2 ") == [2, 3]


@pytest.mark.parametrize("bad", ["", "19", "a", "1||2", "-1", "1.5", "0|x"])
def test_malformed_or_unknown_labels_raise_naming_the_row(bad):
    with pytest.raises(LabelError, match="train.csv line 7"):
        parse_labels(bad, where="train.csv line 7")


def test_multi_hot_round_trip():
    vec = multi_hot("0|5|16")
    assert vec.shape == (19,) and vec.dtype == np.float32
    assert vec.sum() == 3 and vec[0] == vec[5] == vec[16] == 1
    assert from_multi_hot(vec) == [0, 5, 16]
    assert format_labels(from_multi_hot(vec)) == "0|5|16"
    with pytest.raises(LabelError):
        multi_hot([19])
    with pytest.raises(LabelError):
        format_labels([25])


# The competition's public-HPA location names and the class each was given by the organisers'
# download notebook (its ``all_locations`` table), written out here independently of the code.
COMPETITION_LOCATIONS = {
    "Nucleoplasm": 0, "Nuclear membrane": 1, "Nucleoli": 2, "Nucleoli fibrillar center": 3,
    "Nuclear speckles": 4, "Nuclear bodies": 5, "Endoplasmic reticulum": 6, "Golgi apparatus": 7,
    "Intermediate filaments": 8, "Actin filaments": 9, "Focal adhesion sites": 9, "Microtubules": 10,
    "Mitotic spindle": 11, "Centrosome": 12, "Centriolar satellite": 12, "Plasma membrane": 13,
    "Cell Junctions": 13, "Mitochondria": 14, "Aggresome": 15, "Cytosol": 16, "Vesicles": 17,
    "Peroxisomes": 17, "Endosomes": 17, "Lysosomes": 17, "Lipid droplets": 17, "Cytoplasmic bodies": 17,
    "No staining": 18,
}


def test_every_class_name_and_competition_location_maps_to_its_class():
    for i, name in enumerate(CLASS_NAMES):
        assert class_of_name(name) == i
    for name, i in COMPETITION_LOCATIONS.items():
        assert class_of_name(name) == i, name


@pytest.mark.parametrize("spelling, cls", [
    ("cytosol", 16), ("  Golgi   apparatus ", 7), ("CELL JUNCTIONS", 13), ("cell junctions", 13),
    ("Nucleoli fibrillar centre", 3), ("Centriolar satellites", 12), ("negative", 18),
])
def test_common_spellings(spelling, cls):
    assert class_of_name(spelling) == cls


@pytest.mark.parametrize("name", ["Midbody", "Kinetochore", "Nucleoli rim", "Cytokinetic bridge",
                                  "Microtubule ends", "Rods & Rings", "Mitotic chromosome", "", "Nucleus"])
def test_names_outside_the_19_classes_are_not_guessed(name):
    assert class_of_name(name) is None


def test_classes_of_names_splits_known_and_unknown():
    assert classes_of_names(["Vesicles", "Midbody", "Lysosomes", "Nucleoplasm", "Midbody", " "]) == ([0, 17], ["Midbody"])
    assert classes_of_names([]) == ([], [])
