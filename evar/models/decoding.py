"""VAR's scale-by-scale decoding, written once: `generate`, the runtime's torch reference and the export
wrappers all step through `decode_scale`.

    decoder = Decoder(var, vqvae, top_k=900, top_p=0.96)
    state = decoder.begin(labels, guidance=1.5)
    for si: idx = decoder.step(state, si, uniforms_si)    # one scale, KV cache and f_hat kept in `state`
    images = vqvae.fhat_to_img(state.f_hat)

One scale (`decode_scale`): this scale's input (the class token at scale 0, else the word embedding of
f_hat area-resized to this scale) → the transformer over this scale's tokens with the cache → head →
classifier-free guidance over the stacked conditional/unconditional rows → top-k/top-p → inverse-CDF
draw from the given uniforms → f_hat += Phi(upsample(embed(tokens))). What depends on the scale (the
resizes, Phi, the guidance ramp) comes from `ScaleOps`: `EagerOps` computes it from the model; the ONNX
graph gathers the same values from constants indexed by a scale input (`evar.export.graphs`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from evar import rng
from evar.errors import EvarError
from evar.models.sampling import apply_cfg, cfg_ratio, sample_tokens
from evar.models.var import KV, VAR
from evar.models.vqvae import resize


# How a scale's tokens are chosen from its guided logits: (logits (B, n, V), draws, top_k, top_p) → (B, n) int64.
# VAR's is the inverse-CDF draw from uniforms (B, n); Distilled Decoding's pairs map per-token noise
# (B, n, Cvae) through a flow instead (evar.dd.flow). The rest of the scale loop is the same for both.
TokenPicker = Callable[[Tensor, Tensor, int, float], Tensor]


def cfg_labels(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) → (2B,): the conditional rows first, then as many rows of the unconditional class."""
    return torch.cat((labels, torch.full_like(labels, num_classes)))


class ScaleOps(Protocol):
    """What one scale needs besides the transformer; `si` is an int (eager, static graphs) or a (1,) tensor."""

    def scale_input(self, si, cond_BD: Tensor, f_hat: Tensor, n_tokens, guided: bool) -> Tensor:
        """(2B or B, n_tokens, C): the class token at scale 0, else word_embed(area(f_hat)) + level/position."""

    def ramp(self, si):
        """The share of the guidance scale applied at `si` (VAR's linear ramp: 0 at the first scale, 1 at the last)."""

    def accumulate(self, si, f_hat: Tensor, idx: Tensor) -> Tensor:
        """f_hat + Phi_si(upsample(embed(idx)))."""


class EagerOps:
    """Scale-dependent pieces computed from the model itself (PyTorch, and static per-scale graphs)."""

    def __init__(self, var: VAR, vqvae: torch.nn.Module):
        self.var, self.quant = var, vqvae.quantize
        self.patch_nums, self.ranges = var.cfg.patch_nums, var.cfg.scale_ranges()

    def scale_input(self, si: int, cond_BD: Tensor, f_hat: Tensor, n_tokens: int, guided: bool) -> Tensor:
        if si == 0:
            return self.var.first_tokens(cond_BD)
        down = resize(f_hat, self.patch_nums[si], "area")  # (B, Cvae, pn, pn)
        x = self.var.embed_scale(down.flatten(2).transpose(1, 2), *self.ranges[si])
        return x.repeat(2, 1, 1) if guided else x

    def ramp(self, si: int) -> float:
        return cfg_ratio(1.0, si, len(self.patch_nums))

    def accumulate(self, si: int, f_hat: Tensor, idx: Tensor) -> Tensor:
        return f_hat + self.quant.scale_residual(si, self.quant.embed_idx(idx, self.patch_nums[si]))


@dataclass
class StepOutput:
    logits: Tensor  # (B, n, V) after guidance: what the tokens were drawn from
    raw_logits: Tensor  # (2B or B, n, V) before guidance
    idx: Tensor  # (B, n) int64 tokens, row-major
    f_hat: Tensor  # (B, Cvae, H, H) after this scale
    presents: list[KV]  # per layer (k, v) with this scale appended


def decode_scale(var: VAR, ops: ScaleOps, si, cond_BD: Tensor, f_hat: Tensor, uniforms: Tensor, guidance,
                 past: list[KV | None] | None, top_k: int, top_p: float, guided: bool = True,
                 pick: TokenPicker = sample_tokens) -> StepOutput:
    """One scale of VAR's decoding (see the module doc). `cond_BD` has 2B rows when `guided`, else B.
    `uniforms` are the draws `pick` consumes (its first two dims are (B, n tokens))."""
    x = ops.scale_input(si, cond_BD, f_hat, uniforms.shape[1], guided)
    raw, presents = var.decode_step(x, cond_BD, past)
    raw = raw.float()  # under autocast the head gives bfloat16; guidance and sampling stay float32
    if guided:
        cond, uncond = raw.unflatten(0, (2, -1)).unbind(0)
        logits = apply_cfg(cond, uncond, guidance * ops.ramp(si))
    else:
        logits = raw
    idx = pick(logits, uniforms, top_k, top_p)
    return StepOutput(logits, raw, idx, ops.accumulate(si, f_hat, idx), presents)


@dataclass
class DecodeState:
    """One batch in flight: its condition rows, cache and running f_hat."""

    cond_BD: Tensor
    guidance: float
    f_hat: Tensor
    past: list[KV] | None = None
    tokens: list[Tensor] = field(default_factory=list)
    raw_logits: list[Tensor] = field(default_factory=list)  # kept only when the decoder keeps them
    cfg_until_scale: int | None = None  # CFG trimming: from this scale on only the conditional rows run
    cached_hidden: Tensor | None = None  # token pruning: the previous scale's update map (evar.models.token_keep)

    @property
    def guided(self) -> bool:
        return self.guidance != 0  # no guidance: the unconditional rows are not run at all

    def guided_at(self, si: int) -> bool:
        return self.guided and (self.cfg_until_scale is None or si < self.cfg_until_scale)

    def drop_unconditional(self) -> None:
        """Keep rows [0, B) of the condition, of every cached key/value and (token pruning) of the update map the
        next pruned scale restores from: the unguided scales continue the conditional rows' own history, exactly
        what those rows saw while guidance ran."""
        B = self.f_hat.shape[0]
        if self.cond_BD.shape[0] == B:
            return
        self.cond_BD = self.cond_BD[:B]
        if self.past is not None:
            self.past = [(k[:B], v[:B]) for k, v in self.past]
        if self.cached_hidden is not None:
            self.cached_hidden = self.cached_hidden[:B]


class Decoder:
    """Eager decoding of one model: `begin` a batch, `step` each scale in order (the loop is the caller's)."""

    def __init__(self, var: VAR, vqvae: torch.nn.Module, *, top_k: int = 0, top_p: float = 0.0,
                 keep_logits: bool = False, pick: TokenPicker = sample_tokens, token_keep: dict[int, int] | None = None):
        self.var, self.vqvae, self.ops = var, vqvae, EagerOps(var, vqvae)
        self.top_k, self.top_p, self.keep_logits, self.pick = top_k, top_p, keep_logits, pick
        # token pruning: keep counts by scale; the scales from the cache scale on run `decode_pruned_scale`
        self.token_keep = token_keep or {}
        if self.token_keep:
            from evar.models.token_keep import KeepOps, cache_scale

            self.cache_si = cache_scale(self.token_keep)
            self.keep_ops = KeepOps(var, self.cache_si).to(next(var.parameters()).device)

    @torch.no_grad()
    def begin(self, labels: Tensor, guidance: float, cfg_until_scale: int | None = None) -> DecodeState:
        c = self.var.cfg
        check_cfg_until_scale(cfg_until_scale, c.num_scales)
        rows = cfg_labels(labels, c.num_classes) if guidance != 0 else labels
        cond_BD = self.var.class_emb(rows)
        H = c.patch_nums[-1]
        return DecodeState(cond_BD, guidance, cond_BD.new_zeros(len(labels), c.cvae, H, H),
                           cfg_until_scale=cfg_until_scale)

    @torch.no_grad()
    def take_over(self, state: DecodeState, labels: Tensor) -> None:
        """Scale split: continue a batch another model (sharing this one's tokenizer) decoded so far. This model's
        condition rows replace the other's, and its cache is prefilled from the tokens drawn so far in one pass."""
        rows = cfg_labels(labels, self.var.cfg.num_classes) if state.cond_BD.shape[0] != len(labels) else labels
        state.cond_BD = self.var.class_emb(rows)
        state.past = prefill(self.var, self.vqvae, state.cond_BD, state.tokens)

    @torch.no_grad()
    def step(self, state: DecodeState, si: int, uniforms: Tensor) -> Tensor:
        guided = state.guided_at(si)
        if state.guided and not guided:
            state.drop_unconditional()
        if self.token_keep and si >= self.cache_si:
            out = self._pruned(state, si, uniforms.to(state.f_hat.device), guided)
        else:
            out = decode_scale(self.var, self.ops, si, state.cond_BD, state.f_hat, uniforms.to(state.f_hat.device),
                               state.guidance, state.past, self.top_k, self.top_p, guided, self.pick)
        state.f_hat, state.past = out.f_hat, out.presents
        state.tokens.append(out.idx)
        if self.keep_logits:
            state.raw_logits.append(out.raw_logits)
        return out.idx


    def _pruned(self, state: DecodeState, si: int, uniforms: Tensor, guided: bool) -> StepOutput:
        from evar.models.token_keep import decode_pruned_scale

        n = uniforms.shape[1]
        cached = state.cached_hidden
        if si == self.cache_si:  # run in full; from its hidden map on, pruned tokens are restored
            prev = self.var.cfg.patch_nums[si - 1] ** 2
            cached = state.f_hat.new_zeros(state.cond_BD.shape[0], prev, self.var.cfg.embed_dim)
        out, full = decode_pruned_scale(self.var, self.ops, self.keep_ops, si, torch.tensor([si], device=uniforms.device),
                                        state.cond_BD, state.f_hat, uniforms, state.guidance, state.past or
                                        [None] * len(self.var.blocks), self.top_k, self.top_p,
                                        self.token_keep.get(si, n), cached, guided, self.pick)
        state.cached_hidden = full
        return out


@dataclass
class Generation:
    images: Tensor | None  # (B, 3, H, W) in [-1, 1]; None when generated with decode=False
    tokens: list[Tensor]  # per scale (B, pn*pn)
    scale_logits: list[Tensor]  # per scale raw logits before guidance: (2B or B, pn*pn, V)


def check_cfg_until_scale(n: int | None, num_scales: int) -> None:
    if n is not None and not 1 <= n <= num_scales - 1:
        raise EvarError(f"--cfg-until-scale must be in [1, {num_scales - 1}] for a model with {num_scales} scales "
                        f"(guidance runs on the scales before it), got {n}")


def check_split_scale(n: int | None, num_scales: int) -> None:
    if n is not None and not 1 <= n <= num_scales - 1:
        raise EvarError(f"--split-scale must be in [1, {num_scales - 1}] for a model with {num_scales} scales "
                        f"(the early model generates the scales before it), got {n}")


def scale_inputs(quant: torch.nn.Module, tokens: list[Tensor]) -> Tensor:
    """The teacher-forcing inputs of scales 1 … len(tokens) − 1 (at least two scales): the area-downsampled
    running f_hat after each earlier scale → (B, T − 1, Cvae), T = the tokens of those scales
    (`VQVAE.idx_to_var_input` for a prefix; no zeros tensor of a fixed batch, so a graph keeps its batch symbolic)."""
    f_hat, inputs = None, []
    for si in range(len(tokens) - 1):
        r = quant.scale_residual(si, quant.embed_idx(tokens[si], quant.patch_nums[si]))
        f_hat = r if f_hat is None else f_hat + r
        inputs.append(resize(f_hat, quant.patch_nums[si + 1], "area").flatten(2).transpose(1, 2))
    return torch.cat(inputs, 1)


def prefill(var: VAR, vqvae: torch.nn.Module, cond_BD: Tensor, tokens: list[Tensor]) -> list[KV]:
    """The KV cache `var` builds decoding `tokens` (scales 0 … n − 1) itself, computed in one block-causal pass
    over their teacher-forcing inputs (no head, no sampling). `cond_BD` has 2B rows (conditional, then
    unconditional: the same tokens feed both, as in guided decoding) or B."""
    T = sum(t.shape[1] for t in tokens)
    x = var.first_tokens(cond_BD)
    if len(tokens) > 1:
        rest = var.embed_scale(scale_inputs(vqvae.quantize, tokens), 1, T)
        if cond_BD.shape[0] != rest.shape[0]:
            rest = rest.repeat(2, 1, 1)
        x = torch.cat((x, rest), 1)
    cond = var.block_condition(cond_BD)
    bias = var.attn_bias_for_masking[:, :, :T, :T]
    presents = []
    for block in var.blocks:
        x, kv = block(x, cond, bias)
        presents.append(kv)
    return presents


@torch.no_grad()
def generate(var: VAR, vqvae: torch.nn.Module, labels: Tensor, *, guidance: float = 1.5, top_k: int = 0,
             top_p: float = 0.0, seed: int = 0, first_sample: int = 0, keep_logits: bool = False,
             decode: bool = True, cfg_until_scale: int | None = None, early: VAR | None = None,
             split_scale: int | None = None, token_keep: dict[int, int] | None = None) -> Generation:
    """VAR's scale-by-scale generation with a KV cache and classifier-free guidance.

    Uniforms come from `evar.rng` (one stream per scale), so exported graphs and the Swift app
    reproduce these tokens from the same seed; `first_sample` numbers this batch's samples within a
    larger run, so chunked generation equals one big batch. With guidance 0 the unconditional half is skipped.
    `decode=False` returns tokens only: the VQVAE decode of a 256 px image costs about as much as generating
    its tokens with d16, and calibration and distillation data never look at the pixels.
    `cfg_until_scale` N (CFG trimming): scales >= N run the conditional rows only (guidance off there).
    `early` with `split_scale` N (scale split): the `early` model (sharing `vqvae`) generates scales < N, then
    `var` prefills its cache from those tokens in one pass (`prefill`) and generates scales >= N.
    `token_keep` {scale: K} (late-scale token pruning, `evar.models.token_keep`): `var` runs its transformer on K
    tokens of those scales and restores the rest from the previous scale's update map.
    """
    if (early is None) != (split_scale is None):
        raise EvarError("a scale split needs both the early model and --split-scale")
    check_split_scale(split_scale, var.cfg.num_scales)
    if token_keep and split_scale is not None and min(token_keep) <= split_scale:
        # the compressed model's restoration cache is its own scale before the first pruned one
        raise EvarError(f"--token-keep scale {min(token_keep)} is not after --split-scale {split_scale}: with a scale "
                        "split, token pruning must start after the split")
    decoder = Decoder(var, vqvae, top_k=top_k, top_p=top_p, keep_logits=keep_logits, token_keep=token_keep)
    first = decoder if early is None else Decoder(early, vqvae, top_k=top_k, top_p=top_p, keep_logits=keep_logits)
    state = first.begin(labels, guidance, cfg_until_scale)
    B = len(labels)
    for si, pn in enumerate(var.cfg.patch_nums):
        if si == split_scale:
            decoder.take_over(state, labels)
        (first if early is not None and si < split_scale else decoder).step(
            state, si, torch.from_numpy(rng.scale_uniforms(seed, si, B, pn * pn, first_sample)))
    images = vqvae.fhat_to_img(state.f_hat) if decode else None
    return Generation(images, state.tokens, state.raw_logits)
