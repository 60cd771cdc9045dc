"""Helpers shared by the benchmark scripts: single-core set-up and peak-memory measurement."""

from __future__ import annotations

import os
import resource


def one_core() -> None:
    """Pin numeric libraries to one thread, for per-core figures. Call before heavy imports."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = "1"
    import cv2

    cv2.setNumThreads(1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
