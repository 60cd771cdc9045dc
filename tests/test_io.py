from pathlib import Path

import cv2
import numpy as np
import pytest

from hpa_tf.io import (
    CsvFormatError,
    ImageReadError,
    list_image_ids,
    read_label_image,
    read_labels,
    read_rgby,
    read_sample_submission,
    to_uint8,
    write_label_image,
)
from hpa_tf.labels import LabelError


def _write_field(folder: Path, image_id: str, rgby: np.ndarray, ext: str = "png") -> None:
    for k, ch in enumerate(("red", "green", "blue", "yellow")):
        assert cv2.imwrite(str(folder / f"{image_id}_{ch}.{ext}"), rgby[..., k])


def _field(dtype=np.uint8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 65535
    return rng.integers(0, hi + 1, (size, size, 4)).astype(dtype)


def test_reads_8bit_png_in_rgby_order(tmp_path):
    rgby = _field()
    _write_field(tmp_path, "a", rgby)
    out = read_rgby(tmp_path, "a")
    assert out.dtype == np.uint8 and out.shape == (32, 32, 4)
    np.testing.assert_array_equal(out, rgby)


def test_16bit_conversion_uses_full_range_and_native_is_kept(tmp_path):
    rgby = _field(np.uint16)
    rgby[0, 0] = 65535
    rgby[0, 1] = 0
    _write_field(tmp_path, "b", rgby)
    native = read_rgby(tmp_path, "b", native=True)
    assert native.dtype == np.uint16
    np.testing.assert_array_equal(native, rgby)
    out = read_rgby(tmp_path, "b")
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0
    np.testing.assert_array_equal(out, np.round(rgby / 257.0).astype(np.uint8))


def test_to_uint8_is_monotonic_and_exact_at_ends():
    x = np.arange(65536, dtype=np.uint16)
    y = to_uint8(x)
    assert y[0] == 0 and y[-1] == 255
    assert (np.diff(y.astype(int)) >= 0).all()
    assert len(np.unique(y)) == 256


def test_tiff_and_colour_coded_jpg(tmp_path):
    rgby = _field(size=16)
    _write_field(tmp_path, "t", rgby, ext="tif")
    np.testing.assert_array_equal(read_rgby(tmp_path, "t"), rgby)
    # colour-coded: each file RGB with the signal in its own plane (cv2 writes BGR)
    sig = np.full((64, 64), 200, np.uint8)
    zero = np.zeros_like(sig)
    planes = {"red": (zero, zero, sig), "green": (zero, sig, zero), "blue": (sig, zero, zero), "yellow": (zero, sig, sig)}
    for ch, bgr in planes.items():
        cv2.imwrite(str(tmp_path / f"c_{ch}.jpg"), np.stack(bgr, -1), [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = read_rgby(tmp_path, "c")
    assert np.abs(out.astype(int) - 200).max() <= 3


def test_missing_channel_names_the_file(tmp_path):
    _write_field(tmp_path, "m", _field())
    (tmp_path / "m_yellow.png").unlink()
    with pytest.raises(ImageReadError, match="m_yellow"):
        read_rgby(tmp_path, "m")


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    _write_field(tmp_path, "t", _field(size=64))
    data = (tmp_path / "t_green.png").read_bytes()
    (tmp_path / "t_green.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t_green.png"):
        read_rgby(tmp_path, "t")
    _write_field(tmp_path, "j", _field(size=64), ext="jpg")
    data = (tmp_path / "j_blue.jpg").read_bytes()
    (tmp_path / "j_blue.jpg").write_bytes(data[: len(data) - 200])
    with pytest.raises(ImageReadError, match="j_blue.jpg.*truncated"):
        read_rgby(tmp_path, "j")
    (tmp_path / "j_blue.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="j_blue.jpg"):
        read_rgby(tmp_path, "j")


def test_mismatched_sizes_are_an_error(tmp_path):
    _write_field(tmp_path, "s", _field(size=32))
    cv2.imwrite(str(tmp_path / "s_blue.png"), np.zeros((40, 40), np.uint8))
    with pytest.raises(ImageReadError, match="s_blue.png.*differs"):
        read_rgby(tmp_path, "s")


def test_real_colour_coded_fields(shared_data_dir):
    ids = list_image_ids(shared_data_dir)
    assert ids == ["B2AI_1_untreated_A1_R1", "B2AI_1_untreated_A1_R2"]
    img = read_rgby(shared_data_dir, ids[0])
    assert img.shape == (2048, 2048, 4) and img.dtype == np.uint8
    # every channel carries signal, and the nucleus channel is sparse (nuclei on dark background)
    assert (img.reshape(-1, 4).max(0) > 100).all()
    assert 0.02 < (img[..., 2] > 40).mean() < 0.6


def test_read_labels_and_errors(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("ID,Label\na,0|16\nb,18\nc,17|17\n")
    assert read_labels(p) == {"a": [0, 16], "b": [18], "c": [17]}
    p.write_text("ID,Label\na,0\na,1\n")
    with pytest.raises(CsvFormatError, match="line 3.*duplicate"):
        read_labels(p)
    p.write_text("ID,Label\na,0\nb,42\n")
    with pytest.raises(LabelError, match="line 3"):
        read_labels(p)
    p.write_text("ID,Label\n,0\n")
    with pytest.raises(CsvFormatError, match="line 2"):
        read_labels(p)
    p.write_text("Image,Labels\na,0\n")
    with pytest.raises(CsvFormatError, match="lacks"):
        read_labels(p)


def test_sample_submission_and_listing(tmp_path):
    p = tmp_path / "sample_submission.csv"
    p.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,2048,2048,0 1 eNoLCAgIAAAK\ny,1728,1728,\n")
    rows = read_sample_submission(p)
    assert [(r.image_id, r.width, r.height) for r in rows] == [("x", 2048, 2048), ("y", 1728, 1728)]
    p.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,big,2048,\n")
    with pytest.raises(CsvFormatError, match="line 2"):
        read_sample_submission(p)
    _write_field(tmp_path, "f1", _field(size=8))
    _write_field(tmp_path, "f_2", _field(size=8))
    (tmp_path / "notes.txt").write_text("x")
    assert list_image_ids(tmp_path) == ["f1", "f_2"]


def test_label_image_round_trip(tmp_path):
    lab = np.zeros((20, 30), np.int32)
    lab[2:5, 3:9] = 1
    lab[10:15, 10:20] = 300
    write_label_image(tmp_path / "x_cells.png", lab)
    np.testing.assert_array_equal(read_label_image(tmp_path / "x_cells.png"), lab)
    assert [p.name for p in tmp_path.iterdir()] == ["x_cells.png"]  # no temporary left behind


def test_a_garbage_line_in_train_csv_is_named_as_such(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("ID,Label\na,0\ngarbage\nb,1\n")
    with pytest.raises(CsvFormatError) as e:
        read_labels(p)
    assert str(e.value).startswith(f"{p} line 3: not an ID,Label row: 'garbage'")
    assert "empty label" not in str(e.value)
    p.write_text("ID,Label\na,0\nb,\n")
    with pytest.raises(LabelError, match=r"line 3: ID 'b' has an empty Label"):
        read_labels(p)
    p.write_text('ID,Label\na,0\n"b,1\n')  # an unclosed quote swallows the rest of the file
    with pytest.raises((CsvFormatError, LabelError), match="line"):
        read_labels(p)


def _damaged_png(path: Path) -> None:
    """A PNG whose image data is damaged in the middle (libpng complains on stderr when decoding it)."""
    ok, buf = cv2.imencode(".png", _field(size=64)[..., 0])
    data = bytearray(buf.tobytes())
    idat = data.index(b"IDAT") + 8
    data[idat + 20: idat + 60] = bytes(range(40))
    path.write_bytes(bytes(data))


def test_decoder_messages_go_into_the_error_not_onto_the_terminal(tmp_path, capfd):
    _write_field(tmp_path, "d", _field(size=64))
    _damaged_png(tmp_path / "d_red.png")
    capfd.readouterr()
    with pytest.raises(ImageReadError) as e:
        read_rgby(tmp_path, "d")
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert "d_red.png: cannot decode image" in str(e.value) and "libpng" in str(e.value), str(e.value)
    # a truncated PNG: OpenCV's own warning is captured too
    data = (tmp_path / "d_green.png").read_bytes()
    (tmp_path / "d_red.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="d_red.png: cannot decode image"):
        read_rgby(tmp_path, "d")
    assert capfd.readouterr().err == ""
    # a label image too
    _damaged_png(tmp_path / "x_cells.png")
    with pytest.raises(ImageReadError, match="x_cells.png: cannot read label image"):
        read_label_image(tmp_path / "x_cells.png")
    assert capfd.readouterr().err == ""
    # and stderr works as before afterwards
    import sys

    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"


@pytest.fixture
def default_csv_field_limit():
    """Python's default csv field limit (128 KiB), as in a fresh process; restored afterwards."""
    import csv

    old = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(old)


def test_readers_take_fields_over_the_default_csv_limit(tmp_path, default_csv_field_limit):
    """A submission row (~200 kB) given as the sample submission is read (its IDs and sizes)."""
    p = tmp_path / "sub.csv"
    p.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,2048,2048," + "0 1 " + "a" * 200_000 + "\n")
    assert [(r.image_id, r.width) for r in read_sample_submission(p)] == [("x", 2048)]


def test_every_csv_reader_of_the_project_lifts_the_field_limit():
    """Each module that reads CSV with the csv module lifts the field limit first (a submission row
    or an encoded mask is over the default 128 KiB)."""
    import re

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("hpa_tf/**/*.py"), *root.glob("tfrecord_builder/**/*.py")]):
        text = path.read_text()
        if re.search(r"csv\.(reader|DictReader)\(", text) and "raise_csv_field_size_limit()" not in text:
            offenders.append(str(path.relative_to(root)))
    assert offenders == []
