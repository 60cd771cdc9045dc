"""Stage 2: fields of view → segmented cells → crops → TFRecord shards, in parallel and resumable.

``build(options)`` runs the whole build with the local runner (``options.runner == "local"``) or
as an Apache Beam pipeline (``"beam"``: ``tfrecord_builder.beam_runner``, the same plan, the same
per-field function and the same assembly, so the same shard set); its parts, one job each:

``tfrecord_builder.options``  ``BuildOptions`` (the ``CropSpec`` included), checks, the content config
``tfrecord_builder.plan``     images → shard tasks (``plan_shards``), deterministic whatever the workers
``tfrecord_builder.field``    ``encode_field``: one field read, segmented, cropped and encoded
``tfrecord_builder.worker``   one shard task start to finish, in this process or a process pool
``tfrecord_builder.beam_runner``  the tasks as a Beam pipeline (DirectRunner, Dataflow, …)
``tfrecord_builder.output``   the output folder: create/check, resume, assemble manifest and summary
``tfrecord_builder.verify``   read a built shard set back and check it

Order of a build
    1. ``train.csv`` is read first (an unknown label stops the run before any work, naming the line).
    2. Folds are assigned per image over ALL images of the CSV (``hpa_tf.folds.assign_folds``).
    3. The images to build are planned into shard tasks (``tfrecord_builder.plan``).
    4. Each task is run start to finish by a worker: its shard, then its sidecar
       ``parts/fold{f}-{k:05d}.json`` (manifest rows and stats), each atomically.
    5. When every task is done, ``manifest.csv``, ``skipped.csv`` and ``summary.json`` are assembled
       from the sidecars (``summary.json`` last: its presence means "complete").

The output is a shard set (layout, names and file formats: ``hpa_tf.shardset``); ``out`` may be
local or any ``tf.io.gfile`` path such as ``gs://``. Its ``build_config.json`` holds the
content-defining arguments, the crop spec among them, and run info under ``run`` (not compared).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hpa_tf import fileutil, shardset
from hpa_tf.folds import assign_folds, write_folds_csv
from hpa_tf.io import read_labels, read_sources
from tfrecord_builder.options import BuildError, BuildOptions, check_options, config_hash, content_config
from tfrecord_builder.output import assemble, clean_temp_files, load_part, prepare_output, remove_unfinished
from tfrecord_builder.plan import CELLS_PER_FIELD, ShardTask, estimate_images_per_shard, plan_shards
from tfrecord_builder.worker import check_segmenter, run_tasks

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a ``build`` call did. ``complete`` is False when it stopped early (``max_shards``)."""

    out: str
    complete: bool
    fields: int = 0
    fields_skipped: int = 0
    cells: int = 0
    cells_dropped: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    shards_built: int = 0
    shards_kept: int = 0
    summary: dict = field(default_factory=dict)

    def line(self) -> str:
        """One-line summary for a person."""
        state = "" if self.complete else " (incomplete: rerun to finish)"
        skipped = f"skipped {self.fields_skipped} field(s)"
        if self.fields_skipped:
            where = fileutil.join(self.out, shardset.SKIPPED)
            skipped += f" (listed with their reasons in {where})" if self.complete else " (listed once complete)"
        return (
            f"{self.fields} fields, {self.cells} cells, {self.shards} shards, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s; {skipped}, dropped {self.cells_dropped} "
            f"small cell(s); built {self.shards_built} shard(s) now, kept {self.shards_kept}{state}"
        )


def result_from_summary(out: str, summary: dict, built: int, kept: int, seconds: float) -> BuildResult:
    """The ``BuildResult`` of a complete build from its ``summary.json``."""
    return BuildResult(
        out=out, complete=True, fields=summary["fields"], fields_skipped=summary["fields_skipped"],
        cells=summary["cells"], cells_dropped=summary["cells_dropped_small"], shards=summary["shards"],
        bytes=summary["bytes"], seconds=seconds, shards_built=built, shards_kept=kept, summary=summary,
    )


def run_beam(todo: list[ShardTask], options: BuildOptions, digest: str, parts: dict[str, dict]) -> None:
    """Run the tasks as a Beam pipeline (``tfrecord_builder.beam_runner``), then read their sidecars into ``parts``."""
    from tfrecord_builder.beam_runner import run_tasks as beam_run_tasks

    counters = beam_run_tasks(todo, options, digest)
    shard_files = {n for n in fileutil.listdir(options.out) if n.endswith(".tfrec")}
    for task in todo:
        part = load_part(options.out, task, digest, shard_files)
        if part is None:
            raise BuildError(f"the Beam pipeline finished but shard task {task.stem} has no valid sidecar in "
                             f"{fileutil.join(options.out, shardset.PARTS_DIR)}")
        parts[task.stem] = part
    fields = sum(len(t.image_ids) for t in todo)
    log.info("beam: %d field(s), %d cell(s) in %.1f s (%.2f fields/s)", fields, sum(parts[t.stem]["count"] for t in todo),
             counters["seconds"], fields / max(counters["seconds"], 1e-9))


def build(options: BuildOptions, progress: bool = False, max_shards: int | None = None) -> BuildResult:
    """Build (or resume, or confirm) the TFRecord output described by ``options``.

    Parameters
    ----------
    options : see ``BuildOptions``.
    progress : show a tqdm bar (fields/s, cells/s).
    max_shards : build at most this many missing shards in this call, then stop (the output stays
        resumable; ``BuildResult.complete`` tells whether it is finished).

    Raises
    ------
    LabelError, CsvFormatError : a bad ``train.csv`` (before any output is written).
    BuildError : bad options or too few images for the folds; ConfigMismatchError: ``out`` was
        built with other arguments; BuildError: a worker failed on a task (a bug or I/O error,
        not a bad field: bad fields are skipped and listed in ``skipped.csv``).
    """
    t0 = time.perf_counter()
    check_options(options)
    labels = read_labels(options.labels)  # stops on an unknown label, naming the line
    try:
        folds = assign_folds(list(labels), labels, options.folds, options.seed)
    except ValueError as e:
        raise BuildError(f"{options.labels}: {e}") from None
    image_ids = sorted(labels)
    if options.limit is not None:
        image_ids = image_ids[: options.limit]
    per_shard = options.images_per_shard or estimate_images_per_shard(
        options.shard_mb, options.crop.size, options.encoding, cells_per_field=1 if options.crop.is_field else CELLS_PER_FIELD
    )
    tasks = plan_shards(image_ids, folds, labels, per_shard, read_sources(options.labels))
    config = content_config(options, per_shard)
    digest = config_hash(config)
    out = str(options.out)
    run_info = {"runner": options.runner, "workers": options.workers, "shard_mb": options.shard_mb,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if options.runner == "beam":
        from tfrecord_builder.beam_runner import check_inputs, import_beam, stage_models

        import_beam()  # a missing apache-beam stops the build before any output, naming the install line
        check_inputs(options)
        check_segmenter(stage_models(options))  # model files may be remote (gs://); the workers make their own
        segmenter = None
    else:
        segmenter = check_segmenter(options)  # one that cannot be made stops the build before any output
    prepare_output(out, config, run_info)
    fileutil.makedirs(fileutil.join(out, shardset.PARTS_DIR))
    clean_temp_files(out)
    write_folds_csv(fileutil.join(out, shardset.FOLDS_FILE), folds)

    shard_files = {n for n in fileutil.listdir(out) if n.endswith(".tfrec")}
    parts: dict[str, dict] = {}
    for task in tasks:
        part = load_part(out, task, digest, shard_files)
        if part is not None:
            parts[task.stem] = part
    todo = [t for t in tasks if t.stem not in parts]
    kept = len(parts)
    if not todo and fileutil.exists(fileutil.join(out, shardset.SUMMARY)):
        log.info("%s is complete (%d shards): nothing to do", out, kept)
        return result_from_summary(out, shardset.read_summary(out), 0, kept, time.perf_counter() - t0)
    remove_unfinished(out, todo, shard_files)  # a resumed build is incomplete until assembled again
    if max_shards is not None:
        todo = todo[: max(0, max_shards)]
    log.info(
        "%s: %d images in %d shards (%d per shard), %d done, %d to build with %d worker(s)",
        out, len(image_ids), len(tasks), per_shard, kept, len(todo), options.workers,
    )

    bar = None
    if progress and options.runner == "local":  # the Beam runner's progress is its runner's (e.g. Dataflow's UI)
        from tqdm import tqdm

        bar = tqdm(total=sum(len(t.image_ids) for t in todo), unit="field", desc="cells → tfrecords", smoothing=0)
    counts = {"fields": 0, "cells": 0}
    t_run = time.perf_counter()

    def on_field(fields: int, cells: int) -> None:
        counts["fields"] += fields
        counts["cells"] += cells
        if bar is not None:
            dt = max(time.perf_counter() - t_run, 1e-9)
            bar.update(fields)
            bar.set_postfix(fields_s=f"{counts['fields'] / dt:.2f}", cells_s=f"{counts['cells'] / dt:.1f}",
                            refresh=False)

    def on_done(task: ShardTask, part: dict) -> None:
        parts[task.stem] = part

    try:
        if options.runner == "beam":
            run_beam(todo, options, digest, parts)
        else:
            run_tasks(todo, options, digest, on_done, on_field, segmenter=segmenter)
    finally:
        if bar is not None:
            bar.close()
    built = len(todo)
    if len(parts) < len(tasks):
        done = [parts[t.stem] for t in tasks if t.stem in parts]
        log.info("stopped after %d shard(s); %d of %d done: rerun to finish", built, len(done), len(tasks))
        return BuildResult(
            out=out, complete=False, fields=sum(p["fields"] for p in done),
            fields_skipped=sum(len(p["skipped"]) for p in done), cells=sum(p["count"] for p in done),
            cells_dropped=sum(p["cells_dropped"] for p in done), shards=sum(1 for p in done if p["shard"]),
            bytes=sum(p["bytes"] for p in done), seconds=time.perf_counter() - t0, shards_built=built, shards_kept=kept,
        )
    wall = time.perf_counter() - t0
    summary = assemble(out, tasks, [parts[t.stem] for t in tasks], config, options.folds, wall)
    result = result_from_summary(out, summary, built, kept, wall)
    if result.cells == 0:
        log.error("nothing could be built: all %d field(s) were skipped (see %s)", summary["fields_skipped"],
                  fileutil.join(out, shardset.SKIPPED))
    return result
