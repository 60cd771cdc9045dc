"""Predict every cell of a test folder and write the competition's submission CSV (offline).

    hpa-tf-predict --test-dir DATA/test --sample-submission DATA/sample_submission.csv \\
        --model runs/x/best.keras --out submission.csv

(also ``python predict.py …`` from the repository, or ``python -m hpa_tf predict …``.)
Runs on CPU or GPU with no network access; each model's cells are cropped with the crop spec in
its ``model.json``. See ``hpa_tf.predict`` for what it does per field.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hpa_tf.cli import plain, quiet_tensorflow
from hpa_tf.config import PredictConfig
from hpa_tf.settings import add_arguments, from_arguments


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser: one flag per ``PredictConfig`` setting, with its default shown."""
    p = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, PredictConfig)
    return p


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None) -> PredictConfig:
    """The ``PredictConfig`` of a command line (exits with status 2 on a bad one, as argparse does)."""
    return from_arguments(PredictConfig, build_parser(prog).parse_args(argv))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    quiet_tensorflow()  # before TensorFlow is imported
    parser = build_parser(prog)
    config = from_arguments(PredictConfig, parser.parse_args(argv))
    name = parser.prog
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from hpa_tf.segmentation import preload

    preload(config.segmenter)  # hpacellseg: PyTorch's stack must be imported before TensorFlow
    from hpa_tf.fileutil import describe_write_error
    from hpa_tf.predict import PredictError, run

    try:
        s = run(config)
    except (PredictError, FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, no permission: one line, not a traceback
        line = describe_write_error(e, config.out)
        if line is None:
            raise
        print(f"{name}: error: {line}", file=sys.stderr)
        return 2
    per = s["seconds_per_field"]
    print(
        f"{s['fields']} fields ({s['cached']} from cache), {s['cells']} cells ({s['cells_per_field']:.1f}/field), "
        f"{s['seconds']} s; per field: " + ", ".join(f"{k} {v:.2f} s" for k, v in per.items())
    )
    if s["no_cells"]:
        print(f"{len(s['no_cells'])} field(s) with no cells (empty rows): {', '.join(s['no_cells'][:10])}")
    if s["failed"]:
        print(f"{len(s['failed'])} field(s) could not be read (empty rows):", file=sys.stderr)
        for image_id, reason in s["failed"]:
            print(f"  {image_id}: {reason}", file=sys.stderr)
    print(f"wrote {s['out']}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
