"""tfrecord_builder: shards match the manifest and the crops, same bytes for 1 or 2 workers,
resumes after a kill, refuses changed arguments, skips bad fields, verify catches tampering."""

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hpa_tf.crops import CropSpec, cell_crops
from hpa_tf.folds import read_folds_csv
from hpa_tf.io import read_label_image, read_labels, read_rgby
from hpa_tf.labels import NUM_CLASSES, LabelError
from hpa_tf.records import parse_example
from hpa_tf.shardset import MANIFEST_COLUMNS, parse_shard_name, read_crop_spec
from hpa_tf.synthetic import write_dataset
from tfrecord_builder import (
    BuildError,
    BuildOptions,
    ConfigMismatchError,
    build,
    encode_field,
    estimate_images_per_shard,
    plan_shards,
    verify,
)
from tfrecord_builder.__main__ import main as cli

CROP = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, n_train=8, n_test=0, size=256, seed=0)
    return root


def _options(dataset: Path, out: Path, **kw) -> BuildOptions:
    args = dict(data_dir=str(dataset / "train"), labels=str(dataset / "train.csv"), out=str(out),
                crop=CropSpec(size=CROP), masks_dir=str(dataset / "masks"), images_per_shard=2, folds=2, seed=0)
    args.update(kw)
    return BuildOptions(**args)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every content file of an output (shards, manifest, skipped, folds) by name."""
    names = [n for n in os.listdir(out) if n.endswith(".tfrec") or n in ("manifest.csv", "skipped.csv", "folds.csv")]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clean_build(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "records"
    result = build(_options(dataset, out))
    assert result.complete and result.shards_built == result.shards > 0
    return out


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def test_plan_groups_images_by_fold_then_id_in_fixed_sizes():
    folds = {"b": 1, "a": 0, "c": 0, "d": 1, "e": 0}
    labels = {k: [0] for k in folds}
    tasks = plan_shards(list(folds), folds, labels, images_per_shard=2)
    assert [(t.fold, t.index, t.image_ids) for t in tasks] == [
        (0, 0, ("a", "c")), (0, 1, ("e",)), (1, 0, ("b", "d"))]
    assert tasks[0].stem == "fold0-00000"


def test_images_per_shard_estimate_scales_with_crop_size_and_encoding():
    png = estimate_images_per_shard(150, 512, "png")
    assert 5 <= png <= 20  # ~16 MB per field of 30 PNG crops at 512 px
    assert estimate_images_per_shard(150, 512, "jpeg") > 3 * png
    assert estimate_images_per_shard(150, 128, "png") > 10 * png
    assert estimate_images_per_shard(0.001, 512, "png") == 1


# ---------------------------------------------------------------------------------------------
# a clean build
# ---------------------------------------------------------------------------------------------


def test_build_writes_shards_that_match_manifest_crops_and_folds(dataset, clean_build):
    out = clean_build
    rows = _manifest(out)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    labels = read_labels(dataset / "train.csv")
    folds = read_folds_csv(out / "folds.csv")
    assert set(folds) == set(labels)
    # every field's cells are all there (truth masks), all in the image's fold, with its labels
    for image_id in labels:
        mine = [r for r in rows if r["image_id"] == image_id]
        assert len(mine) == int(read_label_image(dataset / "masks" / f"{image_id}_cells.png").max())
        assert {int(r["fold"]) for r in mine} == {folds[image_id]}
        assert {r["labels"] for r in mine} == {"|".join(map(str, labels[image_id]))}
    # shard names carry fold and count; counts agree with the manifest
    shards = sorted(n for n in os.listdir(out) if n.endswith(".tfrec"))
    for name in shards:
        fold, _, count = parse_shard_name(name)
        assert sum(r["shard"] == name for r in rows) == count
        assert all(int(r["fold"]) == fold for r in rows if r["shard"] == name)
    # the records are the crops of hpa_tf.crops, in manifest order (PNG is lossless)
    name = shards[0]
    first = [r for r in rows if r["shard"] == name]
    image_id = first[0]["image_id"]
    image = read_rgby(dataset / "train", image_id)
    cells = read_label_image(dataset / "masks" / f"{image_id}_cells.png")
    expected = cell_crops(image, cells, CROP)
    for k, serialized in enumerate(tf.data.TFRecordDataset(str(out / name)).take(3)):
        ex = parse_example(serialized, crop_size=CROP)
        assert ex["image_id"].numpy().decode() == first[k]["image_id"] == image_id
        assert int(ex["cell_id"]) == int(first[k]["cell_id"]) == expected.cell_ids[k]
        np.testing.assert_array_equal(ex["image"].numpy(), expected.crops[k])
        np.testing.assert_array_equal(ex["mask"].numpy()[..., 0], expected.masks[k])
        assert ex["bbox"].numpy().tolist() == expected.bboxes[k].tolist()
        assert ex["image_size"].numpy().tolist() == [256, 256]
        assert ex["source"].numpy() == b"train"
    # summary: counts per class and fold agree with the manifest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == len(rows) and summary["fields"] == 8 and summary["fields_skipped"] == 0
    per_class = np.array(summary["cells_per_class_and_fold"])
    assert per_class.shape == (NUM_CLASSES, 2)
    for fold in (0, 1):
        assert summary["per_fold"][str(fold)]["cells"] == sum(int(r["fold"]) == fold for r in rows)
    assert per_class[:, 0].sum() == sum(len(r["labels"].split("|")) for r in rows if r["fold"] == "0")
    assert summary["bytes"] == sum((out / n).stat().st_size for n in shards)
    config = json.loads((out / "build_config.json").read_text())
    assert (config["encoding"], config["folds"]) == ("png", 2)
    assert read_crop_spec(str(out)) == CropSpec(size=CROP) and config["crop"] == CropSpec(size=CROP).to_dict()
    assert config["segmenter"] == "masks" and len(config["labels_sha256"]) == 64 and "workers" in config["run"]
    assert verify(str(out)).ok


def test_encode_field_is_the_unit_of_work_and_pickles(dataset, clean_build):
    """The per-field function gives exactly the records and manifest rows of the build, from plain
    (picklable) inputs, with no segmenter when saved masks are used."""
    import pickle

    rows = _manifest(clean_build)
    first = rows[0]
    options = _options(dataset, clean_build)
    labels = read_labels(dataset / "train.csv")[first["image_id"]]
    result = encode_field(first["image_id"], labels, int(first["fold"]), options)
    again = pickle.loads(pickle.dumps((first["image_id"], labels, int(first["fold"]), options, result)))
    assert again[4] == result and again[3] == options
    assert result.skip is None and len(result.examples) == len(result.rows)
    placed = [[str(v) for v in row] for row in result.manifest_rows(first["shard"], 0)]
    assert placed == [list(r.values()) for r in rows[: len(placed)]]
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(clean_build / first["shard"])).take(len(placed))]
    assert list(result.examples) == records  # byte-identical to what the build wrote
    missing = encode_field("absent-id", [0], 0, options)
    assert missing.examples == () and missing.skip[0] == "not in data dir"


def test_two_workers_write_the_same_bytes_as_one(dataset, clean_build, tmp_path):
    out = tmp_path / "two"
    result = build(_options(dataset, out, workers=2), progress=True)
    assert result.shards_built == result.shards
    assert _snapshot(out) == _snapshot(clean_build)


def test_rerun_on_a_finished_output_does_nothing(dataset, clean_build):
    before = _snapshot(clean_build)
    result = build(_options(dataset, clean_build))
    assert result.complete and result.shards_built == 0 and result.shards_kept == result.shards
    assert _snapshot(clean_build) == before


def test_resume_after_a_kill_rebuilds_only_the_missing_shard(dataset, clean_build, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(clean_build, out)
    # the state a kill leaves: one shard and its sidecar gone, a temporary file, no summary
    victim = sorted(n for n in os.listdir(out) if n.endswith(".tfrec"))[1]
    (out / victim).unlink()
    (out / "parts" / (victim.rsplit("-n", 1)[0] + ".json")).unlink()
    (out / ".tmp-0123abcd-fold1.partial").write_bytes(b"half a shard")
    (out / "summary.json").unlink()
    result = build(_options(dataset, out))
    assert result.shards_built == 1 and result.shards_kept == result.shards - 1
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert _snapshot(out) == _snapshot(clean_build)


def test_stopped_build_is_incomplete_then_finishes_identically(dataset, clean_build, tmp_path):
    out = tmp_path / "partial"
    first = build(_options(dataset, out), max_shards=2)
    assert not first.complete and first.shards_built == 2
    assert not (out / "summary.json").exists() and not (out / "manifest.csv").exists()
    second = build(_options(dataset, out))
    assert second.complete and second.shards_kept == 2 and second.shards_built == second.shards - 2
    assert _snapshot(out) == _snapshot(clean_build)


def test_changed_arguments_on_an_existing_output_are_refused(dataset, clean_build):
    before = _snapshot(clean_build)
    with pytest.raises(ConfigMismatchError, match=r"crop.size: 64 there, 96 now"):
        build(_options(dataset, clean_build, crop=CropSpec(size=96)))
    with pytest.raises(ConfigMismatchError, match="crop.mask_neighbors: False there, True now"):
        build(_options(dataset, clean_build, crop=CropSpec(size=CROP, mask_neighbors=True)))
    with pytest.raises(ConfigMismatchError, match="crop.margin: 0.1 there, 0.0 now"):
        build(_options(dataset, clean_build, crop=CropSpec(size=CROP, margin=0.0)))
    assert _snapshot(clean_build) == before


def test_a_folder_with_foreign_shards_is_refused(dataset, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "fold0-00000-n3.tfrec").write_bytes(b"")
    with pytest.raises(BuildError, match="no build_config.json"):
        build(_options(dataset, out))


def test_limit_builds_the_first_ids_with_folds_over_all(dataset, tmp_path):
    out = tmp_path / "limit"
    result = build(_options(dataset, out, limit=3, encoding="jpeg", crop=CropSpec(size=CROP, mask_neighbors=True)))
    ids = sorted(read_labels(dataset / "train.csv"))
    assert {r["image_id"] for r in _manifest(out)} == set(ids[:3])
    assert set(read_folds_csv(out / "folds.csv")) == set(ids)
    assert result.fields == 3
    report = verify(str(out), sample=1)
    assert report.ok and report.decoded >= 1


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_fields_are_skipped_and_listed_with_builtin_segmenter(dataset, tmp_path, capfd):
    ids = sorted(read_labels(dataset / "train.csv"))[:4]
    data = tmp_path / "train"
    data.mkdir()
    for image_id in ids:
        for ch in ("red", "green", "blue", "yellow"):
            shutil.copy(dataset / "train" / f"{image_id}_{ch}.png", data)
    missing, corrupt, dark, good = ids
    (data / f"{missing}_yellow.png").unlink()
    png = bytearray((data / f"{corrupt}_green.png").read_bytes())  # image data damaged: libpng complains
    idat = png.index(b"IDAT") + 8
    png[idat + 20: idat + 60] = bytes(range(40))
    (data / f"{corrupt}_green.png").write_bytes(bytes(png))
    for ch in ("red", "green", "blue", "yellow"):
        tf.io.write_file(str(data / f"{dark}_{ch}.png"), tf.io.encode_png(tf.zeros((256, 256, 1), tf.uint8)))
    labels = tmp_path / "train.csv"
    labels.write_text("ID,Label\n" + "".join(f"{i},0|16\n" for i in [*ids, "absent-id"]))
    out = tmp_path / "records"
    result = build(_options(tmp_path, out, data_dir=str(data), labels=str(labels), masks_dir=None,
                            segmenter="builtin", folds=1, images_per_shard=5))
    assert result.fields == 1 and result.fields_skipped == 4 and result.cells > 0
    with open(out / "skipped.csv", newline="") as f:
        skipped = {r["image_id"]: r for r in csv.DictReader(f)}
    assert set(skipped) == {missing, corrupt, dark, "absent-id"}
    assert skipped[missing]["kind"] == "bad channel file" and "yellow" in skipped[missing]["reason"]
    assert skipped[corrupt]["kind"] == "bad channel file" and "green" in skipped[corrupt]["reason"]
    assert "libpng" in skipped[corrupt]["reason"]  # the decoder's message is in skipped.csv ...
    assert "libpng" not in capfd.readouterr().err  # ... not on the terminal (in the progress bar)
    assert skipped[dark]["kind"] == "no cells"
    assert skipped["absent-id"]["kind"] == "not in data dir"
    assert {r["image_id"] for r in _manifest(out)} == {good}
    assert json.loads((out / "summary.json").read_text())["skipped_reasons"] == {
        "bad channel file": 2, "no cells": 1, "not in data dir": 1}
    assert f"skipped 4 field(s) (listed with their reasons in {out / 'skipped.csv'})" in result.line()


def test_unknown_label_stops_before_any_output(dataset, tmp_path):
    labels = tmp_path / "train.csv"
    lines = (dataset / "train.csv").read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",0|19"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "records"
    with pytest.raises(LabelError, match="line 4"):
        build(_options(dataset, out, labels=str(labels)))
    assert not out.exists()


def test_fewer_images_than_folds_is_refused(dataset, tmp_path):
    with pytest.raises(BuildError, match="cannot split 8 image"):
        build(_options(dataset, tmp_path / "records", folds=9))


def test_cli_exits_nonzero_when_nothing_could_be_built(dataset, tmp_path, capsys):
    empty = tmp_path / "train"
    empty.mkdir()
    out = tmp_path / "records"
    rc = cli(["--data-dir", str(empty), "--labels", str(dataset / "train.csv"), "--out", str(out),
              "--crop-size", str(CROP), "--masks-dir", str(dataset / "masks"), "--folds", "2", "--no-progress"])
    assert rc == 1
    assert "nothing could be built" in capsys.readouterr().err
    assert len((out / "skipped.csv").read_text().splitlines()) == 9


def test_cli_help_for_build_and_verify(capsys):
    for argv in (["--help"], ["build", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--shard-mb" in text and "--masks-dir" in text and "records decoded per shard" in text
    assert "--margin MARGIN" in text and "(default 0.1)" in text


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_catches_a_removed_manifest_row_and_a_truncated_shard(clean_build, tmp_path, capsys):
    out = tmp_path / "tampered"
    shutil.copytree(clean_build, out)
    lines = (out / "manifest.csv").read_text().splitlines(keepends=True)
    (out / "manifest.csv").write_text("".join(lines[:2] + lines[3:]))
    report = verify(str(out))
    assert not report.ok
    assert any("the manifest lists" in p for p in report.problems)
    assert any("summary.json says" in p for p in report.problems)

    out2 = tmp_path / "truncated"
    shutil.copytree(clean_build, out2)
    shard = sorted(out2.glob("*.tfrec"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    report = verify(str(out2))
    assert any(shard.name in p and "truncated" in p for p in report.problems)
    assert cli(["verify", str(out2), "-q"]) == 1
    assert capsys.readouterr().err.startswith(f"CORRUPT: {shard.name}: unreadable after ")
    assert cli(["verify", str(clean_build), "-q"]) == 0


def test_cell_labels_give_each_cell_its_own_labels_and_drop_unlisted_cells(dataset, clean_build, tmp_path):
    rows, given = [], {}
    for image_id in sorted(line.split(",")[0] for line in (dataset / "train.csv").read_text().split()[1:]):
        cells = read_label_image(dataset / "masks" / f"{image_id}_cells.png")
        for cid in np.unique(cells[cells > 0])[1:]:  # the first cell of every field is not listed
            given[(image_id, int(cid))] = sorted({int(cid) % 18, 7})
            rows.append(f"{image_id},{cid},{'|'.join(map(str, given[(image_id, int(cid))]))}")
    path = tmp_path / "cells.csv"
    path.write_text("ID,CellId,Label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "per_cell"
    result = build(_options(dataset, out, cell_labels=str(path)))
    manifest = _manifest(out)
    assert len(manifest) == len(given) == result.cells == len(_manifest(clean_build)) - 8
    for row in manifest:
        assert row["labels"] == "|".join(map(str, given[(row["image_id"], int(row["cell_id"]))]))
    assert verify(str(out)).ok  # the records carry the same labels as the manifest
    assert json.loads((out / "build_config.json").read_text())["cell_labels_file"] == str(path)
    with pytest.raises(BuildError, match="masks_dir"):
        build(_options(dataset, tmp_path / "x", cell_labels=str(path), masks_dir=None))
    assert not (tmp_path / "x").exists()


def test_verify_of_a_missing_folder_says_not_a_folder(tmp_path, capsys):
    assert cli(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"python -m tfrecord_builder verify: error: {tmp_path / 'nope'} is not a folder"
    (tmp_path / "empty").mkdir()
    assert cli(["verify", str(tmp_path / "empty")]) == 2
    assert "is not a shard set" in capsys.readouterr().err


def test_verify_names_a_corrupt_shard_in_one_line(clean_build, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(clean_build, out)
    shard = sorted(out.glob("*.tfrec"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"CORRUPT: {shard.name}: unreadable after "), err
    assert "corrupt or truncated shard" in err[0] and "function_node" not in err[0] and "[Op:" not in err[0]


def test_a_garbage_line_in_the_labels_is_one_line_naming_file_and_line(dataset, tmp_path, capsys):
    labels = tmp_path / "train.csv"
    lines = (dataset / "train.csv").read_text().splitlines()
    labels.write_text("\n".join([*lines[:3], "garbage", *lines[3:]]) + "\n")
    out = tmp_path / "records"
    rc = cli(["--data-dir", str(dataset / "train"), "--labels", str(labels), "--out", str(out),
              "--masks-dir", str(dataset / "masks"), "--folds", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m tfrecord_builder: error: {labels} line 4: not an ID,Label row: 'garbage' (2 columns expected)"
    assert not out.exists()


class _DiskFills:
    """A TFRecordWriter that fills the disk after ``room`` records (raises ENOSPC, as a full disk does)."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path):
        outer = self

        class Writer:
            def __init__(self):
                self.f = open(path, "wb")

            def write(self, record):
                if outer.room <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                outer.room -= 1
                self.f.write(record)

            def close(self):
                self.f.close()

        return Writer()


def test_a_full_disk_while_writing_shards_leaves_nothing_under_a_final_name(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "records"
    argv = ["--data-dir", str(dataset / "train"), "--labels", str(dataset / "train.csv"), "--out", str(out),
            "--crop-size", str(CROP), "--masks-dir", str(dataset / "masks"), "--folds", "2",
            "--images-per-shard", "2", "--no-progress", "-q"]
    monkeypatch.setattr(tf.io, "TFRecordWriter", _DiskFills(room=25))
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "disk full" in err[0], err
    names = os.listdir(out)
    finished = [n for n in names if n.endswith(".tfrec")]
    for name in finished:  # shards finished before the disk filled are whole (they verify below)
        assert len(list(tf.data.TFRecordDataset(str(out / name)))) == parse_shard_name(name)[2]
    assert not [n for n in names if n.startswith(".tmp-")], names
    assert not {"manifest.csv", "summary.json"} & set(names)
    monkeypatch.undo()
    assert cli(argv) == 0  # room again: the rerun finishes the build
    assert verify(str(out)).ok

