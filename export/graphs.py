"""Export-ready wrappers: the per-scale decoder step and the VQVAE decoder.

Both step wrappers run `evar.models.decoding.decode_scale`, the one scale step `generate` runs (see
interface.py for the graph contract); they differ only in where the scale-dependent pieces come from:

- `ScaleStep`: one scale with static shapes (Core ML: one function per scale), with `EagerOps`: the
  model's own separable resize matrices and Phi by index, the reference semantics by construction.
- `DynamicStep`: every scale in one graph (ONNX), with `GatheredOps`: what depends on the scale is gathered
  from stacked constants by the `scale_index` input; sizes come from the symbolic token count
  (uniforms.shape[1]). Resizes are Kronecker matrices (H², pn²) zero-padded to (H², H²) and sliced to the
  live token count, so no shape arithmetic (sqrt of a length) has to be traced.
The CFG batch (2B rows: conditional, then unconditional) is formed in-graph from the labels.

The attention implementation is the caller's choice (`VAR(cfg, attn_impl=...)`): export loads the
model with "math" so the graph has plain matmul/softmax (fused SDPA with a custom scale decomposes
anyway, and Core ML's fused op needs iOS18).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.models.decoding import EagerOps, cfg_labels, decode_scale
from evar.models.sampling import cfg_ratio
from evar.models.var import KV
from evar.models.vqvae import resize_matrix

class ScaleStep(nn.Module):
    """Scale `si` with static shapes. kv_mode "io": past tensors in (none at scale 0), presents out;
    "state": per-layer cache buffers (2B, heads_i, L, head_dim) written in place at [begin, end).
    `guided=False` (the unguided step of CFG trimming): the conditional rows only and no cfg input; io pasts and
    presents have B rows, a state keeps its 2B rows (one state for the whole generation) and only rows [0, B)
    are read and written."""

    def __init__(self, model: Model, si: int, *, top_k: int, top_p: float, kv_mode: str = "io",
                 batch: int | None = None, index_dtype: torch.dtype = torch.int64, guided: bool = True):
        super().__init__()
        self.var, self.vqvae = model.var, model.vqvae
        self.ops = EagerOps(model.var, model.vqvae)
        c = model.config.var
        self.si = si
        self.begin, self.end = c.scale_ranges()[si]
        self.depth, self.num_classes = c.depth, c.num_classes
        self.top_k, self.top_p, self.kv_mode, self.index_dtype = top_k, top_p, kv_mode, index_dtype
        self.guided = guided
        self.rows = slice(None) if guided else slice(0, batch)  # the state rows this step reads and writes
        if kv_mode == "state":
            if batch is None:
                raise ValueError("a state KV cache needs a static batch")
            for i, heads in enumerate(c.num_heads):
                shape = (2 * batch, heads, c.seq_len, c.head_dim)
                self.register_buffer(f"key_cache_{i}", torch.zeros(shape))
                self.register_buffer(f"value_cache_{i}", torch.zeros(shape))

    def _past(self, past_flat: tuple[Tensor, ...]) -> list[KV | None]:
        if self.begin == 0:
            return [None] * self.depth
        if self.kv_mode == "state":
            return [(getattr(self, f"key_cache_{i}")[self.rows, :, : self.begin],
                     getattr(self, f"value_cache_{i}")[self.rows, :, : self.begin]) for i in range(self.depth)]
        return [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.depth)]

    def forward(self, labels: Tensor, f_hat: Tensor, uniforms: Tensor, *rest: Tensor):
        if self.guided:
            cfg, past_flat = rest[0], rest[1:]
            cond_BD = self.var.class_emb(cfg_labels(labels, self.num_classes))
        else:
            cfg, past_flat = 0.0, rest
            cond_BD = self.var.class_emb(labels)
        out = decode_scale(self.var, self.ops, self.si, cond_BD, f_hat, uniforms, cfg, self._past(past_flat),
                           self.top_k, self.top_p, self.guided)
        idx = out.idx.to(self.index_dtype)
        if self.kv_mode == "state":
            for i, (k, v) in enumerate(out.presents):
                if self.begin:  # (a full slice [0:] would trace to an alias, which Core ML cannot convert)
                    k, v = k[:, :, self.begin:], v[:, :, self.begin:]
                getattr(self, f"key_cache_{i}")[self.rows, :, self.begin: self.end] = k
                getattr(self, f"value_cache_{i}")[self.rows, :, self.begin: self.end] = v
            return out.logits, idx, out.f_hat
        return (out.logits, idx, out.f_hat, *[t for kv in out.presents for t in kv])


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


class GatheredOps(nn.Module):
    """`ScaleOps` for one graph serving every scale: the scale-dependent values are stacked constants
    gathered by the `scale_index` input; sizes come from the symbolic token count, never from arithmetic."""

    def __init__(self, model: Model):
        super().__init__()
        c = model.config.var
        self.var, self.embedding = model.var, model.vqvae.quantize.embedding
        self.full = c.patch_nums[-1]
        up, down = _kron_stacks(c.patch_nums)
        self.register_buffer("up_kron", up, persistent=False)
        self.register_buffer("down_kron", down, persistent=False)
        begins = torch.tensor([b for b, _ in c.scale_ranges()])
        self.register_buffer("positions", begins[:, None] + torch.arange(self.full ** 2)[None], persistent=False)
        self.register_buffer("cfg_ramp", torch.tensor([cfg_ratio(1.0, si, c.num_scales) for si in range(c.num_scales)]),
                             persistent=False)
        q = model.vqvae.quantize
        phis = q.quant_resi.qresi_ls
        self.register_buffer("phi_of_scale", torch.tensor([q.phi_index(si) for si in range(c.num_scales)]), persistent=False)
        self.phi_ratio = phis[0].ratio
        self.register_buffer("phi_weight", torch.stack([p.weight.detach() for p in phis]), persistent=False)
        self.register_buffer("phi_bias", torch.stack([p.bias.detach() for p in phis]), persistent=False)

    def _pick(self, table: Tensor, scale_index: Tensor) -> Tensor:
        return table.index_select(0, scale_index).squeeze(0)

    def scale_input(self, scale_index: Tensor, cond_BD: Tensor, f_hat: Tensor, n_tokens, guided: bool) -> Tensor:
        down = self._pick(self.down_kron, scale_index)[:, :n_tokens]  # (H², n)
        nxt = (f_hat.flatten(2) @ down).transpose(1, 2)  # (B, n, Cvae)
        pos = self._pick(self.positions, scale_index)[:n_tokens]
        embedded = self.var.word_embed(nxt) + self.var.level_pos().index_select(1, pos)
        if guided:
            embedded = embedded.repeat(2, 1, 1)
        return torch.where((scale_index == 0).view(1, 1, 1), self.var.first_tokens(cond_BD), embedded)

    def ramp(self, scale_index: Tensor) -> Tensor:
        return self.cfg_ramp.index_select(0, scale_index)

    def accumulate(self, scale_index: Tensor, f_hat: Tensor, idx: Tensor) -> Tensor:
        up = self._pick(self.up_kron, scale_index)[: idx.shape[1]]  # (n, H²)
        h = (self.embedding(idx).transpose(1, 2) @ up).unflatten(2, (self.full, self.full))
        k = self._pick(self.phi_of_scale, scale_index).view(1)
        w, b = self.phi_weight.index_select(0, k).squeeze(0), self.phi_bias.index_select(0, k).squeeze(0)
        return f_hat + (h * (1 - self.phi_ratio) + F.conv2d(h, w, b, padding=1) * self.phi_ratio)


class DynamicStep(nn.Module):
    """Any scale in one graph: (labels, f_hat, uniforms, cfg, scale_index, *past) → (logits, idx, next_f_hat, *present).
    `guided=False` (the unguided graph of CFG trimming): the conditional rows only (B, not 2B, in the cache
    too) and no cfg input: (labels, f_hat, uniforms, scale_index, *past)."""

    def __init__(self, model: Model, *, top_k: int, top_p: float, guided: bool = True):
        super().__init__()
        c = model.config.var
        self.var, self.ops = model.var, GatheredOps(model)
        self.depth, self.num_classes = c.depth, c.num_classes
        self.top_k, self.top_p, self.guided = top_k, top_p, guided

    def forward(self, labels: Tensor, f_hat: Tensor, uniforms: Tensor, *rest: Tensor):
        if self.guided:
            cfg, scale_index, past_flat = rest[0], rest[1], rest[2:]
            cond_BD = self.var.class_emb(cfg_labels(labels, self.num_classes))
        else:
            cfg, scale_index, past_flat = 0.0, rest[0], rest[1:]
            cond_BD = self.var.class_emb(labels)
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.depth)]
        out = decode_scale(self.var, self.ops, scale_index, cond_BD, f_hat, uniforms, cfg, past, self.top_k,
                           self.top_p, self.guided)
        return (out.logits, out.idx, out.f_hat, *[t for kv in out.presents for t in kv])


class VQVAEDecoder(nn.Module):
    """f_hat (B, Cvae, H, H) → image (B, 3, S, S) in [-1, 1] (`VQVAE.fhat_to_img`)."""

    def __init__(self, model: Model):
        super().__init__()
        self.vqvae = model.vqvae

    def forward(self, f_hat: Tensor) -> Tensor:
        return self.vqvae.fhat_to_img(f_hat)
