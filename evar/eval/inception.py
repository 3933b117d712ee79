"""The FID Inception network: Inception v3 as TensorFlow's 2015-12-05 graph computes it, in PyTorch.

Every FID, IS and precision/recall number published for ImageNet 256 (VAR, EVAR, Distilled Decoding, ADM,
DiT) comes from that graph (`classify_image_graph_def.pb`), run by OpenAI's ADM evaluator. Its weights
converted to PyTorch are the file `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release; the same
file torch-fidelity ships), 472 tensors named `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.
running_mean`, …, `fc.weight`. This module declares exactly that layout, so the file loads strictly by name
with `torch.load(weights_only=True)` and nothing is downloaded. Where the graph differs from torchvision's
Inception it is reproduced here: 3×3 average pools in the mixed blocks leave the zero padding out of the
average, the last mixed block max-pools its pool branch, batch norm uses eps 1e-3, and the 1008-way
classifier (1000 ImageNet classes + 8 unused) has its bias left out for the Inception Score, as the
Improved-GAN and ADM evaluators do.

Input handling ("preprocess"):
  tf          the graph's own: bilinear resize to 299×299 as TensorFlow 1.x does it (no half-pixel
              centres), then (x - 128) / 128 on 0..255 pixels. What ADM's reference statistics assume.
  pytorch-fid pytorch-fid's: x / 255, `F.interpolate(bilinear, align_corners=False)` to 299, then 2x - 1.
              For statistics made with pytorch-fid (`--save-stats`).

`reduction` divides every channel count by 2, 4, 8 or 16 (the layout's channel counts share the factor
16): the same network at a test size, for fast pipeline tests only. Reports flag any weights that are not
the standard file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evar.checkpoints import load_strict, read_torch_state
from evar.errors import EvarError
from evar.files import atomic_write_bytes, sha256_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
STANDARD_SHA256_PREFIX = "6726825d"  # torch.hub names a file by its sha256 prefix
INPUT_SIZE = 299
POOL_DIM = 2048  # of the standard layout; a reduced test layout has 2048 // reduction
NUM_LOGITS = 1008
BN_EPS = 1e-3
PREPROCESS = ("tf", "pytorch-fid")
REDUCTIONS = (1, 2, 4, 8, 16)
IGNORED_SUFFIX = ".num_batches_tracked"  # training-only counter some re-saved copies carry


class _BatchNorm(nn.Module):
    """Inference-only batch norm whose state is exactly the converted graph's four tensors."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, BN_EPS)


class _Conv(nn.Module):
    """conv (no bias) → batch norm → ReLU: the unit every layer of the graph is made of."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = _BatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow averages over the pixels inside the image only; PyTorch's default would count the padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1."""

    def __init__(self, c_in: int, pool_features: int, r: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64 // r, 1)
        self.branch5x5_1 = _Conv(c_in, 48 // r, 1)
        self.branch5x5_2 = _Conv(48 // r, 64 // r, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64 // r, 1)
        self.branch3x3dbl_2 = _Conv(64 // r, 96 // r, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96 // r, 96 // r, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features // r, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class _MixedB(nn.Module):
    """35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max pool/2."""

    def __init__(self, c_in: int, r: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384 // r, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64 // r, 1)
        self.branch3x3dbl_2 = _Conv(64 // r, 96 // r, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96 // r, 96 // r, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (1×7 and 7×1)."""

    def __init__(self, c_in: int, c7: int, r: int):
        super().__init__()
        c7 //= r
        self.branch1x1 = _Conv(c_in, 192 // r, 1)
        self.branch7x7_1 = _Conv(c_in, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192 // r, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192 // r, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(c_in, 192 // r, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class _MixedD(nn.Module):
    """17→8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool/2."""

    def __init__(self, c_in: int, r: int):
        super().__init__()
        self.branch3x3_1 = _Conv(c_in, 192 // r, 1)
        self.branch3x3_2 = _Conv(192 // r, 320 // r, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192 // r, 1)
        self.branch7x7x3_2 = _Conv(192 // r, 192 // r, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192 // r, 192 // r, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192 // r, 192 // r, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = x
        for i in range(1, 5):
            tower = getattr(self, f"branch7x7x3_{i}")(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8×8 block with split 1×3 / 3×1 heads. The graph's last one (Mixed_7c) max-pools its pool branch."""

    def __init__(self, c_in: int, r: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(c_in, 320 // r, 1)
        self.branch3x3_1 = _Conv(c_in, 384 // r, 1)
        self.branch3x3_2a = _Conv(384 // r, 384 // r, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384 // r, 384 // r, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(c_in, 448 // r, 1)
        self.branch3x3dbl_2 = _Conv(448 // r, 384 // r, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384 // r, 384 // r, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384 // r, 384 // r, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(c_in, 192 // r, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """uint8 images → (2048-d pool features, 1008 bias-free logits), both float32 (N, ·)."""

    def __init__(self, reduction: int = 1, preprocess: str = "tf"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction}")
        if preprocess not in PREPROCESS:
            raise EvarError(f"unknown Inception preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}")
        r = self.reduction = reduction
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = _Conv(3, 32 // r, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32 // r, 32 // r, 3)
        self.Conv2d_2b_3x3 = _Conv(32 // r, 64 // r, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64 // r, 80 // r, 1)
        self.Conv2d_4a_3x3 = _Conv(80 // r, 192 // r, 3)
        self.Mixed_5b = _MixedA(192 // r, 32, r)
        self.Mixed_5c = _MixedA(256 // r, 64, r)
        self.Mixed_5d = _MixedA(288 // r, 64, r)
        self.Mixed_6a = _MixedB(288 // r, r)
        self.Mixed_6b = _MixedC(768 // r, 128, r)
        self.Mixed_6c = _MixedC(768 // r, 160, r)
        self.Mixed_6d = _MixedC(768 // r, 160, r)
        self.Mixed_6e = _MixedC(768 // r, 192, r)
        self.Mixed_7a = _MixedD(768 // r, r)
        self.Mixed_7b = _MixedE(1280 // r, r, max_pool=False)
        self.Mixed_7c = _MixedE(2048 // r, r, max_pool=True)
        self.fc = nn.Linear(POOL_DIM // r, NUM_LOGITS)

    @property
    def pool_dim(self) -> int:
        return POOL_DIM // self.reduction

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float32 (N, 3, 299, 299) in the network's input range."""
        x = images.permute(0, 3, 1, 2).float()
        if self.preprocess == "tf":
            return (resize_like_tf1(x, INPUT_SIZE) - 128.0) / 128.0
        x = F.interpolate(x / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prepare(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ends (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): the graph's pool_3
        return pool, pool @ self.fc.weight.T  # logits without the bias, as IS evaluators compute them


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF 1.x ResizeBilinear along one axis (align_corners=False, no half-pixel
    centres): output i samples input position i·n_in/n_out, between its floor and the next pixel."""
    pos = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return torch.from_numpy(m).float()


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float → (N, C, size, size), as TensorFlow 1.x's default bilinear resize samples."""
    rows = _tf1_bilinear_matrix(x.shape[2], size).to(x.device)
    cols = _tf1_bilinear_matrix(x.shape[3], size).to(x.device)
    return torch.einsum("ih,nchw,jw->ncij", rows, x, cols)


# ---------------------------------------------------------------- the weights file
@dataclass(frozen=True)
class InceptionInfo:
    """What a report says about the network that produced its features."""

    weights: str
    sha256: str
    standard: bool  # the published pt_inception-2015-12-05 file: numbers comparable with papers
    reduction: int
    preprocess: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def missing_weights_message(path: Path | None) -> str:
    where = "--inception-weights is required" if path is None else f"Inception weights not found at {path}"
    return (f"{where}: download {WEIGHTS_FILE} (the FID Inception, 95 MB) from {WEIGHTS_URL} "
            "and pass it with --inception-weights")


def load_inception(path: str | Path, preprocess: str = "tf",
                   device: torch.device | str = "cpu") -> tuple[FIDInception, InceptionInfo]:
    """Build the network for the weights file at `path` and load it strictly by name
    (`torch.load(weights_only=True)`; a missing, unexpected or mis-shaped tensor is refused with one line
    naming it). The channel reduction is read from the first convolution (1 for the standard file)."""
    path = Path(path)
    if not path.is_file():
        raise EvarError(missing_weights_message(path))
    state = {k: v for k, v in read_torch_state(path).items() if not k.endswith(IGNORED_SUFFIX)}
    net = FIDInception(_reduction_of(state, path), preprocess)
    load_strict(net, state, f"{path} (FID Inception layout, {WEIGHTS_FILE})")
    digest = sha256_file(path)
    info = InceptionInfo(str(path), digest, digest.startswith(STANDARD_SHA256_PREFIX) and net.reduction == 1,
                         net.reduction, preprocess)
    return net.to(device).eval().requires_grad_(False), info


def _reduction_of(state: dict[str, torch.Tensor], path: Path) -> int:
    first = state.get("Conv2d_1a_3x3.conv.weight")
    if first is None:
        raise EvarError(f"{path} is not the FID Inception layout: missing key 'Conv2d_1a_3x3.conv.weight' "
                        f"(expected {WEIGHTS_FILE} from {WEIGHTS_URL})")
    width = first.shape[0]
    if first.ndim != 4 or width < 1 or 32 % width or 32 // width not in REDUCTIONS:
        raise EvarError(f"{path}: key 'Conv2d_1a_3x3.conv.weight' has shape {tuple(first.shape)}; the FID "
                        "Inception has (32, 3, 3, 3)")
    return 32 // width


# ---------------------------------------------------------------- random weights (tests, smoke runs)
def random_state_dict(reduction: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the standard file's layout (He-initialised convs, identity batch norms), so a
    pipeline can be run end to end where the real file is not at hand. Its numbers mean nothing."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        layout = FIDInception(reduction).state_dict()
    for key, ref in layout.items():
        if key.endswith("conv.weight"):
            fan_in = ref[0].numel()
            state[key] = torch.randn(ref.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key == "fc.weight":
            state[key] = torch.randn(ref.shape, generator=gen) / ref.shape[1] ** 0.5
        else:
            state[key] = torch.ones(ref.shape) if key.endswith(("bn.weight", "running_var")) else torch.zeros(ref.shape)
    return state


def write_random_weights(path: str | Path, reduction: int = 1, seed: int = 0) -> Path:
    import io

    buf = io.BytesIO()
    torch.save(random_state_dict(reduction, seed), buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    """`python -m evar.eval.inception --random-weights OUT.pth [--reduction R] [--seed S]`: a weights file of
    the standard layout with random values, to run the ImageNet evaluation end to end without the real one."""
    import argparse

    from evar.errors import run_cli

    parser = argparse.ArgumentParser(prog="python -m evar.eval.inception", description=main.__doc__)
    parser.add_argument("--random-weights", type=Path, required=True, help="file to write")
    parser.add_argument("--reduction", type=int, default=1, choices=REDUCTIONS,
                        help="divide every channel count (1 = the standard layout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def write() -> None:
        out = write_random_weights(args.random_weights, args.reduction, args.seed)
        print(f"random FID-Inception weights (reduction {args.reduction}) → {out}")

    run_cli(write)


if __name__ == "__main__":
    main()
