"""The PyTorch eager reference: the `evar sample` path (`evar.models.decoding.Decoder`) one scale at a time.

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
from evar.models.decoding import Decoder
from evar.runtime.backends.base import BackendUnavailable
from evar.contract import Artifact

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
        # scale split: the early model (its reference in the manifest) decodes the scales before split_scale
        self.split, self.early = artifact.split_scale, None
        if self.split is not None:
            try:
                self.early = zoo.load(artifact.early_model_ref).eval()
            except EvarError as err:
                raise BackendUnavailable(f"the torch reference of a scale split needs its early model "
                                         f"('{artifact.early_model_ref}'): {err}") from None

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        self.decoder = Decoder(self.model.var, self.model.vqvae, top_k=top_k, top_p=top_p,
                               token_keep=self.artifact.token_keep)
        self.first = self.decoder if self.early is None else Decoder(self.early.var, self.model.vqvae, top_k=top_k,
                                                                     top_p=top_p)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.state = self.first.begin(self.labels, cfg, self.artifact.cfg_until_scale)

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        if si == self.split:
            self.decoder.take_over(self.state, self.labels)
        decoder = self.first if self.split is not None and si < self.split else self.decoder
        return decoder.step(self.state, si, torch.from_numpy(uniforms)).numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self) -> np.ndarray:
        return self.model.vqvae.fhat_to_img(self.state.f_hat).float().numpy()

    def close(self) -> None:
        self.model = self.early = None
