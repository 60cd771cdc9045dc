"""Downloader throughput against a local server: files/s and MB/s by number of connections.

Run: ``python benchmarks/bench_download.py [--fields 32] [--size 2048] [--latency 0.05] [--workers 1,4,16]``

Serves the four colour-coded JPGs of one synthetic ``--size``² field (as the HPA website serves
them) under ``--fields`` names from a server on 127.0.0.1 that waits ``--latency`` s before each
answer (a stand-in for an internet round trip and a busy server), and fetches them with
``hpa_tf.download.download`` for each ``--workers`` count, then once more with 20 % of requests
failing and 10 % of bodies truncated. Also prints the cost of the format check per file. Nothing
leaves the machine; the loopback link is far faster than a real one, so the figures show what the
downloader itself can sustain and how connections hide latency, not what a real link gives.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from flaky_server import FlakyServer  # noqa: E402

from hpa_tf.download import Field, FieldList, RetryPolicy, check_jpeg, download, prepare_out  # noqa: E402
from hpa_tf.io import CHANNELS  # noqa: E402
from hpa_tf.synthetic import generate_field  # noqa: E402

PLANES = {"red": (2,), "green": (1,), "blue": (0,), "yellow": (1, 2)}


def colour_coded(rgby: np.ndarray) -> dict[str, bytes]:
    out = {}
    for i, color in enumerate(CHANNELS):
        bgr = np.zeros(rgby.shape[:2] + (3,), np.uint8)
        for p in PLANES[color]:
            bgr[..., p] = rgby[..., i]
        out[color] = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    return out


def run(files: dict[str, bytes], n_fields: int, workers: int, latency: float, fail: float, truncate: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, FlakyServer({}, latency=latency, fail_rate=fail,
                                                             truncate_rate=truncate, seed=workers) as server:
        server.files = {f"/{k}/f{k}_{c}.jpg": data for k in range(n_fields) for c, data in files.items()}
        fields = FieldList(path="bench", kind="plain", fields=[
            Field(image_id=f"f{k}", prefix=f"{server.url}/{k}/f{k}", labels=(0,), names=("Nucleoplasm",),
                  unknown=(), cellline="", line=k + 2) for k in range(n_fields)])
        out = Path(tmp) / "out"
        prepare_out(out)
        policy = RetryPolicy(retries=10, backoff=0.01, backoff_max=0.1, jitter=0.01, timeout=10)
        result = download(fields, out, workers=workers, policy=policy, progress=False)
        assert result.failed == 0, result.failures[:3]
        return {"files/s": result.fetched / result.seconds, "MB/s": result.bytes / 1e6 / result.seconds,
                "requests": sum(server.requests.values()), "files": result.fetched, "s": result.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=32)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--latency", type=float, default=0.05, help="server wait before each answer, s (default 0.05)")
    p.add_argument("--workers", default="1,4,16")
    a = p.parse_args()

    files = colour_coded(generate_field(0, size=a.size).image)
    sizes = {c: len(d) / 1e6 for c, d in files.items()}
    print(f"one {a.size}² field: " + ", ".join(f"{c} {mb:.2f} MB" for c, mb in sizes.items()))
    for color, data in files.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert check_jpeg(data) is None
            times.append(time.perf_counter() - t0)
        print(f"check_jpeg({color}): {1e3 * statistics.median(times):.1f} ms")

    print(f"\n{a.fields} fields ({4 * a.fields} files), server latency {a.latency * 1e3:.0f} ms per request")
    print(f"{'workers':>8} {'trouble':>10} {'files/s':>8} {'MB/s':>7} {'requests':>9} {'seconds':>8}")
    for workers in [int(w) for w in a.workers.split(",")]:
        for fail, truncate in ((0.0, 0.0), (0.2, 0.1)):
            r = run(files, a.fields, workers, a.latency, fail, truncate)
            trouble = "none" if not fail else "20%+10%"
            print(f"{workers:>8} {trouble:>10} {r['files/s']:>8.1f} {r['MB/s']:>7.1f} {r['requests']:>9} {r['s']:>8.2f}")


if __name__ == "__main__":
    main()
