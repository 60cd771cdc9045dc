"""hpa_tf.crops: the one crop geometry (window, padding, masks, neighbours, dropping, batching)."""

import time

import numpy as np
import pytest
from scipy import ndimage

from hpa_tf.crops import (
    CellCrops,
    CropSpec,
    CropSpecError,
    cell_crops,
    crop_window,
    find_cells,
    iter_cell_crops,
)


def _field(h: int = 120, w: int = 160, channels: int = 4):
    """Label image with non-contiguous ids 3, 7, 20 and 9 (tiny) and an image whose value
    encodes the channel and the cell: channel c of cell i = 10 * c + i, background = 200 + c."""
    cells = np.zeros((h, w), np.int32)
    cells[10:30, 20:40] = 3  # 20 x 20 square inside the field
    cells[0:16, 0:12] = 7  # touching the top-left corner (12 wide, 16 tall)
    cells[60:70, 40:120] = 20  # elongated 80 x 10
    cells[100:102, 150:152] = 9  # 4 px
    image = np.zeros((h, w, channels), np.uint8)
    for c in range(channels):
        image[..., c] = 200 + c
        for i in (3, 7, 20, 9):
            image[..., c][cells == i] = 10 * c + i
    return image, cells


def test_crop_window_square_centred_with_margin():
    left, top, side = crop_window((20, 10, 40, 30), (120, 160), margin=0.1)
    assert side == 24  # 20 * 1.2
    assert (left, top) == (18, 8)  # 2 px on each side
    left, top, side = crop_window((40, 60, 120, 70), (120, 160), margin=0.0)
    assert side == 80 and left == 40 and top == 60 - 35  # the short side is centred
    with pytest.raises(ValueError, match="outside"):
        crop_window((0, 0, 200, 10), (120, 160))


def test_crops_are_uint8_with_shapes_and_table():
    image, cells = _field()
    out = cell_crops(image, cells, size=64)
    assert isinstance(out, CellCrops)
    assert out.crops.shape == (4, 64, 64, 4) and out.crops.dtype == np.uint8
    assert out.masks.shape == (4, 64, 64) and out.masks.dtype == np.uint8
    assert set(np.unique(out.masks)) <= {0, 255}
    assert out.cell_ids.tolist() == [3, 7, 9, 20]  # non-contiguous ids, ascending
    assert out.bboxes.tolist() == [[20, 10, 40, 30], [0, 0, 12, 16], [150, 100, 152, 102], [40, 60, 120, 70]]
    assert out.areas.tolist() == [400, 192, 4, 800]
    assert out.n_dropped == 0 and len(out) == 4


def test_edge_cell_is_zero_padded_and_centred():
    image, cells = _field()
    out = cell_crops(image, cells, size=64, margin=0.25, cell_ids=[7])
    crop, mask = out.crops[0], out.masks[0]
    # window side = ceil(16 * 1.5) = 24 starting at (-6, -4): the first rows/columns are padding
    assert crop_window(out.bboxes[0], cells.shape, 0.25) == (-6, -4, 24)
    assert np.all(crop[:8, :, :] == 0) and np.all(crop[:, :14, :] == 0)
    ys, xs = np.nonzero(mask)
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1.5 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1.5
    # the cell's interior keeps its values (channel-specific; edges are interpolated)
    inner = crop[ndimage.binary_erosion(mask == 255, iterations=3)]
    assert len(inner) > 500
    assert np.all(inner[:, 0] == 7) and np.all(inner[:, 3] == 37)


def test_mask_matches_cell_at_native_size():
    image, cells = _field()
    # margin 0.1 on a 20 px square gives a 24 px window: size 24 means no resize, exact mask
    out = cell_crops(image, cells, size=24, margin=0.1, cell_ids=[3])
    expected = np.zeros((24, 24), np.uint8)
    expected[2:22, 2:22] = 255
    np.testing.assert_array_equal(out.masks[0], expected)
    np.testing.assert_array_equal(out.crops[0][2:22, 2:22, 1], 13)
    np.testing.assert_array_equal(out.crops[0][:2, :, 1], 201)  # background kept


def test_mask_neighbors_zeros_other_cells_only():
    image, cells = _field()
    cells[30:34, 20:40] = 5  # a neighbour right below cell 3
    image[30:34, 20:40] = 55
    plain = cell_crops(image, cells, size=24, margin=0.1, cell_ids=[3])
    masked = cell_crops(image, cells, size=24, margin=0.1, cell_ids=[3], mask_neighbors=True)
    own = plain.masks[0] == 255
    neighbour = np.zeros((24, 24), bool)
    neighbour[22:24, 2:22] = True  # rows 30, 31 of the field
    assert np.all(plain.crops[0][neighbour] == 55)
    assert np.all(masked.crops[0][neighbour] == 0)
    np.testing.assert_array_equal(masked.crops[0][own], plain.crops[0][own])
    background = ~own & ~neighbour
    np.testing.assert_array_equal(masked.crops[0][background], plain.crops[0][background])
    assert np.all(masked.crops[0][background] >= 200)


def test_min_area_drops_and_counts():
    image, cells = _field()
    out = cell_crops(image, cells, size=32, min_area=10)
    assert out.cell_ids.tolist() == [3, 7, 20] and out.n_dropped == 1
    assert find_cells(cells, min_area=500).cell_ids.tolist() == [20]


def test_elongated_cell_keeps_its_aspect():
    image, cells = _field()
    out = cell_crops(image, cells, size=64, margin=0.0, cell_ids=[20])
    ys, xs = np.nonzero(out.masks[0])
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert width == 64 and abs(height - 8) <= 1  # 80 x 10 scaled by 0.8: 64 x 8


@pytest.mark.parametrize("size", [64, 512])
def test_sizes_and_interpolation(size):
    image, cells = _field()
    out = cell_crops(image, cells, size=size)
    assert out.crops.shape == (4, size, size, 4)
    # a cell's own pixels keep their constant value whether the crop is enlarged or shrunk
    for k, cid in enumerate(out.cell_ids):
        inner = out.masks[k] == 255
        if inner.sum() > 50:
            core = np.median(out.crops[k][inner][:, 2])
            assert core == 20 + cid


def test_one_channel_and_2d_image():
    image, cells = _field(channels=1)
    out = cell_crops(image, cells, size=32)
    assert out.crops.shape == (4, 32, 32, 1)
    out2 = cell_crops(image[..., 0], cells, size=32)
    np.testing.assert_array_equal(out.crops, out2.crops)


def test_empty_label_image_gives_empty_arrays():
    image = np.zeros((50, 60, 4), np.uint8)
    out = cell_crops(image, np.zeros((50, 60), np.int32), size=64)
    assert out.crops.shape == (0, 64, 64, 4) and out.masks.shape == (0, 64, 64)
    assert out.cell_ids.shape == (0,) and out.bboxes.shape == (0, 4) and out.areas.shape == (0,)
    assert out.n_dropped == 0
    assert list(iter_cell_crops(image, np.zeros((50, 60), np.int32))) == []


def test_iter_batches_equal_whole_and_carry_dropped_once():
    image, cells = _field()
    whole = cell_crops(image, cells, size=48, min_area=10, mask_neighbors=True)
    batches = list(iter_cell_crops(image, cells, size=48, min_area=10, mask_neighbors=True, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    assert sum(b.n_dropped for b in batches) == whole.n_dropped == 1
    np.testing.assert_array_equal(np.concatenate([b.crops for b in batches]), whole.crops)
    np.testing.assert_array_equal(np.concatenate([b.masks for b in batches]), whole.masks)
    np.testing.assert_array_equal(np.concatenate([b.bboxes for b in batches]), whole.bboxes)


def test_bad_inputs_are_refused():
    image, cells = _field()
    with pytest.raises(ValueError, match="does not match"):
        cell_crops(image, cells[:-1])
    with pytest.raises(ValueError, match="not in the label image"):
        cell_crops(image, cells, cell_ids=[4])


def test_deterministic_and_fast_on_a_2048_field():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2048, 2048, 4), dtype=np.uint8)
    cells = np.zeros((2048, 2048), np.int32)
    for i in range(50):  # 50 cells of 150..350 px on a 7 x 8 grid
        y, x = divmod(i, 7)
        h, w = 150 + 4 * i, 350 - 4 * i
        cells[20 + 250 * y : 20 + 250 * y + min(h, 240), 20 + 290 * x : 20 + 290 * x + min(w, 280)] = i + 1
    start = time.perf_counter()
    out = cell_crops(image, cells, size=512)
    elapsed = time.perf_counter() - start
    assert len(out) == 50
    assert elapsed < 2.0, f"{elapsed:.2f} s for 50 crops of a 2048² field"  # ~0.2 s on one free core
    again = cell_crops(image, cells, size=512, cell_ids=out.cell_ids[:3])
    np.testing.assert_array_equal(again.crops, out.crops[:3])


# ---------------------------------------------------------------------------------------------
# the crop spec
# ---------------------------------------------------------------------------------------------


def test_crop_spec_round_trips_and_crops_with_its_own_settings():
    import doctest
    import json

    import hpa_tf.crops

    assert doctest.testmod(hpa_tf.crops).failed == 0
    spec = CropSpec(size=48, margin=0.0, mask_neighbors=True)
    assert CropSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert hash(CropSpec.from_dict(spec.to_dict())) == hash(spec)  # usable as a dict key
    assert spec.to_dict() == {"kind": "cell", "size": 48, "margin": 0.0, "mask_neighbors": True}
    image, cells = _field()
    by_spec = spec.crop(image, cells)
    direct = cell_crops(image, cells, size=48, margin=0.0, mask_neighbors=True)
    np.testing.assert_array_equal(by_spec.crops, direct.crops)
    np.testing.assert_array_equal(np.concatenate([b.crops for b in spec.iter_crops(image, cells, batch_size=2)]),
                                  direct.crops)
    assert not np.array_equal(CropSpec(size=48).crop(image, cells).crops, direct.crops)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "cell", "size": 64, "margin": 0.1}, r"lacks key\(s\) \['mask_neighbors'\]"),
        ({"kind": "cell", "size": 64, "margin": 0.1, "mask_neighbors": False, "pad": 0}, r"unknown key\(s\) \['pad'\]"),
        ({"kind": "tile", "size": 64, "margin": 0.1, "mask_neighbors": False}, "kind must be one of"),
        ({"kind": "field", "size": 64, "margin": 0.0, "mask_neighbors": True}, "not to whole fields"),
        ({"kind": "cell", "size": 0, "margin": 0.1, "mask_neighbors": False}, "size must be"),
        ({"kind": "cell", "size": 64, "margin": -0.1, "mask_neighbors": False}, "margin must be"),
        ({"kind": "cell", "size": 64, "margin": None, "mask_neighbors": False}, "margin must be"),
        ({"kind": "cell", "size": 64, "margin": 0.1, "mask_neighbors": 0}, "mask_neighbors must be"),
        ([64, 0.1], "must be a JSON object"),
    ],
)
def test_crop_spec_refuses_incomplete_or_unknown_settings(data, message):
    with pytest.raises(CropSpecError, match=message) as err:
        CropSpec.from_dict(data, where="x/model.json")
    assert str(err.value).startswith("x/model.json")
