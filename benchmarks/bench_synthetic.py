"""Seconds per synthetic field on one core, at several sizes.

    python benchmarks/bench_synthetic.py [--sizes 512 1024 2048 3072] [--repeat 3]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import one_core, peak_rss_mb  # noqa: E402

one_core()

from hpa_tf.synthetic import generate_field  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 3072])
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    generate_field(0, 256)  # warm-up
    print(f"{'size':>6} {'s/field':>8} {'cells':>6}")
    for size in a.sizes:
        times, cells = [], []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            f = generate_field(1000 + r, size)
            times.append(time.perf_counter() - t0)
            cells.append(int(f.cells.max()))
        print(f"{size:>6} {sum(times) / len(times):>8.2f} {sum(cells) / len(cells):>6.1f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
