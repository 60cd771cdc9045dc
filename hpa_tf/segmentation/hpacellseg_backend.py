"""Adapter for the official HPA cell segmentation models (``hpacellseg``, PyTorch, optional).

The package (CellProfiling/HPA-Cell-Segmentation) runs two U-Nets at a quarter of the image size:
a nuclei model on the blue channel and a cell model on (microtubule, ER, nucleus) = (red, yellow,
blue); ``hpacellseg.utils.label_cell`` turns the two predictions into nucleus and cell label
images at full size.

Install (not a dependency of hpa-tf)::

    pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip
    pip install pytorch_zoo

(offline: ``pip install`` a local copy of that archive). The model files must already be on disk:
this adapter never downloads (hpacellseg itself would, for a path that does not exist, so the
paths are checked first).

Security: the model files are pickled PyTorch models; loading one runs code from the file. Load
only files you trust, and only the paths you name here are loaded.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from hpa_tf.segmentation.builtin import pair_labels

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the hpacellseg backend needs the HPA-Cell-Segmentation package and PyTorch: "
    "pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip "
    "and pip install pytorch_zoo (offline: pip install a local copy of that archive); "
    "or use the built-in segmenter instead (--backend builtin)"
)


def _import_hpacellseg() -> Any:
    """The real package as an object with ``CellSegmentator`` and ``label_cell``."""
    try:
        from hpacellseg.cellsegmentator import CellSegmentator
        from hpacellseg.utils import label_cell
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from None

    return types.SimpleNamespace(CellSegmentator=CellSegmentator, label_cell=label_cell)


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
    device : ``"cuda"`` (also ``"cuda:N"``) or ``"cpu"``.
    scale_factor : the models' working scale (0.25, as they were trained).
    padding : pad the scaled image to a multiple of 32 (needed for sizes like 1728 px).
    batch_size : fields passed to the models per call in ``segment_batch``.
    backend : for tests only: an object with ``CellSegmentator`` and ``label_cell`` standing in
        for the package; ``None`` imports ``hpacellseg``.

    Raises
    ------
    FileNotFoundError : a model path does not exist (the message names it).
    ImportError : the package is not installed (the message says how to install it).
    ValueError : an unknown device.
    """

    def __init__(
        self,
        nuclei_model: str | os.PathLike | None = None,
        cell_model: str | os.PathLike | None = None,
        device: str = "cuda",
        scale_factor: float = 0.25,
        padding: bool = True,
        batch_size: int = 4,
        backend: Any = None,
    ) -> None:
        device = str(device).strip().lower()
        if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        paths = {}
        for name, path in (("nuclei_model", nuclei_model), ("cell_model", cell_model)):
            if path is None or str(path) == "":
                raise ValueError(
                    f"the hpacellseg backend needs {name}=<local model file> (--{name.replace('_', '-')}); "
                    "it never downloads models"
                )
            path = os.path.expanduser(str(path))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} file not found: {path} (the hpacellseg backend never downloads models)")
            paths[name] = path
        api = backend if backend is not None else _import_hpacellseg()
        if backend is None and device.startswith("cuda"):
            import torch  # present whenever hpacellseg imported

            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' requested but PyTorch sees no GPU; use device='cpu' (--device cpu)")
        self.device = device
        self.batch_size = int(batch_size)
        self._label_cell = api.label_cell
        logger.info("loading hpacellseg models %s and %s on %s", paths["nuclei_model"], paths["cell_model"], device)
        self._segmentator = api.CellSegmentator(
            paths["nuclei_model"],
            paths["cell_model"],
            scale_factor=scale_factor,
            device=device,
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
            nuc_preds = self._segmentator.pred_nuclei(blue)
            # (microtubule, ER, nucleus) = (red, yellow, blue), as the 3-channel cell model expects
            cell_preds = self._segmentator.pred_cells([red, yellow, blue])
            for im, nuc_pred, cell_pred in zip(chunk, nuc_preds, cell_preds):
                shape = im.shape[:2]
                nuclei, cells = self._label_cell(_fit(nuc_pred, shape), _fit(cell_pred, shape))
                results.append(pair_labels(np.asarray(cells), np.asarray(nuclei)))
        return results
