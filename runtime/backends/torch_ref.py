"""The PyTorch eager reference: the `evar sample` path (`evar.models.var.generate`) one scale at a time.

Not a graph runner: it loads the model the artifact was exported from (`provenance.model_ref`, or the
model you pass) and runs it eagerly with the default attention, so benchmarks compare the exported
pipeline with what a PyTorch user runs. torch is imported here only; nothing else in `runtime` imports
this module unless this backend is chosen.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evar.errors import EvarError
from evar.models.sampling import apply_cfg, cfg_ratio, sample_tokens
from runtime.backends.base import BackendUnavailable
from runtime.manifest import Artifact

# what must agree between the artifact and the model it is compared with
_SHAPE_KEYS = ("depth", "embed_dim", "num_heads", "ffn_dims", "head_dim", "vocab_size", "cvae", "num_classes", "patch_nums")


class TorchBackend:
    name = "torch"
    compute_units = "cpuOnly"

    def __init__(self, artifact: Artifact, threads: int | None = None, model: Any = None):
        from evar import zoo

        self.artifact = artifact
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        if model is None or isinstance(model, str):
            ref = model or artifact.model_ref
            try:
                model = zoo.load(ref)
            except EvarError as err:
                raise BackendUnavailable(f"the torch reference needs the model the artifact was made from "
                                         f"('{ref}'): {err}; pass --model") from None
        got, want = model.config.to_dict()["var"], artifact.var
        diff = [k for k in _SHAPE_KEYS if list(np.atleast_1d(got[k])) != list(np.atleast_1d(want[k]))]
        if diff:
            raise BackendUnavailable(f"the model for the torch reference does not match artifact {artifact.name}: "
                                     f"{', '.join(diff)} differ")
        self.model = model.eval()

    @torch.no_grad()
    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        var = self.model.var
        c = var.cfg
        self.B, self.cfg, self.top_k, self.top_p = len(labels), cfg, top_k, top_p
        self.guided = cfg != 0  # as generate: no unconditional half without guidance
        lab = torch.from_numpy(labels.astype(np.int64))
        batch_labels = torch.cat((lab, torch.full_like(lab, c.num_classes))) if self.guided else lab
        self.cond_BD = var.class_emb(batch_labels)
        self.x = var.first_tokens(self.cond_BD)
        self.past = None
        self.f_hat = self.cond_BD.new_zeros(self.B, c.cvae, c.patch_nums[-1], c.patch_nums[-1])

    @torch.no_grad()
    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        var, quant = self.model.var, self.model.vqvae.quantize
        c = var.cfg
        logits, self.past = var.decode_step(self.x, self.cond_BD, self.past)
        if self.guided:
            logits = apply_cfg(logits[: self.B], logits[self.B:], cfg_ratio(self.cfg, si, c.num_scales))
        idx = sample_tokens(logits, torch.from_numpy(uniforms), self.top_k, self.top_p)
        h = quant.embed_idx(idx, c.patch_nums[si])
        self.f_hat, nxt = quant.next_input(si, self.f_hat, h)
        if si + 1 < c.num_scales:
            self.x = var.embed_scale(nxt.flatten(2).transpose(1, 2), *c.scale_ranges()[si + 1])
            if self.guided:
                self.x = self.x.repeat(2, 1, 1)
        return idx.numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self) -> np.ndarray:
        return self.model.vqvae.fhat_to_img(self.f_hat).float().numpy()

    def close(self) -> None:
        self.model = None
