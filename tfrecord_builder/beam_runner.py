"""The Beam runner: the shard tasks of a build as an Apache Beam pipeline (DirectRunner, Dataflow,
Flink, Spark), giving the same shard set as the local runner.

``tfrecord_builder.builder.build`` plans, resumes and assembles as for the local runner; only the
tasks still to do are handed to ``run_tasks`` here, which runs::

    ReadFromText(one JSON line per field: shard key, position, ID, labels, source) → Reshuffle
      → ParDo(EncodeFieldFn)   read the field's files through Beam's file systems (gs:// included)
                               into a scratch folder, then tfrecord_builder.field.encode_field
                               (read → segment → crop → encode: the local runner's function)
      → GroupByKey(shard key = (fold, index) of the planned task)
      → ParDo(WriteShardFn)    the task's records in planned order → fold{f}-{index:05d}-n{count}.tfrec
                               and parts/fold{f}-{index:05d}.json, each under a temporary name,
                               then renamed

The shards are the planned tasks of ``tfrecord_builder.plan``, so the shard set is the local
runner's, shard for shard and byte for byte. Output is deterministic: a field is encoded from its
inputs alone, a shard is one group written under its final name only when complete, so a retried
bundle rewrites the same bytes under the same names and never adds records. The launcher then
reads the sidecars, as the local runner does, and writes ``manifest.csv``, ``skipped.csv`` and
``summary.json``. A field that cannot be used is skipped and listed as by the local runner; an
exception in a step (a bug, an I/O error) fails the pipeline after the runner's retries.

``apache_beam`` is imported only here (``pip install .[beam]``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from hpa_tf import fileutil
from hpa_tf.io import CHANNELS, EXTENSIONS, ImageReadError, find_channel_file
from hpa_tf.shardset import PARTS_DIR, shard_name
from tfrecord_builder.field import FieldResult, encode_field
from tfrecord_builder.options import BuildError, BuildOptions
from tfrecord_builder.plan import ShardTask

log = logging.getLogger(__name__)

#: What ``pip`` needs for ``--runner beam``.
INSTALL_HINT = "pip install .[beam]  (or: pip install 'apache-beam[gcp]')"
#: Bytes per read/write call when copying through Beam's file systems.
CHUNK = 8 << 20


def import_beam():
    """``apache_beam``, or BuildError with the install line."""
    try:
        import apache_beam
    except ImportError as e:
        raise BuildError(f"--runner beam needs Apache Beam ({e}): {INSTALL_HINT}") from None
    return apache_beam


def pipeline_args(options: BuildOptions) -> list[str]:
    """Beam pipeline arguments: ``options.beam_options`` (a string is split as a shell would), or
    the local runner with ``options.workers`` workers (in this process with 1).

    The local default is ``FnApiRunner``, the Python engine of Beam's DirectRunner: the
    DirectRunner itself first tries Prism, a binary it downloads on first use, and falls back to
    this one when it cannot; naming it keeps a local build offline and the same everywhere.
    """
    args: list[str] = []
    for item in options.beam_options:
        args += shlex.split(item)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        mode = "in_memory" if options.workers <= 1 else "multi_processing"
        args += [f"--direct_num_workers={options.workers}", f"--direct_running_mode={mode}"]
    return args


# ---------------------------------------------------------------------------------------------
# files through Beam's file systems
# ---------------------------------------------------------------------------------------------


def _filesystems():
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems, CompressionTypes.UNCOMPRESSED


def _join(folder: str, name: str) -> str:
    return fileutil.join(folder, name) if fileutil.is_remote(folder) else os.path.join(folder, name)


def copy_to_local(src: str, dst: str) -> None:
    """Copy a file readable by Beam's file systems to a local path."""
    fs, raw = _filesystems()
    with fs.open(src, compression_type=raw) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, CHUNK)


def upload(local: str, dst: str) -> None:
    """Copy a local file to ``dst`` (any Beam file system) under a temporary name, then rename it:
    ``dst`` holds either its old content or the whole new file, and the same bytes on a retry."""
    fs, raw = _filesystems()
    tmp = fileutil.temp_name(dst)
    try:
        with open(local, "rb") as f, fs.create(tmp, mime_type="application/octet-stream", compression_type=raw) as g:
            shutil.copyfileobj(f, g, CHUNK)
        if fs.exists(dst):  # a retried bundle: the same bytes again
            fs.delete([dst])
        fs.rename([tmp], [dst])
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.delete([tmp])
        except Exception:  # noqa: BLE001 - the original error matters
            pass
        raise


def _channel_files(data_dir: str, image_id: str) -> dict[str, str]:
    """``{channel: path}`` of the field's channel files in ``data_dir`` (any Beam file system), the
    one ``hpa_tf.io.find_channel_file`` would take for each channel: that function itself for a
    local folder, one listing of the field's prefix for a remote one (a prefix listing is one call
    on GCS; a local glob would scan the whole folder for every field)."""
    if not fileutil.is_remote(data_dir):
        chosen = {}
        for channel in CHANNELS:
            try:
                chosen[channel] = str(find_channel_file(data_dir, image_id, channel))
            except ImageReadError:
                pass
        return chosen
    fs, _ = _filesystems()
    prefix = _join(data_dir, f"{image_id}_")
    found = {}
    for result in fs.match([prefix + "*"]):
        for meta in result.metadata_list:
            found[meta.path.replace("\\", "/").rsplit("/", 1)[-1]] = meta.path
    chosen = {}
    for channel in CHANNELS:
        for ext in EXTENSIONS:
            name = next((n for n in (f"{image_id}_{channel}.{ext}", f"{image_id}_{channel}.{ext.upper()}")
                         if n in found), None)
            if name is not None:
                chosen[channel] = found[name]
                break
    return chosen


def stage_field(options: BuildOptions, image_id: str, scratch: str) -> BuildOptions:
    """Copy the field's channel files (and saved mask) into ``scratch`` through Beam's file
    systems; returns the options that point ``encode_field`` there."""
    fs, _ = _filesystems()
    data = os.path.join(scratch, "d")
    os.makedirs(data)
    for path in _channel_files(options.data_dir, image_id).values():
        copy_to_local(path, os.path.join(data, path.replace("\\", "/").rsplit("/", 1)[-1]))
    changes: dict = {"data_dir": data}
    if options.masks_dir:
        masks = os.path.join(scratch, "m")
        os.makedirs(masks)
        name = f"{image_id}_cells.png"
        src = _join(options.masks_dir, name)
        if fs.exists(src):
            copy_to_local(src, os.path.join(masks, name))
        changes["masks_dir"] = masks
    return dataclasses.replace(options, **changes)


def unstage_reason(result: FieldResult, options: BuildOptions, staged: BuildOptions) -> FieldResult:
    """The field's skip reason with the scratch folders named as the local runner names the inputs."""
    if result.skip is None:
        return result
    kind, reason = result.skip
    if kind == "not in data dir":  # tfrecord_builder.field.read_field names the folder as given
        reason = reason.replace(staged.data_dir, str(options.data_dir))
    else:  # hpa_tf.io names files under Path(folder)
        shown = str(options.data_dir).rstrip("/") if fileutil.is_remote(options.data_dir) else str(Path(options.data_dir))
        reason = reason.replace(str(Path(staged.data_dir)), shown)
    if options.masks_dir and staged.masks_dir:
        reason = reason.replace(staged.masks_dir, str(options.masks_dir))
    return dataclasses.replace(result, skip=(kind, reason))


def stage_models(options: BuildOptions, cache: str | None = None) -> BuildOptions:
    """The options with every remote segmenter file (e.g. ``--nuclei-model gs://B/nuclei.pth``)
    replaced by a local copy in ``cache`` (default: ``hpa-tf-models`` in the temp folder), fetched
    through Beam's file systems once per machine (a copy of the same size is reused)."""
    import hashlib

    remote = {k: v for k, v in options.segmenter_options.items() if isinstance(v, str) and fileutil.is_remote(v)}
    if not remote or options.masks_dir:
        return options
    fs, _ = _filesystems()
    cache = cache or os.path.join(tempfile.gettempdir(), "hpa-tf-models")
    os.makedirs(cache, exist_ok=True)
    local = dict(options.segmenter_options)
    for key, path in remote.items():
        matched = fs.match([path])[0].metadata_list
        if not matched:
            raise BuildError(f"segmenter {options.segmenter}: {key} {path} not found")
        digest = hashlib.sha1(path.encode()).hexdigest()[:12]
        dst = os.path.join(cache, f"{digest}-{path.rstrip('/').rsplit('/', 1)[-1]}")
        if not (os.path.isfile(dst) and os.path.getsize(dst) == matched[0].size_in_bytes):
            tmp = fileutil.temp_name(dst)
            copy_to_local(path, tmp)
            os.replace(tmp, dst)
        local[key] = dst
    return dataclasses.replace(options, segmenter_options=local)


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def field_elements(tasks: Sequence[ShardTask]) -> list[tuple]:
    """One element per field: ``((fold, index), position, image_id, labels, source)``."""
    return [((t.fold, t.index), k, image_id, tuple(labels), t.source(k))
            for t in tasks for k, (image_id, labels) in enumerate(zip(t.image_ids, t.labels))]


def encode_element(element: tuple, options: BuildOptions, segmenter: object | None) -> tuple:
    """``(key, (position, image_id, labels, source, FieldResult, seconds, cpu_seconds))`` for one field."""
    key, position, image_id, labels, source = element
    # thread CPU time: a Beam worker process runs several bundles at once, in threads
    t0, cpu0 = time.perf_counter(), time.thread_time()
    with tempfile.TemporaryDirectory(prefix="hpa-field-") as scratch:
        staged = stage_field(options, image_id, scratch)
        result = encode_field(image_id, labels, key[0], staged, segmenter, source=source)
    result = unstage_reason(result, options, staged)
    return key, (position, image_id, labels, source, result, time.perf_counter() - t0, time.thread_time() - cpu0)


def write_group(key: tuple[int, int], values: Sequence[tuple], options: BuildOptions, config_hash: str) -> dict:
    """Write one shard task's shard and sidecar from its encoded fields (any order); returns the sidecar.

    The sidecar is ``tfrecord_builder.worker.build_shard``'s, so resuming and assembling do not
    care which runner built a shard.
    """
    import tensorflow as tf

    from tfrecord_builder.worker import _peak_rss_mb

    t0, cpu0 = time.perf_counter(), time.thread_time()
    by_position = {}
    for value in values:
        by_position[value[0]] = value  # a duplicate (retried upstream bundle) is the same field
    ordered = [by_position[k] for k in sorted(by_position)]
    if [v[0] for v in ordered] != list(range(len(ordered))):
        raise BuildError(f"shard task {key}: fields at positions {sorted(by_position)}, expected 0..{len(ordered) - 1}")
    fold, index = key
    task = ShardTask(fold, index, tuple(v[1] for v in ordered), tuple(tuple(v[2]) for v in ordered),
                     tuple(v[3] for v in ordered))
    results: list[FieldResult] = [v[4] for v in ordered]
    count = sum(len(r.examples) for r in results)
    shard = shard_name(fold, index, count) if count else ""
    size = 0
    if shard:
        with tempfile.TemporaryDirectory(prefix="hpa-shard-") as scratch:
            local = os.path.join(scratch, shard)
            with tf.io.TFRecordWriter(local) as writer:
                for result in results:
                    for example in result.examples:
                        writer.write(example)
            size = os.path.getsize(local)
            upload(local, _join(options.out, shard))
    rows: list[list] = []
    for result in results:
        rows += result.manifest_rows(shard, len(rows))
    part = {
        "task": task.identity(),
        "config_hash": config_hash,
        "shard": shard,
        "count": count,
        "bytes": size,
        "fields": sum(1 for r in results if r.skip is None),
        "cells_dropped": sum(r.cells_dropped for r in results),
        "skipped": [[r.image_id, *r.skip] for r in results if r.skip is not None],
        "seconds": round(sum(v[5] for v in ordered) + time.perf_counter() - t0, 3),
        "cpu_seconds": round(sum(v[6] for v in ordered) + time.thread_time() - cpu0, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="hpa-part-") as scratch:
        local = os.path.join(scratch, "part.json")
        with open(local, "w", encoding="utf-8") as f:
            f.write(json.dumps(part, indent=1) + "\n")
        upload(local, _join(_join(options.out, PARTS_DIR), f"{task.stem}.json"))
    return part


def _make_dofns(beam):
    """The pipeline's DoFns (defined once Beam is imported)."""
    from apache_beam.metrics import Metrics

    class EncodeFieldFn(beam.DoFn):
        """One field → ``(shard key, its encoded records and rows)``; the segmenter is made once per instance."""

        def __init__(self, options: BuildOptions):
            self.options = options
            self.segmenter = None
            self.fields = Metrics.counter("tfrecord_builder", "fields")
            self.skipped = Metrics.counter("tfrecord_builder", "fields_skipped")
            self.cells = Metrics.counter("tfrecord_builder", "cells")

        def setup(self):
            import cv2

            from tfrecord_builder.worker import make_segmenter

            cv2.setNumThreads(1)  # the runner provides the parallelism
            self.segmenter = make_segmenter(stage_models(self.options))

        def process(self, element):
            out = encode_element(element, self.options, self.segmenter)
            result = out[1][4]
            self.fields.inc()
            self.cells.inc(len(result.examples))
            if result.skip is not None:
                self.skipped.inc()
            yield out

    class WriteShardFn(beam.DoFn):
        """One shard task's fields → its shard and sidecar (deterministic names, temp-then-rename)."""

        def __init__(self, options: BuildOptions, config_hash: str):
            self.options, self.config_hash = options, config_hash
            self.shards = Metrics.counter("tfrecord_builder", "shards")

        def process(self, element):
            key, values = element
            part = write_group(tuple(key), list(values), self.options, self.config_hash)
            self.shards.inc()
            yield part["task"]["fold"], part["task"]["index"], part["count"]

    return EncodeFieldFn, WriteShardFn


def check_inputs(options: BuildOptions) -> None:
    """BuildError when the data dir (local or remote) holds no file at all."""
    fs, _ = _filesystems()
    try:
        matched = fs.match([_join(options.data_dir, "*")], limits=[1])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError and others, per file system
        raise BuildError(f"data dir {options.data_dir}: cannot list it through Beam's file systems: {e}") from None
    if not matched:
        raise BuildError(f"data dir {options.data_dir} holds no files")


def element_line(element: tuple) -> str:
    """One field element as a JSON line (``field_elements``' tuples)."""
    key, position, image_id, labels, source = element
    return json.dumps([list(key), position, image_id, list(labels), source])


def element_from_line(line: str) -> tuple:
    """The inverse of ``element_line``."""
    key, position, image_id, labels, source = json.loads(line)
    return (int(key[0]), int(key[1])), int(position), str(image_id), tuple(int(c) for c in labels), source


def write_elements(todo: Sequence[ShardTask], out: str) -> str:
    """Write the fields to build as JSON lines to ``out/parts/.tmp-fields-….jsonl`` (through Beam's
    file systems) and return its path: the pipeline reads its input from there, so the job
    description stays small whatever the number of fields (Dataflow limits its size). A killed
    run's copy is removed by the next start, as every ``.tmp-`` file."""
    import uuid

    path = _join(_join(out, PARTS_DIR), f".tmp-fields-{uuid.uuid4().hex[:8]}.jsonl")
    with tempfile.TemporaryDirectory(prefix="hpa-fields-") as scratch:
        local = os.path.join(scratch, "fields.jsonl")
        with open(local, "w", encoding="utf-8") as f:
            for element in field_elements(todo):
                f.write(element_line(element) + "\n")
        upload(local, path)
    return path


def run_tasks(todo: Sequence[ShardTask], options: BuildOptions, config_hash: str) -> dict:
    """Run the shard tasks as one Beam pipeline and wait for it; the sidecars land in ``out/parts``.

    Returns the pipeline's counters (``fields``, ``fields_skipped``, ``cells``, ``shards``) and
    ``seconds``. Raises BuildError when the pipeline fails.
    """
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    args = pipeline_args(options)
    EncodeFieldFn, WriteShardFn = _make_dofns(beam)
    n_fields = sum(len(t.image_ids) for t in todo)
    t0 = time.perf_counter()
    log.info("beam: %d field(s) in %d shard task(s); pipeline options %s", n_fields, len(todo), " ".join(args))
    fields_file = write_elements(todo, options.out)
    fs, _ = _filesystems()
    try:
        pipeline = beam.Pipeline(options=PipelineOptions(args))
        _ = (
            pipeline
            | "Fields" >> beam.io.ReadFromText(fields_file)
            | "Parse" >> beam.Map(element_from_line)
            | "Spread" >> beam.Reshuffle()
            | "Encode" >> beam.ParDo(EncodeFieldFn(options))
            | "ByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(options, config_hash))
        )
        result = pipeline.run()
        state = result.wait_until_finish()
    except BuildError:
        raise
    except Exception as e:  # a failed step, after the runner's retries
        raise BuildError(f"the Beam pipeline failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        try:
            fs.delete([fields_file])
        except Exception:  # noqa: BLE001 - the next start removes it anyway
            pass
    if str(state).split(".")[-1] not in ("DONE", "UNKNOWN"):
        raise BuildError(f"the Beam pipeline ended in state {state}")
    counters = {"fields": 0, "fields_skipped": 0, "cells": 0, "shards": 0}
    try:
        for counter in result.metrics().query()["counters"]:
            if counter.key.metric.name in counters:
                counters[counter.key.metric.name] += int(counter.committed or counter.attempted or 0)
    except Exception:  # noqa: BLE001 - metrics are informative only; some runners lack them
        pass
    counters["seconds"] = round(time.perf_counter() - t0, 2)
    return counters
