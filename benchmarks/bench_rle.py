"""Mask text encoding speed: hpa_tf.submission vs the competition's pycocotools path.

Run: ``python benchmarks/bench_rle.py [--size 2048] [--cells 50] [--repeat 20]``

Prints milliseconds per call (median of ``--repeat``) for
  * one realistic cell (an ~200 px blob) in a size × size field: ``encode_mask`` vs the reference
    ``pycocotools.encode(np.asfortranarray(mask[..., None].astype(uint8)))`` + zlib + base64;
  * one field with ``--cells`` cells: ``encode_cells`` vs ``encode_mask(cells == id)`` per cell vs
    the reference per cell;
  * ``decode_mask`` of one cell.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_core  # noqa: E402

one_core()

import numpy as np  # noqa: E402
from pycocotools import _mask as coco_mask_c  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from hpa_tf.submission import decode_mask, encode_cells, encode_mask  # noqa: E402


def reference_text(mask: np.ndarray) -> str:
    rle = coco_mask_c.encode(np.asfortranarray(mask[..., None].astype(np.uint8)))[0]["counts"]
    return base64.b64encode(zlib.compress(rle, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def timed(fn, repeat: int) -> float:
    """Median milliseconds per call (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cell_field(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """(size, size) int32 label image: Voronoi cells cut to ~200 px wide blobs around their seeds."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[:size, :size]
    distance, nearest = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], axis=1))
    cells = (nearest + 1).reshape(size, size).astype(np.int32)
    cells[distance.reshape(size, size) > 110 + 30 * np.sin(yy / 37.0 + xx / 53.0)] = 0
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="field side in pixels")
    parser.add_argument("--cells", type=int, default=50, help="cells per field")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per figure (median)")
    args = parser.parse_args()

    cells = cell_field(args.size, args.cells)
    ids = [int(i) for i in np.unique(cells) if i]
    one = cells == ids[len(ids) // 2]
    ys, xs = np.nonzero(one)
    print(
        f"field {args.size}x{args.size}, {len(ids)} cells; one cell: {one.sum()} px, "
        f"bbox {xs.max() - xs.min() + 1}x{ys.max() - ys.min() + 1}"
    )
    assert encode_mask(one) == reference_text(one)
    assert encode_cells(cells) == {i: reference_text(cells == i) for i in ids}

    ref_ms = timed(lambda: reference_text(one), args.repeat)
    ours_ms = timed(lambda: encode_mask(one), args.repeat)
    print(
        f"one cell   encode_mask      {ours_ms:8.3f} ms   pycocotools path {ref_ms:8.3f} ms   ({ref_ms / ours_ms:.0f}x)"
    )
    text = encode_mask(one)
    dec_ms = timed(lambda: decode_mask(text, args.size, args.size), args.repeat)
    print(f"one cell   decode_mask      {dec_ms:8.3f} ms")

    repeat = max(2, args.repeat // 5)
    cells_ms = timed(lambda: encode_cells(cells), repeat)
    loop_ms = timed(lambda: [encode_mask(cells == i) for i in ids], repeat)
    ref_loop_ms = timed(lambda: [reference_text(cells == i) for i in ids], repeat)
    print(
        f"one field  encode_cells     {cells_ms:8.3f} ms   encode_mask loop {loop_ms:8.3f} ms   "
        f"pycocotools loop {ref_loop_ms:8.3f} ms   ({ref_loop_ms / cells_ms:.0f}x)"
    )


if __name__ == "__main__":
    main()
