import numpy as np
import pytest

from hpa_tf.labels import (
    CLASS_NAMES,
    NEGATIVE,
    NUM_CLASSES,
    SHORT_NAMES,
    LabelError,
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
