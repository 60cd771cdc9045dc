"""``python -m hpa_tf kit``: a folder that, uploaded as a Kaggle dataset, predicts in a kernel with no internet.

    python -m hpa_tf kit --out kit/ --model runs/b0/best.keras [runs/b1/best.keras …] \\
        [--hpacellseg-src ARCHIVE --pytorch-zoo-src ARCHIVE --nuclei-model P --cell-model P] \\
        [--python-version 3.11 --platform manylinux_2_28_x86_64] [--dataset-id USER/slug]

The kit holds:

``wheels/``
    hpa-tf's own wheel (built from this checkout with ``pip wheel --no-deps``, or ``--project-wheel``)
    and a wheel of every package of ``requirements-runtime.txt`` for the kernel's Python and
    platform (``pip download --only-binary=:all: --no-deps``), never TensorFlow, Keras, numpy or
    torch: the image's own are kept. With hpacellseg, wheels built from its source archives.
``models/``
    each model (``models/NAME/best.keras``) with the ``model.json`` that ``hpa_tf.model.save_model``
    or training wrote beside it; with hpacellseg, ``models/hpacellseg/`` holds its two model files
    and the source archives the wheels were built from.
``kernel.py``
    the kernel: installs from ``wheels/`` (``pip install --no-index --find-links wheels --no-deps``),
    checks TensorFlow, Keras, numpy and torch are unchanged, runs ``hpa_tf.cli.predict`` on
    ``/kaggle/input/COMPETITION/test`` and writes ``/kaggle/working/submission.csv``
    (``python kernel.py --help``: every path has a flag and an environment variable).
``kit.json``, ``dataset-metadata.json``, ``README.md``
    what the kernel reads; the Kaggle datasets CLI's metadata (``kaggle datasets create -p KIT``);
    how to use the kit.

``--wheels-from DIR`` takes the wheels from a folder instead (no network: a project wheel
``hpa_tf-*.whl`` there is used as is, and one wheel per runtime requirement must be there).
The kit is built in ``OUT.tmp`` and renamed to ``OUT`` when complete: a refused or killed run
leaves no half kit (a stale ``OUT.tmp`` of a killed run is removed by the next). An ``OUT`` that
exists and is not empty is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpa_tf.cli import plain

#: Never in a kit: the image's own stack (the kernel checks they are unchanged after the install).
PROTECTED = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly", "keras", "tf-keras", "numpy", "torch",
             "torchvision", "tensorboard", "jax", "jaxlib")
KIT_FORMAT = "hpa-tf-kit"
KIT_VERSION = 1
COMPETITION = "hpa-single-cell-image-classification"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
PARTIAL_MARK = ".hpa-tf-kit-partial"
ROOT = Path(__file__).resolve().parents[1]  # the checkout, when hpa_tf is run from one
KERNEL_TEMPLATE = Path(__file__).with_name("kit_kernel.py")


class KitError(RuntimeError):
    """A refused kit: one line naming the file and the reason."""


@dataclass
class KitOptions:
    out: str
    models: Sequence[str]
    python_version: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    platforms: Sequence[str] = (DEFAULT_PLATFORM,)
    requirements: str | None = None
    wheels_from: str | None = None
    project_wheel: str | None = None
    extra_wheels: Sequence[str] = ()
    hpacellseg_src: str | None = None
    pytorch_zoo_src: str | None = None
    nuclei_model: str | None = None
    cell_model: str | None = None
    competition: str = COMPETITION
    dataset_id: str | None = None
    title: str = "hpa-tf offline kit"
    license: str = "CC0-1.0"
    predict_args: Sequence[str] = ()
    force: bool = False


@dataclass
class _Model:
    source: Path
    config: Path
    name: str
    spec: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Checks (nothing is written before all of them pass)
# ----------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def read_requirements(path: str | os.PathLike) -> list[str]:
    """The requirement lines of a requirements file (comments and blanks dropped); refuses protected names."""
    from packaging.requirements import InvalidRequirement, Requirement

    p = Path(path)
    if not p.is_file():
        raise KitError(f"{p}: runtime requirements file not found (pass --requirements FILE)")
    reqs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text.startswith("-"):
            raise KitError(f"{p} line {n}: options ({text.split()[0]}) are not supported in a runtime requirements file")
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise KitError(f"{p} line {n}: {e}") from None
        if _canonical(req.name) in PROTECTED:
            raise KitError(f"{p} line {n}: {req.name} is the image's own and never goes into a kit")
        reqs.append(text)
    return reqs


def _requirement_name(text: str) -> str:
    from packaging.requirements import Requirement

    return _canonical(Requirement(text).name)


def _wheel_name(path: Path) -> tuple[str, str]:
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as e:
        raise KitError(f"{path}: {e}") from None
    return str(name), str(version)


def _expand_platforms(platforms: Sequence[str]) -> list[str]:
    """A manylinux platform accepts the older ones too (as pip's --platform does): manylinux_2_28 → …_2_17, 2014, …"""
    out: list[str] = []
    for plat in platforms:
        out.append(plat)
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", plat)
        legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
        m2 = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", plat)
        if m:
            major, minor, arch = int(m[1]), int(m[2]), m[3]
        elif m2:
            major, minor, arch = 2, legacy[m2[1]], m2[2]
        else:
            continue
        if major != 2:
            continue
        for k in range(minor, 4, -1):
            out.append(f"manylinux_2_{k}_{arch}")
        out += [f"{name}_{arch}" for name, k in legacy.items() if k <= minor]
    return list(dict.fromkeys(out))


def wheel_fits(path: Path, python_version: str, platforms: Sequence[str]) -> bool:
    """Whether a wheel installs on CPython ``python_version`` on one of ``platforms``."""
    from packaging import tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(x) for x in python_version.split(".")[:2])
    plats = _expand_platforms(platforms)
    supported = set(tags.cpython_tags(version, platforms=plats))
    supported |= set(tags.compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=plats))
    _, _, _, wheel_tags = parse_wheel_filename(path.name)
    return bool(set(wheel_tags) & supported)


def _check_file(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise KitError(f"{what} not found: {p}")
    return p


def _check_models(paths: Sequence[str]) -> list[_Model]:
    from hpa_tf.model import ModelConfigError, ModelSpec, config_candidates, find_config

    if not paths:
        raise KitError("no model given: pass --model PATH.keras")
    models: list[_Model] = []
    names: set[str] = set()
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise KitError(f"model file not found: {p}")
        if p.suffix != ".keras":
            raise KitError(f"{p}: not a .keras model file")
        config = find_config(p)
        if config is None:
            raise KitError(f"{p}: no model.json beside it (looked for {' and '.join(config_candidates(p))}); "
                           "the predictor needs its crop spec")
        try:
            spec = json.loads(Path(config).read_text())
            ModelSpec.from_config(spec, where=config)
        except (OSError, ValueError) as e:
            raise KitError(str(e) if isinstance(e, ModelConfigError) else f"{config}: unreadable: {e}") from None
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", p.resolve().parent.name).strip("-.") or "model"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        models.append(_Model(p, Path(config), name, spec))
    return models


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KitError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KitError(f"{out}: exists and is not empty (pass --force to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise KitError(f"{parent}: the folder to write the kit in does not exist")
    tmp = Path(f"{out}.tmp")
    if tmp.exists() and not (tmp / PARTIAL_MARK).is_file():
        raise KitError(f"{tmp}: exists and is not a kit in progress; remove it or choose another --out")


def _check_dataset(options: KitOptions) -> tuple[str, str]:
    user = os.environ.get("KAGGLE_USERNAME") or "INSERT_USERNAME"
    dataset_id = options.dataset_id or f"{user}/hpa-tf-kit"
    if not re.fullmatch(r"[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]{1,48}[a-z0-9]", dataset_id):
        raise KitError(f"--dataset-id {dataset_id!r}: must be USER/slug (slug: 3-50 lowercase letters, digits, '-')")
    if not 6 <= len(options.title) <= 50:
        raise KitError(f"--title {options.title!r}: Kaggle wants 6 to 50 characters")
    return dataset_id, options.title


@dataclass
class _Plan:
    out: Path
    models: list[_Model]
    requirements: list[str]
    requirements_path: Path | None
    wheels_from: Path | None
    project_wheel: Path | None
    extra_wheels: list[Path]
    hpacellseg: dict | None
    dataset_id: str
    title: str


def check(options: KitOptions) -> _Plan:
    """Every check of the inputs, before anything is written; raises KitError."""
    out = Path(options.out)
    _check_out(out, options.force)
    if not re.fullmatch(r"\d+\.\d+", options.python_version):
        raise KitError(f"--python-version {options.python_version!r}: expected MAJOR.MINOR, e.g. 3.11")
    models = _check_models(options.models)
    req_path = Path(options.requirements) if options.requirements else ROOT / "requirements-runtime.txt"
    requirements = read_requirements(req_path)
    wheels_from = None
    if options.wheels_from:
        wheels_from = Path(options.wheels_from)
        if not wheels_from.is_dir():
            raise KitError(f"--wheels-from {wheels_from}: not a folder")
    project_wheel = _check_file(options.project_wheel, "project wheel")
    if project_wheel is None and wheels_from is not None:
        found = sorted(wheels_from.glob("hpa_tf-*.whl"))
        if len(found) > 1:
            raise KitError(f"{wheels_from}: several hpa-tf wheels ({', '.join(p.name for p in found)}); pass --project-wheel")
        project_wheel = found[0] if found else None
    if project_wheel is None and not (ROOT / "pyproject.toml").is_file():
        raise KitError(f"{ROOT}: not a checkout of hpa-tf (no pyproject.toml) to build its wheel from; pass --project-wheel")
    if project_wheel is not None and _wheel_name(project_wheel)[0] != "hpa-tf":
        raise KitError(f"{project_wheel}: not an hpa-tf wheel")
    extra = [_check_file(w, "extra wheel") for w in options.extra_wheels]
    for w in extra:
        if _canonical(_wheel_name(w)[0]) in PROTECTED:
            raise KitError(f"{w}: {_wheel_name(w)[0]} is the image's own and never goes into a kit")
    seg_given = [options.hpacellseg_src, options.pytorch_zoo_src, options.nuclei_model, options.cell_model]
    hpacellseg = None
    if any(seg_given):
        if not all(seg_given):
            raise KitError("hpacellseg needs all four of --hpacellseg-src, --pytorch-zoo-src, --nuclei-model, --cell-model")
        hpacellseg = {
            "src": [_check_file(options.hpacellseg_src, "hpacellseg source archive"),
                    _check_file(options.pytorch_zoo_src, "pytorch_zoo source archive")],
            "nuclei_model": _check_file(options.nuclei_model, "hpacellseg nuclei model"),
            "cell_model": _check_file(options.cell_model, "hpacellseg cell model"),
        }
    dataset_id, title = _check_dataset(options)
    return _Plan(out, models, requirements, req_path, wheels_from, project_wheel, [w for w in extra if w],
                 hpacellseg, dataset_id, title)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _run_pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip() and "is ignored" not in ln]
        tail = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise KitError(f"{what} failed (pip exit {proc.returncode}): {tail}")


#: What hpa-tf's wheel is built from (pyproject.toml's packages and readme): copied to a scratch folder,
#: so the build never writes into the checkout and no stale build/ output can slip into the wheel.
PROJECT_FILES = ("pyproject.toml", "README.md", "hpa_tf", "tfrecord_builder")


def _build_wheel(source: Path, dest: Path, what: str) -> Path:
    """``pip wheel --no-deps`` of a source archive, or of the checkout's files, into ``dest``; returns the wheel."""
    with tempfile.TemporaryDirectory(prefix="hpa-tf-kit-") as tmp:
        if source.is_dir():
            tree = Path(tmp) / "src"
            for name in PROJECT_FILES:
                if (source / name).is_dir():
                    shutil.copytree(source / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    tree.mkdir(exist_ok=True)
                    shutil.copy2(source / name, tree / name)
            source = tree
        out = Path(tmp) / "out"
        args = ["wheel", "--no-deps", "-q", "-w", str(out), str(source)]
        try:
            import setuptools  # noqa: F401  (present: build here, offline, with it)

            args.insert(2, "--no-build-isolation")
        except ImportError:
            pass
        _run_pip(args, f"building the wheel of {what} ({source})")
        built = sorted(out.glob("*.whl"))
        if len(built) != 1:
            raise KitError(f"building the wheel of {what} ({source}) gave {len(built)} wheels")
        target = dest / built[0].name
        shutil.copy2(built[0], target)
    return target


def _runtime_wheels(plan: _Plan, options: KitOptions, wheels: Path) -> list[str]:
    names = {_requirement_name(r): r for r in plan.requirements}
    if plan.wheels_from is not None:
        chosen = []
        for name in names:
            found = [w for w in sorted(plan.wheels_from.glob("*.whl")) if _canonical(_wheel_name(w)[0]) == name
                     and wheel_fits(w, options.python_version, options.platforms)]
            if not found:
                raise KitError(f"--wheels-from {plan.wheels_from}: no wheel of {name} for Python "
                               f"{options.python_version} on {', '.join(options.platforms)}")
            shutil.copy2(found[-1], wheels / found[-1].name)
            chosen.append(found[-1].name)
        return chosen
    if names:
        plat_args = [a for p in options.platforms for a in ("--platform", p)]
        _run_pip(["download", "--only-binary=:all:", "--no-deps", "--python-version", options.python_version,
                  "--implementation", "cp", *plat_args, "-q", "-d", str(wheels), *plan.requirements],
                 "downloading the runtime wheels (" + ", ".join(names) + ")")
    got = {_canonical(_wheel_name(w)[0]): w.name for w in wheels.glob("*.whl")}
    missing = [n for n in names if n not in got]
    if missing:
        raise KitError(f"pip download gave no wheel of {', '.join(missing)}")
    return [got[n] for n in names]


def _kernel_readme(info: dict) -> str:
    models = "\n".join(f"- `{m['path']}`: {m['backbone']} at {m['image_size']} px, channels {m['channels']}, "
                       f"crops of {m['crop_size']} px" for m in info["models"])
    wheels = "\n".join(f"- `wheels/{w}`" for w in info["wheels"])
    seg = ("hpacellseg (models in `models/hpacellseg/`, pickled PyTorch models: load only files you trust)"
           if info.get("hpacellseg") else "the built-in segmenter")
    return f"""# hpa-tf offline kit

Predicts the Human Protein Atlas single-cell classification test set in a Kaggle kernel with no
internet: hpa-tf {info['project']['version']} for Python {info['python_version']}
({', '.join(info['platforms'])}), segmentation by {seg}.

## Use

1. Upload this folder as a dataset: `kaggle datasets create -p THIS_FOLDER` (a new version:
   `kaggle datasets version -p THIS_FOLDER -m "new models"`); `dataset-metadata.json` holds its
   title and id (`{info['dataset_id']}`: set your user name there first).
2. In a kernel with Internet off, add this dataset and the competition's data, then run
   `!python /kaggle/input/SLUG/kernel.py` (or make `kernel.py` the kernel's script).
3. It installs hpa-tf from `wheels/` with `pip install --no-index --find-links wheels --no-deps`
   (the image's TensorFlow, Keras, numpy and torch are kept, and checked unchanged), predicts
   `/kaggle/input/{info['competition']}/test` in the order of its `sample_submission.csv` and writes
   `/kaggle/working/submission.csv`.

`python kernel.py --help` lists the flags; each path also has an environment variable
(`HPA_TF_DATA_DIR`, `HPA_TF_TEST_DIR`, `HPA_TF_SAMPLE_SUBMISSION`, `HPA_TF_OUT`, `HPA_TF_CACHE_DIR`,
`HPA_TF_KIT`); `HPA_TF_PREDICT_ARGS` or arguments after `--` go to the predictor (e.g. `-- --tta`).

## Contents

Models (each with the `model.json` beside it that says how to crop cells for it):

{models}

Wheels:

{wheels}

`kit.json` is what `kernel.py` reads. Made by `python -m hpa_tf kit` on {info['created']}.
"""


def build(options: KitOptions, say=print) -> dict:
    """Build the kit; returns its ``kit.json`` content. Raises KitError (nothing written on a refusal)."""
    plan = check(options)
    out = plan.out
    tmp = Path(f"{out}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed run's (checked: it carries the partial mark)
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARK).write_text("an hpa-tf kit being built; removed by the next run\n")
        info = _fill(plan, options, tmp, say)
        (tmp / PARTIAL_MARK).unlink()
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            os.replace(out, old / "kit")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _fill(plan: _Plan, options: KitOptions, tmp: Path, say) -> dict:
    wheels = tmp / "wheels"
    models_dir = tmp / "models"
    wheels.mkdir()
    models_dir.mkdir()
    n = 4 if plan.hpacellseg is None else 5

    say(f"[1/{n}] hpa-tf wheel")
    if plan.project_wheel is not None:
        project = wheels / plan.project_wheel.name
        shutil.copy2(plan.project_wheel, project)
    else:
        project = _build_wheel(ROOT, wheels, "hpa-tf")
    _, project_version = _wheel_name(project)

    say(f"[2/{n}] runtime wheels for Python {options.python_version} on {', '.join(options.platforms)}: "
        + (", ".join(plan.requirements) or "none"))
    runtime = _runtime_wheels(plan, options, wheels)
    for w in plan.extra_wheels:
        shutil.copy2(w, wheels / w.name)

    say(f"[3/{n}] {len(plan.models)} model(s)")
    model_entries = []
    for m in plan.models:
        folder = models_dir / m.name
        folder.mkdir()
        shutil.copy2(m.source, folder / m.source.name)
        shutil.copy2(m.config, folder / m.config.name)
        crop = m.spec["crop"]
        model_entries.append({
            "path": f"models/{m.name}/{m.source.name}", "config": f"models/{m.name}/{m.config.name}",
            "source": str(m.source.resolve()), "backbone": m.spec["backbone"], "image_size": m.spec["image_size"],
            "channels": m.spec["channel_letters"], "crop_size": crop.get("size"),
        })

    seg_entry = None
    if plan.hpacellseg is not None:
        say(f"[4/{n}] hpacellseg: wheels from its sources, its two model files")
        seg_dir = models_dir / "hpacellseg"
        seg_dir.mkdir()
        seg_wheels = []
        for src in plan.hpacellseg["src"]:
            shutil.copy2(src, seg_dir / src.name)
            seg_wheels.append(_build_wheel(src, wheels, src.name).name)
        seg_entry = {"wheels": seg_wheels, "sources": [f"models/hpacellseg/{s.name}" for s in plan.hpacellseg["src"]]}
        for key in ("nuclei_model", "cell_model"):
            src = plan.hpacellseg[key]
            shutil.copy2(src, seg_dir / src.name)
            seg_entry[key] = f"models/hpacellseg/{src.name}"

    say(f"[{n}/{n}] kernel.py, kit.json, dataset-metadata.json, README.md")
    versions = {}
    for name in ("tensorflow", "keras", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # informative only
            versions[name] = None
    info = {
        "format": KIT_FORMAT,
        "format_version": KIT_VERSION,
        "project": {"name": "hpa-tf", "version": project_version, "wheel": project.name},
        "python_version": options.python_version,
        "platforms": list(options.platforms),
        "runtime_requirements": [_requirement_name(r) if _is_bare(r) else r for r in plan.requirements],
        "wheels": sorted(p.name for p in wheels.glob("*.whl")),
        "runtime_wheels": runtime,
        "extra_wheels": [w.name for w in plan.extra_wheels],
        "models": model_entries,
        "hpacellseg": seg_entry,
        "competition": options.competition,
        "predict_args": list(options.predict_args),
        "dataset_id": plan.dataset_id,
        "built_with": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    kernel = KERNEL_TEMPLATE.read_text().replace(
        'COMPETITION = "hpa-single-cell-image-classification"', f"COMPETITION = {json.dumps(options.competition)}")
    (tmp / "kernel.py").write_text(kernel)
    (tmp / "kit.json").write_text(json.dumps(info, indent=2) + "\n")
    metadata = {"title": plan.title, "id": plan.dataset_id, "licenses": [{"name": options.license}]}
    (tmp / "dataset-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (tmp / "README.md").write_text(_kernel_readme(info))
    return info


def _is_bare(requirement: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9._-]+", requirement.strip()) is not None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(prog: str = "python -m hpa_tf kit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the kit folder to write")
    p.add_argument("--model", dest="models", nargs="+", required=True, metavar="MODEL",
                   help="one or more .keras models, each with its model.json beside it")
    g = p.add_argument_group("the kernel's Python")
    g.add_argument("--python-version", default=KitOptions.python_version,
                   help="the kernel's Python, MAJOR.MINOR (default %(default)s, this one)")
    g.add_argument("--platform", dest="platforms", action="append", metavar="PLATFORM",
                   help=f"wheel platform tag, repeatable (default {DEFAULT_PLATFORM}, which takes older manylinux too)")
    g = p.add_argument_group("wheels")
    g.add_argument("--requirements", help="runtime requirements (default: requirements-runtime.txt of the checkout)")
    g.add_argument("--wheels-from", metavar="DIR",
                   help="take the wheels from this folder instead of downloading (an hpa_tf-*.whl there is the project's)")
    g.add_argument("--project-wheel", metavar="WHL", help="hpa-tf's wheel (default: built from the checkout)")
    g.add_argument("--extra-wheel", dest="extra_wheels", action="append", metavar="WHL",
                   help="another wheel for the kernel to install (--no-deps), e.g. a package the image lacks; "
                        "repeatable (default: none)")
    g = p.add_argument_group("hpacellseg (all four, or none: the built-in segmenter)")
    g.add_argument("--hpacellseg-src", metavar="ARCHIVE", help="HPA-Cell-Segmentation source archive")
    g.add_argument("--pytorch-zoo-src", metavar="ARCHIVE", help="haoxusci/pytorch_zoo source archive")
    g.add_argument("--nuclei-model", metavar="PTH", help="dpn_unet_nuclei_v1.pth")
    g.add_argument("--cell-model", metavar="PTH", help="dpn_unet_cell_3ch_v1.pth")
    g = p.add_argument_group("the dataset and the kernel")
    g.add_argument("--competition", default=COMPETITION, help="competition slug: data in /kaggle/input/SLUG (default %(default)s)")
    g.add_argument("--dataset-id", help="Kaggle dataset id USER/slug (default $KAGGLE_USERNAME/hpa-tf-kit)")
    g.add_argument("--title", default=KitOptions.title, help="dataset title (default %(default)r)")
    g.add_argument("--license", default=KitOptions.license, help="dataset license (default %(default)s)")
    g.add_argument("--predict-args", default="", metavar="ARGS",
                   help="predictor flags the kernel always passes, one string (e.g. '--tta --batch-size 64'; default: none)")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpa_tf kit") -> int:
    import shlex

    a = build_parser(prog).parse_args(argv)
    options = KitOptions(
        out=a.out, models=a.models, python_version=a.python_version, platforms=tuple(a.platforms or (DEFAULT_PLATFORM,)),
        requirements=a.requirements, wheels_from=a.wheels_from, project_wheel=a.project_wheel,
        extra_wheels=tuple(a.extra_wheels or ()), hpacellseg_src=a.hpacellseg_src, pytorch_zoo_src=a.pytorch_zoo_src,
        nuclei_model=a.nuclei_model, cell_model=a.cell_model, competition=a.competition, dataset_id=a.dataset_id,
        title=a.title, license=a.license, predict_args=tuple(shlex.split(a.predict_args)), force=a.force,
    )
    try:
        info = build(options, say=lambda s: print(f"kit: {s}", flush=True))
    except KitError as e:
        print(f"kit: error: {e}", file=sys.stderr)
        return 2
    out = Path(options.out)
    print(f"kit: wrote {out} ({_size(out) / 1e6:.1f} MB): {len(info['wheels'])} wheels, {len(info['models'])} model(s); "
          f"dataset {info['dataset_id']}")
    if info["dataset_id"].startswith("INSERT_USERNAME/"):
        print("kit: set your Kaggle user name in dataset-metadata.json (or pass --dataset-id USER/slug)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
