"""Export-ready wrappers: the per-scale decoder step and the VQVAE decoder.

Both step wrappers compute exactly what `evar.models.var.generate` computes for one scale (see
interface.py for the contract): input embedding (class token at scale 0, else word_embed of the
area-downsampled f_hat), the transformer over this scale's tokens with the KV cache, head, CFG over the
in-graph 2B batch, top-k/top-p and inverse-CDF sampling from explicit uniforms, and the f_hat update
with the sampled tokens (embedding lookup, bicubic upsample, Phi).

- `ScaleStep`: one scale with static shapes (Core ML: one function per scale). It reuses the model's own
  methods (separable resize matrices, Phi by index), so it is the reference semantics by construction.
- `DynamicStep`: every scale in one graph (ONNX). What depends on the scale is gathered from stacked
  constants by the `scale_index` input; sizes come from the symbolic token count (uniforms.shape[1]).
  Resizes are Kronecker matrices (H², pn²) zero-padded to (H², H²) and sliced to the live token count,
  so no shape arithmetic (sqrt of a length) has to be traced.

The attention implementation is the caller's choice (`VAR(cfg, attn_impl=...)`): export loads the
model with "math" so the graph has plain matmul/softmax (fused SDPA with a custom scale decomposes
anyway, and Core ML's fused op needs iOS18).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.models.sampling import apply_cfg, sample_tokens
from evar.models.vqvae import resize, resize_matrix

KV = tuple[Tensor, Tensor]


def cfg_labels(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) → (2B,): conditional rows first, then the unconditional class (as `generate`)."""
    return torch.cat((labels, torch.full_like(labels, num_classes)))


def guide_and_sample(logits_2BlV: Tensor, uniforms_Bl: Tensor, t: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """CFG over the stacked halves, then the sampler of `generate`. → (logits (B, l, V), idx (B, l))."""
    cond, uncond = logits_2BlV.unflatten(0, (2, -1)).unbind(0)
    logits = apply_cfg(cond, uncond, t)
    return logits, sample_tokens(logits, uniforms_Bl, top_k, top_p)


def run_blocks(model: Model, x: Tensor, cond_BD: Tensor, past: list[KV | None]) -> tuple[Tensor, list[KV]]:
    """`VAR.decode_step` with an optional past per layer → (raw logits (2B, l, V), presents)."""
    var = model.var
    cond = var.block_condition(cond_BD)
    presents = []
    for block, p in zip(var.blocks, past):
        x, kv = block(x, cond, None, p)
        presents.append(kv)
    return var.logits(x, cond_BD), presents


class ScaleStep(nn.Module):
    """Scale `si` with static shapes. kv_mode "io": past tensors in (none at scale 0), presents out;
    "state": per-layer cache buffers (2B, heads_i, L, head_dim) written in place at [begin, end)."""

    def __init__(self, model: Model, si: int, *, top_k: int, top_p: float, kv_mode: str = "io",
                 batch: int | None = None, index_dtype: torch.dtype = torch.int64):
        super().__init__()
        self.model_var, self.vqvae = model.var, model.vqvae
        self.model = model
        c = model.config.var
        self.si, self.pn = si, c.patch_nums[si]
        self.begin, self.end = c.scale_ranges()[si]
        self.num_scales, self.depth, self.num_classes = c.num_scales, c.depth, c.num_classes
        self.ratio = si / max(c.num_scales - 1, 1)
        self.top_k, self.top_p, self.kv_mode, self.index_dtype = top_k, top_p, kv_mode, index_dtype
        if kv_mode == "state":
            if batch is None:
                raise ValueError("a state KV cache needs a static batch")
            for i, heads in enumerate(c.num_heads):
                shape = (2 * batch, heads, c.seq_len, c.head_dim)
                self.register_buffer(f"key_cache_{i}", torch.zeros(shape))
                self.register_buffer(f"value_cache_{i}", torch.zeros(shape))

    def embed_input(self, cond_BD: Tensor, f_hat: Tensor) -> Tensor:
        var = self.model_var
        if self.si == 0:
            return var.first_tokens(cond_BD)  # (2B, 1, C)
        nxt = resize(f_hat, self.pn, "area")  # (B, Cvae, pn, pn)
        x = var.embed_scale(nxt.flatten(2).transpose(1, 2), self.begin, self.end)
        return x.repeat(2, 1, 1)

    def accumulate(self, f_hat: Tensor, idx: Tensor) -> Tensor:
        q = self.vqvae.quantize
        return f_hat + q.scale_residual(self.si, q.embed_idx(idx, self.pn))

    def forward(self, labels: Tensor, f_hat: Tensor, uniforms: Tensor, cfg: Tensor, *past_flat: Tensor):
        cond_BD = self.model_var.class_emb(cfg_labels(labels, self.num_classes))
        x = self.embed_input(cond_BD, f_hat)
        if self.kv_mode == "state":
            past = [None if self.begin == 0 else (getattr(self, f"key_cache_{i}")[:, :, : self.begin],
                                                  getattr(self, f"value_cache_{i}")[:, :, : self.begin])
                    for i in range(self.depth)]
        elif self.begin == 0:
            past = [None] * self.depth
        else:
            past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.depth)]
        raw, presents = run_blocks(self.model, x, cond_BD, past)
        logits, idx = guide_and_sample(raw, uniforms, cfg * self.ratio, self.top_k, self.top_p)
        next_f_hat = self.accumulate(f_hat, idx)
        idx = idx.to(self.index_dtype)
        if self.kv_mode == "state":
            for i, (k, v) in enumerate(presents):
                if self.begin:  # (a full slice [0:] would trace to an alias, which Core ML cannot convert)
                    k, v = k[:, :, self.begin:], v[:, :, self.begin:]
                getattr(self, f"key_cache_{i}")[:, :, self.begin: self.end] = k
                getattr(self, f"value_cache_{i}")[:, :, self.begin: self.end] = v
            return logits, idx, next_f_hat
        return (logits, idx, next_f_hat, *[t for kv in presents for t in kv])


def _kron_stacks(patch_nums: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(S, H², H²) upsample (rows: this scale's tokens, zero-padded) and area-downsample (cols) operators.

    up[si][:n] (n, H²) maps row-major tokens of scale si to the full map; down[si][:, :n] the full map to
    scale si. Entries are products of the float32 1-D matrices `resize` uses, rounded once.
    """
    H = patch_nums[-1]
    up = torch.zeros(len(patch_nums), H * H, H * H, dtype=torch.float64)
    down = torch.zeros_like(up)
    eye = torch.eye(H, dtype=torch.float64)
    for si, pn in enumerate(patch_nums):
        u = eye if pn == H else resize_matrix(pn, H, "bicubic").double()  # (H, pn)
        d = eye if pn == H else resize_matrix(H, pn, "area").double()  # (pn, H)
        up[si, : pn * pn] = torch.kron(u, u).T  # (pn², H²)
        down[si, :, : pn * pn] = torch.kron(d, d).T  # (H², pn²)
    return up.float(), down.float()


class DynamicStep(nn.Module):
    """Any scale in one graph: (labels, f_hat, uniforms, cfg, scale_index, *past) → (logits, idx, next_f_hat, *present)."""

    def __init__(self, model: Model, *, top_k: int, top_p: float):
        super().__init__()
        c = model.config.var
        self.model = model
        self.var, self.vqvae = model.var, model.vqvae
        self.depth, self.num_classes, self.full = c.depth, c.num_classes, c.patch_nums[-1]
        self.top_k, self.top_p = top_k, top_p
        q = model.vqvae.quantize
        up, down = _kron_stacks(c.patch_nums)
        self.register_buffer("up_kron", up, persistent=False)
        self.register_buffer("down_kron", down, persistent=False)
        begins = torch.tensor([b for b, _ in c.scale_ranges()])
        self.register_buffer("positions", begins[:, None] + torch.arange(self.full ** 2)[None], persistent=False)
        self.register_buffer("cfg_ramp", torch.tensor([si / max(c.num_scales - 1, 1) for si in range(c.num_scales)]),
                             persistent=False)
        phis = q.quant_resi.qresi_ls
        self.register_buffer("phi_of_scale", torch.tensor([q.phi_index(si) for si in range(c.num_scales)]), persistent=False)
        self.phi_ratio = phis[0].ratio
        self.register_buffer("phi_weight", torch.stack([p.weight.detach() for p in phis]), persistent=False)
        self.register_buffer("phi_bias", torch.stack([p.bias.detach() for p in phis]), persistent=False)

    def _pick(self, table: Tensor, scale_index: Tensor) -> Tensor:
        return table.index_select(0, scale_index).squeeze(0)

    def phi(self, h: Tensor, scale_index: Tensor) -> Tensor:
        k = self._pick(self.phi_of_scale, scale_index).view(1)
        w, b = self.phi_weight.index_select(0, k).squeeze(0), self.phi_bias.index_select(0, k).squeeze(0)
        return h * (1 - self.phi_ratio) + F.conv2d(h, w, b, padding=1) * self.phi_ratio

    def forward(self, labels: Tensor, f_hat: Tensor, uniforms: Tensor, cfg: Tensor, scale_index: Tensor,
                *past_flat: Tensor):
        n = uniforms.shape[1]  # this scale's token count (symbolic in the graph)
        var = self.var
        cond_BD = var.class_emb(cfg_labels(labels, self.num_classes))
        # input embedding: class token at scale 0, else word_embed(area(f_hat)) + level/position
        down = self._pick(self.down_kron, scale_index)[:, :n]  # (H², n)
        nxt = (f_hat.flatten(2) @ down).transpose(1, 2)  # (B, n, Cvae)
        pos = self._pick(self.positions, scale_index)[:n]
        embedded = (var.word_embed(nxt) + var.level_pos().index_select(1, pos)).repeat(2, 1, 1)
        x = torch.where((scale_index == 0).view(1, 1, 1), var.first_tokens(cond_BD), embedded)
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.depth)]
        raw, presents = run_blocks(self.model, x, cond_BD, past)
        t = cfg * self.cfg_ramp.index_select(0, scale_index)
        logits, idx = guide_and_sample(raw, uniforms, t, self.top_k, self.top_p)
        # f_hat update with this scale's tokens: embed, upsample to the full map, Phi
        up = self._pick(self.up_kron, scale_index)[:n]  # (n, H²)
        h = (self.vqvae.quantize.embedding(idx).transpose(1, 2) @ up).unflatten(2, (self.full, self.full))
        next_f_hat = f_hat + self.phi(h, scale_index)
        return (logits, idx, next_f_hat, *[t for kv in presents for t in kv])


class VQVAEDecoder(nn.Module):
    """f_hat (B, Cvae, H, H) → image (B, 3, S, S) in [-1, 1] (`VQVAE.fhat_to_img`)."""

    def __init__(self, model: Model):
        super().__init__()
        self.vqvae = model.vqvae

    def forward(self, f_hat: Tensor) -> Tensor:
        return self.vqvae.fhat_to_img(f_hat)
