"""Sampling on the host, in numpy: what an artifact whose manifest says `sampling.where == "host"` leaves out
of its graphs (classifier-free guidance, top-k / top-p, the inverse-CDF draw), with the decisions of
`evar.models.sampling` (EVARKit's `Sampler` is the Swift copy).

Precision follows PyTorch's CPU kernels: logits and probabilities are float32, the softmax is formed in
float64 and rounded once, running sums accumulate in float64 and are stored as float32 (torch's CPU
cumsum does the same), thresholds are float32. torch-free: the runtime imports this.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def cfg_ratio(cfg: float, scale_index: int, num_scales: int) -> float:
    """VAR's linear guidance ramp: no guidance at the first scale, full `cfg` at the last."""
    return cfg * scale_index / max(num_scales - 1, 1)


def apply_cfg(cond: np.ndarray, uncond: np.ndarray, t: float) -> np.ndarray:
    """(1 + t)·cond − t·uncond in float32, each product rounded as torch does with a Python scalar."""
    cond, uncond = cond.astype(np.float32), uncond.astype(np.float32)
    return np.float32(1 + t) * cond - np.float32(t) * uncond


def _softmax(x: np.ndarray) -> np.ndarray:
    """float32 probabilities along the last axis; -inf gets exactly 0."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _cumsum(p: np.ndarray) -> np.ndarray:
    return np.cumsum(p.astype(np.float64), axis=-1).astype(np.float32)


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 0.0) -> np.ndarray:
    """-inf where top-k and then top-p exclude a token. (..., V) → (..., V) float32."""
    logits = logits.astype(np.float32, copy=True)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(logits, vocab - top_k, axis=-1)[..., vocab - top_k: vocab - top_k + 1]
        logits[logits < kth] = -np.inf
    if top_p > 0.0:
        order = np.argsort(logits, axis=-1, kind="stable")  # ascending
        ascending = np.take_along_axis(logits, order, axis=-1)
        drop_sorted = _cumsum(_softmax(ascending)) <= np.float32(1.0 - top_p)
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    return logits


def sample_from_uniforms(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: how many cumulative probabilities are <= u·total (clamped to V − 1). int64."""
    cdf = _cumsum(_softmax(logits))
    threshold = uniforms.astype(np.float32)[..., None] * cdf[..., -1:]
    return np.minimum((cdf <= threshold).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)


def sample_scale(raw_logits: np.ndarray, uniforms: np.ndarray, cfg: float, scale_index: int, num_scales: int,
                 top_k: int, top_p: float) -> np.ndarray:
    """One scale's tokens (B, n) from the graph's raw logits (2B, n, V): conditional rows first, then
    unconditional ones (with cfg 0 the graph still ran both; the conditional rows are used alone)."""
    B = uniforms.shape[0]
    raw = np.asarray(raw_logits, dtype=np.float32)
    logits = apply_cfg(raw[:B], raw[B:], cfg_ratio(cfg, scale_index, num_scales)) if cfg != 0 else raw[:B]
    return sample_from_uniforms(filter_logits(logits, top_k, top_p), uniforms)


def guided_logits(raw_logits: np.ndarray, batch: int, cfg: float, scale_index: int, num_scales: int) -> np.ndarray:
    """The logits the tokens are drawn from (after guidance): what an in-graph artifact outputs as `logits`."""
    raw = np.asarray(raw_logits, dtype=np.float32)
    return apply_cfg(raw[:batch], raw[batch:], cfg_ratio(cfg, scale_index, num_scales)) if cfg != 0 else raw[:batch]


def class_onehot(labels: np.ndarray, num_classes: int, dtype=np.float16) -> np.ndarray:
    """(2B, num_classes + 1): rows [0, B) one-hot of the labels, rows [B, 2B) of the unconditional class."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes}), got {labels.tolist()}")
    rows = np.concatenate((labels, np.full_like(labels, num_classes)))
    out = np.zeros((len(rows), num_classes + 1), dtype)
    out[np.arange(len(rows)), rows] = 1
    return out


# ---------------------------------------------------------------- the loop of a host-sampled artifact
StepCall = Callable[[int, dict[str, Any]], dict[str, Any]]


@dataclass
class HostScale:
    idx: np.ndarray  # (B, n) int64
    logits: np.ndarray  # (B, n, V) float32 after guidance: what the tokens were drawn from


class HostSampledLoop:
    """Scale by scale for an artifact whose manifest says `sampling.where == "host"`: the step function of
    scale si turns (class_onehot, f_hat) into raw logits (its KV cache is state the caller owns), the host
    draws the tokens, and the fhat_update function of scale si adds them to f_hat. `step(si, feeds)` and
    `update(si, feeds)` run the named functions (Core ML on macOS, or the PyTorch wrappers in parity) and
    return their outputs by name; feeds are built from the manifest's roles and dtypes (`step_feeds`)."""

    def __init__(self, manifest: dict[str, Any], step: StepCall, update: StepCall):
        from evar.contract import FHAT_GRAPH, STEP_GRAPH

        self.manifest, self.step, self.update = manifest, step, update
        self.steps = {f["scale_index"]: f for f in manifest["graphs"][STEP_GRAPH]["functions"]}
        self.updates = {f["scale_index"]: f for f in manifest["graphs"][FHAT_GRAPH]["functions"]}
        self.var = manifest["model"]["var"]
        self.num_scales = len(manifest["patch_nums"])

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        from evar.contract import NP_DTYPES

        H = self.var["patch_nums"][-1]
        onehot_spec = next(t for t in self.steps[0]["inputs"] if t["role"] == "class_onehot")
        self.labels, self.cfg, self.top_k, self.top_p = np.asarray(labels), float(cfg), top_k, top_p
        self.onehot = class_onehot(self.labels, int(self.var["num_classes"]), NP_DTYPES[onehot_spec["dtype"]])
        self.f_hat = np.zeros((len(labels), self.var["cvae"], H, H), np.float32)

    def scale(self, si: int, uniforms: np.ndarray) -> HostScale:
        from evar.contract import step_feeds

        fn = self.steps[si]
        outs = self.step(si, step_feeds(fn["inputs"], {"class_onehot": self.onehot, "f_hat": self.f_hat}, {}, _no_past))
        raw = np.asarray(outs[_named(fn["outputs"], "raw_logits")], np.float32)
        B = len(self.labels)
        logits = guided_logits(raw, B, self.cfg, si, self.num_scales)
        idx = sample_from_uniforms(filter_logits(logits, self.top_k, self.top_p), uniforms)
        up = self.updates[si]
        outs = self.update(si, step_feeds(up["inputs"], {"f_hat": self.f_hat, "idx": idx}, {}, _no_past))
        self.f_hat = np.asarray(outs[_named(up["outputs"], "f_hat")], np.float32)
        return HostScale(idx, logits)


def _named(tensors: list[dict[str, Any]], role: str) -> str:
    return next(t["name"] for t in tensors if t["role"] == role)


def _no_past(tensor: dict[str, Any]) -> Any:
    raise ValueError(f"a host-sampled step has no cache inputs, got {tensor['name']}")
