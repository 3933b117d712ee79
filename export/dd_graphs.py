"""Export-ready Distilled Decoding passes: one static graph per distinct student forward.

A few-step run (`evar.dd.sampler.dd_generate`) is a chain of passes; pass k is given the first `t_k` scales
(t_0 = 0: everything is noise). The scales given are a constant of the pass, so each distinct t is its own graph
with static shapes and a constant noise/data flag; the batch is symbolic (ONNX) or fixed (Core ML):

    pass t = 0    (labels, noise)                               → (tokens, vectors, f_hat)
    pass t > 0    (labels, noise, given_tokens, given_vectors)   → (tokens, vectors, f_hat)

`given_*` are the previous pass's `tokens` / `vectors` (the whole (B, L) arrays; the graph keeps their first
`ranges[t][0]` tokens as data and puts the noise back after them). `tokens` are the argmax tokens (the decided
ones passed through), `vectors` what each token contributes (its codebook vector, or the regression head's from
`continuous_from` on), `f_hat` their sum over scales, the input of the VQVAE decoder graph. The noise is an
input computed on the host (`evar.contract.few_step`), never in the graph: every runtime draws the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from evar.export.interface import BATCH, Dim, FunctionSpec, TensorSpec
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.contract import few_step
from evar.dd.model import DDModel, DDStudent
from evar.dd.sampler import fhat_of_vectors, pass_outputs, regression_split


def export_ready(model: DDModel) -> DDModel:
    """The same weights with the plain matmul/softmax attention (what the converters handle best)."""
    if all(b.attn.impl == "math" for b in model.student.blocks):
        return model
    student = DDStudent(model.config.var, attn_impl="math")
    student.load_state_dict(model.student.state_dict())
    return DDModel(model.config, student.eval(), model.vqvae, model.provenance)


def decoder_model(model: DDModel) -> Model:
    """The VQVAE as the VAR export's decoder graph takes it (it reads only `config` and `vqvae`)."""
    return Model(model.config.model, None, model.vqvae)


def pass_role(t: int) -> str:
    """The manifest's graph role of the pass given t scales."""
    return f"dd_pass_t{t}"


@dataclass(frozen=True)
class PassInterface:
    """Names, shapes and roles of the pass given `t` scales. `batch` None = symbolic (ONNX); Core ML has no int64
    features, so its labels and tokens are int32."""

    model: DDModel
    t: int
    batch: int | None = None
    index_dtype: str = "int64"

    @property
    def given(self) -> int:
        """Tokens given as data: those of the scales before t."""
        return self.model.config.var.scale_ranges()[self.t][0]

    def function(self) -> FunctionSpec:
        c = self.model.config.var
        b: Dim = BATCH if self.batch is None else self.batch
        L, C, H = c.seq_len, c.cvae, c.patch_nums[-1]
        ins = [TensorSpec("labels", (b,), self.index_dtype, "labels"),
               TensorSpec("noise", (b, L, C), "float32", "noise", doc=few_step.DESCRIPTION)]
        if self.t:
            ins += [TensorSpec("given_tokens", (b, L), self.index_dtype, "given_tokens",
                               doc=f"the previous pass's tokens; the first {self.given} are kept"),
                    TensorSpec("given_vectors", (b, L, C), "float32", "given_vectors",
                               doc=f"the previous pass's vectors; the first {self.given} are the student's data input")]
        outs = (TensorSpec("tokens", (b, L), self.index_dtype, "tokens", doc="argmax tokens, scales coarse to fine"),
                TensorSpec("vectors", (b, L, C), "float32", "vectors",
                           doc="per token: its codebook vector (or the regression head's from continuous_from on)"),
                TensorSpec("f_hat", (b, C, H, H), "float32", "f_hat", doc="input of the vqvae_decoder graph"))
        return FunctionSpec("main", tuple(ins), outs, token_range=(self.given, L))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        if self.batch is not None:
            return {}
        fn = self.function()
        return {t.name: {0: BATCH} for t in fn.inputs + fn.outputs}


class StudentPass(nn.Module):
    """One student pass given `t` scales, with `dd_generate`'s decisions (`pass_outputs`, `fhat_of_vectors`)."""

    def __init__(self, model: DDModel, t: int, index_dtype: torch.dtype = torch.int64):
        super().__init__()
        self.index_dtype = index_dtype
        self.student, self.quant, self.cfg = model.student, model.vqvae.quantize, model.config.var
        self.given = self.cfg.scale_ranges()[t][0]
        self.split = regression_split(model.config)
        is_data = torch.zeros(1, self.cfg.seq_len, dtype=torch.bool)
        is_data[:, :self.given] = True
        self.register_buffer("is_data", is_data, persistent=False)

    def forward(self, labels: Tensor, noise: Tensor, given_tokens: Tensor | None = None,
                given_vectors: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        g = self.given
        x = noise if not g else torch.cat((given_vectors[:, :g], noise[:, g:]), dim=1)
        logits, regressed = self.student(labels, x, self.is_data.expand(noise.shape[0], -1))
        idx, vectors = pass_outputs(logits, regressed, self.quant.embedding.weight, self.split)
        if self.index_dtype != idx.dtype:
            idx = idx.to(self.index_dtype)
        if g:
            idx = torch.cat((given_tokens[:, :g], idx[:, g:]), dim=1)
            vectors = torch.cat((given_vectors[:, :g], vectors[:, g:]), dim=1)
        return idx, vectors, fhat_of_vectors(self.quant, vectors, self.cfg)
