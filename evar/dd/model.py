"""The Distilled Decoding student: VAR's transformer reading per-token noise (or data) instead of VAR's inputs.

Sequence: one leading level (the class token, as VAR's start token) followed by one input per token of every
scale: its noise from `evar.dd.flow`, or, for the scales already decided, the codebook vector of its token.
A flag embedding says which (0 noise, 1 data). Output j predicts the clean token at j with two heads: VAR's
logits over the codebook and a continuous regression onto the codebook vector (Cvae). Attention mask: a
token sees every token of strictly earlier levels and itself, and no other token of its own scale; within a
scale the tokens are independent given the coarser ones, exactly as the flow made them.

Weights use VAR's key names where they mean the same (blocks, heads, class and word embeddings), so the
student starts as a copy of its teacher (`from_teacher`); `pos_1LC` and `lvl_embed` have one more level,
`flag_embed` and `reg_head` are new. A DD model directory is its own family (`format` "evar-dd-model":
config.json + dd.safetensors + vqvae.safetensors), so VAR-only commands refuse it and DD commands refuse a VAR.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from evar.checkpoints import (CONFIG_FILE, VQVAE_FILE, Model, _contiguous, load_strict, read_safetensors)
from evar.config import ConfigError, ModelConfig, VARConfig, VQVAEConfig
from evar.errors import CheckpointError
from evar.files import atomic_dir, atomic_write_json, read_versioned_json
from evar.models.var import AdaLNBeforeHead, AdaLNSelfAttn
from evar.models.vqvae import VQVAE

DD_FORMAT, DD_FORMAT_VERSION, DD_FILE = "evar-dd-model", 1, "dd.safetensors"
NOISE, DATA = 0, 1  # the flag embedding's rows


@dataclass
class DDConfig:
    """A teacher's architecture (VAR + VQVAE) and the DD-only settings."""

    model: ModelConfig
    continuous_from: int | None = None  # scales >= this take the regression head's vectors; None: argmax tokens

    @property
    def var(self) -> VARConfig:
        return self.model.var

    @property
    def vqvae(self) -> VQVAEConfig:
        return self.model.vqvae

    def validate(self) -> None:
        self.model.validate()
        S = self.var.num_scales
        if self.continuous_from is not None and not 0 <= self.continuous_from <= S:
            raise ConfigError(f"continuous_from must be in 0..{S}, got {self.continuous_from}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": DD_FORMAT, "format_version": DD_FORMAT_VERSION, **self.model.to_dict(),
                "dd": {"continuous_from": self.continuous_from}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DDConfig:
        dd = data.get("dd", {})
        rest = {k: v for k, v in data.items() if k in ("var", "vqvae", "provenance")}
        cfg = cls(ModelConfig.from_dict(rest), dd.get("continuous_from"))
        cfg.validate()
        return cfg


def levels(cfg: VARConfig) -> Tensor:
    """(1 + L,) level of every position: 0 for the class token, 1 + si for the tokens of scale si."""
    return torch.cat([torch.zeros(1, dtype=torch.long)] +
                     [torch.full((pn * pn,), si + 1, dtype=torch.long) for si, pn in enumerate(cfg.patch_nums)])


def attention_mask(cfg: VARConfig) -> Tensor:
    """(1 + L, 1 + L) additive mask: position i sees j when j's level is lower than i's, or j is i."""
    lv = levels(cfg)
    visible = (lv.view(-1, 1) > lv.view(1, -1)) | torch.eye(len(lv), dtype=torch.bool)
    return torch.zeros(len(lv), len(lv)).masked_fill(~visible, float("-inf"))


class DDStudent(nn.Module):
    def __init__(self, cfg: VARConfig, attn_impl: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, L, S = cfg.embed_dim, cfg.seq_len, cfg.num_scales
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, 1 + L, C))
        self.lvl_embed = nn.Embedding(S + 1, C)
        self.flag_embed = nn.Embedding(2, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, i, attn_impl) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.reg_head = nn.Linear(C, cfg.cvae)
        self.register_buffer("lvl_1L", levels(cfg).view(1, -1), persistent=False)
        self.register_buffer("attn_bias_for_masking", attention_mask(cfg).view(1, 1, 1 + L, 1 + L), persistent=False)

    @torch.no_grad()
    def init_from_teacher(self, teacher: nn.Module) -> None:
        """Copy the teacher; the token at scale si takes the teacher's embeddings for scale si (the teacher's
        output there predicts the same tokens), the class token the teacher's first position."""
        own = self.state_dict()
        for name, value in teacher.state_dict().items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
        self.pos_1LC[:, 0] = teacher.pos_1LC[:, 0]
        self.pos_1LC[:, 1:] = teacher.pos_1LC
        self.lvl_embed.weight[0] = teacher.lvl_embed.weight[0]
        self.lvl_embed.weight[1:] = teacher.lvl_embed.weight
        self.flag_embed.weight.zero_()  # starts as no change; training learns what noise vs data means
        # small and seeded: the same teacher always gives the same student (resumed runs rebuild it)
        nn.init.trunc_normal_(self.reg_head.weight, std=1e-3, generator=torch.Generator().manual_seed(0))
        self.reg_head.bias.zero_()

    def forward(self, labels: Tensor, x_BLCv: Tensor, is_data: Tensor) -> tuple[Tensor, Tensor]:
        """labels (B,), inputs (B, L, Cvae), is_data (B, L) bool → logits (B, L, V), vectors (B, L, Cvae)."""
        cond_BD = self.class_emb(labels)
        pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, 1 + L, C)
        start = cond_BD.unsqueeze(1) + self.pos_start + pos[:, :1]
        tokens = self.word_embed(x_BLCv) + self.flag_embed(is_data.long()) + pos[:, 1:]
        h = torch.cat((start, tokens), dim=1)
        cond = self.shared_ada_lin(cond_BD).unflatten(-1, (6, self.cfg.embed_dim)).unsqueeze(1) \
            if self.cfg.shared_aln else cond_BD
        for block in self.blocks:
            h, _ = block(h, cond, self.attn_bias_for_masking)
        h = self.head_nm(h[:, 1:].float(), cond_BD)
        return self.head(h), self.reg_head(h)


@dataclass
class DDModel:
    """A loaded student with its VQVAE (the teacher's: the tokens it learnt are the teacher's)."""

    config: DDConfig
    student: DDStudent
    vqvae: VQVAE
    provenance: dict[str, Any] = field(default_factory=dict)

    def eval(self) -> DDModel:
        self.student.eval()
        self.vqvae.eval()
        return self


def from_teacher(teacher: Model, continuous_from: int | None = None) -> DDModel:
    config = DDConfig(ModelConfig(teacher.config.var, teacher.config.vqvae), continuous_from)
    config.validate()
    student = DDStudent(config.var)
    student.init_from_teacher(teacher.var)
    return DDModel(config, student, teacher.vqvae)


def save_dd_dir(model: DDModel, out: str | Path, provenance: dict[str, Any]) -> Path:
    cfg = DDConfig(ModelConfig(model.config.var, model.config.vqvae, provenance), model.config.continuous_from)
    cfg.validate()
    with atomic_dir(out) as tmp:
        save_file(_contiguous(model.student.state_dict()), str(tmp / DD_FILE))
        save_file(_contiguous(model.vqvae.state_dict()), str(tmp / VQVAE_FILE))
        atomic_write_json(tmp / CONFIG_FILE, cfg.to_dict())
    return Path(out)


def load_dd_dir(model_dir: str | Path) -> DDModel:
    """A DD model directory (the loader `evar.zoo.FAMILIES` names for the format)."""
    model_dir = Path(model_dir)
    data = read_versioned_json(model_dir / CONFIG_FILE, DD_FORMAT, DD_FORMAT_VERSION, "DD model config",
                               CheckpointError)
    try:
        cfg = DDConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: {err}") from None
    with torch.device("meta"):
        student, vqvae = DDStudent(cfg.var), VQVAE(cfg.vqvae)
    student.to_empty(device="cpu")
    vqvae.to_empty(device="cpu")
    student.lvl_1L.copy_(levels(cfg.var).view(1, -1))  # non-persistent buffers are rebuilt, not loaded
    L = cfg.var.seq_len + 1
    student.attn_bias_for_masking.copy_(attention_mask(cfg.var).view(1, 1, L, L))
    load_strict(student, read_safetensors(model_dir / DD_FILE), str(model_dir / DD_FILE))
    load_strict(vqvae, read_safetensors(model_dir / VQVAE_FILE), str(model_dir / VQVAE_FILE))
    return DDModel(cfg, student, vqvae, cfg.model.provenance).eval()

