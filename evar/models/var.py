"""The VAR transformer (next-scale prediction), with module names equal to the official checkpoint keys.

Blocks are described per block by `VARConfig` (head count, FFN width), so pruned models are ordinary
instances of this class. The KV cache is functional: each attention takes its past (k, v) and returns
the present, which teacher forcing, cached generation and export wrappers all share without hooks.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from evar.config import VARConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, H, L_so_far, head_dim)
MAX_SCALE_MUL = math.log(100.0)


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused qkv without weight bias; q/v biases as parameters and a zero k bias as a buffer (official layout)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, l2_norm: bool, impl: str = "sdpa"):
        super().__init__()
        if impl not in ("sdpa", "math"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        self.num_heads, self.head_dim, self.l2_norm, self.impl = num_heads, head_dim, l2_norm, impl
        inner = num_heads * head_dim
        self.mat_qkv = nn.Linear(embed_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        if l2_norm:
            # Cosine attention: the per-head learned temperature replaces 1/sqrt(d).
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(head_dim)
        self.proj = nn.Linear(inner, embed_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, l, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp(max=MAX_SCALE_MUL).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, l, L)
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1) @ v

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        q, k, v = self.qkv(x)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = self.attend(q, k, v, bias).transpose(1, 2).flatten(2)  # (B, l, H*hd)
        return self.proj(out), (k, v)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition."""

    def __init__(self, cfg: VARConfig, block: int, attn_impl: str = "sdpa"):
        super().__init__()
        C = cfg.embed_dim
        self.embed_dim, self.shared_aln = C, cfg.shared_aln
        self.attn = SelfAttention(C, cfg.num_heads[block], cfg.head_dim, cfg.attn_l2_norm, attn_impl)
        self.ffn = FFN(C, cfg.ffn_dims[block])
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / math.sqrt(C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2."""
        if self.shared_aln:
            return self.ada_gss + cond  # cond is already the shared (B, 1, 6, C) projection
        return self.ada_lin(cond).unflatten(-1, (6, self.embed_dim)).unsqueeze(1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, bias: torch.Tensor | None = None,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond).unbind(2)  # each (B, 1, C)
        a, present = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, bias, past)
        x = x + a * gamma1
        x = x + self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2
        return x, present


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, eps: float):
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).unflatten(-1, (2, self.embed_dim)).unsqueeze(1).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig, attn_impl: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, i, attn_impl) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", level.view(1, L))
        # Block-causal by scale: a token sees every token of its own and earlier scales.
        visible = level.view(L, 1) >= level.view(1, L)
        mask = torch.zeros(L, L).masked_fill(~visible, float("-inf"))
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, L, L))
        self.reset_parameters()

    # ---- initialisation (as VAR trains from scratch: small AdaLN gates, scaled residual projections)
    @torch.no_grad()
    def reset_parameters(self, init_head: float = 0.02, init_adaln: float = 0.5, init_gamma: float = 1e-5) -> None:
        C, std = self.cfg.embed_dim, math.sqrt(1 / self.cfg.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC, self.lvl_embed.weight, self.class_emb.weight):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))
            if not self.cfg.shared_aln:
                w = block.ada_lin[-1].weight
                w[2 * C:].mul_(init_adaln)
                w[: 2 * C].mul_(init_gamma)

    # ---- pieces shared by teacher forcing, cached generation and export wrappers
    def level_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)

    def first_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return cond_BD.unsqueeze(1) + self.pos_start + self.level_pos()[:, :1]  # (B, 1, C)

    def embed_scale(self, x_BlCv: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """Word-embed the VQVAE features of tokens [begin, end) and add their level and position."""
        return self.word_embed(x_BlCv) + self.level_pos()[:, begin:end]

    def block_condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        if self.cfg.shared_aln:
            return self.shared_ada_lin(cond_BD).unflatten(-1, (6, self.cfg.embed_dim)).unsqueeze(1)
        return cond_BD

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD))

    def embed_sequence(self, labels: torch.Tensor, x_BLCv_wo_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing input (B, L, C) and the class condition (B, C)."""
        cond_BD = self.class_emb(labels)
        x = torch.cat((self.first_tokens(cond_BD), self.embed_scale(x_BLCv_wo_first, 1, self.cfg.seq_len)), dim=1)
        return x, cond_BD

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first: torch.Tensor,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher forcing over the whole sequence with the block-causal mask → logits (B, L, V).

        `labels` are used as given: label dropout for CFG training is the trainer's job, so that a
        teacher and a student can see the same labels. With `return_hidden`, also every block's output.
        """
        x, cond_BD = self.embed_sequence(labels, x_BLCv_wo_first)
        cond = self.block_condition(cond_BD)
        hidden = []
        for block in self.blocks:
            x, _ = block(x, cond, self.attn_bias_for_masking)
            hidden.append(x)
        logits = self.logits(x, cond_BD)
        return (logits, hidden) if return_hidden else logits

    def decode_step(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor,
                    past: list[KV | None] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """One scale of cached decoding: this scale's tokens attend to the cache and to each other.
        `past` per layer (None, or None for a layer: nothing cached yet) → (raw logits, presents)."""
        cond = self.block_condition(cond_BD)
        presents = []
        for i, block in enumerate(self.blocks):
            x_BlC, kv = block(x_BlC, cond, None, None if past is None else past[i])
            presents.append(kv)
        return self.logits(x_BlC, cond_BD), presents
