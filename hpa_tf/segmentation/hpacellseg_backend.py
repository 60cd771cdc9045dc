"""Adapter for the official HPA cell segmentation models (``hpacellseg``, PyTorch, optional).

The package (CellProfiling/HPA-Cell-Segmentation) runs two U-Nets at a quarter of the image size:
a nuclei model on the blue channel and a cell model on (microtubule, ER, nucleus) = (red, yellow,
blue); ``hpacellseg.utils.label_cell`` turns the two predictions into nucleus and cell label
images at full size.

Install (not a dependency of hpa-tf; skip the first line where torch and torchvision are already
installed, as on Kaggle and Colab)::

    pip install torch torchvision
    pip install --no-deps https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip
    pip install https://github.com/haoxusci/pytorch_zoo/archive/master.zip

Offline, ``pip install`` local copies of the two archives. ``--no-deps``: hpacellseg's own
requirements add ``opencv-python``, a second package providing ``cv2`` beside the
``opencv-python-headless`` hpa-tf uses (the two overwrite each other's files), and its other
requirements (scikit-image, scipy, imageio, pillow) come with hpa-tf already. The model files
are whole pickled ``pytorch_zoo.unet.DPNUnet`` modules: they need the haoxusci ``pytorch_zoo``
source above (which imports torchvision); the ``pytorch_zoo`` on the package index is an unrelated
package without ``pytorch_zoo.unet``.

The model files must already be on disk: this adapter never downloads (hpacellseg itself would,
for a path that does not exist). It loads them itself and passes the modules to
``CellSegmentator``: ``torch.load(path, map_location=device, weights_only=False)``, since
torch >= 2.6 defaults to ``weights_only=True``, which refuses whole pickled modules.

Security: the model files are pickled PyTorch models; loading one runs code from the file. Load
only files you trust, and only the paths you name here are loaded.

Compatibility with current libraries (hpacellseg was written for torch 1.x, numpy 1.x and
scikit-image < 0.19). Each fix is narrow and applied when a segmenter is created, never to the
libraries themselves (see ``apply_compat``):

- ``skimage.transform.rescale`` lost its ``multichannel`` argument (scikit-image 0.19 deprecated
  it for ``channel_axis``; current releases raise ``TypeError``): hpacellseg's module sees
  ``transform`` through an overlay whose ``rescale`` maps ``multichannel=True`` to
  ``channel_axis=-1``. ``skimage.transform`` itself is untouched.
- ``np.bool`` (used by ``label_cell``) is missing from numpy 1.24-1.26 (removed in 1.24, back as
  an alias of ``np.bool_`` in 2.0): on those releases ``hpacellseg.utils`` sees numpy through an
  overlay that adds ``bool = np.bool_``.
- scikit-image >= 0.26 warns (``FutureWarning``) on every ``remove_small_objects(ar, min_size)``
  call in ``label_cell``; the meaning is unchanged, so those warnings are silenced during the
  adapter's calls into hpacellseg, and only there.
- PyTorch's ``triton`` imported after TensorFlow crashes the process (exit 139: its LLVM
  initialisers bind to the LLVM copy TensorFlow has loaded); unpickling a model file imports it
  (pytorch_zoo → torchvision → torch._dynamo → triton). ``preload`` imports torch's stack first:
  the command lines call it before TensorFlow is imported. If TensorFlow is already imported
  (a notebook, a library user), triton is loaded with ``RTLD_DEEPBIND`` so that it binds its own
  LLVM.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from hpa_tf.segmentation import SegmenterError
from hpa_tf.segmentation.builtin import pair_labels

logger = logging.getLogger(__name__)

HPACELLSEG_URL = "https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip"
PYTORCH_ZOO_URL = "https://github.com/haoxusci/pytorch_zoo/archive/master.zip"

INSTALL_HINT = (
    "the hpacellseg backend needs PyTorch with torchvision, the HPA-Cell-Segmentation package and "
    f"pytorch_zoo from the haoxusci source: pip install torch torchvision; pip install --no-deps {HPACELLSEG_URL}; "
    f"pip install {PYTORCH_ZOO_URL} (offline: pip install local copies of those archives); "
    "or use the built-in segmenter (--segmenter builtin)"
)

PYTORCH_ZOO_HINT = (
    "the HPA model files are pickled pytorch_zoo.unet.DPNUnet modules and need pytorch_zoo from the haoxusci "
    f"source: pip install {PYTORCH_ZOO_URL} (offline: a local copy of that archive; the pytorch_zoo on the "
    "package index is an unrelated package without pytorch_zoo.unet: pip uninstall pytorch_zoo first)"
)

DEVICES = "auto, cpu, cuda or cuda:N"


# ---------------------------------------------------------------------------------------------
# PyTorch beside TensorFlow
# ---------------------------------------------------------------------------------------------


def _import_triton_after_tensorflow() -> None:
    """Import triton with ``RTLD_DEEPBIND`` so its shared library binds its own LLVM symbols."""
    deepbind = getattr(os, "RTLD_DEEPBIND", None)
    if deepbind is None:  # not glibc: no triton wheels there either
        importlib.import_module("triton")
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | deepbind)
    try:
        importlib.import_module("triton")
    finally:
        sys.setdlopenflags(flags)


def preload() -> None:
    """Import PyTorch's stack (torch, triton, torchvision) now, where installed.

    Call it before TensorFlow is imported in a process that uses both: ``import triton`` after
    ``import tensorflow`` crashes the process, and unpickling the HPA model files imports triton.
    When TensorFlow is already imported, triton is loaded so that it binds its own LLVM instead.
    Missing or broken packages are left for the segmenter to report.
    """
    for name in ("torch", "triton", "torchvision"):
        if name in sys.modules:
            continue
        try:
            if importlib.util.find_spec(name) is None:
                continue
            if name == "triton" and "tensorflow" in sys.modules:
                logger.debug("TensorFlow is already imported: loading triton with RTLD_DEEPBIND")
                _import_triton_after_tensorflow()
            else:
                importlib.import_module(name)
        except Exception as e:  # reported when the segmenter imports or unpickles what it needs
            logger.debug("preloading %s failed: %s: %s", name, type(e).__name__, e)


# ---------------------------------------------------------------------------------------------
# hpacellseg with current libraries
# ---------------------------------------------------------------------------------------------


class _Overlay:
    """A module seen through a few replaced attributes; everything else is the module's own."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self.__dict__.update(replaced)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"<{self._module.__name__} with hpa-tf's compatibility overlay>"


def rescale_accepting_multichannel(rescale: Any) -> Any:
    """``rescale`` that also takes scikit-image < 0.19's ``multichannel`` (as ``channel_axis``)."""

    @functools.wraps(rescale)
    def compat_rescale(image: Any, scale: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel is not None:
            if "channel_axis" in kwargs:
                raise TypeError("pass multichannel or channel_axis, not both")
            kwargs["channel_axis"] = -1 if multichannel else None
        return rescale(image, scale, *args, **kwargs)

    return compat_rescale


def _accepts(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def apply_compat(cellsegmentator: Any, utils: Any) -> list[str]:
    """Let hpacellseg's modules run on current scikit-image and numpy; returns what was applied.

    ``cellsegmentator`` and ``utils`` are the modules ``hpacellseg.cellsegmentator`` and
    ``hpacellseg.utils``. Only their own view of ``skimage.transform`` and ``numpy`` changes (see
    the module docstring); calling it again changes nothing.
    """
    applied = []
    transform = cellsegmentator.transform
    if not isinstance(transform, _Overlay) and not _accepts(transform.rescale, "multichannel"):
        cellsegmentator.transform = _Overlay(transform, rescale=rescale_accepting_multichannel(transform.rescale))
        applied.append("skimage.transform.rescale(multichannel=...)")
    if not isinstance(utils.np, _Overlay) and not hasattr(utils.np, "bool"):
        utils.np = _Overlay(utils.np, bool=np.bool_)
        applied.append("np.bool")
    if applied:
        logger.debug("hpacellseg compatibility: %s", ", ".join(applied))
    return applied


@contextlib.contextmanager
def _quiet_hpacellseg_warnings() -> Iterator[None]:
    """Silence scikit-image's deprecation warnings raised on hpacellseg's own calls, inside this block."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=r"hpacellseg(\.|$)")
        yield


# ---------------------------------------------------------------------------------------------
# Loading the package and the model files
# ---------------------------------------------------------------------------------------------


def _missing_module_message(path: str, error: ImportError) -> str:
    name = getattr(error, "name", None) or ""
    if name.split(".")[0] == "pytorch_zoo" or "pytorch_zoo" in str(error):
        return f"cannot load {path}: {error}; {PYTORCH_ZOO_HINT}"
    if name.split(".")[0] == "torchvision":
        return f"cannot load {path}: {error}; pip install torchvision (the release made for your torch)"
    return f"cannot load {path}: it needs the Python module {name or '?'!r}, which is missing ({error})"


def load_model_file(path: str, device: str) -> Any:
    """Load one whole pickled torch model (``torch.nn.Module``) onto ``device``.

    Raises
    ------
    ImportError : a module the pickle names is missing (for the HPA files: pytorch_zoo from the
        haoxusci source, torchvision); the message says what to install.
    SegmenterError : the file is not a readable whole pickled model (corrupt, truncated, a
        state dict); the message names the file.
    """
    import torch

    options: dict[str, Any] = {"map_location": torch.device(device)}
    if _accepts(torch.load, "weights_only"):
        options["weights_only"] = False  # whole pickled modules; torch >= 2.6 defaults to True
    try:
        model = torch.load(path, **options)
    except ImportError as e:  # ModuleNotFoundError included
        raise ImportError(_missing_module_message(path, e)) from None
    except AttributeError as e:  # "Can't get attribute 'DPNUnet' on <module 'pytorch_zoo.unet'>"
        if "pytorch_zoo" in str(e):
            raise ImportError(f"cannot load {path}: {e}; {PYTORCH_ZOO_HINT}") from None
        raise SegmenterError(f"cannot load {path}: a class it names is missing ({e})") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SegmenterError(
            f"cannot load {path}: not a readable PyTorch model file ({type(e).__name__}: {reason}); "
            "name the nuclei and cell model files (dpn_unet_nuclei_v1.pth, dpn_unet_cell_3ch_v1.pth), "
            "downloaded completely"
        ) from None
    if not isinstance(model, torch.nn.Module):
        what = "a state dict (weights only)" if isinstance(model, dict) else f"a {type(model).__name__}"
        raise SegmenterError(
            f"cannot use {path}: it holds {what}, not a whole pickled model; hpacellseg needs the whole-model "
            "files (dpn_unet_nuclei_v1.pth, dpn_unet_cell_3ch_v1.pth)"
        )
    return model


def _count_gpus() -> int:
    import torch

    with warnings.catch_warnings():  # a CUDA build of torch on a machine without a driver warns here
        warnings.simplefilter("ignore", UserWarning)
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _import_hpacellseg() -> Any:
    """The real package as an object with ``CellSegmentator``, ``label_cell``, ``load_model``
    (``(path, device) -> module``) and ``count_gpus`` (``() -> int``)."""
    preload()
    try:
        import torch  # noqa: F401  (named first in the error when missing)
        from hpacellseg import cellsegmentator, utils
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from None
    if importlib.util.find_spec("torchvision") is not None:  # installed: it must import (pytorch_zoo needs it)
        try:
            importlib.import_module("torchvision")
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise ImportError(
                f"torchvision is installed but does not import ({type(e).__name__}: {reason}); "
                f"install the torchvision release made for torch {sys.modules['torch'].__version__}"
            ) from None
    apply_compat(cellsegmentator, utils)
    return types.SimpleNamespace(
        CellSegmentator=cellsegmentator.CellSegmentator, label_cell=utils.label_cell,
        load_model=load_model_file, count_gpus=_count_gpus,
    )


def resolve_device(device: str, count_gpus: Callable[[], int]) -> str:
    """``auto`` → ``cuda`` when ``count_gpus()`` > 0 else ``cpu``; checks ``cuda``/``cuda:N``
    against the GPUs there are (``count_gpus`` is only called for those three).

    >>> resolve_device("auto", lambda: 0), resolve_device("AUTO", lambda: 2), resolve_device("cuda:1", lambda: 2)
    ('cpu', 'cuda', 'cuda:1')
    """
    name = str(device).strip().lower()
    if name == "cpu":
        return name
    if name == "auto":
        return "cuda" if count_gpus() > 0 else "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"device must be {DEVICES}, got {device!r}")
    gpus = count_gpus()
    if gpus == 0:
        raise SegmenterError(
            f"device {name!r} requested but PyTorch sees no GPU; use --device cpu, or --device auto "
            "(the GPU when there is one)"
        )
    if match.group(1) is not None and int(match.group(1)) >= gpus:
        raise SegmenterError(f"device {name!r} requested but PyTorch sees {gpus} GPU(s): cuda:0 to cuda:{gpus - 1}")
    return name


def _fit(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a (h, w, 3) prediction to ``shape`` (H, W) when it differs.

    hpacellseg restores the size with ``cv2.resize(pred, (H, W))`` although cv2 takes (W, H), so
    non-square fields come back transposed in size; this puts them right.
    """
    pred = np.asarray(pred)
    if pred.shape[:2] != tuple(shape):
        pred = cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return pred


class HpaCellSegmenter:
    """Cells and nuclei from the HPA U-Net models, with the ``segment`` / ``segment_batch`` API.

    Parameters
    ----------
    nuclei_model, cell_model : local paths of the nuclei model and the 3-channel cell model
        (``dpn_unet_nuclei_v1.pth`` / ``dpn_unet_cell_3ch_v1.pth``). Pickled torch models: loading
        runs code from the file, so name only files you trust. A missing file is an error, never
        a download.
    device : ``"auto"`` (the GPU when PyTorch sees one, else the CPU), ``"cuda"``, ``"cuda:N"``
        or ``"cpu"``.
    scale_factor : the models' working scale (0.25, as they were trained).
    padding : pad the scaled image to a multiple of 32 (needed for sizes like 1728 px).
    batch_size : fields passed to the models per call in ``segment_batch``.
    backend : for tests only: an object with ``CellSegmentator``, ``label_cell``,
        ``load_model(path, device)`` and ``count_gpus()`` standing in for the package; ``None``
        imports ``hpacellseg``.

    Raises
    ------
    FileNotFoundError : a model path does not exist (the message names it).
    ImportError : a package is missing or is the wrong one (the message says what to install).
    ValueError : an unknown device or a bad option.
    SegmenterError : a model file cannot be loaded, or the device has no GPU.
    """

    def __init__(
        self,
        nuclei_model: str | os.PathLike | None = None,
        cell_model: str | os.PathLike | None = None,
        device: str = "auto",
        scale_factor: float = 0.25,
        padding: bool = True,
        batch_size: int = 4,
        backend: Any = None,
    ) -> None:
        name = str(device).strip().lower()
        if name not in ("auto", "cpu") and re.fullmatch(r"cuda(:\d+)?", name) is None:
            raise ValueError(f"device must be {DEVICES}, got {device!r}")
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        paths = {}
        for key, path in (("nuclei_model", nuclei_model), ("cell_model", cell_model)):
            if path is None or str(path) == "":
                raise ValueError(
                    f"the hpacellseg backend needs {key}=<local model file> (--{key.replace('_', '-')}); "
                    "it never downloads models"
                )
            path = os.path.expanduser(str(path))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{key} file not found: {path} (the hpacellseg backend never downloads models)")
            paths[key] = path
        api = backend if backend is not None else _import_hpacellseg()
        self.device = resolve_device(name, api.count_gpus)
        self.batch_size = int(batch_size)
        self._label_cell = api.label_cell
        logger.info("loading hpacellseg models %s and %s on %s", paths["nuclei_model"], paths["cell_model"],
                    self.device)
        with _quiet_hpacellseg_warnings():
            self._segmentator = api.CellSegmentator(
                api.load_model(paths["nuclei_model"], self.device),
                api.load_model(paths["cell_model"], self.device),
                scale_factor=scale_factor,
                device=self.device,
                padding=padding,
                multi_channel_model=True,
            )

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment one field; see ``segment_batch``."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Segment fields.

        Parameters
        ----------
        images : (H, W, 4) RGBY arrays, uint8 (uint16 is converted by ``hpa_tf.io.to_uint8``).

        Returns
        -------
        [(cells, nuclei)] : (H, W) int32 label images per field, a cell and its nucleus sharing
            one id, ids ``1..N``, 0 = background.
        """
        from hpa_tf.io import to_uint8

        results: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = []
            for image in images[start : start + self.batch_size]:
                image = np.asarray(image)
                if image.ndim != 3 or image.shape[2] != 4:
                    raise ValueError(f"expected an (H, W, 4) RGBY image, got shape {image.shape}")
                chunk.append(to_uint8(image))
            red = [np.ascontiguousarray(im[..., 0]) for im in chunk]
            blue = [np.ascontiguousarray(im[..., 2]) for im in chunk]
            yellow = [np.ascontiguousarray(im[..., 3]) for im in chunk]
            with _quiet_hpacellseg_warnings():
                nuc_preds = self._segmentator.pred_nuclei(blue)
                # (microtubule, ER, nucleus) = (red, yellow, blue), as the 3-channel cell model expects
                cell_preds = self._segmentator.pred_cells([red, yellow, blue])
                for im, nuc_pred, cell_pred in zip(chunk, nuc_preds, cell_preds):
                    shape = im.shape[:2]
                    nuclei, cells = self._label_cell(_fit(nuc_pred, shape), _fit(cell_pred, shape))
                    results.append(pair_labels(np.asarray(cells), np.asarray(nuclei)))
        return results
