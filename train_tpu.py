"""Train the cell classifier on TFRecord shards, on a TPU, GPUs or the CPU (resumable).

    python train_tpu.py --data gs://bucket/shards --val-fold 0 --backbone efficientnet_b0 \\
        --image-size 256 --batch-size 64 --epochs 20 --lr 2e-3 --strategy tpu --tpu local \\
        --mixed-precision --steps-per-execution 32 --out gs://bucket/runs/b0-f0

Shards are ``fold{f}-{index:05d}-n{count}.tfrec`` with ``manifest.csv`` (and ``build_config.json``)
beside them, as ``python -m tfrecord_builder`` writes them. ``--batch-size`` is per replica (a TPU
v3-8 has 8). The run folder gets ``best.keras``/``last.keras`` with ``.json`` descriptions,
``model.json`` (what ``predict.py`` reads), ``log.csv``, ``val_ap.csv``, ``state.json``; run the same
command with ``--resume`` to continue a killed run from its last completed epoch.
See ``hpa_tf.train`` for what happens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _fold(text: str) -> int | None:
    return None if text.lower() in ("none", "-1", "") else int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+",
                   help="shard folder, glob (gs://bucket/shards/fold*.tfrec) or shard paths")
    g.add_argument("--manifest", help="manifest.csv (default: beside the shards)")
    g.add_argument("--val-fold", type=_fold, default=0, help="held-out fold ('none': train on all folds)")
    g.add_argument("--train-folds", type=int, nargs="+", help="training folds (default: all but --val-fold)")
    g.add_argument("--channels", default="rgby", help="input planes, letters of rgby (e.g. rgby, rgb, g)")
    g.add_argument("--balance", action="store_true", help="oversample rare classes (repeat-factor sampling)")
    g.add_argument("--balance-threshold", type=float, default=0.05,
                   help="classes rarer than this fraction of examples are repeated sqrt(threshold/freq) times")
    g.add_argument("--no-augment", action="store_true", help="no flips/rotations/intensity jitter")
    g.add_argument("--augment-on", default="device", choices=["device", "host"],
                   help="where flips/rotations/intensity jitter run: 'device' = inside the training step on the "
                        "accelerator (default), 'host' = in tf.data on the CPU")
    g.add_argument("--scale-augment", type=float, nargs=2, metavar=("LO", "HI"),
                   help="random square sub-crop of LO..HI of the crop side before resizing, e.g. 0.8 1.0")
    g.add_argument("--shuffle-buffer", type=int, default=1024, help="examples in the shuffle buffer")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_b0", help="efficientnet_b0..b7, efficientnet_v2_*, tiny_cnn")
    g.add_argument("--image-size", type=int, default=256, help="model input side in pixels")
    g.add_argument("--weights", help="'imagenet' or a weights file of the backbone (default: random init)")
    g.add_argument("--dropout", type=float, default=0.2)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="PER REPLICA; global = this × replicas")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--steps-per-epoch", type=int, help="default: training examples // global batch")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (after warm-up)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length, then cosine decay")
    g.add_argument("--min-lr-fraction", type=float, default=0.01, help="final lr = lr × this")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW decoupled weight decay")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (0 = binary cross-entropy)")
    g.add_argument("--focal-alpha", type=float, help="focal alpha for positives (enables class balancing)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--monitor", default="val_map", help="metric that picks best.keras (val_map, val_auc, val_loss…)")
    g = p.add_argument_group("hardware")
    g.add_argument("--strategy", default="auto", choices=["auto", "tpu", "gpu", "cpu"])
    g.add_argument("--tpu", help="TPU name or address ('local' on Kaggle/Colab TPU VMs)")
    g.add_argument("--mixed-precision", nargs="?", const="auto", default="float32",
                   help="bare flag: bfloat16 on TPU, float16 on GPU; or float32/mixed_bfloat16/mixed_float16")
    g.add_argument("--steps-per-execution", type=int, default=1, help="training steps per host call (TPU: 32+)")
    g.add_argument("--jit-compile", default="auto", choices=["auto", "on", "off"], help="XLA for GPU/CPU steps")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run folder (local or gs://) for checkpoints and logs")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.keras + state.json if present")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2], help="Keras: 0 silent, 1 bar, 2 a line/epoch")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hpa_tf.data import DataError
    from hpa_tf.distribute import AcceleratorNotFoundError
    from hpa_tf.train import NonFiniteLossError, TrainConfig, train

    config = TrainConfig(
        data=a.data[0] if len(a.data) == 1 else a.data, out=a.out, manifest=a.manifest, val_fold=a.val_fold,
        train_folds=a.train_folds, backbone=a.backbone, image_size=a.image_size, channels=a.channels,
        batch_size=a.batch_size, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, lr=a.lr,
        warmup_epochs=a.warmup_epochs, min_lr_fraction=a.min_lr_fraction, weight_decay=a.weight_decay,
        weights=a.weights, dropout=a.dropout, focal_gamma=a.focal_gamma, focal_alpha=a.focal_alpha,
        label_smoothing=a.label_smoothing, augment=not a.no_augment, augment_on=a.augment_on,
        scale_augment=tuple(a.scale_augment) if a.scale_augment else None, balance=a.balance,
        balance_threshold=a.balance_threshold, shuffle_buffer=a.shuffle_buffer,
        steps_per_execution=a.steps_per_execution, mixed_precision=a.mixed_precision, strategy=a.strategy,
        tpu=a.tpu, jit_compile={"auto": "auto", "on": True, "off": False}[a.jit_compile], resume=a.resume,
        seed=a.seed, monitor=a.monitor, tensorboard=not a.no_tensorboard, verbose=a.verbose,
    )
    try:
        result = train(config)
    except (DataError, AcceleratorNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"train_tpu.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train_tpu.py: error: {e}", file=sys.stderr)
        return 3
    best = f", best {result.monitor} {result.best_value:.4f} → {result.best_path}" if result.best_value is not None else ""
    print(f"{result.epochs_completed} epoch(s) done ({result.epochs_completed - result.initial_epoch} now), "
          f"{result.replicas} replica(s), global batch {result.global_batch}, {result.steps_per_epoch} steps/epoch"
          f"{best}; last → {result.last_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
