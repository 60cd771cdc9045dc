"""The public-HPA downloader against a misbehaving server on 127.0.0.1 (nothing leaves the machine)."""

from __future__ import annotations

import csv
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from flaky_server import FAIL_MODES, TRUNCATE_MODES, FlakyServer

from hpa_tf.download import (
    Fetcher,
    FetchError,
    ListError,
    RetryPolicy,
    check_jpeg,
    download,
    image_id_from_prefix,
    main,
    prepare_out,
    read_list,
)
from hpa_tf.io import CHANNELS, read_labels, read_rgby
from hpa_tf.labels import CLASS_NAMES
from hpa_tf.synthetic import generate_field

# quick retries: waits of a few milliseconds, a 2 s timeout on every connection and read
FAST = RetryPolicy(retries=10, backoff=0.002, backoff_max=0.02, jitter=0.002, timeout=2.0)
FAST_ARGS = ["--retries", "10", "--backoff", "0.002", "--backoff-max", "0.02", "--jitter", "0.002",
             "--timeout", "2", "--no-progress"]
# HPA location names for the synthetic fields' classes, some in the list's own spellings
HPA_NAME = {i: n for i, n in enumerate(CLASS_NAMES)} | {17: "Vesicles", 18: "No staining", 9: "Focal adhesion sites"}
PLANES = {"red": (2,), "green": (1,), "blue": (0,), "yellow": (1, 2)}  # BGR planes of each colour-coded file


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def colour_coded_jpeg(plane: np.ndarray, color: str) -> bytes:
    """One channel as the HPA website serves it: an RGB JPG with the signal in its colour's planes."""
    bgr = np.zeros(plane.shape + (3,), np.uint8)
    for p in PLANES[color]:
        bgr[..., p] = plane
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def fields():
    """Six small synthetic fields: (antibody folder, file stem, class ids, {colour: jpg bytes}, rgby)."""
    out = []
    for k in range(6):
        f = generate_field(100 + k, size=96)
        files = {c: colour_coded_jpeg(f.image[..., i], c) for i, c in enumerate(CHANNELS)}
        out.append((str(10000 + k), f"9{k}_B{k + 1}_1", f.image_labels, files, f.image))
    return out


def served_files(fields) -> dict[str, bytes]:
    return {f"/{ab}/{stem}_{c}.jpg": data for ab, stem, _, files, _ in fields for c, data in files.items()}


def write_hpa_list(path: Path, base_url: str, fields, extra: list[list[str]] = ()) -> Path:
    """The competition's public-HPA list layout: Image (URL prefix), Label (names, comma-joined), ..."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image", "Label", "Cellline", "in_trainset", "Label_idx"])
        for ab, stem, labels, _, _ in fields:
            w.writerow([f"{base_url}/{ab}/{stem}", ",".join(HPA_NAME[i] for i in labels), "U-2 OS", "False",
                        "|".join(map(str, labels))])
        w.writerows(extra)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_label_rows(fields, base_url: str) -> list[dict[str, str]]:
    return [{"ID": f"{ab}_{stem}", "Label": "|".join(map(str, sorted(labels))), "Source": "hpa-public",
             "Cellline": "U-2 OS", "Image": f"{base_url}/{ab}/{stem}"} for ab, stem, labels, _, _ in fields]


def assert_all_identical(out: Path, fields) -> None:
    for ab, stem, _, files, _ in fields:
        for c, data in files.items():
            assert (out / "train" / f"{ab}_{stem}_{c}.jpg").read_bytes() == data, (ab, stem, c)
    assert not list((out / "train").glob("*.part"))


# ----------------------------------------------------------------------------------------------
# The bar: a server failing 20 % of requests and truncating some bodies
# ----------------------------------------------------------------------------------------------


def test_flaky_server_every_file_complete_and_identical_and_rerun_fetches_nothing(tmp_path, fields, capsys):
    files = served_files(fields)
    paths = sorted(files)
    # besides chance, the first request of five files gets each kind of trouble for certain
    plan = {p: [mode] for p, mode in zip(paths, FAIL_MODES + TRUNCATE_MODES)}
    with FlakyServer(files, fail_rate=0.2, truncate_rate=0.1, plan=plan, seed=1) as server:
        listed = write_hpa_list(tmp_path / "kaggle_2021.tsv", server.url, fields)
        out = tmp_path / "out"
        rc = main(["--list", str(listed), "--out", str(out), "--workers", "4", *FAST_ARGS])
        summary = capsys.readouterr().out
        assert rc == 0, summary
        assert_all_identical(out, fields)
        for mode in FAIL_MODES + TRUNCATE_MODES:
            assert server.count(mode) >= 1, mode
        first_run = sum(server.requests.values())
        assert first_run > len(files)  # troubles were answered by retries
        assert read_csv(out / "failed.csv") == []
        assert read_csv(out / "train.csv") == expected_label_rows(fields, server.url)
        # the builder's own reader takes the label file as it is
        assert read_labels(out / "train.csv") == {f"{ab}_{stem}": sorted(lab) for ab, stem, lab, _, _ in fields}
        assert f"fetched {len(files)} files" in summary and "0 failed" in summary

        rc = main(["--list", str(listed), "--out", str(out), "--workers", "4", *FAST_ARGS])
        assert rc == 0
        assert sum(server.requests.values()) == first_run  # nothing asked for again
        assert f"fetched 0 files (0.0 MB, 0.0 MB/s); {len(files)} already present" in capsys.readouterr().out
        assert read_csv(out / "train.csv") == expected_label_rows(fields, server.url)
        assert_all_identical(out, fields)


def test_downloaded_files_read_back_as_the_source_field(tmp_path, fields):
    with FlakyServer(served_files(fields)) as server:
        result = download(read_list(write_hpa_list(tmp_path / "l.csv", server.url, fields)), _out(tmp_path),
                          workers=2, policy=FAST, progress=False)
    assert result.failed == 0 and result.fields == len(fields)
    for ab, stem, _, _, rgby in fields:
        back = read_rgby(tmp_path / "out" / "train", f"{ab}_{stem}")
        assert back.shape == rgby.shape and back.dtype == np.uint8
        # JPEG is lossy (and halves colour resolution), yet each plane is far nearer its own
        # source plane than any other: it came from its own colour's file and plane
        error = np.array([[np.abs(back[..., i].astype(int) - rgby[..., j]).mean() for j in range(4)] for i in range(4)])
        for i in range(4):
            others = np.delete(error[i], i)
            assert error[i, i] < 10 and error[i, i] * 1.4 < others.min(), (stem, CHANNELS[i], error.round(1))


def _out(tmp_path: Path) -> str:
    out = tmp_path / "out"
    prepare_out(out)
    return str(out)


# ----------------------------------------------------------------------------------------------
# Failures, retries, Retry-After, timeouts
# ----------------------------------------------------------------------------------------------


def test_404_is_reported_once_and_the_rest_completes(tmp_path, fields, capsys):
    files = served_files(fields)
    missing = f"/{fields[1][0]}/{fields[1][1]}_green.jpg"
    del files[missing]
    with FlakyServer(files) as server:
        listed = write_hpa_list(tmp_path / "l.csv", server.url, fields)
        rc = main(["--list", str(listed), "--out", str(tmp_path / "out"), "--workers", "3", *FAST_ARGS])
        assert rc == 1
        assert server.requests[missing] == 1  # a 404 is final: never asked again in the run
    failed = read_csv(tmp_path / "out" / "failed.csv")
    assert failed == [{"ID": f"{fields[1][0]}_{fields[1][1]}", "Color": "green", "URL": server.url + missing,
                       "Reason": "HTTP 404 Not Found", "Attempts": "1"}]
    ids = [r["ID"] for r in read_csv(tmp_path / "out" / "train.csv")]
    assert ids == [f"{ab}_{stem}" for ab, stem, *_ in fields if stem != fields[1][1]]  # the incomplete field left out
    assert "1 failed (see" in capsys.readouterr().out


def test_retries_are_bounded_and_the_last_reason_reported(tmp_path, fields):
    path = f"/{fields[0][0]}/{fields[0][1]}_red.jpg"
    policy = RetryPolicy(retries=3, backoff=0.001, jitter=0.0, timeout=2.0)
    with FlakyServer(served_files(fields), plan={path: ["500"] * 10}) as server:
        with pytest.raises(FetchError) as e:
            Fetcher().fetch(server.url + path, policy)
        assert server.requests[path] == 4
    assert e.value.attempts == 4 and "HTTP 500" in e.value.reason


def test_bodies_failing_the_check_are_retried_within_the_same_budget(tmp_path, fields):
    path = f"/{fields[0][0]}/{fields[0][1]}_blue.jpg"
    policy = RetryPolicy(retries=2, backoff=0.001, jitter=0.0, timeout=2.0)
    with FlakyServer(served_files(fields), plan={path: ["short_close", "500", "short_length", "ok"]}) as server:
        with pytest.raises(FetchError) as e:
            Fetcher().fetch(server.url + path, policy)
        assert server.requests[path] == 3
        assert e.value.attempts == 3
        body, attempts = Fetcher().fetch(server.url + path, policy)  # the plan's next answer is the file
    assert body == fields[0][3]["blue"] and attempts == 1


@pytest.mark.parametrize("status", ["503", "429"])
def test_retry_after_is_waited_for(fields, status):
    path = f"/{fields[0][0]}/{fields[0][1]}_red.jpg"
    with FlakyServer(served_files(fields), plan={path: [status]}, retry_after="1") as server:
        body, attempts = Fetcher().fetch(server.url + path, FAST)  # back-off alone would wait ~0 s
        (t0, _, m0), (t1, _, m1) = server.log
    assert (m0, m1) == (status, "ok") and attempts == 2 and body == fields[0][3]["red"]
    assert t1 - t0 >= 0.95


def test_a_server_slower_than_the_timeout_is_asked_again(fields):
    path = f"/{fields[0][0]}/{fields[0][1]}_red.jpg"
    policy = RetryPolicy(retries=3, backoff=0.001, jitter=0.0, timeout=0.3)
    with FlakyServer(served_files(fields), plan={path: ["slow"]}, slow_seconds=1.0) as server:
        body, attempts = Fetcher().fetch(server.url + path, policy)
    assert body == fields[0][3]["red"] and attempts == 2


def test_check_jpeg_catches_short_empty_and_foreign_bodies(fields):
    data = fields[0][3]["green"]
    assert check_jpeg(data) is None
    assert check_jpeg(b"") == "empty body"
    assert "not a JPEG" in check_jpeg(b"<html>busy</html>")
    for cut in (2, len(data) // 2, len(data) - 1):
        assert check_jpeg(data[:cut]) == "truncated JPEG (no end-of-image marker)"
    assert check_jpeg(b"\xff\xd8" + b"\x00\x11" * 50 + b"\xff\xd9") == "JPEG does not decode"


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def test_resume_trusts_finished_files_ignores_part_files_and_recheck_refetches_bad_ones(tmp_path, fields):
    files = served_files(fields)
    out = Path(_out(tmp_path))
    (ab0, stem0), (ab1, stem1), (ab2, stem2) = [(f[0], f[1]) for f in fields[:3]]
    (out / "train" / f"{ab0}_{stem0}_red.jpg").write_bytes(fields[0][3]["red"])  # finished earlier
    (out / "train" / f"{ab1}_{stem1}_red.jpg.part").write_bytes(b"\xff\xd8half")  # left by a killed run
    with FlakyServer(files) as server:
        listed = read_list(write_hpa_list(tmp_path / "l.csv", server.url, fields))
        result = download(listed, out, workers=2, policy=FAST, progress=False)
        assert result.present == 1 and result.fetched == len(files) - 1 and result.failed == 0
        assert server.requests[f"/{ab0}/{stem0}_red.jpg"] == 0
        assert server.requests[f"/{ab1}/{stem1}_red.jpg"] == 1
        assert_all_identical(out, fields)

        # a finished file damaged afterwards: trusted by a plain rerun, fetched again by --recheck
        damaged = out / "train" / f"{ab2}_{stem2}_yellow.jpg"
        damaged.write_bytes(damaged.read_bytes()[:100])
        before = sum(server.requests.values())
        assert download(listed, out, workers=2, policy=FAST, progress=False).fetched == 0
        assert sum(server.requests.values()) == before
        result = download(listed, out, workers=2, policy=FAST, progress=False, recheck=True)
        assert result.fetched == 1 and result.present == len(files) - 1
        assert server.requests[f"/{ab2}/{stem2}_yellow.jpg"] == 2
        assert_all_identical(out, fields)


def test_recheck_removes_a_bad_file_it_cannot_fetch_again(tmp_path, fields):
    files = served_files(fields)
    ab, stem = fields[0][0], fields[0][1]
    with FlakyServer(files) as server:
        listed = read_list(write_hpa_list(tmp_path / "l.csv", server.url, fields))
        out = Path(_out(tmp_path))
        assert download(listed, out, workers=2, policy=FAST, progress=False).failed == 0
        damaged = out / "train" / f"{ab}_{stem}_green.jpg"
        damaged.write_bytes(b"<html>oops</html>")
        del server.files[f"/{ab}/{stem}_green.jpg"]
        result = download(listed, out, workers=2, policy=FAST, progress=False, recheck=True)
    assert [(f.image_id, f.color, f.reason) for f in result.failures] == [(f"{ab}_{stem}", "green", "HTTP 404 Not Found")]
    assert not damaged.exists()
    assert f"{ab}_{stem}" not in {r["ID"] for r in read_csv(out / "train.csv")}


def test_a_killed_run_leaves_only_whole_files_and_a_rerun_fetches_the_rest(tmp_path, fields):
    files = served_files(fields)
    with FlakyServer(files, latency=0.1) as server:  # one connection: 2.4 s for all, killed after ~0.8 s
        listed = write_hpa_list(tmp_path / "l.csv", server.url, fields)
        out = tmp_path / "out"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen([sys.executable, "-m", "hpa_tf.download", "--list", str(listed), "--out", str(out),
                                 "--workers", "1", *FAST_ARGS], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while sum(server.requests.values()) < 8 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        finished = sorted(p.name for p in (out / "train").glob("*.jpg"))
        assert 0 < len(finished) < len(files)
        for name in finished:  # nothing half-written under a final name
            ab = name.split("_", 1)[0]
            assert (out / "train" / name).read_bytes() == files[f"/{ab}/{name[len(ab) + 1:]}"]
        before = server.requests.copy()
        assert main(["--list", str(listed), "--out", str(out), "--workers", "2", *FAST_ARGS]) == 0
        for name in finished:
            ab = name.split("_", 1)[0]
            path = f"/{ab}/{name[len(ab) + 1:]}"
            assert server.requests[path] == before[path]  # not fetched again
        assert_all_identical(out, fields)
        assert read_csv(out / "train.csv") == expected_label_rows(fields, server.url)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, fields, capsys):
    with FlakyServer(served_files(fields)) as server:
        listed = write_hpa_list(tmp_path / "l.csv", server.url, fields)
        out = Path(_out(tmp_path))
        with open(out / ".download.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rc = main(["--list", str(listed), "--out", str(out), *FAST_ARGS])
        assert rc == 2 and sum(server.requests.values()) == 0
    assert "another download is writing into this folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Proxies from the environment
# ----------------------------------------------------------------------------------------------


def test_http_proxy_from_the_environment_is_used(monkeypatch, fields):
    path = f"/{fields[0][0]}/{fields[0][1]}_red.jpg"
    with FlakyServer(served_files(fields)) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        # a name that resolves nowhere: only the proxy on 127.0.0.1 can answer it
        body, _ = Fetcher().fetch("http://images.hpa.invalid" + path, FAST)
        assert body == fields[0][3]["red"] and proxy.requests[path] == 1


def test_loopback_addresses_bypass_the_proxy(monkeypatch, fields):
    path = f"/{fields[0][0]}/{fields[0][1]}_red.jpg"
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    with FlakyServer(served_files(fields)) as server:
        body, _ = Fetcher().fetch(server.url + path, FAST)
    assert body == fields[0][3]["red"]


# ----------------------------------------------------------------------------------------------
# The list and the label file
# ----------------------------------------------------------------------------------------------


def test_competition_list_ids_labels_trainset_and_unknown_names(tmp_path):
    p = tmp_path / "kaggle_2021.tsv"
    p.write_text(
        "Image,Label,Cellline,in_trainset,Label_idx\n"
        'https://images.proteinatlas.org/10005/921_B9_1,"Cytosol,Nucleoplasm",A-431,False,16|0\n'
        'https://images.proteinatlas.org/10006/921_B9_1,"Midbody,Vesicles,Cell Junctions",HeLa,False,17|13\n'
        "https://images.proteinatlas.org/10007/1_A1_1,Nucleoli,U-2 OS,True,2\n"
        'https://images.proteinatlas.org/10008/5_C3_2,"Midbody,Kinetochore",U-2 OS,False,\n'
        "https://images.proteinatlas.org/10009/6_C3_2,No staining,SiHa,False,18\n"
    )
    fl = read_list(p)
    assert fl.kind == "hpa" and fl.in_trainset == 1
    assert [(f.image_id, f.labels) for f in fl.fields] == [
        ("10005_921_B9_1", (0, 16)), ("10006_921_B9_1", (13, 17)), ("10008_5_C3_2", ()), ("10009_6_C3_2", (18,))]
    assert fl.unknown_names() == {"Midbody": 2, "Kinetochore": 1}
    assert [f.image_id for f in fl.unlabeled] == ["10008_5_C3_2"]
    assert fl.fields[0].cellline == "A-431" and fl.fields[0].url("red") == (
        "https://images.proteinatlas.org/10005/921_B9_1_red.jpg")
    assert len(read_list(p, include_trainset=True).fields) == 5


def test_plain_list_with_ids_or_names_comma_or_tab_separated(tmp_path):
    rows = [("a1", "http://h/x/a1", "0|5"), ("b2", "http://h/x/b2_", "Nucleoli|mitochondria"),
            ("c3", "http://h/x/c3", "Aggresome;16"), ("d4", "http://h/x/d4", "")]
    for sep in (",", "\t"):
        p = tmp_path / f"plain{len(sep)}.csv"
        p.write_text(sep.join(["ID", "URL", "Label"]) + "\n" + "".join(sep.join(r) + "\n" for r in rows))
        fl = read_list(p)
        assert fl.kind == "plain"
        assert [(f.image_id, f.prefix, f.labels) for f in fl.fields] == [
            ("a1", "http://h/x/a1", (0, 5)), ("b2", "http://h/x/b2", (2, 14)), ("c3", "http://h/x/c3", (15, 16)),
            ("d4", "http://h/x/d4", ())]


def test_unlabeled_fields_are_left_out_unless_kept(tmp_path, fields):
    files = served_files(fields)
    with FlakyServer(files) as server:
        extra = [[f"{server.url}/{fields[0][0]}/{fields[0][1]}_x", "Midbody", "HeLa", "False", ""]]
        listed = write_hpa_list(tmp_path / "l.csv", server.url, fields[1:], extra=extra)
        files[f"/{fields[0][0]}/{fields[0][1]}_x_red.jpg"] = fields[0][3]["red"]
        out = tmp_path / "out"
        assert main(["--list", str(listed), "--out", str(out), "--colors", "red", *FAST_ARGS]) == 0
        assert server.requests[f"/{fields[0][0]}/{fields[0][1]}_x_red.jpg"] == 0
        assert read_csv(out / "unlabeled.csv") == [
            {"ID": f"{fields[0][0]}_{fields[0][1]}_x", "Image": extra[0][0], "Names": "Midbody"}]
        assert read_csv(out / "unmapped.csv") == [{"Name": "Midbody", "Fields": "1"}]
        assert len(read_csv(out / "train.csv")) == len(fields) - 1
        assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
            f"{ab}_{stem}_red.jpg" for ab, stem, *_ in fields[1:])

        server.files = files  # now also serves the unlabeled field's file
        assert main(["--list", str(listed), "--out", str(out), "--colors", "red", "--keep-unlabeled", *FAST_ARGS]) == 0
        assert (out / "train" / f"{fields[0][0]}_{fields[0][1]}_x_red.jpg").is_file()
        assert len(read_csv(out / "train.csv")) == len(fields) - 1  # still no label to write


def test_image_id_from_prefix():
    assert image_id_from_prefix("https://images.proteinatlas.org/10005/921_B9_1") == "10005_921_B9_1"


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing left behind
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ("Image,Cellline\nhttp://h/1/a,HeLa\n", "lacks column(s) ['Label']"),
    ("ID,Label\na,0\n", "lacks column(s) ['URL']"),
    ("", "empty file"),
    ("ID,URL,Label\na,ftp://h/a,0\n", "line 2: URL 'ftp://h/a' is not an http(s) URL"),
    ("ID,URL,Label\na,http://h/a,0|19\n", "line 2"),
    ("ID,URL,Label\n../a,http://h/a,0\n", "line 2: unusable field ID '../a'"),
    ("ID,URL,Label\na,http://h/a,0\na,http://h/b,1\n", "line 3: field ID 'a' also on line 2"),
    ("ID,URL,Label\na,http://h/a,Midbody\n", "no field has a label among the 19 classes"),
    ("Image,Label,in_trainset\nhttp://h/1/a,Cytosol,True\n", "no fields listed (1 rows of the competition"),
])
def test_bad_list_one_line_error_and_no_output_folder(tmp_path, capsys, content, message):
    p = tmp_path / "list.csv"
    p.write_text(content)
    out = tmp_path / "out"
    assert main(["--list", str(p), "--out", str(out), *FAST_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err and message in err
    assert not out.exists()


def test_unreadable_list_and_uncreatable_out(tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    assert main(["--list", str(tmp_path / "nope.csv"), "--out", str(out), *FAST_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.csv: cannot read (No such file or directory)" in err
    assert main(["--list", str(tmp_path), "--out", str(out), *FAST_ARGS]) == 2
    assert "is a folder, not a list file" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()

    p = tmp_path / "list.csv"
    p.write_text("ID,URL,Label\na,http://127.0.0.1:9/a,0\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--list", str(p), "--out", str(blocker / "sub" / "out"), *FAST_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the output folder" in err and str(blocker) in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["--list", str(p), "--out", str(locked / "a" / "b"), *FAST_ARGS]) == 2
        assert "Permission denied" in capsys.readouterr().err and list(locked.iterdir()) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["file", "list.csv"] + (
        ["locked"] if os.geteuid() != 0 else []))


def test_read_list_errors_are_list_errors(tmp_path):
    with pytest.raises(ListError, match="not UTF-8"):
        (tmp_path / "bin.csv").write_bytes(b"ID,URL,Label\n\xff\xfe\x00\x01\n")
        read_list(tmp_path / "bin.csv")


def test_bad_colors_and_workers_are_usage_errors(tmp_path, capsys):
    for args in (["--colors", "red,purple"], ["--colors", "red,red"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--list", "x", "--out", str(tmp_path / "o"), *args])
        assert e.value.code == 2
    assert not (tmp_path / "o").exists()
