"""``python -m hpa_tf COMMAND …``: one entry point for every stage.

Commands: ``demo`` (the whole system on synthetic data), ``synthetic``, ``download``, ``segment``,
``build``, ``verify``, ``train``, ``predict``, ``metric``, ``kit``. Each takes ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command → (module with a ``main(argv)`` function, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hpa_tf.demo", "run the whole system on synthetic data and write a report"),
    "synthetic": ("hpa_tf.synthetic", "write an HPA-like synthetic dataset with cell-level truth"),
    "download": ("hpa_tf.download", "fetch the public HPA images of a list and write their train.csv"),
    "segment": ("hpa_tf.segmentation.__main__", "segment fields into cell and nucleus label images"),
    "build": ("tfrecord_builder.__main__", "crop every cell and shard the crops into TFRecords"),
    "train": ("hpa_tf.cli.train", "train the classifier (TPU, GPUs or CPU)"),
    "predict": ("hpa_tf.cli.predict", "predict every cell of a test folder and write the submission CSV"),
    "metric": ("hpa_tf.metric", "score a submission with the competition's mAP"),
    "kit": ("hpa_tf.kit", "write an offline kit (wheels, models, kernel.py) for a Kaggle kernel"),
}


def _usage() -> str:
    lines = ["usage: python -m hpa_tf COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "python -m hpa_tf COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "verify":
        command, rest = "build", ["verify", *rest]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
