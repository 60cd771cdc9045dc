"""``python -m hpa_tf COMMAND …``: one entry point for every stage.

Commands: ``demo`` (the whole system on synthetic data), ``synthetic``, ``download``, ``segment``,
``build``, ``verify``, ``train``, ``predict``, ``metric``, ``kit``. Each takes ``--help``; its usage and error
lines name it as ``python -m hpa_tf COMMAND``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from hpa_tf.cli import quiet_tensorflow


class Command(NamedTuple):
    """A command: its module, a one-line description, and the names of the module's
    ``main(argv, prog) -> exit status`` and ``build_parser(prog) -> ArgumentParser`` functions."""

    module: str
    description: str
    main: str = "main"
    parser: str = "build_parser"


COMMANDS: dict[str, Command] = {
    "demo": Command("hpa_tf.demo", "run the whole system on synthetic data and write a report"),
    "synthetic": Command("hpa_tf.synthetic", "write an HPA-like synthetic dataset with cell-level truth"),
    "download": Command("hpa_tf.download", "fetch the public HPA images of a list and write their train.csv"),
    "segment": Command("hpa_tf.segmentation.__main__", "segment fields into cell and nucleus label images"),
    "build": Command("tfrecord_builder.__main__", "crop every cell and shard the crops into TFRecords",
                     main="build_main"),
    "verify": Command("tfrecord_builder.__main__", "check a built shard set against its manifest, shard by shard",
                      main="verify_main", parser="verify_parser"),
    "train": Command("hpa_tf.cli.train", "train the classifier (TPU, GPUs or CPU)"),
    "predict": Command("hpa_tf.cli.predict", "predict every cell of a test folder and write the submission CSV"),
    "metric": Command("hpa_tf.metric", "score a submission with the competition's mAP"),
    "kit": Command("hpa_tf.kit", "write an offline kit (wheels, models, kernel.py) for a Kaggle kernel"),
}


def prog_of(command: str) -> str:
    """The program name a command's usage and error lines show."""
    return f"python -m hpa_tf {command}"


def parser_of(command: str) -> argparse.ArgumentParser:
    """The argument parser of a command, as ``python -m hpa_tf COMMAND`` uses it."""
    spec = COMMANDS[command]
    return getattr(importlib.import_module(spec.module), spec.parser)(prog=prog_of(command))


def _usage() -> str:
    lines = ["usage: python -m hpa_tf COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {spec.description}" for name, spec in COMMANDS.items()]
    lines += ["", "python -m hpa_tf COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m hpa_tf: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_tensorflow()
    spec = COMMANDS[command]
    result = getattr(importlib.import_module(spec.module), spec.main)(rest, prog=prog_of(command))
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
