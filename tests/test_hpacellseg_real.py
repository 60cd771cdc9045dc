"""The hpacellseg backend against the REAL package (``hpacellseg.cellsegmentator.CellSegmentator``
and ``hpacellseg.utils.label_cell``, CellProfiling/HPA-Cell-Segmentation) with small stand-in
models pickled whole (``tests/hpacellseg_standins.py``; the real weights are not reachable here).

Skipped where torch or hpacellseg is not installed (CI: torch is too large for every run).
``scripts/check_hpacellseg.sh`` makes an environment with both and runs these tests for real.
"""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hpa_tf.segmentation import SegmenterError, get_segmenter, preload  # noqa: E402

# The pytest process imported TensorFlow first (conftest): load PyTorch's stack the way a process
# that did so must (the stand-ins import torchvision, as pytorch_zoo does).
preload("hpacellseg")

import hpacellseg_standins  # noqa: E402

from hpa_tf.segmentation.builtin import pair_labels  # noqa: E402
from hpa_tf.segmentation.evaluate import match_labels  # noqa: E402
from hpa_tf.segmentation.hpacellseg_backend import (  # noqa: E402
    PYTORCH_ZOO_URL,
    apply_compat,
    load_model_file,
)
from hpa_tf.synthetic import generate_field  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The package's source beside the checkout (what scripts/check_hpacellseg.sh installs; it sets
#: HPACELLSEG_SRC when it installs another path).
VENDOR_ARCHIVE = Path(os.environ.get("HPACELLSEG_SRC") or ROOT.parent / "shared" / "vendor" / "hpacellseg-7b6dbc6.tar.gz")
CHANNELS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def hpacellseg():
    pytest.importorskip("hpacellseg")
    from hpacellseg import cellsegmentator, utils

    return cellsegmentator, utils


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return hpacellseg_standins.write_models(tmp_path_factory.mktemp("standin_models"))


@pytest.fixture(scope="module")
def segmenter(hpacellseg, model_files):
    return get_segmenter("hpacellseg", nuclei_model=model_files[0], cell_model=model_files[1], device="cpu")


def _field(seed: int, size: int, shape: tuple[int, int] | None = None):
    """A synthetic field with cells large enough for label_cell's size cut-offs (tuned for 2048 px
    fields), optionally cut to ``shape`` (H, W)."""
    f = generate_field(seed, size, cell_radius=0.18 * size)
    h, w = shape or (size, size)
    return f.image[:h, :w], f.cells[:h, :w]


@pytest.fixture(scope="module")
def fields():
    return {"square": _field(11, 512), "wide": _field(12, 640, (448, 640)), "tall": _field(13, 576, (576, 400))}


def _check_labels(cells, nuclei, shape):
    assert cells.shape == shape and nuclei.shape == shape
    assert cells.dtype == np.int32 and nuclei.dtype == np.int32
    n = int(cells.max())
    assert set(np.unique(cells)) - {0} == set(range(1, n + 1)) == set(np.unique(nuclei)) - {0}
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()


# ---------------------------------------------------------------------------------------------
# The real package, driven by the adapter
# ---------------------------------------------------------------------------------------------


def test_installed_package_is_the_vendored_source(hpacellseg):
    """The checks below run against HPA-Cell-Segmentation at 7b6dbc6 (the archive beside the checkout)."""
    if not VENDOR_ARCHIVE.is_file():
        pytest.skip(f"{VENDOR_ARCHIVE} not present")
    cellsegmentator, utils = hpacellseg
    with tarfile.open(VENDOR_ARCHIVE) as tar:
        for module in (cellsegmentator, utils):
            name = f"HPA-Cell-Segmentation/hpacellseg/{Path(module.__file__).name}"
            assert tar.extractfile(name).read() == Path(module.__file__).read_bytes(), name


def test_output_equals_label_cell_and_pairing_on_the_real_package(hpacellseg, segmenter, model_files, fields):
    """Square and non-square fields: the adapter's labels are exactly the package's own pipeline
    (CellSegmentator at scale 0.25 on (red, yellow, blue) and blue, label_cell, then the
    project's cell/nucleus pairing), have the field's shape and lie on the true cells."""
    cellsegmentator, utils = hpacellseg
    reference = cellsegmentator.CellSegmentator(
        load_model_file(str(model_files[0]), "cpu"), load_model_file(str(model_files[1]), "cpu"),
        scale_factor=0.25, device="cpu", padding=True, multi_channel_model=True,
    )
    for name, (image, truth) in fields.items():
        h, w = image.shape[:2]
        cells, nuclei = segmenter.segment(image)
        _check_labels(cells, nuclei, (h, w))
        red, blue, yellow = (np.ascontiguousarray(image[..., c]) for c in (0, 2, 3))
        nuc_pred = reference.pred_nuclei([blue])[0]
        cell_pred = reference.pred_cells([[red], [yellow], [blue]])[0]
        # the package returns non-square predictions with H and W swapped; cv2 takes (W, H)
        nuc_pred, cell_pred = (cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in (nuc_pred, cell_pred))
        with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates label_cell's min_size calls
            warnings.simplefilter("ignore", FutureWarning)
            ref_nuclei, ref_cells = utils.label_cell(nuc_pred, cell_pred)
        ref = pair_labels(np.asarray(ref_cells), np.asarray(ref_nuclei))
        assert np.array_equal(cells, ref[0]) and np.array_equal(nuclei, ref[1]), name
        match = match_labels(truth, cells, iou=0.6)
        assert cells.max() >= 4 and match.recall >= 0.5 and match.precision >= 0.6, (name, match.recall, match.precision)


def test_models_see_the_quarter_scale_padded_field(segmenter, fields):
    image, _ = fields["wide"]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
             for m in (segmenter._segmentator.nuclei_model, segmenter._segmentator.cell_model)]
    try:
        segmenter.segment(image)
    finally:
        for hook in hooks:
            hook.remove()
    rows, cols = round(image.shape[0] * 0.25), round(image.shape[1] * 0.25)
    padded = (1, 3, 32 + rows + 32 - rows % 32, 32 + cols + 32 - cols % 32)
    assert seen == [padded, padded]


def test_channels_reach_the_models_as_the_package_expects(segmenter, fields):
    """Blue drives the nuclei (no blue: no cells); green never reaches the models; uint16 input
    gives the uint8 result."""
    image, _ = fields["square"]
    cells, nuclei = segmenter.segment(image)
    assert cells.max() > 0
    no_blue = image.copy()
    no_blue[..., 2] = 0
    assert segmenter.segment(no_blue)[0].max() == 0
    other_green = image.copy()
    other_green[..., 1] = np.random.default_rng(0).integers(0, 256, image.shape[:2], dtype=np.uint8)
    assert all(np.array_equal(a, b) for a, b in zip(segmenter.segment(other_green), (cells, nuclei)))
    wide = image.astype(np.uint16) * 257
    assert all(np.array_equal(a, b) for a, b in zip(segmenter.segment(wide), (cells, nuclei)))
    batch = segmenter.segment_batch([image, fields["tall"][0]])
    assert np.array_equal(batch[0][0], cells) and batch[1][0].shape == fields["tall"][0].shape[:2]


def test_device_auto_is_the_gpu_when_torch_sees_one_else_the_cpu(hpacellseg, model_files):
    from hpa_tf.segmentation.hpacellseg_backend import _count_gpus

    gpus = _count_gpus()
    seg = get_segmenter("hpacellseg", nuclei_model=model_files[0], cell_model=model_files[1])
    assert seg.device == ("cuda" if gpus else "cpu")
    for model in (seg._segmentator.nuclei_model, seg._segmentator.cell_model):
        assert next(model.parameters()).device.type == seg.device
    if gpus == 0:
        with pytest.raises(SegmenterError, match="PyTorch sees no GPU; use --device cpu"):
            get_segmenter("hpacellseg", nuclei_model=model_files[0], cell_model=model_files[1], device="cuda")


# ---------------------------------------------------------------------------------------------
# Compatibility with current libraries
# ---------------------------------------------------------------------------------------------


def test_whole_pickled_models_load_although_torch_defaults_to_weights_only(model_files):
    """torch >= 2.6 refuses whole pickled modules by default; the adapter loads the files it is given."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 6):
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            torch.load(model_files[0])
    model = load_model_file(str(model_files[0]), "cpu")
    assert isinstance(model, hpacellseg_standins.ThresholdUNet)


def test_rescale_takes_multichannel_for_hpacellseg_only(hpacellseg, segmenter):
    from skimage import transform

    cellsegmentator, _ = hpacellseg
    original = transform.rescale
    image = np.random.default_rng(1).random((40, 24, 3))
    expected = original(image, 0.25, channel_axis=-1)
    got = cellsegmentator.transform.rescale(image, 0.25, multichannel=True)
    assert got.shape == (10, 6, 3) and np.array_equal(got, expected)
    assert cellsegmentator.transform.resize is transform.resize  # everything else is skimage's own
    assert transform.rescale is original  # scikit-image itself is untouched
    if "channel_axis" in original.__code__.co_varnames and "multichannel" not in original.__code__.co_varnames:
        with pytest.raises(TypeError, match="multichannel"):
            original(image, 0.25, multichannel=True)
    assert apply_compat(cellsegmentator, hpacellseg[1]) == []  # applied once, by the backend


def test_label_cell_runs_on_a_numpy_without_np_bool(hpacellseg, segmenter, fields, monkeypatch):
    """numpy 1.24-1.26 have no ``np.bool`` (label_cell uses it); the overlay supplies it. The old
    numpy is simulated where label_cell sees it (numpy itself needs its ``bool`` here)."""

    class NumpyWithoutBool:
        def __getattr__(self, name):
            if name == "bool":
                raise AttributeError("module 'numpy' has no attribute 'bool'")
            return getattr(np, name)

    cellsegmentator, utils = hpacellseg
    image, _ = fields["square"]
    expected = segmenter.segment(image)
    monkeypatch.setattr(utils, "np", NumpyWithoutBool())  # restored after the test
    with pytest.raises(AttributeError, match="bool"):
        segmenter.segment(image)
    assert apply_compat(cellsegmentator, utils) == ["np.bool"]
    assert utils.np.bool is np.bool_ and utils.np.zeros is np.zeros
    assert all(np.array_equal(a, b) for a, b in zip(segmenter.segment(image), expected))


# ---------------------------------------------------------------------------------------------
# Model files that cannot be used
# ---------------------------------------------------------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def dpn_unet_file(tmp_path, monkeypatch):
    """A file pickled like the HPA ones: a whole ``pytorch_zoo.unet.DPNUnet`` (here a stand-in
    package of that name); afterwards the package is no longer importable."""
    root = _write_package(tmp_path / "zoo", {
        "pytorch_zoo/__init__.py": "",
        "pytorch_zoo/unet.py": """
            import torch

            class DPNUnet(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = torch.nn.Conv2d(3, 3, 1)
            """,
    })
    for name in ("pytorch_zoo", "pytorch_zoo.unet"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    sys.path.insert(0, str(root))
    try:
        import pytorch_zoo.unet

        path = tmp_path / "dpn_unet_nuclei_v1.pth"
        torch.save(pytorch_zoo.unet.DPNUnet(), path)
    finally:
        sys.path.remove(str(root))
        for name in ("pytorch_zoo", "pytorch_zoo.unet"):
            sys.modules.pop(name, None)
    return path


def test_missing_or_wrong_pytorch_zoo_names_the_haoxusci_source(dpn_unet_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_zoo", None)  # not installed
    with pytest.raises(ImportError) as info:
        load_model_file(str(dpn_unet_file), "cpu")
    message = str(info.value)
    assert str(dpn_unet_file) in message and f"pip install {PYTORCH_ZOO_URL}" in message and "\n" not in message
    # the package index's pytorch_zoo: a package of that name without pytorch_zoo.unet
    pypi = _write_package(tmp_path / "pypi", {"pytorch_zoo/__init__.py": "def something():\n    pass\n"})
    monkeypatch.delitem(sys.modules, "pytorch_zoo")
    monkeypatch.syspath_prepend(str(pypi))
    with pytest.raises(ImportError, match=r"pytorch_zoo\.unet.*haoxusci.*unrelated package without pytorch_zoo\.unet"):
        load_model_file(str(dpn_unet_file), "cpu")
    sys.modules.pop("pytorch_zoo", None)


def test_missing_torchvision_is_named(dpn_unet_file, tmp_path, monkeypatch):
    zoo = _write_package(tmp_path / "zoo_tv", {
        "pytorch_zoo/__init__.py": "import torchvision\n",
        "pytorch_zoo/unet.py": "",
    })
    monkeypatch.syspath_prepend(str(zoo))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="torchvision.*pip install torchvision"):
        load_model_file(str(dpn_unet_file), "cpu")
    for name in ("pytorch_zoo", "pytorch_zoo.unet"):
        sys.modules.pop(name, None)


def test_torchvision_that_does_not_import_is_named(hpacellseg, model_files, tmp_path, monkeypatch):
    """A torchvision built for another torch fails on import ('operator torchvision::nms does not exist')."""
    broken = _write_package(tmp_path / "broken", {
        "torchvision/__init__.py": "raise RuntimeError('operator torchvision::nms does not exist')\n",
    })
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(ImportError, match=r"torchvision is installed but does not import \(RuntimeError: operator "
                                          r"torchvision::nms does not exist\); install the torchvision release made "
                                          r"for torch"):
        get_segmenter("hpacellseg", nuclei_model=model_files[0], cell_model=model_files[1], device="cpu")


def test_unreadable_model_files_are_one_line_errors(tmp_path, model_files):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(model_files[1]).read_bytes()[:2000])
    weights = tmp_path / "weights.pth"
    torch.save(hpacellseg_standins.cell_model().state_dict(), weights)
    for path, reason in ((corrupt, "not a readable PyTorch model file"), (truncated, "not a readable PyTorch model file"),
                         (weights, "state dict")):
        with pytest.raises(SegmenterError) as info:
            load_model_file(str(path), "cpu")
        message = str(info.value)
        assert str(path) in message and reason in message and "\n" not in message, message


def _cli_args(data: Path, out: Path, nuclei: Path, cell: Path, model: Path) -> dict[str, list[str]]:
    """Arguments of the segmentation CLI, the builder and predict.py with the hpacellseg backend."""
    seg = ["--segmenter", "hpacellseg", "--nuclei-model", str(nuclei), "--cell-model", str(cell), "--device", "cpu"]
    return {
        "segment": ["--data-dir", str(data / "train"), "--out", str(out / "masks"), "--overlay", "--quiet", *seg],
        "build": ["--data-dir", str(data / "train"), "--labels", str(data / "train.csv"), "--out", str(out / "shards"),
                  "--crop-size", "64", "--folds", "2", "--workers", "2", "--no-progress", *seg],
        "predict": ["--test-dir", str(data / "train"), "--sample-submission", str(data / "sample_submission.csv"),
                    "--model", str(model), "--out", str(out / "predict" / "submission.csv"), "--no-progress", *seg],
    }


#: How each command is started.
COMMANDS = {
    "segment": [sys.executable, "-m", "hpa_tf.segmentation"],
    "build": [sys.executable, "-m", "tfrecord_builder"],
    "predict": [sys.executable, str(ROOT / "predict.py")],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def test_unreadable_model_file_stops_every_command_with_one_line(hpacellseg, model_files, tmp_path, capsys):
    """Segmentation CLI, builder and predict.py: exit 2, one line naming the file, nothing written."""
    from hpa_tf.cli import predict as predict_cli
    from hpa_tf.segmentation.__main__ import main as segment_main
    from tfrecord_builder.__main__ import main as build_main

    data = tmp_path / "data"
    _write_dataset(data, [(21, 256, None), (22, 256, None)])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a model")
    model = tmp_path / "model.keras"  # never reached: the segmenter is made first
    model.write_bytes(b"")
    mains = {"segment": segment_main, "build": build_main, "predict": predict_cli.main}
    for name, args in _cli_args(data, tmp_path / "out", bad, model_files[1], model).items():
        assert mains[name](args) == 2, name
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert str(bad) in lines[0] and "not a readable PyTorch model file" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# PyTorch and TensorFlow in one process
# ---------------------------------------------------------------------------------------------


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=600)


def test_tensorflow_first_then_the_backend_does_not_crash(hpacellseg, model_files, tmp_path):
    """The order that crashed (exit 139): TensorFlow imported, then the model files unpickled,
    which imports torchvision → torch._dynamo → triton."""
    result = _python(f"""
        import sys
        import tensorflow as tf
        assert "torch" not in sys.modules
        from hpa_tf.segmentation import get_segmenter
        from hpa_tf.synthetic import generate_field
        seg = get_segmenter("hpacellseg", nuclei_model={str(model_files[0])!r}, cell_model={str(model_files[1])!r},
                            device="cpu")
        cells, _ = seg.segment(generate_field(11, 512, cell_radius=92).image)
        print("cells", int(cells.max()), "torchvision" in sys.modules, tf.reduce_sum(tf.ones(3)).numpy())
        """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    words = result.stdout.split()
    assert words[0] == "cells" and int(words[1]) > 0 and words[2:] == ["True", "3.0"], result.stdout


def test_preload_then_tensorflow_then_torch_stack(hpacellseg, tmp_path):
    """What predict.py and the builder do: PyTorch's stack first, TensorFlow after, both usable."""
    result = _python("""
        import importlib.util, sys
        from hpa_tf.segmentation import preload
        preload("hpacellseg")
        import tensorflow as tf
        import torch, torchvision
        if importlib.util.find_spec("triton") is not None:
            import triton
            assert "triton" in sys.modules
        print(float(torch.ones(2).sum()), float(tf.reduce_sum(tf.ones(2))))
        """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.split() == ["2.0", "2.0"]


# ---------------------------------------------------------------------------------------------
# The three command lines, end to end
# ---------------------------------------------------------------------------------------------


def _write_dataset(root: Path, specs) -> list[tuple[str, np.ndarray]]:
    """Fields (seed, size, shape) in the Kaggle layout: train/ PNGs, train.csv, sample_submission.csv."""
    from hpa_tf.labels import format_labels

    (root / "train").mkdir(parents=True, exist_ok=True)
    written = []
    labels = []
    for seed, size, shape in specs:
        f = generate_field(seed, size, cell_radius=0.18 * size)
        h, w = shape or (size, size)
        image_id = f"field{seed}"
        for k, channel in enumerate(CHANNELS):
            assert cv2.imwrite(str(root / "train" / f"{image_id}_{channel}.png"), f.image[:h, :w, k])
        written.append((image_id, f.image[:h, :w]))
        labels.append((image_id, format_labels(f.image_labels), w, h))
    with open(root / "train.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["ID", "Label"])
        out.writerows((i, lab) for i, lab, _, _ in labels)
    with open(root / "sample_submission.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["ID", "ImageWidth", "ImageHeight", "PredictionString"])
        out.writerows((i, w, h, "") for i, _, w, h in labels)
    return written


def test_segmentation_cli_builder_and_predict_run_end_to_end(hpacellseg, segmenter, model_files, tmp_path):
    """``--segmenter hpacellseg --device cpu`` in all three commands, each a fresh process that
    imports TensorFlow (the builder with two worker processes): exit 0 and valid outputs whose
    cells are the backend's."""
    from hpa_tf.backbones import build_classifier
    from hpa_tf.crops import CropSpec
    from hpa_tf.io import read_label_image
    from hpa_tf.model import save_model
    from hpa_tf.submission import decode_mask, read_submission, validate_submission

    data = tmp_path / "data"
    fields = _write_dataset(data, [(32, 640, (448, 640)), (33, 576, (576, 400))])
    model = tmp_path / "tiny.keras"
    save_model(build_classifier("tiny_cnn", image_size=32, channels=4), str(model), crop=CropSpec(size=64),
               channels="rgby")
    out = tmp_path / "out"
    results = {name: subprocess.run(COMMANDS[name] + args, capture_output=True, text=True, env=_env(), cwd=tmp_path,
                                    timeout=900)
               for name, args in _cli_args(data, out, *model_files, model).items()}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-3000:])

    expected = {image_id: segmenter.segment(image)[0] for image_id, image in fields}
    for image_id, cells in expected.items():
        assert cells.max() > 0, image_id
        assert np.array_equal(read_label_image(out / "masks" / f"{image_id}_cells.png"), cells), image_id
        assert (out / "masks" / f"{image_id}_overlay.png").is_file()

    verify = subprocess.run([sys.executable, "-m", "tfrecord_builder", "verify", str(out / "shards")],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr
    with open(out / "shards" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["image_id"] for r in rows} == set(expected)
    assert len(rows) == sum(int(c.max()) for c in expected.values())

    submission = out / "predict" / "submission.csv"
    assert validate_submission(submission, expected_ids=list(expected)) == []
    for row in read_submission(submission):
        cells = expected[row.image_id]
        assert (row.height, row.width) == cells.shape
        masks = {p.mask for p in row.predictions}
        decoded = {tuple(np.flatnonzero(decode_mask(m, row.height, row.width))) for m in masks}
        assert decoded == {tuple(np.flatnonzero(cells == i)) for i in range(1, cells.max() + 1)}, row.image_id
