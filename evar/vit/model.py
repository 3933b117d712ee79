"""A ViT classifier whose state dict has timm's `VisionTransformer` key names and shapes.

    cls_token                      (1, 1, D)
    pos_embed                      (1, 1 + T, D): learned, the class token's position first (timm's default)
    patch_embed.proj               Conv2d(C_in → D, kernel = stride = patch)
    blocks.i.norm1, .attn.qkv, .attn.proj, .norm2, .mlp.fc1, .mlp.fc2    pre-norm blocks
    norm                           final LayerNorm
    head                           Linear(D → classes) on the class token
LayerNorms use eps 1e-6 and GELU is the exact (erf) one, as in timm; qkv's output rows are (q | k | v), each
head-major, which is what its `reshape(B, N, 3, heads, head_dim)` reads. Modules timm keeps as Identity
(LayerScale, q/k norms, fc_norm, dropouts) hold no parameters, so they are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evar.config import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 16
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 256  # timm: embed_dim · mlp_ratio
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.img_size < 1 or self.patch_size < 1 or self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a positive multiple of patch_size {self.patch_size}")
        if min(self.depth, self.num_heads, self.mlp_dim, self.in_chans, self.num_classes) < 1:
            raise ConfigError("depth, num_heads, mlp_dim, in_chans and num_classes must be >= 1")
        if self.embed_dim < 1 or self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._init()

    def _init(self) -> None:
        """timm's spirit: truncated-normal Linear weights (std 0.02), zero biases, a small class token."""
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → the first block's input (B, 1 + T, D)."""
        x = self.patch_embed(images)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output → class logits (from the class token)."""
        return self.head(self.norm(x)[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.classify(x)
