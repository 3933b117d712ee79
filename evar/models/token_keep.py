"""Late-scale token pruning (the FastVAR idea, arXiv 2503.23367): `--token-keep 4:0.6,5:0.4`.

At a pruned scale si with keep count K = ceil(ratio · pn²) (static per scale, so graphs keep static shapes):
  1. score every token of the scale's input map x (the area-downsampled f_hat, what VAR feeds this scale) by its
     high-frequency energy ‖x − U·D·x‖², U·D = down to the previous scale's size and bicubic back up: the tokens
     that differ most from the previous scale's prediction upsampled;
  2. run the transformer on the K highest-scoring tokens only (row-major order kept; the same positions for the
     conditional and unconditional rows), attending to the cache as usual; their K keys/values are cached;
  3. every other token is restored from the cache (FastVAR's idea): it keeps its own input embedding (this
     scale's level and position) and takes the blocks' update (final hidden − input) from the previous scale's
     update map, bicubic-upsampled (the scale before the first pruned one, the *cache scale*, runs in full; each
     later scale's map holds its kept tokens' updates and the restored ones). Borrowing the whole hidden state
     instead carried the previous scale's level into the head: on digits the restored tokens' KL to the dense
     model was a third higher;
  4. the head, guidance and the inverse-CDF draw then run on all pn² tokens as usual, so every token is a real
     token drawn with its own uniform, and f_hat accumulates them exactly as unpruned decoding does.
The cost saved is the transformer blocks on pn² − K tokens; the head (one matmul) still runs on every token.
Every scale-dependent operator is a matrix gathered by scale index (`KeepOps`), the same code in PyTorch and in
the exported graph; a keep ratio of 1 gives the unpruned tokens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from evar.errors import EvarError
from evar.models.sampling import apply_cfg
from evar.models.var import KV, VAR
from evar.models.vqvae import resize_matrix


def parse_token_keep(text: str | None, patch_nums: tuple[int, ...]) -> dict[int, float]:
    """'4:0.6,5:0.4' → {4: 0.6, 5: 0.4}; scale indices from 2 (the scale before the first pruned one is run in
    full to fill the restoration cache, and scale 0 is the class token)."""
    if text is None or not text.strip():
        return {}
    S = len(patch_nums)
    out: dict[int, float] = {}
    for item in text.split(","):
        si_text, sep, ratio_text = item.strip().partition(":")
        try:
            si, ratio = int(si_text), float(ratio_text)
        except ValueError:
            raise EvarError(f"--token-keep takes SCALE:RATIO pairs such as 4:0.6,5:0.4, got '{item.strip()}'") from None
        if not sep or not 2 <= si <= S - 1:
            raise EvarError(f"--token-keep scale {si_text.strip()} is not a scale index in [2, {S - 1}] of this "
                            f"{S}-scale model (scale index, not patch size: 0 is the 1×1 scale)")
        if not 0 < ratio <= 1:
            raise EvarError(f"--token-keep ratio of scale {si} must be in (0, 1], got {ratio_text.strip()}")
        if si in out:
            raise EvarError(f"--token-keep names scale {si} twice")
        out[si] = ratio
    return out


def keep_counts(ratios: dict[int, float], patch_nums: tuple[int, ...]) -> dict[int, int]:
    """Static keep counts: K = ceil(ratio · pn²) (at least 1)."""
    return {si: max(1, math.ceil(r * patch_nums[si] ** 2 - 1e-9)) for si, r in sorted(ratios.items())}


def cache_scale(counts: dict[int, int]) -> int:
    return min(counts) - 1


class KeepOps(nn.Module):
    """The scale-dependent matrices of a pruned scale, stacked over scales (zero-padded to H²) and picked by index:
    `down` f_hat → this scale's input map, `lowpass` U·D (previous size and back), `restore` the previous scale's
    map → this scale (bicubic). Indexed by a (1,) int64 tensor in PyTorch and in the graph alike."""

    def __init__(self, var: VAR, cache_si: int):
        super().__init__()
        pns = var.cfg.patch_nums
        H = pns[-1]
        S = len(pns)
        down = torch.zeros(S, H * H, H * H, dtype=torch.float64)
        low = torch.zeros_like(down)
        restore = torch.zeros_like(down)
        for si, pn in enumerate(pns):
            n = pn * pn
            d = torch.eye(H, dtype=torch.float64) if pn == H else resize_matrix(H, pn, "area").double()
            down[si, :, :n] = torch.kron(d, d).T  # (H², n)
            if si >= 1:
                dp = resize_matrix(pn, pns[si - 1], "area").double()  # (pn_prev, pn)
                up = resize_matrix(pns[si - 1], pn, "bicubic").double()  # (pn, pn_prev)
                low[si, :n, :n] = torch.kron(up @ dp, up @ dp)  # (n, n)
            if si > cache_si:
                u = resize_matrix(pns[si - 1], pn, "bicubic").double()
                restore[si, :n, : pns[si - 1] ** 2] = torch.kron(u, u)  # (n, n_prev)
        self.register_buffer("down", down.float(), persistent=False)
        self.register_buffer("lowpass", low.float(), persistent=False)
        self.register_buffer("restore", restore.float(), persistent=False)
        begins = torch.tensor([b for b, _ in var.cfg.scale_ranges()])
        self.register_buffer("positions", begins[:, None] + torch.arange(H * H)[None], persistent=False)

    def pick(self, table: Tensor, scale_index: Tensor) -> Tensor:
        return table.index_select(0, scale_index).squeeze(0)


def select_tokens(ops: KeepOps, scale_index: Tensor, f_hat: Tensor, n_tokens, keep) -> tuple[Tensor, Tensor]:
    """(this scale's input map (B, n, Cvae), the kept token indices (B, K) in row-major order)."""
    x_in = (f_hat.flatten(2) @ ops.pick(ops.down, scale_index)[:, :n_tokens]).transpose(1, 2)
    low = ops.pick(ops.lowpass, scale_index)[:n_tokens, :n_tokens] @ x_in
    score = (x_in - low).square().sum(-1)  # (B, n): high-frequency energy
    kept = torch.topk(score, keep, dim=1).indices
    return x_in, kept.sort(dim=1).values


def pruned_step(var: VAR, ops: KeepOps, scale_index: Tensor, cond_BD: Tensor, f_hat: Tensor, n_tokens, keep,
                cached_update: Tensor, past: list[KV | None], guided: bool, ramp
                ) -> tuple[Tensor, Tensor, Tensor, list[KV]]:
    """One pruned scale up to the logits: → (guided logits (B, n, V), raw logits (R, n, V), this scale's update map
    (R, n, C), presents). R = 2B rows when guided. A token's final hidden state is its input embedding plus the
    blocks' update; a pruned token keeps its own input embedding (this scale's level and position) and borrows the
    update from `cached_update` (R, n_prev, C), the previous scale's update map upsampled (zeros at the cache scale,
    where every token is kept). `ramp` is the guidance weight of this scale."""
    x_in, kept = select_tokens(ops, scale_index, f_hat, n_tokens, keep)
    C = var.cfg.embed_dim
    pos = ops.pick(ops.positions, scale_index)[:n_tokens]
    x_all = var.word_embed(x_in) + var.level_pos()[0].index_select(0, pos)  # (B, n, C): every token's input
    x = torch.gather(x_all, 1, kept.unsqueeze(-1).expand(-1, -1, C))
    rows = kept
    if guided:
        x, rows, x_all = x.repeat(2, 1, 1), kept.repeat(2, 1), x_all.repeat(2, 1, 1)
    cond = var.block_condition(cond_BD)
    presents = []
    for i, block in enumerate(var.blocks):
        x, kv = block(x, cond, None, past[i])
        presents.append(kv)
    n_prev = cached_update.shape[1]
    base = x_all + ops.pick(ops.restore, scale_index)[:n_tokens, :n_prev] @ cached_update  # (R, n, C)
    full = base.scatter(1, rows.unsqueeze(-1).expand(-1, -1, C), x.to(base.dtype))
    raw = var.logits(full, cond_BD).float()
    update = full - x_all
    if guided:
        cond_l, uncond_l = raw.unflatten(0, (2, -1)).unbind(0)
        return apply_cfg(cond_l, uncond_l, ramp), raw, update, presents
    return raw, raw, update, presents


def decode_pruned_scale(var: VAR, ops, keep_ops: KeepOps, si, scale_index: Tensor, cond_BD: Tensor, f_hat: Tensor,
                        uniforms: Tensor, guidance, past: list[KV | None], top_k: int, top_p: float, keep,
                        cached_hidden: Tensor, guided: bool = True, pick=None):
    """`evar.models.decoding.decode_scale` for a scale run through `pruned_step` (`ops` gives the guidance ramp and
    the f_hat update, `si` indexes it) → (StepOutput, this scale's update map (R, n, C))."""
    from evar.models.decoding import StepOutput
    from evar.models.sampling import sample_tokens

    logits, raw, full, presents = pruned_step(var, keep_ops, scale_index, cond_BD, f_hat, uniforms.shape[1], keep,
                                              cached_hidden, past, guided, guidance * ops.ramp(si))
    idx = (pick or sample_tokens)(logits, uniforms, top_k, top_p)
    return StepOutput(logits, raw, idx, ops.accumulate(si, f_hat, idx), presents), full
