"""Offline Kaggle kernel of an hpa-tf kit: install hpa-tf from the kit's wheels, predict, write the submission.

    python /kaggle/input/YOUR-KIT/kernel.py            (a notebook cell: !python /kaggle/input/YOUR-KIT/kernel.py)

``python -m hpa_tf kit`` copies this file into every kit as ``kernel.py``, beside ``kit.json``,
``wheels/`` and ``models/``. It needs no internet:

1. installs hpa-tf from ``wheels/`` with ``pip install --no-index --find-links wheels --no-deps`` (the
   project's wheel, the runtime wheels the kit lists and, for the hpacellseg segmenter, its wheels),
   so the image's TensorFlow, Keras, numpy and torch are never replaced; it checks they are unchanged;
2. runs the project's predictor (``hpa_tf.cli.predict``) on ``DATA/test`` with
   ``DATA/sample_submission.csv`` and every model of the kit (each with its ``model.json``), and
   writes ``/kaggle/working/submission.csv``.

Every path has a flag and an environment variable (flags win). Arguments after ``--`` go to the
predictor as they are (e.g. ``-- --tta --batch-size 64``). Exit status: the predictor's (0 done,
1 some field unreadable, 2 bad input), 2 for a kit or install problem (one line on stderr).

This file must run before hpa-tf is installed: it imports nothing of hpa-tf until step 2.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata as metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

#: Packages of the image that installing the kit must leave as they are.
PROTECTED = ("tensorflow", "tensorflow-cpu", "keras", "tf-keras", "numpy", "torch", "torchvision", "tensorboard")
COMPETITION = "hpa-single-cell-image-classification"
KIT_FILE = "kit.json"


class KitError(RuntimeError):
    """A problem with the kit, the data or the install (one line)."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def find_kit(explicit: str | None) -> Path:
    """The kit folder: ``--kit``/``HPA_TF_KIT``, else this file's folder, else ``/kaggle/input/*/kit.json``."""
    if explicit:
        kit = Path(explicit)
        if not (kit / KIT_FILE).is_file():
            raise KitError(f"{kit}: not an hpa-tf kit (no {KIT_FILE})")
        return kit
    here = Path(globals().get("__file__", "") or ".").resolve().parent
    if (here / KIT_FILE).is_file():
        return here
    found = sorted(glob.glob(f"/kaggle/input/*/{KIT_FILE}") + glob.glob(f"/kaggle/input/*/*/{KIT_FILE}"))
    if len(found) == 1:
        return Path(found[0]).parent
    if found:
        raise KitError(f"several kits under /kaggle/input ({', '.join(found)}): pass --kit DIR")
    raise KitError(f"no {KIT_FILE} beside {here} nor under /kaggle/input: attach the kit dataset or pass --kit DIR")


def read_kit(kit: Path) -> dict:
    try:
        info = json.loads((kit / KIT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise KitError(f"{kit / KIT_FILE}: unreadable: {e}") from None
    if info.get("format") != "hpa-tf-kit":
        raise KitError(f"{kit / KIT_FILE}: not an hpa-tf kit description")
    return info


def installed_versions(names=PROTECTED) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    print("$ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        tail = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "")
        raise KitError(f"installing {what} failed (pip exit {proc.returncode}): {tail.strip()}")
    done = [line for line in proc.stdout.splitlines() if line.startswith(("Successfully installed", "Requirement already"))]
    for line in done:
        print("  " + line)


def install(kit: Path, info: dict) -> None:
    """Install the kit's wheels offline, never touching the protected packages; raise KitError if any changed."""
    wheels = kit / "wheels"
    before = installed_versions()
    base = ["--no-index", "--find-links", str(wheels), "--no-deps"]
    project = wheels / info["project"]["wheel"]
    if not project.is_file():
        raise KitError(f"{project}: the project's wheel is missing from the kit")
    _pip([*base, "--force-reinstall", str(project)], "hpa-tf")  # the kit's own hpa-tf, whatever was there
    runtime = list(info.get("runtime_requirements", []))
    if runtime:
        _pip([*base, *runtime], "the runtime wheels (" + ", ".join(runtime) + ")")
    seg = [str(wheels / w) for w in (info.get("hpacellseg") or {}).get("wheels", [])]
    if seg:
        _pip([*base, *seg], "hpacellseg")
    extra = [str(wheels / w) for w in info.get("extra_wheels", [])]
    if extra:
        _pip([*base, *extra], "the extra wheels")
    after = installed_versions()
    changed = {k: (before[k], after[k]) for k in PROTECTED if before[k] != after[k]}
    if changed:
        raise KitError("the install changed the image's packages: "
                       + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    importlib.invalidate_caches()


def predict_argv(kit: Path, info: dict, a: argparse.Namespace, extra: list[str]) -> list[str]:
    """The predictor's command line for this kit and these paths."""
    test_dir = Path(a.test_dir) if a.test_dir else Path(a.data_dir) / "test"
    sample = a.sample_submission or str(Path(a.data_dir) / "sample_submission.csv")
    if not test_dir.is_dir():
        raise KitError(f"test folder not found: {test_dir} (attach the competition's data, or pass --data-dir/--test-dir)")
    argv = ["--test-dir", str(test_dir), "--out", a.out]
    if Path(sample).is_file():
        argv += ["--sample-submission", sample]
    elif a.sample_submission:
        raise KitError(f"sample submission not found: {sample}")
    else:
        print(f"note: no {sample}: predicting every field in {test_dir}")
    models = []
    for m in info["models"]:
        path = kit / m["path"]
        if not path.is_file():
            raise KitError(f"{path}: a model of the kit is missing")
        models.append(str(path))
    argv += ["--model", *models]
    seg = info.get("hpacellseg")
    if seg:
        argv += ["--segmenter", "hpacellseg", "--nuclei-model", str(kit / seg["nuclei_model"]),
                 "--cell-model", str(kit / seg["cell_model"])]
    argv += ["--cache-dir", a.cache_dir]
    return argv + list(info.get("predict_args", [])) + extra


def build_parser() -> argparse.ArgumentParser:
    data = _env("HPA_TF_DATA_DIR", f"/kaggle/input/{COMPETITION}")
    p = argparse.ArgumentParser(prog="kernel.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", default=_env("HPA_TF_KIT"),
                   help="the kit folder [HPA_TF_KIT] (default: this file's folder, else the one /kaggle/input/*/kit.json)")
    p.add_argument("--data-dir", default=data, help=f"competition data: test/ and sample_submission.csv [HPA_TF_DATA_DIR] (default {data})")
    p.add_argument("--test-dir", default=_env("HPA_TF_TEST_DIR"), help="test fields [HPA_TF_TEST_DIR] (default DATA/test)")
    p.add_argument("--sample-submission", default=_env("HPA_TF_SAMPLE_SUBMISSION"),
                   help="IDs and order to predict [HPA_TF_SAMPLE_SUBMISSION] (default DATA/sample_submission.csv; "
                        "without one, every field of the test folder)")
    out = _env("HPA_TF_OUT", "/kaggle/working/submission.csv")
    p.add_argument("--out", default=out, help=f"submission to write [HPA_TF_OUT] (default {out})")
    cache = _env("HPA_TF_CACHE_DIR", os.path.join(tempfile.gettempdir(), "hpa-tf-predict-cache"))
    p.add_argument("--cache-dir", default=cache, help=f"finished fields, for a rerun [HPA_TF_CACHE_DIR] (default {cache})")
    p.add_argument("--no-install", action="store_true", default=_env("HPA_TF_NO_INSTALL", "0") not in ("0", "false", ""),
                   help="skip the install (hpa-tf already importable) [HPA_TF_NO_INSTALL=1]")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    extra += shlex.split(_env("HPA_TF_PREDICT_ARGS", "") or "")
    a = build_parser().parse_args(argv)
    try:
        kit = find_kit(a.kit)
        info = read_kit(kit)
        print(f"kit {kit}: hpa-tf {info['project']['version']}, {len(info['models'])} model(s); "
              f"python {sys.version.split()[0]}; " + ", ".join(f"{k} {v}" for k, v in installed_versions().items() if v))
        if not a.no_install:
            install(kit, info)
        args = predict_argv(kit, info, a, extra)
    except KitError as e:
        print(f"kernel.py: error: {e}", file=sys.stderr)
        return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    try:  # what the predictor imports (hpacellseg's torch stack first, as the predictor does)
        from hpa_tf.segmentation import preload

        preload("hpacellseg" if info.get("hpacellseg") else "builtin")
        importlib.import_module("hpa_tf.predict")
        from hpa_tf.cli import predict
    except ImportError as e:
        hint = "drop --no-install" if a.no_install else "the image lacks it: add its wheel to the kit (--extra-wheel)"
        print(f"kernel.py: error: hpa-tf does not import: {e} ({hint})", file=sys.stderr)
        return 2
    print("predict " + " ".join(shlex.quote(x) for x in args), flush=True)
    return predict.main(args, prog="kernel.py")


if __name__ == "__main__":
    raise SystemExit(main())
