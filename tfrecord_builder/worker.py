"""The local runner: one shard task start to finish (``build_shard``), in this process or in a
spawn-context process pool (``run_tasks``).

A task encodes its fields with ``tfrecord_builder.field.encode_field``, writes
``fold{f}-{index:05d}-n{count}.tfrec`` (none when no cell survives) and then the sidecar
``parts/fold{f}-{index:05d}.json`` (its manifest rows and stats), each atomically.

Processes: workers are started with the ``spawn`` context (TensorFlow is imported in the parent;
forking a process that has started TF threads can deadlock). Each worker imports TF only to
serialise examples and write TFRecords; OpenCV runs single-threaded in workers. A pool worker
keeps its segmenter and its progress queue in ``_WORKER`` (set by the pool's initializer, one per
process); nothing else is module state.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from queue import Empty

from hpa_tf import fileutil
from hpa_tf.shardset import PARTS_DIR
from tfrecord_builder.field import FieldResult, encode_field
from tfrecord_builder.options import BuildError, BuildOptions
from tfrecord_builder.plan import ShardTask

log = logging.getLogger(__name__)

#: ``on_field(1, n_cells)``: called for every finished field (progress).
FieldCallback = Callable[[int, int], None]


def make_segmenter(options: BuildOptions) -> object | None:
    """The segmenter the options ask for (None with saved masks, or for whole-field records)."""
    if options.masks_dir or options.crop.is_field:
        return None
    from hpa_tf.segmentation import get_segmenter, preload

    preload(options.segmenter)  # hpacellseg: PyTorch's stack before TensorFlow (see hpa_tf.segmentation)
    return get_segmenter(options.segmenter, **dict(options.segmenter_options))


def check_segmenter(options: BuildOptions) -> object | None:
    """Create the segmenter in this process, so that one that cannot be made (a missing package or
    model file, no GPU) stops the build with its one-line reason before any output is written.

    Returns it for a build in this process (1 worker), None otherwise: pool workers make their own,
    so this one's memory (models, GPU) is freed at once.
    """
    from hpa_tf.segmentation import SEGMENTER_ERRORS

    try:
        segmenter = make_segmenter(options)
    except SEGMENTER_ERRORS as e:
        raise BuildError(f"segmenter {options.segmenter}: {e}") from None
    return segmenter if options.workers <= 1 else None


def shard_part(task: ShardTask, config_hash: str, shard: str, results: Sequence[FieldResult], size: int,
               seconds: float, cpu_seconds: float) -> dict:
    """The part record of one written shard (``parts/{stem}.json``), as both runners write it: what the
    assembly reads to write the manifest, the skipped list and the summary."""
    rows: list[list] = []
    for result in results:
        rows += result.manifest_rows(shard, len(rows))
    return {
        "task": task.identity(),
        "config_hash": config_hash,
        "shard": shard,
        "count": len(rows),
        "bytes": size,
        "fields": sum(1 for r in results if r.skip is None),
        "cells_dropped": sum(r.cells_dropped for r in results),
        "skipped": [[r.image_id, *r.skip] for r in results if r.skip is not None],  # [image_id, kind, reason]
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rows": rows,
    }


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux VmHWM: unlike ru_maxrss, not inherited
    from the parent that started a spawned worker)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_shard(task: ShardTask, options: BuildOptions, config_hash: str, segmenter: object | None = None,
                on_field: FieldCallback | None = None) -> dict:
    """Build one shard and its sidecar; returns the sidecar's content.

    ``segmenter``: see ``encode_field`` (None with ``options.masks_dir``). ``on_field(1, n_cells)``
    is called after each field.
    """
    from hpa_tf.records import ShardWriter

    t0, cpu0 = time.perf_counter(), time.process_time()
    results = []
    with ShardWriter(options.out, max_per_shard=1 << 62, first_index=task.index) as writer:
        for k, (image_id, label_ids) in enumerate(zip(task.image_ids, task.labels)):
            result = encode_field(image_id, label_ids, task.fold, options, segmenter, source=task.source(k))
            for example in result.examples:
                writer.write(example, fold=task.fold)
            results.append(result)
            if on_field is not None:
                on_field(1, len(result.examples))
    paths = writer.paths
    if len(paths) > 1:  # cannot happen with max_per_shard = 2**62; guards the naming assumption
        raise BuildError(f"{task.stem}: expected one shard, the writer made {paths}")
    shard = paths[0].replace("\\", "/").rsplit("/", 1)[-1] if paths else ""
    part = shard_part(task, config_hash, shard, results, fileutil.file_size(paths[0]) if paths else 0,
                      seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0)
    fileutil.write_json(fileutil.join(options.out, PARTS_DIR, f"{task.stem}.json"), part)
    return part


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------

#: Per-process state of a pool worker: its progress queue and segmenters (set by ``_init_worker``).
_WORKER: dict = {}


def _init_worker(cv2_threads: int, progress_queue: object) -> None:
    """Pool initializer: one OpenCV thread per worker (the pool provides the parallelism)."""
    import cv2

    cv2.setNumThreads(cv2_threads)
    _WORKER.update(queue=progress_queue, segmenters={})


def _pool_task(task: ShardTask, options: BuildOptions, config_hash: str) -> dict:
    key = json.dumps([options.masks_dir, options.segmenter, dict(options.segmenter_options)], sort_keys=True,
                     default=str)
    segmenters: dict = _WORKER["segmenters"]
    if key not in segmenters:
        segmenters[key] = make_segmenter(options)
    queue = _WORKER["queue"]
    return build_shard(task, options, config_hash, segmenters[key], on_field=lambda f, c: queue.put((f, c)))


def run_tasks(
    todo: Sequence[ShardTask],
    options: BuildOptions,
    config_hash: str,
    on_done: Callable[[ShardTask, dict], None],
    on_field: FieldCallback,
    segmenter: object | None = None,
) -> None:
    """Run the tasks in this process (1 worker) or in a spawn-context process pool.

    ``on_field(1, n_cells)`` is called in this process for every field a worker finishes,
    ``on_done(task, sidecar)`` for every finished task. ``segmenter``: one already made in this
    process (``check_segmenter``), used when the tasks run here.
    """
    if options.workers <= 1 or len(todo) <= 1:
        if segmenter is None and todo:
            segmenter = make_segmenter(options)
        for task in todo:
            on_done(task, build_shard(task, options, config_hash, segmenter, on_field))
        return
    context = multiprocessing.get_context("spawn")
    workers = min(options.workers, len(todo))
    queue = context.Queue()

    def drain() -> None:
        while True:
            try:
                on_field(*queue.get_nowait())
            except Empty:
                return

    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(1, queue)) as pool:
        pending: dict[Future, ShardTask] = {pool.submit(_pool_task, t, options, config_hash): t for t in todo}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in finished:
                    task = pending.pop(future)
                    try:
                        part = future.result()
                    except Exception as e:
                        raise BuildError(f"shard {task.stem} failed: {type(e).__name__}: {e}") from e
                    on_done(task, part)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
