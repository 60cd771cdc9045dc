"""Train the cell classifier on TFRecord shards, on a TPU, GPUs or the CPU (resumable).

    hpa-tf-train --data gs://bucket/shards --val-fold 0 --backbone efficientnet_b0 \\
        --image-size 256 --batch-size 64 --epochs 20 --lr 2e-3 --strategy tpu --tpu local \\
        --mixed-precision --steps-per-execution 32 --out gs://bucket/runs/b0-f0

(also ``python train_tpu.py …`` from the repository, or ``python -m hpa_tf train …``.)
Shards are a shard set as ``python -m tfrecord_builder`` writes it: ``fold{f}-{index:05d}-n{count}.tfrec``
with ``manifest.csv`` and ``build_config.json`` (its crop spec is what the model is trained on and
what ``model.json`` records). ``--batch-size`` is per replica (a TPU v3-8 has 8). The run folder gets
``best.keras``/``last.keras`` with ``.json`` descriptions, ``model.json`` (what the predictor reads),
``log.csv``, ``val_ap.csv``, ``state.json``; run the same command with ``--resume`` to continue a killed
run from its last completed epoch. See ``hpa_tf.train`` for what happens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hpa_tf.cli import plain, quiet_tensorflow
from hpa_tf.config import TrainConfig
from hpa_tf.settings import add_arguments, from_arguments

GROUPS = ("data", "augmentation", "model", "optimisation", "hardware", "output")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser: one flag per ``TrainConfig`` setting, with its default shown."""
    p = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainConfig, groups=GROUPS)
    return p


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a command line (exits with status 2 on a bad one, as argparse does)."""
    return from_arguments(TrainConfig, build_parser(prog).parse_args(argv))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    quiet_tensorflow()  # before TensorFlow is imported
    parser = build_parser(prog)
    config = from_arguments(TrainConfig, parser.parse_args(argv))
    name = parser.prog
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hpa_tf.distribute import AcceleratorNotFoundError
    from hpa_tf.shardset import DataError
    from hpa_tf.train import NonFiniteLossError, train

    try:
        result = train(config)
    except (DataError, AcceleratorNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 3
    best = f", best {result.monitor} {result.best_value:.4f} → {result.best_path}" if result.best_value is not None else ""
    print(f"{result.epochs_completed} epoch(s) done ({result.epochs_completed - result.initial_epoch} now), "
          f"{result.replicas} replica(s), global batch {result.global_batch}, {result.steps_per_epoch} steps/epoch"
          f"{best}; last → {result.last_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
