"""Small stand-ins for the HPA U-Net model files, for testing the hpacellseg backend without the
real weights (about 530 MiB each, not reachable from the tests).

The real files are whole pickled ``pytorch_zoo.unet.DPNUnet`` modules: given an image normalised
as ``hpacellseg`` does (``(x - mean) / std`` per channel, ``x`` in [0, 1]), they return three
logits per pixel (background, border, foreground). ``ThresholdUNet`` has the same interface and
is pickled whole the same way (``torch.save(module, path)``); it calls a pixel foreground where a
weighted sum of the blurred input channels exceeds a threshold. This module must be importable
wherever such a file is loaded (as ``pytorch_zoo`` must be for the real files), and like
``pytorch_zoo`` it imports torchvision (and so, through torch, triton) when installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

try:  # like pytorch_zoo, whose import (so: unpickling the real files) imports torchvision
    import torchvision  # noqa: F401
except ImportError:
    pass

#: hpacellseg's input normalisation (``hpacellseg.cellsegmentator.NORMALIZE``).
MEAN = (124 / 255, 117 / 255, 104 / 255)
STD = 1 / (0.0167 * 255)


class ThresholdUNet(nn.Module):
    """(N, 3, H, W) normalised image -> (N, 3, H, W) logits: background 0, border -20 (never),
    foreground ``sharpness * (sum_c weights[c] * blurred x_c - threshold)``, x in [0, 1]."""

    def __init__(self, weights: tuple[float, float, float], threshold: float, blur: int = 5,
                 sharpness: float = 40.0) -> None:
        super().__init__()
        self.blur = nn.AvgPool2d(blur, stride=1, padding=blur // 2, count_include_pad=False)
        self.head = nn.Conv2d(3, 3, kernel_size=1)
        weight = torch.zeros(3, 3, 1, 1)
        bias = torch.tensor([0.0, -20.0, 0.0])
        for c, w in enumerate(weights):  # x_c = v_c * STD + MEAN[c]
            weight[2, c, 0, 0] = sharpness * w * STD
            bias[2] += sharpness * w * MEAN[c]
        bias[2] -= sharpness * threshold
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blur(x))


def nuclei_model() -> ThresholdUNet:
    """Nuclei: foreground where the blue channel is bright (the nuclei model sees blue three times)."""
    return ThresholdUNet(weights=(0.0, 0.0, 1.0), threshold=0.2)


def cell_model() -> ThresholdUNet:
    """Cells: foreground where (microtubule, ER, nucleus) = (red, yellow, blue) sum to more than 0.15."""
    return ThresholdUNet(weights=(1.0, 1.0, 1.0), threshold=0.15, blur=9)


def write_models(folder: str | Path) -> tuple[Path, Path]:
    """Pickle both stand-ins whole into ``folder``; returns (nuclei path, cell path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "nuclei.pth", folder / "cell.pth"
    torch.save(nuclei_model(), paths[0])
    torch.save(cell_model(), paths[1])
    return paths

