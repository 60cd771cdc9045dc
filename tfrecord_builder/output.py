"""The output folder of a build: create or check it, resume from it, and assemble it at the end.

Resuming: a task whose sidecar exists (for the same task and content) and whose shard exists with
the recorded size is done; a rerun builds only the others. Temporary files (``.tmp-*``) and shards
without a sidecar, left by a killed run, are removed. ``build_config.json`` holds the arguments
that define the content; an output made with other arguments is refused (``ConfigMismatchError``).
One builder per output folder at a time. File names and formats: ``hpa_tf.shardset``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from hpa_tf import fileutil, shardset
from hpa_tf.labels import CLASS_NAMES, NUM_CLASSES, parse_labels
from tfrecord_builder.options import BuildError, ConfigMismatchError, config_differences
from tfrecord_builder.plan import ShardTask

log = logging.getLogger(__name__)


def prepare_output(out: str, config: dict, run_info: dict) -> None:
    """Create ``out`` with ``build_config.json``, or check that an existing one matches ``config``."""
    path = fileutil.join(out, shardset.BUILD_CONFIG)
    if fileutil.exists(path):
        try:
            old = {k: v for k, v in fileutil.read_json(path).items() if k != "run"}
        except (ValueError, AttributeError) as e:
            raise BuildError(f"{path}: unreadable build config ({e}); use a new --out") from None
        if old != config:
            raise ConfigMismatchError(
                f"{out} holds a build made with other arguments ({'; '.join(config_differences(old, config))}): "
                "rerun with the same arguments to resume, or choose another --out"
            )
        return
    foreign = [n for n in fileutil.listdir(out) if shardset.is_shard_name(n) or n in (shardset.MANIFEST, shardset.PARTS_DIR)]
    if foreign:
        raise BuildError(f"{out} holds {foreign[:3]} but no {shardset.BUILD_CONFIG}: not a build of this tool; "
                         "choose another --out")
    fileutil.makedirs(out)
    shardset.write_build_config(out, {**config, "run": run_info})


def clean_temp_files(out: str) -> int:
    """Remove ``.tmp-*`` files left by a killed run (in ``out`` and ``out/parts``)."""
    n = 0
    for folder in (out, fileutil.join(out, shardset.PARTS_DIR)):
        for name in fileutil.listdir(folder):
            if name.startswith(".tmp-"):
                fileutil.remove(fileutil.join(folder, name))
                n += 1
    if n:
        log.info("removed %d temporary file(s) left by an earlier run", n)
    return n


def load_part(out: str, task: ShardTask, config_hash: str, shard_files: set[str]) -> dict | None:
    """The sidecar of ``task`` if the task is done (same task and content, shard present, size right)."""
    path = fileutil.join(out, shardset.PARTS_DIR, f"{task.stem}.json")
    try:
        part = fileutil.read_json(path)
    except (OSError, ValueError):
        return None
    try:
        if part["config_hash"] != config_hash or part["task"] != task.identity():
            return None
        if part["shard"]:
            if part["shard"] not in shard_files or fileutil.file_size(fileutil.join(out, part["shard"])) != part["bytes"]:
                return None
        return part
    except (KeyError, TypeError, OSError):
        return None


def remove_unfinished(out: str, todo: Sequence[ShardTask], shard_files: set[str]) -> None:
    """Make a resumed output incomplete again: drop the assembled files and the shards of the tasks
    still to do (a run killed between a shard and its sidecar leaves such a shard)."""
    for name in (shardset.SUMMARY, shardset.MANIFEST, shardset.SKIPPED):
        fileutil.remove(fileutil.join(out, name))
    stems = {t.stem for t in todo}
    for name in sorted(shard_files):
        if name.rsplit("-n", 1)[0] in stems:
            fileutil.remove(fileutil.join(out, name))


def summarize(tasks: Sequence[ShardTask], parts: Sequence[dict], config: dict, n_folds: int, wall: float) -> dict:
    """``summary.json``'s content: counts per fold and class, skipped fields, bytes, seconds."""
    cells_class = np.zeros((n_folds, NUM_CLASSES), np.int64)
    fields_class = np.zeros((n_folds, NUM_CLASSES), np.int64)
    per_fold = {f: {"fields": 0, "fields_skipped": 0, "cells": 0, "shards": 0, "bytes": 0} for f in range(n_folds)}
    reasons: dict[str, int] = {}
    labels_col = shardset.MANIFEST_COLUMNS.index("labels")
    for task, part in zip(tasks, parts):
        stats = per_fold[task.fold]
        stats["fields"] += part["fields"]
        stats["fields_skipped"] += len(part["skipped"])
        stats["cells"] += part["count"]
        stats["shards"] += 1 if part["shard"] else 0
        stats["bytes"] += part["bytes"]
        skipped = {s[0] for s in part["skipped"]}
        for image_id, label_ids in zip(task.image_ids, task.labels):
            if image_id not in skipped:
                fields_class[task.fold, list(label_ids)] += 1
        for row in part["rows"]:
            cells_class[task.fold, parse_labels(row[labels_col])] += 1
        for _, kind, _ in part["skipped"]:
            reasons[kind] = reasons.get(kind, 0) + 1
    cells = sum(p["count"] for p in parts)
    return {
        "complete": True,
        "fields_planned": sum(len(t.image_ids) for t in tasks),
        "fields": sum(p["fields"] for p in parts),
        "fields_skipped": sum(len(p["skipped"]) for p in parts),
        "cells": cells,
        "cells_dropped_small": sum(p["cells_dropped"] for p in parts),
        "shards": sum(1 for p in parts if p["shard"]),
        "bytes": sum(p["bytes"] for p in parts),
        "bytes_per_cell": round(sum(p["bytes"] for p in parts) / max(cells, 1), 1),
        "work_seconds": round(sum(p["seconds"] for p in parts), 2),
        "work_cpu_seconds": round(sum(p.get("cpu_seconds", 0.0) for p in parts), 2),
        "wall_seconds_last_run": round(wall, 2),
        "peak_worker_rss_mb": max((p.get("peak_rss_mb", 0.0) for p in parts), default=0.0),
        "per_fold": {str(f): v for f, v in per_fold.items()},
        "classes": list(CLASS_NAMES),
        "cells_per_class_and_fold": cells_class.T.tolist(),
        "fields_per_class_and_fold": fields_class.T.tolist(),
        "skipped_reasons": reasons,
        "skipped": [{"image_id": s[0], "kind": s[1], "reason": s[2]} for p in parts for s in p["skipped"]],
        "config": config,
    }


def assemble(out: str, tasks: Sequence[ShardTask], parts: Sequence[dict], config: dict, n_folds: int,
             wall: float) -> dict:
    """Write manifest.csv, skipped.csv and (last) summary.json from the sidecars; drop stray shards."""
    wanted = {p["shard"] for p in parts if p["shard"]}
    for name in fileutil.listdir(out):
        if name.endswith(".tfrec") and name not in wanted:
            log.warning("removing %s: no task of this build made it", name)
            fileutil.remove(fileutil.join(out, name))
    shardset.write_manifest(out, (r for p in parts for r in p["rows"]))
    shardset.write_skipped(out, ((s[0], s[2], s[1]) for p in parts for s in p["skipped"]))
    summary = summarize(tasks, parts, config, n_folds, wall)
    shardset.write_summary(out, summary)
    return summary
