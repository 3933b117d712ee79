"""The Neural Engine layout of VAR's scale step and of the VQVAE decoder (`evar-export coreml --target ane`).

The Neural Engine runs fp16 convolutions over channels-first 4-D tensors; what it cannot run (sorting,
cumulative sums, scatters and gathers, int math, fp32) splits a Core ML function into CPU and ANE pieces
with a copy at every seam. So the ANE functions hold the transformer alone, written the way Apple's
ml-ane-transformers lays a transformer out:

- activations are (N, C, 1, S): channels on axis 1, the tokens of this scale on the last axis;
- every `nn.Linear` is a 1x1 convolution with the same weights;
- attention is per head (channels split into heads, two einsums per head), so no (B, H, S, d) reshapes;
- LayerNorm and GroupNorm reduce over channels after dividing by the largest magnitude they see, so no
  square can exceed fp16's 65504 (the decoder's GroupNorm at 256 px did, as a decomposed `square`);
- what depends on the class alone (scale 0's token, every AdaLN's gates, 1 + scales and shifts, the head's) is
  a table computed in fp32 at export (`class_tables`) and picked by a one-hot row per CFG row (host-built):
  no embedding gather, no int input, and one fp16 rounding instead of a SiLU and a linear in fp16;
- the q/k l2-norm is the same division-first normalisation over each head's channels;
- the KV cache is model state padded to a multiple of 32 positions (and channels, for pruned head counts):
  keys as (2B, Lpad, 1, Cpad), values as (2B, Cpad, 1, Lpad); scale si writes [begin, end) and reads [0, ceil32(end)) (constant bounds), and the
  positions at or after `end` get an additive -1e4 (exp underflows to exactly 0, in fp16 and in fp32).

What is left (CFG, top-k/top-p, the inverse-CDF draw) runs on the host from the fp16 raw logits
(`evar.contract.host_sampling`, EVARKit's `Sampler`), and the f_hat update (an embedding gather, the
bicubic upsample and Phi) is a small fp32 function on the CPU (`FhatUpdate`). At fp32 these wrappers give the
reference's tokens; parity.py checks it for every export, and fp16 on the CPU scale by scale.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.models.decoding import EagerOps
from evar.models.var import MAX_SCALE_MUL, AdaLNSelfAttn, VAR
from evar.models.vqvae import resize

ALIGN = 32  # Core ML states whose dims are not multiples of 32 leave the ANE (coremltools #2631)
MASKED = -1e4  # additive attention bias of a padded position: exp(-1e4 - max) is 0 in fp16 and fp32
TINY = 2.0 ** -14  # smallest normal fp16: the floor of a magnitude we divide by


def aligned(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def conv_of(linear: nn.Linear, bias: Tensor | None = None) -> nn.Conv2d:
    """The 1x1 convolution computing `linear` over the channels of an (N, C, 1, S) tensor."""
    b = linear.bias if bias is None else bias
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.detach()[:, :, None, None])
        if b is not None:
            conv.bias.copy_(b.detach())
    return conv


def narrow(t: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """t[start:stop] along dim; the tensor itself when that is all of it (a full slice traces to an alias,
    which coremltools cannot convert)."""
    return t if (start, stop) == (0, t.shape[dim]) else t.narrow(dim, start, stop - start)


def _by_max(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """x divided by its largest magnitude along `dim` (floored at TINY): every square of it is <= 1."""
    m = x.abs().amax(dim=dim, keepdim=True).clamp_min(TINY)
    return x / m, m


def norm_channels(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine over axis 1 of (N, C, 1, S), overflow-free in fp16.

    With x = m·y (|y| <= 1) and c = y - mean(y): (x - mean x) / sqrt(var x + eps) = c / sqrt(var c + eps / m²),
    and eps / m² is formed as (sqrt(eps) / m)², so neither a square of x nor of m appears."""
    y, m = _by_max(x, 1)
    c = y - y.mean(1, keepdim=True)
    r = math.sqrt(eps) / m
    return c * torch.rsqrt((c * c).mean(1, keepdim=True) + r * r)


def l2_normalize_channels(x: Tensor) -> Tensor:
    """F.normalize over axis 1 (x / max(||x||, 1e-12)), dividing by the largest magnitude first."""
    y, _ = _by_max(x, 1)
    return y / (y * y).sum(1, keepdim=True).sqrt().clamp_min(TINY)


def modulate(x: Tensor, one_plus_scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """AdaLN: the channel LayerNorm of x, scaled and shifted per sample and channel."""
    return norm_channels(x, eps) * one_plus_scale + shift


def by_class(onehot: Tensor, table: Tensor) -> Tensor:
    """(N, K+1) one-hot rows, (K+1, D) table → (N, D, 1, 1): each row's entry (exact: one product by 1)."""
    return (onehot @ table).unsqueeze(2).unsqueeze(3)


@torch.no_grad()
def class_tables(var: VAR) -> tuple[Tensor, list[Tensor], Tensor]:
    """Everything VAR derives from the class label alone, for every label, in fp32: the first token (K+1, C),
    each block's AdaLN (K+1, 6C) as gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2, and the head's
    (K+1, 2C) as 1 + scale, shift. A function of one fp16 input computes these from the class embedding
    through SiLU and a linear, rounding each step; as tables they are rounded once, like any weight (the
    fp16 budget benchmark measured the chain at about a third of the layout's fp16 token flips)."""
    C = var.cfg.embed_dim
    cond = var.class_emb.weight.detach()  # (K+1, C)
    first = var.first_tokens(cond)[:, 0]
    block_cond = var.block_condition(cond)
    blocks = []
    for block in var.blocks:
        mod = block.modulation(block_cond).reshape(len(cond), 6, C).clone()
        mod[:, 2:4] += 1
        blocks.append(mod.reshape(len(cond), 6 * C))
    head = var.head_nm.ada_lin(cond).reshape(len(cond), 2, C).clone()
    head[:, 0] += 1
    return first, blocks, head.reshape(len(cond), 2 * C)


def residual(x: Tensor, branch: Tensor, gate: Tensor) -> Tensor:
    """The residual stream after a gated branch."""
    return x + branch * gate


class SafeGroupNorm(nn.Module):
    """nn.GroupNorm for (B, C, H, W) computed the same way as `norm_channels`: per-channel reductions over
    W then H (each sums at most one row, so an fp16 accumulator stays small), then over each group's channels
    on (B, G, C/G, 1); nothing is reshaped to a (B, G, C/G·H·W) tensor whose last dim could exceed 16384."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = gn.num_groups, gn.eps
        self.weight = nn.Parameter(gn.weight.detach().clone().view(1, -1, 1, 1))
        self.bias = nn.Parameter(gn.bias.detach().clone().view(1, -1, 1, 1))

    def _per_group(self, t: Tensor, reduce: str) -> Tensor:
        """(B, C, 1, 1) per-channel values → the group's max or mean, broadcast back to (B, C, 1, 1)."""
        B, C = t.shape[:2]
        g = t.reshape(B, self.groups, C // self.groups, 1)
        g = g.amax(2, keepdim=True) if reduce == "max" else g.mean(2, keepdim=True)
        return g.expand(B, self.groups, C // self.groups, 1).reshape(B, C, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        m = self._per_group(x.abs().amax(3, keepdim=True).amax(2, keepdim=True), "max").clamp_min(TINY)
        y = x / m
        c = y - self._per_group(y.mean(3, keepdim=True).mean(2, keepdim=True), "mean")
        var = self._per_group((c * c).mean(3, keepdim=True).mean(2, keepdim=True), "mean")
        r = math.sqrt(self.eps) / m
        return c * torch.rsqrt(var + r * r) * self.weight + self.bias


def safe_groupnorms(module: nn.Module) -> nn.Module:
    """A copy of `module` with every nn.GroupNorm replaced by SafeGroupNorm (same weights)."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.GroupNorm):
                setattr(child, attr, SafeGroupNorm(sub))
    return module


class AneDecoder(nn.Module):
    """f_hat (B, Cvae, H, H) → image (B, 3, S, S) in [-1, 1], `VQVAE.fhat_to_img` with overflow-free GroupNorm."""

    def __init__(self, model: Model):
        super().__init__()
        self.post_quant_conv = copy.deepcopy(model.vqvae.post_quant_conv)
        self.decoder = safe_groupnorms(model.vqvae.decoder)

    def forward(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)


class AneBlock(nn.Module):
    """One `AdaLNSelfAttn` in the (N, C, 1, S) layout, reading and writing its layer's padded cache."""

    def __init__(self, block: AdaLNSelfAttn, eps: float, modulation: Tensor):
        super().__init__()
        a = block.attn
        self.heads, self.head_dim, self.l2_norm, self.eps, self.C = a.num_heads, a.head_dim, a.l2_norm, eps, block.embed_dim
        inner = a.num_heads * a.head_dim
        self.qkv = conv_of(a.mat_qkv, torch.cat((a.q_bias, a.zero_k_bias, a.v_bias)).detach())
        self.proj, self.fc1, self.fc2 = conv_of(a.proj), conv_of(block.ffn.fc1), conv_of(block.ffn.fc2)
        self.register_buffer("modulation_table", modulation.clone(), persistent=False)  # (K+1, 6C): `class_tables`
        if a.l2_norm:  # the per-head temperature is a constant of the weights: fold it
            temps = a.scale_mul_1H11.detach().clamp(max=MAX_SCALE_MUL).exp().flatten().tolist()
        else:
            temps = [a.scale] * a.num_heads
        self.temps = [float(t) for t in temps]
        self.inner = inner

    def modulation(self, onehot: Tensor) -> list[Tensor]:
        """(N, K+1) one-hot class rows → 6 × (N, C, 1, 1): gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2."""
        return list(by_class(onehot, self.modulation_table).split(self.C, dim=1))

    def attention(self, x: Tensor, kc: Tensor, vc: Tensor, begin: int, end: int, mask: Tensor) -> Tensor:
        """x (N, C, 1, n); kc (N, Lpad, 1, inner), vc (N, inner, 1, Lpad) caches written in place at [begin, end)."""
        q, k, v = self.qkv(x).split(self.inner, dim=1)
        hd, read = self.head_dim, mask.shape[1]
        qs, ks = list(q.split(hd, dim=1)), list(k.split(hd, dim=1))
        if self.l2_norm:
            qs = [l2_normalize_channels(qh) * t for qh, t in zip(qs, self.temps)]
            ks = [l2_normalize_channels(kh) for kh in ks]
        else:
            qs = [qh * t for qh, t in zip(qs, self.temps)]
        k = torch.cat(ks, dim=1).permute(0, 3, 2, 1)  # (N, n, 1, inner)
        if kc.shape[3] == self.inner:
            kc[:, begin:end] = k
            vc[:, :, :, begin:end] = v
        else:  # channels padded to a multiple of 32 as well: the pad stays zero and is never read
            kc[:, begin:end, :, :self.inner] = k
            vc[:, :self.inner, :, begin:end] = v
        keys, values = narrow(kc, 1, 0, read), narrow(vc, 3, 0, read)
        outs = []
        for h, qh in enumerate(qs):
            kh, vh = narrow(keys, 3, h * hd, (h + 1) * hd), narrow(values, 1, h * hd, (h + 1) * hd)
            w = (torch.einsum("bchq,bkhc->bkhq", qh, kh) + mask).softmax(dim=1)  # (N, read, 1, n)
            outs.append(torch.einsum("bkhq,bchk->bchq", w, vh))  # (N, hd, 1, n)
        return self.proj(torch.cat(outs, dim=1))

    def mlp(self, h: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def forward(self, x: Tensor, onehot: Tensor, kc: Tensor, vc: Tensor, begin: int, end: int, mask: Tensor) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(onehot)
        x = residual(x, self.attention(modulate(x, scale1, shift1, self.eps), kc, vc, begin, end, mask), gamma1)
        return residual(x, self.mlp(modulate(x, scale2, shift2, self.eps)), gamma2)


class AneVAR(nn.Module):
    """The converted weights and the padded caches, once: every scale's `AneStep` shares them."""

    def __init__(self, model: Model, batch: int, pad_to: int = ALIGN):
        super().__init__()
        var: VAR = model.var
        c = self.cfg = var.cfg
        self.C, self.pad_to, self.length = c.embed_dim, pad_to, aligned(c.seq_len, pad_to)
        first, modulations, head = class_tables(var)
        with torch.no_grad():
            self.register_buffer("first_table", first.clone(), persistent=False)  # (K+1, C): scale 0's token
            self.register_buffer("head_table", head.clone(), persistent=False)  # (K+1, 2C): 1 + scale, shift
            self.register_buffer("level_pos", var.level_pos()[0].detach().clone(), persistent=False)  # (L, C)
        self.word_embed = conv_of(var.word_embed)
        self.blocks = nn.ModuleList(AneBlock(b, c.norm_eps, m) for b, m in zip(var.blocks, modulations))
        self.head = conv_of(var.head)
        self.caches = [(torch.zeros(2 * batch, self.length, 1, aligned(h * c.head_dim, pad_to)),
                        torch.zeros(2 * batch, aligned(h * c.head_dim, pad_to), 1, self.length)) for h in c.num_heads]


class AneStep(nn.Module):
    """Scale si of VAR in the ANE layout: (class_onehot (2B, K+1), f_hat (B, Cvae, H, H)) → raw logits
    (2B, pn², V), conditional rows first; the caches are the buffers `key_cache_i` / `value_cache_i` (the
    Core ML state), the same tensors in every scale's step."""

    def __init__(self, core: AneVAR, si: int):
        super().__init__()
        c = core.cfg
        self.core, self.si, self.C, self.eps = core, si, c.embed_dim, c.norm_eps
        self.begin, self.end = c.scale_ranges()[si]
        self.pn = c.patch_nums[si]
        read = min(aligned(self.end, core.pad_to), core.length)
        self.register_buffer("mask", torch.zeros(1, read, 1, 1).masked_fill(
            torch.arange(read).view(1, read, 1, 1) >= self.end, MASKED), persistent=False)
        if si > 0:  # scale 0's token, with its position, is `first_table`'s row
            with torch.no_grad():
                position = core.level_pos[self.begin:self.end].T.reshape(1, self.C, 1, -1)
            self.register_buffer("position", position.clone(), persistent=False)
        for i, (k, v) in enumerate(core.caches):
            self.register_buffer(f"key_cache_{i}", k)
            self.register_buffer(f"value_cache_{i}", v)

    def tokens_in(self, onehot: Tensor, f_hat: Tensor) -> Tensor:
        """(2B, C, 1, n): the class token at scale 0, else word_embed(area(f_hat)) + level/position, twice."""
        if self.si == 0:
            return by_class(onehot, self.core.first_table)
        small = resize(f_hat, self.pn, "area")  # (B, Cvae, pn, pn): the reference's own two matmuls
        x = self.core.word_embed(small.flatten(2).unsqueeze(2)) + self.position
        return torch.cat((x, x), dim=0)

    def forward(self, class_onehot: Tensor, f_hat: Tensor) -> Tensor:
        core = self.core
        x = self.tokens_in(class_onehot, f_hat)
        for i, block in enumerate(core.blocks):
            x = block(x, class_onehot, getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}"),
                      self.begin, self.end, self.mask)
        scale, shift = by_class(class_onehot, core.head_table).split(self.C, dim=1)
        logits = core.head(modulate(x, scale, shift, self.eps))  # (2B, V, 1, n)
        return logits.squeeze(2).transpose(1, 2)


def ane_steps(model: Model, batch: int, pad_to: int = ALIGN) -> list[AneStep]:
    """Every scale's step over one shared copy of the converted weights and caches."""
    core = AneVAR(model, batch, pad_to).eval()
    return [AneStep(core, si).eval() for si in range(model.config.var.num_scales)]


class FhatUpdate(nn.Module):
    """Scale si's f_hat update on the CPU, fp32: (f_hat, idx) → f_hat + Phi_si(upsample(embed(idx)))."""

    def __init__(self, model: Model, si: int):
        super().__init__()
        self.var, self.vqvae, self.si = model.var, model.vqvae, si
        self.ops = EagerOps(model.var, model.vqvae)

    def forward(self, f_hat: Tensor, idx: Tensor) -> Tensor:
        return self.ops.accumulate(self.si, f_hat, idx.long())
