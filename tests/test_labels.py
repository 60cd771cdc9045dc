import numpy as np
import pytest

from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES, LabelError, format_labels, from_multi_hot, multi_hot, parse_labels


def test_table_has_19_classes_in_competition_order():
    assert NUM_CLASSES == 19
    assert CLASS_NAMES[0] == "Nucleoplasm"
    assert CLASS_NAMES[11] == "Mitotic spindle"
    assert CLASS_NAMES[17].startswith("Vesicles")
    assert CLASS_NAMES[18] == "Negative"


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
