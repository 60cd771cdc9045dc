"""``verify``: read a built shard set back and check it against its manifest, config and summary."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from hpa_tf import fileutil, shardset

log = logging.getLogger(__name__)


class NotAShardSetError(ValueError):
    """``verify`` was given something that is not a built output (no folder, or no manifest and no shards)."""


@dataclass
class VerifyReport:
    """Result of ``verify``: ``problems`` is empty when the output is consistent."""

    shards: int = 0
    records: int = 0
    manifest_rows: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)
    #: the problems that are unreadable (corrupt or truncated) shards, one per shard (also in ``problems``)
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self)


def verify(out: str, sample: int = 2) -> VerifyReport:
    """Check a built output against its manifest.

    Raises ``NotAShardSetError`` when ``out`` is not a folder, or holds neither a manifest nor shards.

    Reads every shard: its record count must equal the count in its name and its manifest rows,
    and its records' (image_id, cell_id) must follow the manifest's order; the first ``sample``
    records of each shard are fully decoded (``hpa_tf.records.parse_example``) and checked for
    shape (the crop spec's size), fold and labels. Manifest shards that are missing and shards that
    the manifest lacks are reported, and the totals of ``summary.json`` are compared.
    """
    import tensorflow as tf

    from hpa_tf.records import parse_example, read_error_reason

    report = VerifyReport()
    problems = report.problems
    out = str(out)
    if not fileutil.isdir(out):
        raise NotAShardSetError(f"{out} is not a folder")
    if not fileutil.exists(fileutil.join(out, shardset.MANIFEST)) and not any(
            shardset.is_shard_name(n) for n in fileutil.listdir(out)):
        raise NotAShardSetError(f"{out} is not a shard set: it holds neither {shardset.MANIFEST} nor shards")
    try:
        manifest = shardset.read_manifest(fileutil.join(out, shardset.MANIFEST))
    except (OSError, ValueError, tf.errors.OpError) as e:
        problems.append(f"cannot read the manifest: {e}")
        return report
    report.manifest_rows = len(manifest)
    crop_size = None
    try:
        crop_size = shardset.read_crop_spec(out).size
    except (OSError, ValueError, tf.errors.OpError) as e:
        problems.append(f"cannot read the crop spec: {e}")
    try:
        summary = shardset.read_summary(out)
        if summary.get("cells") != len(manifest):
            problems.append(f"{shardset.SUMMARY} says {summary.get('cells')} cells, the manifest has {len(manifest)} rows")
    except (OSError, ValueError, tf.errors.OpError) as e:
        problems.append(f"cannot read {shardset.SUMMARY} (incomplete build?): {e}")

    by_shard: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(manifest.shard.tolist()):
        by_shard[name] = np.flatnonzero(manifest.shard == name)
    on_disk = sorted(n for n in fileutil.listdir(out) if n.endswith(".tfrec"))
    for name in sorted(set(by_shard) - set(on_disk)):
        problems.append(f"{name}: in the manifest ({len(by_shard[name])} rows) but not in {out}")
    for name in sorted(set(on_disk) - set(by_shard)):
        problems.append(f"{name}: in {out} but not in the manifest")

    id_spec = {
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "cell_id": tf.io.FixedLenFeature([], tf.int64),
    }
    for name in on_disk:
        path = fileutil.join(out, name)
        rows = by_shard.get(name, np.zeros(0, np.int64))
        try:
            fold, _, count_in_name = shardset.parse_shard_name(name)
        except ValueError as e:
            problems.append(str(e))
            continue
        report.shards += 1
        ids: list[tuple[str, int]] = []
        try:
            dataset = tf.data.TFRecordDataset(path).batch(256).map(lambda s: tf.io.parse_example(s, id_spec))
            for batch in dataset:
                ids.extend(zip((b.decode() for b in batch["image_id"].numpy()), batch["cell_id"].numpy().tolist()))
        except tf.errors.OpError as e:
            report.corrupt.append(f"{name}: unreadable after {len(ids)} record(s) (corrupt or truncated shard): "
                                  f"{read_error_reason(e)}")
            problems.append(report.corrupt[-1])
            continue
        report.records += len(ids)
        if len(ids) != count_in_name:
            problems.append(f"{name}: {len(ids)} records, the name says {count_in_name}")
        if name in by_shard and len(ids) != len(rows):
            problems.append(f"{name}: {len(ids)} records, the manifest lists {len(rows)}")
        listed = [(str(manifest.image_id[i]), int(manifest.cell_id[i])) for i in rows]
        if name in by_shard and len(ids) == len(rows) and ids != listed:
            k = next(i for i, (a, b) in enumerate(zip(ids, listed)) if a != b)
            problems.append(f"{name}: record {k} is {ids[k]}, the manifest says {listed[k]}")
        bad_folds = set(manifest.fold[rows].tolist()) - {fold}
        if bad_folds:
            problems.append(f"{name}: manifest rows of fold(s) {sorted(bad_folds)} in a fold-{fold} shard")
        try:
            for k, serialized in enumerate(tf.data.TFRecordDataset(path).take(sample)):
                ex = parse_example(serialized, crop_size=crop_size)
                image, mask = ex["image"].numpy(), ex["mask"].numpy()
                s = crop_size or image.shape[0]
                if image.shape != (s, s, 4) or mask.shape != (s, s, 1) or int(ex["crop_size"]) != s:
                    problems.append(f"{name} record {k}: image {image.shape}, mask {mask.shape}, crop size {s} expected")
                if int(ex["fold"]) != fold:
                    problems.append(f"{name} record {k}: fold {int(ex['fold'])}, the name says {fold}")
                if k < len(rows) and not np.array_equal(manifest.labels[rows[k]], ex["labels"].numpy()):
                    problems.append(f"{name} record {k}: labels {ex['label_ids'].numpy().tolist()}, the manifest "
                                    f"says {np.flatnonzero(manifest.labels[rows[k]]).tolist()}")
                report.decoded += 1
        except (tf.errors.OpError, ValueError) as e:
            problems.append(f"{name}: a sample record does not decode: {e}")
    log.info("verified %s: %d shards, %d records, %d manifest rows, %d decoded, %d problem(s)",
             out, report.shards, report.records, report.manifest_rows, report.decoded, len(problems))
    return report
