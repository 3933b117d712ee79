"""A class-conditional diffusion transformer (DiT) whose state dict has facebookresearch/DiT's key names.

So a user's DiT checkpoint loads strictly by name, and the modules pruning sees are the ones the paper has:
    x_embedder.proj            patchify conv (C_in → C, kernel = stride = patch)
    pos_embed                  fixed 2-D sin-cos table (1, T, C), stored in the state dict as DiT does
    t_embedder.mlp.{0,2}       timestep MLP on a 256-wide sinusoidal embedding
    y_embedder.embedding_table num_classes + 1 rows: the last is the null class of classifier-free guidance
    blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}   adaLN-Zero blocks (6C modulation)
    final_layer.{linear, adaLN_modulation.1}
The LayerNorms have no affine parameters (adaLN supplies scale and shift). Unlike the paper, every block may
have its own number of heads and FFN width (`num_heads`, `ffn_dims`): a pruned DiT is a DiT of another shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evar.config import ConfigError

FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to t_embedder.mlp
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 16  # image (or latent) side
    patch_size: int = 2
    in_channels: int = 3
    hidden_size: int = 128
    num_heads: tuple[int, ...] = (4, 4, 4, 4)  # per block; depth = len
    ffn_dims: tuple[int, ...] = (512, 512, 512, 512)
    head_dim: int = 32
    num_classes: int = 10
    learn_sigma: bool = False  # official checkpoints: True (the second half of the output is the variance)
    class_dropout_prob: float = 0.1
    diffusion_steps: int = 1000  # linear beta schedule over this many steps, as DiT trains
    # What the network predicts: "eps" (the noise: DiT's, so official checkpoints) or "v" (√ᾱ·ε − √(1−ᾱ)·x0, which
    # stays informative at high noise, where a small eps-model's image estimate is noise; EVAR's digits DiT).
    prediction: str = "eps"

    @property
    def depth(self) -> int:
        return len(self.num_heads)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if len(self.ffn_dims) != len(self.num_heads) or not self.num_heads:
            raise ConfigError(f"num_heads ({len(self.num_heads)} blocks) and ffn_dims ({len(self.ffn_dims)}) "
                              "must list the same, non-zero number of blocks")
        if any(h < 1 for h in self.num_heads) or any(f < 1 for f in self.ffn_dims):
            raise ConfigError("every block needs at least one head and one FFN unit")
        if self.hidden_size % 4 or self.head_dim < 1:
            raise ConfigError(f"hidden_size must be a multiple of 4 (sin-cos position table), got {self.hidden_size}")
        if self.num_classes < 1 or self.diffusion_steps < 2:
            raise ConfigError("num_classes must be >= 1 and diffusion_steps >= 2")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")

    @classmethod
    def uniform(cls, depth: int, hidden_size: int, heads: int, mlp_ratio: float = 4.0, **kw) -> DiTConfig:
        """The paper's shape: every block alike, head_dim = hidden / heads (DiT-XL/2: 28, 1152, 16)."""
        return cls(hidden_size=hidden_size, num_heads=(heads,) * depth,
                   ffn_dims=(int(hidden_size * mlp_ratio),) * depth, head_dim=hidden_size // heads, **kw)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps → (N, dim): cosines then sines of t at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed positions: half the channels encode the row, half the column (sin | cos each)."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        angles = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    cols, rows = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy")
    return torch.cat([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # row num_classes: "no class"

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, C), row-major patches


class Attention(nn.Module):
    """qkv rows are [q of every head | k of every head | v of every head], head-major inside each third."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, ffn: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, ffn)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.y_embedder = LabelEmbedder(cfg.num_classes, C)
        grid = cfg.input_size // cfg.patch_size
        self.pos_embed = nn.Parameter(sincos_table(C, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(C, h, cfg.head_dim, f) for h, f in zip(cfg.num_heads, cfg.ffn_dims))
        self.final_layer = FinalLayer(C, cfg.patch_size, cfg.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's: Xavier linears, small embeddings, and adaLN-Zero (modulations and the output start at 0).
        Skipped on the meta device (a model about to be loaded): random init there goes through a slow path."""
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for layer in self.final_layer.adaLN_modulation[1], self.final_layer.linear:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) → (N, C, H, W)."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        g = self.cfg.input_size // p
        x = x.view(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noisy images x (N, C, H, W), timesteps t (N,), labels (N,; num_classes = none) → the model output
        (N, out_channels, H, W): the prediction (`cfg.prediction`), then (learn_sigma) the variance interpolation."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The prediction alone (the first in_channels of the output: noise or v, as `cfg.prediction` says)."""
        return self.forward(x, t, labels)[:, : self.cfg.in_channels]
