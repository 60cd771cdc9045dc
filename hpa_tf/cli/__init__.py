"""Command lines of the package: ``hpa_tf.cli.train`` (``hpa-tf-train``, ``train_tpu.py``) and
``hpa_tf.cli.predict`` (``hpa-tf-predict``, ``predict.py``). Each has ``main(argv) -> exit status``;
their flags are derived from the settings tables in ``hpa_tf.config``.

Also the helpers every command line of the project uses (light: nothing here imports TensorFlow).
"""

from __future__ import annotations

import glob
import os

#: TensorFlow's C++ log level the command lines set when the user has not (``TF_CPP_MIN_LOG_LEVEL``).
TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"


def quiet_tensorflow() -> str:
    """Keep TensorFlow's C++ start-up log out of a command's output; returns the level in force.

    Call before TensorFlow is first imported. On a machine without an NVIDIA device TensorFlow
    still probes CUDA and logs ``E0000 … failed call to cuInit … UNKNOWN ERROR (303)``, which reads
    as a real error: there the level is 3 (errors of the C++ log hidden; Python exceptions are not
    affected); with a GPU it is 2 (info and warnings hidden, errors shown). A value the user has set
    wins (``TF_CPP_MIN_LOG_LEVEL=0`` shows everything).
    """
    level = "2" if glob.glob("/dev/nvidia[0-9]*") else "3"
    return os.environ.setdefault(TF_LOG_ENV, level)


def plain(doc: str | None) -> str:
    """A docstring made fit for ``--help``: reStructuredText's ````literal```` marks removed."""
    return (doc or "").replace("``", "")
