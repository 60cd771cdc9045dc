"""Metric speed: ``hpa_tf.metric.evaluate`` on a competition-sized synthetic submission.

Run: ``python benchmarks/bench_metric.py [--fields 600] [--size 2048] [--cells 40] [--no-files]``

Builds ``--fields`` fields of ``--size``² pixels with ~``--cells`` truth cells each (8 distinct cell
layouts, 1–3 classes per cell), and a submission with every class (19 detections) for every
predicted cell, the predicted cells being the truth cells shifted by a few pixels (IoU near the
0.6 threshold for some). Prints
  * ``evaluate`` with the truth and rows in memory (IoU + matching + AP: the metric itself);
  * ``evaluate_with_baselines`` in memory (the same, plus ``--seeds`` random rescorings and the
    ceiling; the masks are decoded and the IoU computed once), and what the baselines add;
  * with files: writing the submission CSV, ``load_truth`` (truth.csv + one uint16 label PNG per
    field, decoded and run-length encoded per field), ``read_submission``, and ``evaluate`` from the
    two paths end to end (what ``python -m hpa_tf.metric`` does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_core, peak_rss_mb  # noqa: E402

one_core()

import numpy as np  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from hpa_tf.io import write_label_image  # noqa: E402
from hpa_tf.metric import ImageTruth, evaluate, evaluate_with_baselines, load_truth  # noqa: E402
from hpa_tf.submission import (  # noqa: E402
    Prediction,
    SubmissionRow,
    cells_to_coco,
    encode_cells,
    format_confidence,
    read_submission,
    write_submission,
)

N_LAYOUTS = 8
N_SHIFTS = 3


def cell_field(size: int, n_cells: int, seed: int) -> np.ndarray:
    """(size, size) int32 label image of ~n_cells Voronoi cells cut to blobs (ids 1..n)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[:size, :size]
    distance, nearest = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], axis=1))
    cells = (nearest + 1).reshape(size, size).astype(np.int32)
    radius = size / np.sqrt(n_cells) * 0.55
    cells[distance.reshape(size, size) > radius * (1 + 0.2 * np.sin(yy / 37.0 + xx / 53.0))] = 0
    return cells


def build(args: argparse.Namespace):
    rng = np.random.default_rng(0)
    layouts, layout_masks, predicted_texts = [], [], []
    for k in range(N_LAYOUTS):
        cells = cell_field(args.size, args.cells, seed=k)
        layouts.append(cells)
        layout_masks.append(cells_to_coco(cells))
        variants = []
        for s in range(N_SHIFTS):
            shift = (int(rng.integers(-12, 13)), int(rng.integers(-12, 13))) if s else (0, 0)
            variants.append(encode_cells(np.roll(cells, shift, axis=(0, 1))))
        predicted_texts.append(variants)
    truth: dict[str, ImageTruth] = {}
    rows: list[SubmissionRow] = []
    for i in range(args.fields):
        image_id = f"field{i:04d}"
        k = i % N_LAYOUTS
        masks = layout_masks[k]
        labels = {cell: tuple(sorted(set(rng.integers(0, 19, rng.integers(1, 4)).tolist()))) for cell in masks}
        truth[image_id] = ImageTruth(
            image_id, args.size, args.size, tuple(masks.values()), tuple(labels.values()), tuple(masks)
        )
        texts = predicted_texts[k][(i // N_LAYOUTS) % N_SHIFTS]
        scores = rng.random((len(texts), 19)) * 0.6
        preds = []
        for j, (cell, text) in enumerate(texts.items()):
            for c in labels.get(cell, ()):
                scores[j, c] += 0.4
            # confidences as the CSV stores them, so that in-memory and file results agree exactly
            preds += [Prediction(c, float(format_confidence(scores[j, c])), text) for c in range(19)]
        rows.append(SubmissionRow(image_id, args.size, args.size, preds))
    return layouts, truth, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=600)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=40, help="cells per field (approximate)")
    parser.add_argument("--seeds", type=int, default=5, help="random rescorings of the baselines")
    parser.add_argument("--no-files", action="store_true", help="only the in-memory figures")
    args = parser.parse_args()

    t0 = time.perf_counter()
    layouts, truth, rows = build(args)
    n_cells = sum(len(t.masks) for t in truth.values())
    n_dets = sum(len(r.predictions) for r in rows)
    print(
        f"built {args.fields} fields of {args.size}x{args.size}: {n_cells} truth cells, {n_dets} detections "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    t0 = time.perf_counter()
    result = evaluate(rows, truth)
    t_mem = time.perf_counter() - t0
    print(f"evaluate (in memory)        {t_mem:7.2f} s   mAP {result.mean_ap:.4f}  macro F1 {result.macro_f1:.4f}")
    t0 = time.perf_counter()
    baselines = evaluate_with_baselines(rows, truth, n_seeds=args.seeds)
    t_base = time.perf_counter() - t0
    print(
        f"evaluate_with_baselines     {t_base:7.2f} s   random {baselines.random_map:.4f} ({args.seeds} seeds)  "
        f"ceiling {baselines.ceiling_map:.4f}  skill {baselines.skill:.4f}  "
        f"(+{t_base - t_mem:.2f} s over evaluate)"
    )
    assert baselines.metric.to_dict() == result.to_dict()
    if args.no_files:
        return

    with tempfile.TemporaryDirectory(prefix="bench_metric_") as tmp:
        root = Path(tmp)
        (root / "masks").mkdir()
        for k, cells in enumerate(layouts):
            write_label_image(root / f"layout{k}.png", cells)
        lines = ["ID,ImageWidth,ImageHeight,CellId,Label"]
        for i, (image_id, t) in enumerate(truth.items()):
            os.symlink(root / f"layout{i % N_LAYOUTS}.png", root / "masks" / f"{image_id}_cells.png")
            lines += [
                f"{image_id},{t.width},{t.height},{c},{'|'.join(map(str, lab))}" for c, lab in zip(t.cell_ids, t.labels)
            ]
        (root / "truth.csv").write_text("\n".join(lines) + "\n")
        sub = root / "submission.csv"
        t0 = time.perf_counter()
        write_submission(sub, rows)
        print(f"write_submission            {time.perf_counter() - t0:7.2f} s   ({sub.stat().st_size / 2**20:.0f} MiB)")
        del rows

        t0 = time.perf_counter()
        loaded = load_truth(root / "truth.csv")
        t_truth = time.perf_counter() - t0
        print(f"load_truth (csv + PNGs)     {t_truth:7.2f} s   ({1e3 * t_truth / len(loaded):.1f} ms per field)")
        t0 = time.perf_counter()
        read_rows = read_submission(sub)
        print(f"read_submission             {time.perf_counter() - t0:7.2f} s")
        del read_rows
        t0 = time.perf_counter()
        from_files = evaluate(sub, root / "truth.csv")
        t_files = time.perf_counter() - t0
        print(f"evaluate (from files)       {t_files:7.2f} s   mAP {from_files.mean_ap:.4f}")
        assert from_files.to_dict() == result.to_dict()
    print(f"peak memory {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
