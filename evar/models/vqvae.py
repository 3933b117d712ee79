"""VAR's multi-scale residual VQVAE (the tokenizer of FoundationVision/VAR).

Module names equal the keys of the official `vae_ch160v4096z32.pth`, so the checkpoint loads with
`strict=True` and no rename table. The encoder/decoder are the taming-style conv nets VAR uses; the
quantizer turns a feature map into `len(v_patch_nums)` token maps of growing size, each coding the
residual the coarser scales left behind.

VAR resizes with bicubic (token map -> full size) and area (full size -> token map) interpolation.
Here both are separable matrix products (`resize`) built from `F.interpolate` itself, so an exported
graph needs nothing but matmuls to reproduce them exactly.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evar.config import VQVAEConfig

# ----------------------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=None)
def _cached_resize_matrix(src: int, dst: int, mode: str) -> Tensor:
    """Read-only (dst, src) float32 matrix; shared between callers, never mutate it."""
    if mode not in ("bicubic", "area"):
        raise ValueError(f"resize mode must be 'bicubic' or 'area', got {mode!r}")
    # The one-hot rows of an identity, resized along H with W fixed at 1, give one column each of the
    # 1-D operator; a width of 1 -> 1 is the identity for both modes, so this is exactly F.interpolate's
    # 1-D factor. float64 so the only rounding left is the final cast.
    eye = torch.eye(src, dtype=torch.float64, device="cpu").view(src, 1, src, 1)
    kw = {"align_corners": False} if mode == "bicubic" else {}
    out = F.interpolate(eye, size=(dst, 1), mode=mode, **kw)  # (src, 1, dst, 1)
    return out[:, 0, :, 0].T.contiguous().float()  # (dst, src)


def resize_matrix(src: int, dst: int, mode: str) -> Tensor:
    """(dst, src) float32 matrix M with `M @ v` == 1-D `F.interpolate(v, dst, mode)` (bicubic: align_corners=False)."""
    return _cached_resize_matrix(src, dst, mode).clone()


def _constant_resize_matrix(src: int, dst: int, mode: str) -> Tensor:
    return _cached_resize_matrix(src, dst, mode)


# Strict torch.export (dynamo) sees through lru_cache and would trace the eye/interpolate that build the
# matrix. This flag is what `torch.compiler.assume_constant_result` sets; setting it directly keeps the
# matrix a graph constant without importing torch._dynamo (~2.5 s) on every `import evar`.
# test_export_graph_has_no_interpolation[strict] catches a torch release that renames it.
_constant_resize_matrix._dynamo_marked_constant = True  # type: ignore[attr-defined]


def warm_resize_cache(patch_nums: tuple[int, ...]) -> None:
    """Build every matrix VAR's quantizer uses, so tracing (jit.trace, non-strict export) only sees constants."""
    full = patch_nums[-1]
    for pn in patch_nums[:-1]:
        _cached_resize_matrix(pn, full, "bicubic")
        _cached_resize_matrix(full, pn, "area")


def resize(x_BCHW: Tensor, size: int, mode: str) -> Tensor:
    """`F.interpolate(x, size=(size, size), mode)` for square maps as `M @ x @ M.T` (identity if same size)."""
    src = int(x_BCHW.shape[-1])  # python int: a static shape, and a hashable cache key while tracing
    if src == size:
        return x_BCHW
    m = _constant_resize_matrix(src, size, mode)  # (size, src)
    if m.device != x_BCHW.device or m.dtype != x_BCHW.dtype:
        m = m.to(device=x_BCHW.device, dtype=x_BCHW.dtype)
    return m @ x_BCHW @ m.transpose(0, 1)  # (B, C, size, size)


# ------------------------------------------------------------------------------------ conv blocks


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, inner: int | None = None,
                 shortcut: bool | None = None):
        super().__init__()
        inner = out_ch if inner is None else inner  # a pruned decoder's blocks are narrower inside
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inner, 3, padding=1)
        self.norm2 = group_norm(inner)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(inner, out_ch, 3, padding=1)
        # Identity has no parameters, so equal widths add no `nin_shortcut` key (as in the checkpoint). A pruned
        # decoder says where its parent had one (`shortcut`): its widths may have become equal there.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch if shortcut is None else shortcut) \
            else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map. `inner` is the q/k/v width, which
    stays the architecture's when pruning narrows the feature map around it."""

    def __init__(self, channels: int, inner: int | None = None):
        super().__init__()
        self.inner = channels if inner is None else inner
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * self.inner, 1)
        self.proj_out = nn.Conv2d(self.inner, channels, 1)
        self.scale = self.inner ** -0.5

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.inner, H * W).unbind(1)  # each (B, inner, HW)
        attn = (q.transpose(1, 2) @ k * self.scale).softmax(dim=-1)  # (B, HW_q, HW_k)
        h = (v @ attn.transpose(1, 2)).reshape(B, self.inner, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: taming's even-size halving


class Upsample(nn.Module):
    def __init__(self, channels: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels if out_ch is None else out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: `block.*`, `attn.*`, optional `downsample`/`upsample`."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, dropout: float,
                 inner: tuple[int, ...] | None = None, first_shortcut: bool | None = None,
                 attn_inner: int | None = None):
        super().__init__()
        inner = inner or (out_ch,) * n_blocks
        self.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout, inner[j],
                                               first_shortcut if j == 0 else None) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, attn_inner) for _ in range(n_blocks if attn else 0))

    def run_blocks(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Mid(nn.Module):
    def __init__(self, channels: int, using_mid_sa: bool, dropout: float, inner: tuple[int, ...] | None = None,
                 attn_inner: int | None = None):
        super().__init__()
        inner = inner or (channels, channels)
        self.block_1 = ResnetBlock(channels, channels, dropout, inner[0])
        self.attn_1 = AttnBlock(channels, attn_inner) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, inner[1])

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            level = Level(in_ch, out_ch, cfg.num_res_blocks, cfg.using_sa and i == last, cfg.dropout)
            if i != last:
                level.downsample = Downsample(out_ch)
            self.down.append(level)
            in_ch = out_ch
        self.mid = Mid(in_ch, cfg.using_mid_sa, cfg.dropout)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z, H/ds, W/ds)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]  # the architecture's; a pruned decoder's are in `plan`
        plan = cfg.decoder_plan()
        last = len(widths) - 1
        in_ch, arch_in = plan.levels[last].width, widths[last]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = Mid(in_ch, cfg.using_mid_sa, cfg.dropout, plan.mid, widths[last])
        # Built lowest resolution first (that is the data flow) but stored so that up.i has width
        # ch*ch_mult[i], matching the checkpoint's `decoder.up.{i}` numbering.
        levels = []
        for i in reversed(range(len(widths))):
            lv = plan.levels[i]
            level = Level(in_ch, lv.width, cfg.num_res_blocks + 1, cfg.using_sa and i == last, cfg.dropout,
                          lv.blocks, arch_in != widths[i], widths[i])
            if i != 0:
                level.upsample = Upsample(lv.width, lv.upsample)
            levels.insert(0, level)
            in_ch, arch_in = (lv.upsample if i != 0 else lv.width), widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for i in reversed(range(len(self.up))):
            h = self.up[i].run_blocks(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# -------------------------------------------------------------------------------------- quantizer


class Phi(nn.Conv2d):
    """VAR's residual refiner after upsampling: h*(1-r) + conv3x3(h)*r."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiStack(nn.Module):
    """Holds the K shared Phis under the checkpoint's `quant_resi.qresi_ls.{k}` names."""

    def __init__(self, channels: int, ratio: float, k: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(k))


def phi_schedule(num_scales: int, k: int) -> tuple[int, ...]:
    """Phi index of each scale: the tick nearest to si/(SN-1).

    The ticks are official VAR's: linspace(1/(3K), 1-1/(3K), K) for K == 4, linspace(1/(2K), 1-1/(2K), K)
    otherwise (numpy, so ties break as upstream's np.argmin does).
    """
    if num_scales == 1:
        return (0,)
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


class MultiScaleQuantizer(nn.Module):
    ema_decay = 0.97  # of the per-scale code-hit counts in `ema_vocab_hit_SV` (training: finds dead codes)

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(cfg.v_patch_nums)
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.quant_resi = PhiStack(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)
        self._phi_idx = phi_schedule(len(self.patch_nums), cfg.share_quant_resi)
        warm_resize_cache(self.patch_nums)

    # ---- inference building blocks (pure functions of indices; export friendly)

    def phi_index(self, si: int) -> int:
        return self._phi_idx[si]

    def phi(self, si: int, h: Tensor) -> Tensor:
        return self.quant_resi.qresi_ls[self.phi_index(si)](h)

    def embed_idx(self, idx_Bl: Tensor, pn: int) -> Tensor:
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)  # (B, Cvae, pn, pn), row-major

    def scale_residual(self, si: int, h_BChw: Tensor) -> Tensor:
        """Phi_si(h bicubic-upsampled to the full map): scale si's contribution to f_hat."""
        if si != len(self.patch_nums) - 1:
            h_BChw = resize(h_BChw, self.patch_nums[-1], "bicubic")  # (B, Cvae, H, W)
        return self.phi(si, h_BChw)

    def next_input(self, si: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One VAR sampling step: (new f_hat, next scale's input map (B, Cvae, pn_next, pn_next)).

        At the last scale the "next input" is f_hat itself.
        """
        f_hat = f_hat + self.scale_residual(si, h_BChw)
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        return f_hat, resize(f_hat, self.patch_nums[si + 1], "area")

    # ---- encoding: residual quantisation

    def nearest_code(self, rest_BChw: Tensor) -> Tensor:
        """Row-major (B, h*w) index of the L2-nearest codebook vector at each position."""
        B, C = rest_BChw.shape[:2]
        rest_NC = rest_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        codes_VC = self.embedding.weight.detach()
        # Full |r|^2 + |e|^2 - 2 r.e (as upstream) so near-ties round the same way.
        dist_NV = rest_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1) - 2 * rest_NC @ codes_VC.T
        return dist_NV.argmin(dim=1).view(B, -1)

    def residual_quantize(self, f_BChw: Tensor, residuals: list[Tensor] | None = None
                          ) -> tuple[Tensor, list[Tensor], Tensor]:
        """Residual quantisation of f: (f_hat, idx per scale, vq_loss), f_hat carrying codebook/Phi grads.

        `residuals`, if given, receives each scale's quantised residual as (pn*pn*B, Cvae) rows (for
        dead-code restarts in training)."""
        with torch.autocast(f_BChw.device.type, enabled=False):  # as VAR: code choice and loss in fp32
            return self._residual_quantize(f_BChw.float(), residuals)

    def _residual_quantize(self, f_BChw: Tensor, residuals: list[Tensor] | None = None
                           ) -> tuple[Tensor, list[Tensor], Tensor]:
        f_nograd = f_BChw.detach()
        f_rest = f_nograd
        f_hat = torch.zeros_like(f_nograd)
        idx_list, loss = [], f_nograd.new_zeros(())
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            rest = f_rest if si == last else resize(f_rest, pn, "area")  # (B, Cvae, pn, pn)
            idx = self.nearest_code(rest)  # (B, pn*pn)
            if residuals is not None:
                residuals.append(rest.permute(0, 2, 3, 1).reshape(-1, rest.shape[1]))
            h = self.scale_residual(si, self.embed_idx(idx, pn))  # (B, Cvae, H, W)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            # As VAR: the commitment term pulls the encoder toward the running f_hat; the codebook term
            # pulls codes (and Phi) toward the encoder output.
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_nograd)
            idx_list.append(idx)
        return f_hat, idx_list, loss / len(self.patch_nums)

    @torch.no_grad()
    def _record_hits(self, idx_list: list[Tensor]) -> Tensor:
        """Update the per-scale hit EMA (training only) and return the % of the vocabulary used in the batch."""
        V = self.embedding.num_embeddings
        hit_SV = torch.stack([idx.flatten().bincount(minlength=V).float() for idx in idx_list])
        if self.training:
            fresh = self.ema_vocab_hit_SV.sum(dim=1, keepdim=True) == 0  # first batch: copy, don't decay zeros
            ema = self.ema_vocab_hit_SV * self.ema_decay + hit_SV * (1 - self.ema_decay)
            self.ema_vocab_hit_SV.copy_(torch.where(fresh, hit_SV, ema))
        return (hit_SV.sum(0) > 0).float().mean() * 100

    def forward(self, f_BChw: Tensor, residuals: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(straight-through f_hat, vq_loss, codebook usage % in this batch)."""
        f_hat, idx_list, loss = self.residual_quantize(f_BChw, residuals)
        usage = self._record_hits(idx_list)
        # Straight-through: decoder sees f_hat's values, gradients flow to the encoder as if it saw f.
        f_hat = (f_hat - f_BChw).detach() + f_BChw
        return f_hat, loss, usage


# ------------------------------------------------------------------------------------------ VQVAE


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    def encode_features(self, img_B3HW: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(img_B3HW))  # (B, Cvae, h, w)

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: Tensor) -> list[Tensor]:
        _, idx_list, _ = self.quantize.residual_quantize(self.encode_features(img_B3HW))
        return idx_list  # [(B, pn*pn) int64 per scale]

    def idx_to_var_input(self, idx_list: list[Tensor]) -> Tensor:
        """VAR teacher-forcing input: the area-downsampled running f_hat of every scale but the first."""
        q, pns = self.quantize, self.quantize.patch_nums
        f_hat = self._zero_fhat(idx_list[0])
        inputs = []
        for si in range(len(pns) - 1):
            f_hat, nxt = q.next_input(si, f_hat, q.embed_idx(idx_list[si], pns[si]))  # nxt (B, Cvae, pn', pn')
            inputs.append(nxt.flatten(2).transpose(1, 2))  # (B, pn'^2, Cvae)
        return torch.cat(inputs, dim=1)  # (B, L - 1, Cvae)

    def idx_to_fhat(self, idx_list: list[Tensor]) -> Tensor:
        q = self.quantize
        f_hat = self._zero_fhat(idx_list[0])
        for si, pn in enumerate(q.patch_nums):
            f_hat = f_hat + q.scale_residual(si, q.embed_idx(idx_list[si], pn))
        return f_hat  # (B, Cvae, H, W)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)  # (B, 3, H*ds, W*ds)

    def idx_to_img(self, idx_list: list[Tensor]) -> Tensor:
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    def forward(self, img_B3HW: Tensor, residuals: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction, vq_loss, codebook usage %). Unclamped, as in VAR's training.

        `residuals` collects the vectors each scale quantised (see `MultiScaleQuantizer.residual_quantize`)."""
        f_hat, vq_loss, usage = self.quantize(self.encode_features(img_B3HW), residuals)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, usage

    def _zero_fhat(self, like_idx: Tensor) -> Tensor:
        H = self.quantize.patch_nums[-1]
        w = self.quantize.embedding.weight
        return w.new_zeros(like_idx.shape[0], self.cfg.z_channels, H, H)
