"""python -m hpa_tf kit: the kit's layout and metadata, its kernel.py predicting offline, clear refusals
that leave nothing behind. (scripts/check_kit.sh installs a kit into a virtualenv with another TensorFlow.)"""

import base64
import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

from hpa_tf import kit as hk
from hpa_tf.backbones import build_classifier
from hpa_tf.crops import CropSpec
from hpa_tf.io import read_sample_submission
from hpa_tf.model import save_model
from hpa_tf.submission import read_submission, validate_submission
from hpa_tf.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ["pycocotools", "iterative-stratification", "tqdm"]


def _fake_wheel(folder: Path, name: str, version: str = "1.0", tag: str = "py3-none-any") -> Path:
    """A valid, empty wheel (dist-info only) standing in for a runtime package in --wheels-from."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(text)}")
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """--wheels-from: hpa-tf's wheel built from this checkout (pip wheel --no-deps) and stand-ins for the rest."""
    folder = tmp_path_factory.mktemp("wheels")
    before = sorted(p.name for p in ROOT.iterdir())
    built = hk._build_wheel(hk.ROOT, folder, "hpa-tf")  # pip wheel --no-deps of a scratch copy of the checkout
    assert sorted(p.name for p in ROOT.iterdir()) == before  # no build/ or *.egg-info left in the checkout
    names = zipfile.ZipFile(built).namelist()
    assert "hpa_tf/kit_kernel.py" in names and "hpa_tf/cli/predict.py" in names and "tfrecord_builder/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    for name in RUNTIME:
        _fake_wheel(folder, name)
    _fake_wheel(folder, "tqdm", "9.9", "cp311-cp311-win_amd64")  # another platform: never chosen
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    root = tmp_path_factory.mktemp("runs")
    paths = []
    for k, (run, channels) in enumerate([("b0", "rgby"), ("b1", "gby")]):
        keras.utils.set_random_seed(k)
        model = build_classifier("tiny_cnn", image_size=32, channels=len(channels))
        save_model(model, root / run / "best.keras", crop=CropSpec(size=48), channels=channels)
        paths.append(root / run / "best.keras")
    return paths


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    """/kaggle/input/COMPETITION as the kernel sees it: test/ with 16-bit fields and sample_submission.csv."""
    root = tmp_path_factory.mktemp("input") / hk.COMPETITION
    write_dataset(root, n_train=0, n_test=2, size=[192, 224], seed=4, bit16_test=True)
    return root


def _kit(out, models, wheels, *extra):
    return hk.main(["--out", str(out), "--model", *map(str, models), "--wheels-from", str(wheels),
                    "--python-version", "3.11", "--dataset-id", "someone/hpa-tf-kit-test", *extra])


@pytest.fixture(scope="module")
def kit(tmp_path_factory, models, wheels):
    out = tmp_path_factory.mktemp("kits") / "kit"
    assert _kit(out, models, wheels, "--predict-args", "--image-weight 0.2") == 0
    return out


def _load_kernel(kit_dir: Path):
    spec = importlib.util.spec_from_file_location("kit_kernel_under_test", kit_dir / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_metadata_and_model_json_copies(kit, models, wheels):
    files = sorted(str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file())
    project = next(wheels.glob("hpa_tf-*.whl")).name
    assert files == sorted([
        "README.md", "dataset-metadata.json", "kernel.py", "kit.json",
        "models/b0/best.keras", "models/b0/best.json", "models/b1/best.keras", "models/b1/best.json",
        f"wheels/{project}", "wheels/iterative_stratification-1.0-py3-none-any.whl",
        "wheels/pycocotools-1.0-py3-none-any.whl", "wheels/tqdm-1.0-py3-none-any.whl",
    ])
    for model, name in zip(models, ["b0", "b1"]):
        assert (kit / "models" / name / "best.keras").read_bytes() == model.read_bytes()
        assert (kit / "models" / name / "best.json").read_bytes() == model.with_suffix(".json").read_bytes()
    meta = json.loads((kit / "dataset-metadata.json").read_text())
    assert meta == {"title": "hpa-tf offline kit", "id": "someone/hpa-tf-kit-test", "licenses": [{"name": "CC0-1.0"}]}
    info = json.loads((kit / "kit.json").read_text())
    assert info["format"] == "hpa-tf-kit" and info["project"]["wheel"] == project
    assert info["runtime_requirements"] == RUNTIME and info["python_version"] == "3.11"
    assert [(m["path"], m["channels"], m["crop_size"]) for m in info["models"]] == [
        ("models/b0/best.keras", "rgby", 48), ("models/b1/best.keras", "gby", 48)]
    assert info["predict_args"] == ["--image-weight", "0.2"] and info["hpacellseg"] is None
    assert not any(w.lower().startswith(("tensorflow", "keras", "numpy", "torch")) for w in info["wheels"])
    assert (kit / "kernel.py").read_text() == (ROOT / "hpa_tf" / "kit_kernel.py").read_text()
    assert "kernel.py" in (kit / "README.md").read_text()


def test_kernel_predicts_offline_to_a_valid_submission(kit, competition, tmp_path, monkeypatch, capsys):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HPA_TF_OUT", str(tmp_path / "working" / "submission.csv"))  # paths from the environment
    monkeypatch.setenv("HPA_TF_DATA_DIR", str(competition))
    kernel = _load_kernel(kit)
    rc = kernel.main(["--no-install", "--cache-dir", str(tmp_path / "cache"), "--", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "--image-weight 0.2" in out and "--no-progress" in out  # the kit's and the caller's predictor flags
    sub = tmp_path / "working" / "submission.csv"
    expected = {r.image_id: (r.width, r.height) for r in read_sample_submission(competition / "sample_submission.csv")}
    assert validate_submission(sub, expected_ids=expected) == []
    rows = read_submission(sub)
    assert [r.image_id for r in rows] == list(expected) and all(r.predictions for r in rows)


def test_kernel_installs_only_from_the_kit_without_deps(kit, monkeypatch):
    kernel = _load_kernel(kit)
    calls = []
    monkeypatch.setattr(kernel, "_pip", lambda args, what: calls.append(args))
    info = kernel.read_kit(kit)
    kernel.install(kit, info)
    assert len(calls) == 2
    for args in calls:
        assert args[:4] == ["--no-index", "--find-links", str(kit / "wheels"), "--no-deps"]
    assert calls[0][4:] == ["--force-reinstall", str(kit / "wheels" / info["project"]["wheel"])]
    assert calls[1][4:] == RUNTIME
    # a changed TensorFlow is caught and named
    versions = iter([{"tensorflow": "2.18.1"}, {"tensorflow": "2.21.0"}])
    monkeypatch.setattr(kernel, "PROTECTED", ("tensorflow",))
    monkeypatch.setattr(kernel, "installed_versions", lambda names=None: next(versions))
    with pytest.raises(kernel.KitError, match="tensorflow 2.18.1 -> 2.21.0"):
        kernel.install(kit, info)


def test_kernel_errors_are_one_line(kit, tmp_path, capsys):
    kernel = _load_kernel(kit)
    assert kernel.main(["--no-install", "--data-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kernel.py: error: test folder not found:") and "\n" not in err
    assert kernel.main(["--no-install", "--kit", str(tmp_path)]) == 2
    assert "not an hpa-tf kit" in capsys.readouterr().err


def _refused(capsys, rc, *fragments):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("kit: error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_refusals_write_nothing(models, wheels, tmp_path, capsys):
    out = tmp_path / "kit"
    rc = _kit(out, [tmp_path / "missing.keras"], wheels)
    _refused(capsys, rc, "model file not found", "missing.keras")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "best.keras").write_bytes(models[0].read_bytes())
    _refused(capsys, _kit(out, [bare / "best.keras"], wheels), "no model.json beside it")
    no_crop = tmp_path / "nocrop"
    no_crop.mkdir()
    (no_crop / "best.keras").write_bytes(models[0].read_bytes())
    config = json.loads(models[0].with_suffix(".json").read_text())
    (no_crop / "best.json").write_text(json.dumps({**config, "crop": None}))
    _refused(capsys, _kit(out, [no_crop / "best.keras"], wheels), "no crop spec")
    req = tmp_path / "req.txt"
    req.write_text("tqdm\ntensorflow>=2.16\n")
    _refused(capsys, _kit(out, models, wheels, "--requirements", str(req)), "req.txt line 2", "tensorflow")
    _refused(capsys, _kit(out, models, wheels, "--nuclei-model", str(models[0])), "needs all four")
    _refused(capsys, _kit(out, models, wheels, "--python-version", "3"), "--python-version")
    # a missing runtime wheel is found while building: the half-built kit is removed
    partial = tmp_path / "partial"
    partial.mkdir()
    for w in wheels.glob("*.whl"):
        if not w.name.startswith("pycocotools"):
            (partial / w.name).write_bytes(w.read_bytes())
    _refused(capsys, _kit(out, models, partial), "no wheel of pycocotools for Python 3.11")
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "bare", no_crop, req, partial])


def test_existing_out_needs_force_and_is_replaced_whole(models, wheels, tmp_path, capsys, monkeypatch):
    out = tmp_path / "kit"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _refused(capsys, _kit(out, models[:1], wheels), "exists and is not empty", "--force")
    assert (out / "mine.txt").read_text() == "keep"

    # a run killed in the middle (here: interrupted while writing the README) leaves OUT as it was
    def interrupted(info):
        raise KeyboardInterrupt

    monkeypatch.setattr(hk, "_kernel_readme", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _kit(out, models[:1], wheels, "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"] and (out / "mine.txt").is_file()
    monkeypatch.undo()

    # a stale OUT.tmp of a killed run is cleared; one that is not a kit in progress is refused
    stale = tmp_path / "kit.tmp"
    stale.mkdir()
    (stale / "other.txt").write_text("x")
    _refused(capsys, _kit(out, models[:1], wheels, "--force"), "kit.tmp: exists and is not a kit in progress")
    (stale / hk.PARTIAL_MARK).write_text("")
    assert _kit(out, models[:1], wheels, "--force") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit"]
    assert not (out / "mine.txt").exists() and (out / "kit.json").is_file() and (out / "models/b0/best.keras").is_file()


def test_wheel_platform_check():
    fits = hk.wheel_fits
    assert fits(Path("a-1-py3-none-any.whl"), "3.11", ["manylinux_2_28_x86_64"])
    assert fits(Path("a-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"), "3.11", ["manylinux_2_28_x86_64"])
    assert fits(Path("a-1-cp38-abi3-manylinux2014_x86_64.whl"), "3.11", ["manylinux2014_x86_64"])
    assert not fits(Path("a-1-cp311-cp311-manylinux_2_34_x86_64.whl"), "3.11", ["manylinux_2_28_x86_64"])
    assert not fits(Path("a-1-cp310-cp310-manylinux2014_x86_64.whl"), "3.11", ["manylinux_2_28_x86_64"])
    assert not fits(Path("a-1-cp311-cp311-win_amd64.whl"), "3.11", ["manylinux_2_28_x86_64"])
    assert not fits(Path("a-1-cp311-cp311-manylinux2014_aarch64.whl"), "3.11", ["manylinux_2_28_x86_64"])


def _sdist(folder: Path, name: str) -> Path:
    """A minimal source archive of a pure-Python package (standing in for hpacellseg's and pytorch_zoo's)."""
    import tarfile

    root = folder / f"{name}-0.1"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("VALUE = 1\n")
    (root / "setup.py").write_text(f"from setuptools import setup\nsetup(name={name!r}, version='0.1', packages=[{name!r}])\n")
    archive = folder / f"{name}-0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return archive


def test_hpacellseg_kit_carries_wheels_models_and_sources(models, wheels, competition, tmp_path, monkeypatch):
    srcs = [_sdist(tmp_path, "hpacellseg"), _sdist(tmp_path, "pytorch_zoo")]
    weights = []
    for name in ("dpn_unet_nuclei_v1.pth", "dpn_unet_cell_3ch_v1.pth"):
        (tmp_path / name).write_bytes(name.encode() * 10)
        weights.append(tmp_path / name)
    out = tmp_path / "kit"
    assert _kit(out, models[:1], wheels, "--hpacellseg-src", str(srcs[0]), "--pytorch-zoo-src", str(srcs[1]),
                "--nuclei-model", str(weights[0]), "--cell-model", str(weights[1])) == 0
    info = json.loads((out / "kit.json").read_text())
    seg = info["hpacellseg"]
    assert sorted(seg["wheels"]) == ["hpacellseg-0.1-py3-none-any.whl", "pytorch_zoo-0.1-py3-none-any.whl"]
    assert all((out / "wheels" / w).is_file() for w in seg["wheels"])
    assert seg["sources"] == ["models/hpacellseg/hpacellseg-0.1.tar.gz", "models/hpacellseg/pytorch_zoo-0.1.tar.gz"]
    for key, src in zip(("nuclei_model", "cell_model"), weights):
        assert (out / seg[key]).read_bytes() == src.read_bytes()

    kernel = _load_kernel(out)
    calls = []
    monkeypatch.setattr(kernel, "_pip", lambda args, what: calls.append(args))
    kernel.install(out, info)
    assert calls[2] == ["--no-index", "--find-links", str(out / "wheels"), "--no-deps",
                        *(str(out / "wheels" / w) for w in seg["wheels"])]
    args = kernel.build_parser().parse_args(["--data-dir", str(competition), "--out", str(tmp_path / "s.csv")])
    argv = kernel.predict_argv(out, info, args, ["--device", "cpu"])
    i = argv.index("--segmenter")
    assert argv[i:i + 6] == ["--segmenter", "hpacellseg", "--nuclei-model", str(out / seg["nuclei_model"]),
                             "--cell-model", str(out / seg["cell_model"])]
    assert argv[-2:] == ["--device", "cpu"]


def test_runtime_requirements_are_project_dependencies_and_never_the_images_stack():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    runtime = [Requirement(r).name for r in hk.read_requirements(ROOT / "requirements-runtime.txt")]
    deps = {Requirement(d).name for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert runtime == RUNTIME and set(runtime) <= deps
    assert not set(runtime) & {"tensorflow", "keras", "numpy", "torch", "opencv-python-headless", "tensorboard"}
