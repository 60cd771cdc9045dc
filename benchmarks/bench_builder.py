"""TFRecord builder throughput, bytes per cell and where the time goes, on synthetic 2048 px fields.

    python benchmarks/bench_builder.py [--data /tmp/hpa_bench_2048] [--fields 8] [--size 2048]
                                       [--crop-size 512] [--segmenter builtin|masks]
                                       [--runner local|beam|both] [--throughput-only]

1. fields/s and cells/s of a whole build (``tfrecord_builder.build``) with 1 and 2 workers
   (wall time including the start of the worker processes, and per-field work time), and the peak
   memory of a worker; with ``--runner beam`` (or ``both``) also on Apache Beam's local runner
   (``--runner beam``: in this process with 1 worker, worker processes with 2), whose CPU seconds
   per field are the per-vCPU figure of a Dataflow build;
2. bytes per cell for PNG and JPEG, with and without neighbour masking (saved masks, 4 fields);
3. a per-stage profile of one worker on a few fields: read, segment, crop, encode (PNG levels, JPEG).
The synthetic fields are written once to ``--data`` and reused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages first
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from hpa_tf.crops import CropSpec, cell_crops  # noqa: E402
from hpa_tf.io import read_labels, read_rgby  # noqa: E402
from hpa_tf.records import encode_example  # noqa: E402
from hpa_tf.synthetic import write_dataset  # noqa: E402
from tfrecord_builder import BuildOptions, build  # noqa: E402


def _dataset(path: Path, n: int, size: int) -> Path:
    if not (path / "train.csv").exists() or len(read_labels(path / "train.csv")) < n:
        print(f"writing {n} synthetic {size} px fields to {path} ...", flush=True)
        write_dataset(path, n_train=n, n_test=0, size=size, seed=0, workers=2)
    return path


def _build(data: Path, n: int, crop_size: int, mask_neighbors: bool = False, **kw) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        options = BuildOptions(data_dir=str(data / "train"), labels=str(data / "train.csv"), out=tmp + "/out",
                               crop=CropSpec(size=crop_size, mask_neighbors=mask_neighbors), folds=2, limit=n,
                               images_per_shard=max(1, n // 4), **kw)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        result = build(options)
        return time.perf_counter() - t0, {**result.summary, "build_cpu_seconds": _cpu_seconds() - cpu0}


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (pool or Beam workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _noop(_: int) -> int:
    import hpa_tf.records  # noqa: F401  (what a worker imports before its first task)
    import tfrecord_builder.worker  # noqa: F401

    return os.getpid()


def _worker_start_seconds(workers: int) -> float:
    """Seconds until ``workers`` spawned processes have imported the builder (TensorFlow included)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_noop, range(workers)))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/hpa_bench_2048")
    p.add_argument("--fields", type=int, default=8)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--segmenter", default="builtin", choices=["builtin", "masks"])
    p.add_argument("--runner", default="local", choices=["local", "beam", "both"],
                   help="builder runner(s) of the throughput section (beam: pip install .[beam])")
    p.add_argument("--throughput-only", action="store_true", help="only the throughput section")
    a = p.parse_args()
    data = _dataset(Path(a.data), a.fields, a.size)
    seg = {"masks_dir": str(data / "masks")} if a.segmenter == "masks" else {"segmenter": "builtin"}
    print(f"{a.fields} fields of {a.size}², crop {a.crop_size}, segmenter {a.segmenter}, PNG level 1, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    print("\n== throughput (whole build) ==")
    start = _worker_start_seconds(2)
    print(f"starting 2 spawned workers (import of TensorFlow etc.): {start:.1f} s")
    print(f"{'runner':>6} {'workers':>7} {'wall s':>7} {'fields/s':>8} {'cells/s':>8} {'fields/s*':>9} "
          f"{'work s/field':>12} {'CPU s/field':>11} {'fields/s/vCPU':>13} {'all CPU s/field':>15} "
          f"{'peak MB/worker':>14}")
    runners = ["local", "beam"] if a.runner == "both" else [a.runner]
    for runner in runners:
        if runner == "beam":
            import apache_beam  # noqa: F401  (its import is not the build's time)
        for workers in (1, 2):
            wall, s = _build(data, a.fields, crop_size=a.crop_size, workers=workers, runner=runner, **seg)
            steady = wall - (start if workers > 1 else 0.0)
            cpu = s["work_cpu_seconds"] / max(s["fields"], 1)
            print(f"{runner:>6} {workers:>7} {wall:>7.1f} {s['fields'] / wall:>8.2f} {s['cells'] / wall:>8.1f} "
                  f"{s['fields'] / steady:>9.2f} {s['work_seconds'] / max(s['fields'], 1):>12.2f} "
                  f"{cpu:>11.2f} {1 / max(cpu, 1e-9):>13.2f} {s['build_cpu_seconds'] / max(s['fields'], 1):>15.2f} "
                  f"{s['peak_worker_rss_mb']:>14.0f}", flush=True)
    print("(fields/s*: without the workers' start; work s/field: wall seconds of one worker per field;\n"
          " CPU s/field: its CPU seconds, independent of other load: N cores give at most N / that fields/s;\n"
          " fields/s/vCPU = 1 / CPU s/field; all CPU s/field: every CPU second of the build (this process and\n"
          " its pool or Beam worker processes: start-up, imports, Beam's own work) per field)")
    if a.throughput_only:
        return

    print("\n== bytes per cell (saved masks, 4 fields) ==")
    print(f"{'encoding':>8} {'neighbours':>10} {'kB/cell':>8} {'MB/field':>8}")
    for encoding in ("png", "jpeg"):
        for masked in (False, True):
            _, s = _build(data, min(4, a.fields), crop_size=a.crop_size, masks_dir=str(data / "masks"),
                          encoding=encoding, mask_neighbors=masked)
            print(f"{encoding:>8} {'masked' if masked else 'kept':>10} {s['bytes_per_cell'] / 1e3:>8.1f} "
                  f"{s['bytes'] / 1e6 / s['fields']:>8.2f}", flush=True)

    print("\n== where the time goes (one process, 1 OpenCV thread, 3 fields) ==")
    import cv2

    cv2.setNumThreads(1)
    from hpa_tf.segmentation import get_segmenter

    segmenter = get_segmenter("builtin")
    labels = read_labels(data / "train.csv")
    stages: dict[str, list[float]] = {}
    n_cells = 0
    for image_id in sorted(labels)[:3]:
        t = time.perf_counter()
        image = read_rgby(data / "train", image_id)
        stages.setdefault("read", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        cells, _ = segmenter.segment(image)
        stages.setdefault("segment (builtin)", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        crops = cell_crops(image, cells, a.crop_size)
        stages.setdefault("crop", []).append(time.perf_counter() - t)
        n_cells += len(crops)
        for name, kw in (("encode png level 0", dict(png_compression=0)), ("encode png level 1", dict(png_compression=1)),
                         ("encode png level 3", dict(png_compression=3)), ("encode jpeg q90", dict(encoding="jpeg"))):
            t = time.perf_counter()
            for k in range(len(crops)):
                encode_example(crops.crops[k], crops.masks[k], labels[image_id], image_id, int(crops.cell_ids[k]),
                               crops.bboxes[k], image.shape[:2], **kw)
            stages.setdefault(name, []).append(time.perf_counter() - t)
        # proposal for hpa_tf.records: PNG level 1 with the fast filters and the RLE strategy
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FAST_FILTERS,
                  cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        t = time.perf_counter()
        for k in range(len(crops)):
            cv2.imencode(".png", crops.crops[k][..., [2, 1, 0, 3]], params)
            cv2.imencode(".png", crops.masks[k], params)
        stages.setdefault("png l1 fast+RLE (cv2)", []).append(time.perf_counter() - t)
    print(f"{'stage':>20} {'s/field':>8} {'ms/cell':>8}   ({n_cells / 3:.0f} cells per field)")
    for name, times in stages.items():
        print(f"{name:>20} {np.mean(times):>8.3f} {1000 * sum(times) / n_cells:>8.1f}")


if __name__ == "__main__":
    main()
