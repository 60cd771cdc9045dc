"""tfrecord_builder --runner beam: on Beam's local runner (in this process, one worker) it builds the
local runner's shard set from the same arguments (same records per fold byte for byte, same manifest,
skipped list, build config and summary counts), verify passes, a rerun does nothing, a retried
shard write does not duplicate records, and per-row sources travel into the records."""

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import tensorflow as tf

from hpa_tf.crops import CropSpec
from hpa_tf.io import read_labels, read_sources
from hpa_tf.synthetic import write_dataset
from tfrecord_builder import BuildError, BuildOptions, build, verify
from tfrecord_builder.__main__ import main as cli

beam = pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install .[beam])")

CROP = 48
#: summary.json entries that measure the run (time, memory), not the content.
RUN_KEYS = {"work_seconds", "work_cpu_seconds", "wall_seconds_last_run", "peak_worker_rss_mb"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Seven synthetic 256 px fields (builtin segmenter), one with a corrupt channel file, one listed
    but absent, and a Source column naming two sources."""
    root = tmp_path_factory.mktemp("beam-synthetic")
    write_dataset(root, n_train=7, n_test=0, size=256, seed=3)
    (root / "train" / f"{_corrupt_id(root)}_green.png").write_bytes(b"\x89PNG not really")
    rows = list(csv.DictReader(open(root / "train.csv", newline="")))
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Label", "Source"])
        for k, row in enumerate(rows):
            w.writerow([row["ID"], row["Label"], "hpa-public" if k % 2 else ""])
        w.writerow(["absent-id", "0", "hpa-public"])
    return root


def _corrupt_id(dataset: Path) -> str:
    return sorted(i for i in read_labels(dataset / "train.csv") if i != "absent-id")[2]


def _options(dataset: Path, out: Path, **kw) -> BuildOptions:
    args = dict(data_dir=str(dataset / "train"), labels=str(dataset / "train.csv"), out=str(out),
                crop=CropSpec(size=CROP), segmenter="builtin", images_per_shard=3, folds=2, seed=0)
    args.update(kw)
    return BuildOptions(**args)


@pytest.fixture(scope="module")
def both(dataset, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("beam-out")
    local, beamed = root / "local", root / "beam"
    assert build(_options(dataset, local)).complete
    result = build(_options(dataset, beamed, runner="beam"))
    assert result.complete and result.shards_built == result.shards > 0
    return local, beamed


def _records_by_fold(out: Path) -> dict[int, list[bytes]]:
    by_fold: dict[int, list[bytes]] = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tfrec"):
            fold = int(name[4:].split("-")[0])
            by_fold.setdefault(fold, []).extend(r.numpy() for r in tf.data.TFRecordDataset(str(out / name)))
    return {f: sorted(v) for f, v in by_fold.items()}


def _content(out: Path) -> dict[str, bytes]:
    names = [n for n in os.listdir(out) if n.endswith(".tfrec") or n in ("manifest.csv", "skipped.csv", "folds.csv")]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def test_beam_builds_the_local_runners_shard_set(both):
    local, beamed = both
    records = _records_by_fold(beamed)
    assert records == _records_by_fold(local)
    assert len(records) == 2 and all(records.values())
    for name in ("manifest.csv", "skipped.csv", "folds.csv"):
        assert (beamed / name).read_bytes() == (local / name).read_bytes(), name
    assert _content(beamed) == _content(local)  # shard for shard, too: the same planned tasks
    config = {k: v for k, v in json.loads((beamed / "build_config.json").read_text()).items() if k != "run"}
    assert config == {k: v for k, v in json.loads((local / "build_config.json").read_text()).items() if k != "run"}
    assert json.loads((beamed / "build_config.json").read_text())["run"]["runner"] == "beam"
    summaries = [{k: v for k, v in json.loads((o / "summary.json").read_text()).items() if k not in RUN_KEYS}
                 for o in (local, beamed)]
    assert summaries[0] == summaries[1]
    assert verify(str(beamed)).ok
    assert not [n for n in os.listdir(beamed / "parts") if n.startswith(".tmp-")]  # the fields list is gone


def test_bad_fields_are_skipped_and_listed_as_by_the_local_runner(dataset, both):
    _, beamed = both
    corrupt = _corrupt_id(dataset)
    with open(beamed / "skipped.csv", newline="") as f:
        skipped = {r["image_id"]: r for r in csv.DictReader(f)}
    assert set(skipped) == {corrupt, "absent-id"}
    assert skipped["absent-id"]["kind"] == "not in data dir"
    assert skipped["absent-id"]["reason"] == f"no channel files in {dataset / 'train'}"
    assert skipped[corrupt]["kind"] == "bad channel file"
    assert str(dataset / "train" / f"{corrupt}_green.png") in skipped[corrupt]["reason"]  # not the scratch folder
    assert json.loads((beamed / "summary.json").read_text())["skipped_reasons"] == {
        "bad channel file": 1, "not in data dir": 1}


def test_sources_of_the_label_file_reach_the_records(dataset, both):
    _, beamed = both
    with open(dataset / "train.csv", newline="") as f:
        given = {r["ID"]: r["Source"] or "train" for r in csv.DictReader(f)}
    with open(beamed / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows} == {"train", "hpa-public"}
    assert all(r["source"] == given[r["image_id"]] for r in rows)
    first = next(n for n in sorted(os.listdir(beamed)) if n.endswith(".tfrec"))
    spec = {"image_id": tf.io.FixedLenFeature([], tf.string), "source": tf.io.FixedLenFeature([], tf.string)}
    for serialized in tf.data.TFRecordDataset(str(beamed / first)):
        ex = tf.io.parse_single_example(serialized, spec)
        assert ex["source"].numpy().decode() == given[ex["image_id"].numpy().decode()]


def test_rerun_of_a_finished_beam_build_does_nothing(dataset, both):
    _, beamed = both

    def state() -> dict:  # folds.csv is rewritten (same bytes) by every start, as with the local runner
        return {n: (beamed / n).read_bytes() if n == "folds.csv" else (beamed / n).stat().st_mtime_ns
                for n in os.listdir(beamed) if os.path.isfile(beamed / n)}

    before = state()
    result = build(_options(dataset, beamed, runner="beam"))
    assert result.complete and result.shards_built == 0 and result.shards_kept == result.shards
    assert state() == before


def test_beam_resumes_a_killed_build_and_a_retried_write_adds_nothing(dataset, both, tmp_path):
    """A shard written twice (a retried bundle) keeps its name and records; a killed build resumes."""
    from tfrecord_builder.beam_runner import encode_element, field_elements, write_group
    from tfrecord_builder.options import config_hash, content_config
    from tfrecord_builder.plan import ShardTask

    local, beamed = both
    out = tmp_path / "killed"
    shutil.copytree(beamed, out)
    victim = sorted(n for n in os.listdir(out) if n.endswith(".tfrec"))[0]
    (out / victim).unlink()
    (out / "parts" / (victim.rsplit("-n", 1)[0] + ".json")).unlink()
    (out / "summary.json").unlink()
    (out / f".tmp-0123abcd-{victim}").write_bytes(b"half a shard")
    result = build(_options(dataset, out, runner="beam"))
    assert result.shards_built == 1 and result.shards_kept == result.shards - 1
    assert _content(out) == _content(local) and verify(str(out)).ok

    # the write step run twice for one shard task, its fields given twice and out of order
    options = _options(dataset, out, runner="beam")
    part = json.loads((out / "parts" / (victim.rsplit("-n", 1)[0] + ".json")).read_text())
    ids = tuple(part["task"]["image_ids"])
    task = ShardTask(part["task"]["fold"], part["task"]["index"], ids,
                     tuple(tuple(read_labels(dataset / "train.csv")[i]) for i in ids),
                     tuple(read_sources(dataset / "train.csv").get(i) for i in ids))
    encoded = [encode_element(e, options, None if options.masks_dir else _segmenter()) for e in field_elements([task])]
    digest = config_hash(content_config(options, options.images_per_shard))
    for values in (encoded[::-1] + encoded, encoded):
        again = write_group(encoded[0][0], [v for _, v in values], options, digest)
        assert again["shard"] == victim and again["count"] == part["count"]
    assert _content(out) == _content(local) and verify(str(out)).ok
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def _segmenter():
    from hpa_tf.segmentation import get_segmenter

    return get_segmenter("builtin")


def test_cli_runner_beam_and_its_errors(dataset, both, tmp_path, capsys, monkeypatch):
    _, beamed = both
    argv = ["--data-dir", str(dataset / "train"), "--labels", str(dataset / "train.csv"), "--crop-size", str(CROP),
            "--images-per-shard", "3", "--folds", "2", "--no-progress", "-q", "--runner", "beam"]
    assert cli([*argv, "--out", str(beamed)]) == 0  # finished: nothing to do
    assert "built 0 shard(s) now" in capsys.readouterr().out
    # beam options without the beam runner, and a missing apache-beam: one-line errors, no output folder
    assert cli([*argv[:-2], "--out", str(tmp_path / "a"), "--beam-options", "--runner=DirectRunner --project=P"]) == 2
    assert "beam options need runner beam" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "apache_beam", None)
    assert cli([*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "pip install .[beam]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_remote_data_dir_needs_the_beam_runner(dataset, tmp_path):
    with pytest.raises(BuildError, match="only --runner beam reads fields from remote storage"):
        build(_options(dataset, tmp_path / "r", data_dir="gs://bucket/train"))


def test_fields_on_a_remote_file_system_are_read_through_beam(dataset, tmp_path):
    """A data dir and masks dir behind a URL scheme (as gs:// is) are read through Beam's file
    systems: here a Beam file system registered for ``fakefs://`` that serves a local folder."""
    from apache_beam.io.localfilesystem import LocalFileSystem

    root = str(dataset)

    class FakeRemoteFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "fakefs"

        @staticmethod
        def _local(path):
            return path.replace("fakefs://", root + "/", 1)

        def match(self, patterns, limits=None):
            return super().match([self._local(p) for p in patterns], limits)

        def open(self, path, *args, **kwargs):
            return super().open(self._local(path), *args, **kwargs)

        def exists(self, path):
            return super().exists(self._local(path))

    local = tmp_path / "local-masks"
    assert build(_options(dataset, local, masks_dir=str(dataset / "masks"))).complete
    out = tmp_path / "from-remote"
    result = build(_options(dataset, out, runner="beam", data_dir="fakefs://train", masks_dir="fakefs://masks"))
    assert result.complete and result.cells > 0
    assert _records_by_fold(out) == _records_by_fold(local)
    assert (out / "manifest.csv").read_bytes() == (local / "manifest.csv").read_bytes()
    with open(out / "skipped.csv", newline="") as f:
        skipped = {r["image_id"]: r for r in csv.DictReader(f)}
    assert skipped["absent-id"]["reason"] == "no channel files in fakefs://train"
    assert f"fakefs://train/{_corrupt_id(dataset)}_green.png" in skipped[_corrupt_id(dataset)]["reason"]
    config = json.loads((out / "build_config.json").read_text())
    assert (config["data_dir"], config["masks_dir"], config["segmenter"]) == ("fakefs://train", "fakefs://masks", "masks")
    assert verify(str(out)).ok
    with pytest.raises(BuildError, match="data dir fakefs://nothing-here holds no files"):
        build(_options(dataset, tmp_path / "none", runner="beam", data_dir="fakefs://nothing-here"))
    assert not (tmp_path / "none").exists()


def test_remote_segmenter_files_are_fetched_once(tmp_path):
    """hpacellseg model files given as remote paths (gs://…) are copied to the worker through
    Beam's file systems, once; local paths and saved masks are left alone."""
    from apache_beam.io.localfilesystem import LocalFileSystem

    from tfrecord_builder.beam_runner import stage_models

    store = tmp_path / "bucket"
    store.mkdir()
    (store / "nuclei.pth").write_bytes(b"n" * 1000)

    class ModelStoreFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "modelstore"

        def match(self, patterns, limits=None):
            return super().match([p.replace("modelstore://", f"{store}/") for p in patterns], limits)

        def open(self, path, *args, **kwargs):
            return super().open(path.replace("modelstore://", f"{store}/"), *args, **kwargs)

    options = BuildOptions(data_dir=str(tmp_path), labels="x.csv", out=str(tmp_path / "o"), segmenter="hpacellseg",
                           segmenter_options={"nuclei_model": "modelstore://nuclei.pth", "cell_model": "/local/cell.pth",
                                              "device": "cpu"})
    staged = stage_models(options, cache=str(tmp_path / "cache"))
    path = staged.segmenter_options["nuclei_model"]
    assert path.startswith(str(tmp_path / "cache")) and open(path, "rb").read() == b"n" * 1000
    assert staged.segmenter_options["cell_model"] == "/local/cell.pth" and staged.segmenter_options["device"] == "cpu"
    mtime = os.stat(path).st_mtime_ns
    assert stage_models(options, cache=str(tmp_path / "cache")) == staged and os.stat(path).st_mtime_ns == mtime
    with pytest.raises(BuildError, match="nuclei_model modelstore://absent.pth not found"):
        stage_models(dataclasses.replace(options, segmenter_options={"nuclei_model": "modelstore://absent.pth"}),
                     cache=str(tmp_path / "cache"))


def test_pipeline_options_from_the_command_line():
    from tfrecord_builder.__main__ import _join_beam_options, build_parser
    from tfrecord_builder.beam_runner import pipeline_args

    a = build_parser().parse_args(_join_beam_options(
        ["--data-dir", "d", "--labels", "l", "--out", "o", "--runner", "beam",
         "--beam-options", "--runner=DataflowRunner --project=P", "--beam-options=--region=R"]))
    options = BuildOptions(data_dir="d", labels="l", out="o", runner=a.runner, beam_options=tuple(a.beam_options))
    assert pipeline_args(options) == ["--runner=DataflowRunner", "--project=P", "--region=R"]
    local = BuildOptions(data_dir="d", labels="l", out="o", runner="beam", workers=3)
    assert pipeline_args(local) == ["--runner=FnApiRunner", "--direct_num_workers=3",
                                    "--direct_running_mode=multi_processing"]
