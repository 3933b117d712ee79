"""Few-step sampling with a DD student: one step, two steps, or with the teacher deciding some middle scales.

    t_list (0,)      one forward pass: every token from its noise
    t_list (0, t)    then keep scales < t of that prediction as data, put the same noise back elsewhere, predict again
    teacher (a..b)   after the student's first pass, the teacher decodes scales a..b (its own sampler, CFG, KV cache,
                     given the student's tokens below a), and the student predicts the rest from scales <= b as data

A step's output per token is the codebook vector of its argmax token, or for scales >= `continuous_from` the
regression head's vector. Noise is `flow.sequence_noise(seed, first_sample + b, …)`: the noise the pairs of
sample b were made from, numbered by sample, so batches and ranks do not change a sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evar import rng
from evar.checkpoints import Model
from evar.dd.flow import sequence_noise
from evar.dd.model import DDModel
from evar.errors import EvarError
from evar.models.decoding import Decoder
from evar.models.sampling import sample_tokens
from evar.samples import SamplingSettings


@dataclass(frozen=True)
class FewStep:
    """What a DD sample run does (checked against the model's scales by `check`)."""

    t_list: tuple[int, ...] = (0,)
    teacher_scales: tuple[int, ...] = ()  # consecutive scales the teacher decodes; () = student only

    def check(self, num_scales: int) -> None:
        t = self.t_list
        if not t or t[0] != 0 or any(b <= a for a, b in zip(t, t[1:])):
            raise EvarError(f"--t-list must start at 0 and increase, got {','.join(map(str, t))}")
        if t[-1] >= num_scales:
            raise EvarError(f"--t-list {','.join(map(str, t))} goes beyond the model's scales: each t must be "
                            f"below {num_scales} (t = how many scales are given)")
        s = self.teacher_scales
        if s:
            if any(b != a + 1 for a, b in zip(s, s[1:])) or s[0] < 0 or s[-1] >= num_scales - 1:
                raise EvarError(f"--teacher-scales must be consecutive scales in 0..{num_scales - 2} (the student "
                                f"predicts the scales after them), got {','.join(map(str, s))}")
            if len(t) > 1:
                raise EvarError("--t-list and --teacher-scales exclude each other: after the teacher's scales the "
                                "student's second step starts at the scale after the teacher's last")

    @property
    def steps(self) -> int:
        return len(self.t_list) + (len(self.teacher_scales) + (self.teacher_scales[0] > 0) if self.teacher_scales
                                   else 0)


def parse_ints(text: str | None, flag: str) -> tuple[int, ...]:
    if text is None or not text.strip():
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EvarError(f"{flag} must be comma-separated integers, got '{text}'") from None


def plan(num_scales: int, steps: int | None, t_list: str | None, teacher_scales: str | None) -> FewStep:
    """--steps / --t-list / --teacher-scales → a checked FewStep (steps 2 alone: the second step at S // 2)."""
    if steps is not None and steps < 1:
        raise EvarError(f"--steps must be 1 or more, got {steps}")
    t = parse_ints(t_list, "--t-list")
    if not t:
        t = (0,) if steps in (None, 1) else tuple(round(i * num_scales / steps) for i in range(steps))
    elif steps is not None and steps != len(t):
        raise EvarError(f"--steps {steps} but --t-list has {len(t)} entries: give one of them, or matching ones")
    few = FewStep(t, parse_ints(teacher_scales, "--teacher-scales"))
    few.check(num_scales)
    return few


class _Forced:
    """A TokenPicker that returns given tokens (the student's, teacher-forced through the cache) when set, else
    VAR's inverse-CDF draw."""

    forced: Tensor | None = None

    def __call__(self, logits: Tensor, uniforms: Tensor, top_k: int, top_p: float) -> Tensor:
        return self.forced if self.forced is not None else sample_tokens(logits, uniforms, top_k, top_p)


@torch.no_grad()
def dd_generate(model: DDModel, labels: Tensor, few: FewStep = FewStep(), seed: int = 0, first_sample: int = 0,
                teacher: Model | None = None, teacher_settings: SamplingSettings = SamplingSettings(),
                decode: bool = True) -> tuple[Tensor | None, Tensor]:
    """(images (B, 3, H, W) in [-1, 1] or None, tokens (B, L)) of a few-step run."""
    cfg, quant = model.config.var, model.vqvae.quantize
    few.check(cfg.num_scales)
    if few.teacher_scales and teacher is None:
        raise EvarError("--teacher-scales needs --teacher (the VAR that decodes those scales)")
    B, ranges = len(labels), cfg.scale_ranges()
    noise = sequence_noise(seed, first_sample, B, cfg.patch_nums, cfg.cvae)
    codebook = quant.embedding.weight
    split = regression_split(model.config)
    x, is_data = noise.clone(), torch.zeros(B, cfg.seq_len, dtype=torch.bool)
    tokens = torch.zeros(B, cfg.seq_len, dtype=torch.long)
    given = 0  # tokens [0, given) are decided (data)

    def predict() -> None:
        idx, out = pass_outputs(*model.student(labels, x, is_data), codebook, split)
        tokens[:, given:] = idx[:, given:]
        x[:, given:] = out[:, given:]  # the prediction; only the decided part is marked as data below

    def decide(end: int) -> None:
        nonlocal given
        x[:, end:] = noise[:, end:]  # the same noise goes back where nothing is decided
        is_data[:, given:end] = True
        given = end

    steps = list(few.t_list)
    if few.teacher_scales:
        a, b = few.teacher_scales[0], few.teacher_scales[-1]
        if a > 0:
            predict()
        _teacher_scales(teacher, labels, tokens, x, a, b, seed, first_sample, teacher_settings, codebook)
        decide(ranges[b][1])
        steps = [b + 1]
    for k, t in enumerate(steps):
        if k > 0 or t > 0:
            decide(ranges[t][0] if t < cfg.num_scales else cfg.seq_len)
        predict()
    images = _decode(model, x, cfg) if decode else None
    return images, tokens


def _teacher_scales(teacher: Model, labels: Tensor, tokens: Tensor, x: Tensor, a: int, b: int, seed: int,
                    first_sample: int, s: SamplingSettings, codebook: Tensor) -> None:
    """The teacher's scales a..b given the student's tokens below a (through its cache), written into tokens/x."""
    cfg = teacher.config.var
    picker = _Forced()
    decoder = Decoder(teacher.var, teacher.vqvae, top_k=s.top_k, top_p=s.top_p, pick=picker)
    state = decoder.begin(labels, s.guidance)
    ranges = cfg.scale_ranges()
    for si in range(b + 1):
        lo, hi = ranges[si]
        picker.forced = tokens[:, lo:hi] if si < a else None
        u = torch.from_numpy(rng.scale_uniforms(seed, si, len(labels), hi - lo, first_sample))
        idx = decoder.step(state, si, u)
        if si >= a:
            tokens[:, lo:hi] = idx
            x[:, lo:hi] = codebook[idx]


def regression_split(config) -> int:
    """The first token whose vector comes from the regression head (L: none does)."""
    c = config.var
    return c.seq_len if config.continuous_from is None else c.scale_ranges()[config.continuous_from][0]


def pass_outputs(logits: Tensor, vectors: Tensor, codebook: Tensor, split: int) -> tuple[Tensor, Tensor]:
    """A student pass's (tokens (B, L), per-token vectors (B, L, Cvae)): the argmax token everywhere; its codebook
    vector before `split`, the regression head's from `split` on (the sampler and the exported graphs share it)."""
    idx = logits.argmax(-1)
    if split >= vectors.shape[1] or split <= 0:  # no full slice: Core ML cannot convert the alias it traces to
        return idx, codebook[idx] if split > 0 else vectors
    return idx, torch.cat((codebook[idx[:, :split]], vectors[:, split:]), dim=1)


def fhat_of_vectors(quant, vectors: Tensor, cfg) -> Tensor:
    """f_hat (B, Cvae, H, H) from per-token vectors (codebook vectors or regressed ones), scale by scale."""
    f_hat = None  # no batch size is read anywhere: the exported graphs keep a symbolic batch
    for si, (lo, hi) in enumerate(cfg.scale_ranges()):
        pn = cfg.patch_nums[si]
        residual = quant.scale_residual(si, vectors[:, lo:hi].transpose(1, 2).unflatten(2, (pn, pn)))
        f_hat = residual if f_hat is None else f_hat + residual
    return f_hat


def _decode(model: DDModel, vectors: Tensor, cfg) -> Tensor:
    return model.vqvae.fhat_to_img(fhat_of_vectors(model.vqvae.quantize, vectors, cfg))


def _check_teacher(model: DDModel, teacher: Model) -> None:
    """The teacher's tokens must mean what the student's mean: the same scales and the same tokenizer weights
    (a retrained tokenizer of the same shape has other codebook vectors)."""
    same_tokenizer = teacher.config.vqvae == model.config.vqvae and all(
        torch.equal(a, b) for a, b in zip(teacher.vqvae.state_dict().values(), model.vqvae.state_dict().values()))
    if teacher.config.var.patch_nums != model.config.var.patch_nums or not same_tokenizer:
        raise EvarError("--teacher does not share the DD model's tokenizer and scales: its tokens would mean "
                        "other things (teacher-involved sampling needs the teacher the student was distilled from)")


@torch.no_grad()
def dd_sample_images(model: DDModel, labels: Tensor, few: FewStep, seed: int = 0, batch_size: int = 64,
                     teacher: Model | None = None, teacher_settings: SamplingSettings = SamplingSettings()
                     ) -> np.ndarray:
    """uint8 (N, H, W, 3) images, chunked without changing them."""
    from evar.data import to_uint8_nhwc

    if teacher is not None:
        _check_teacher(model, teacher)
    chunks = []
    for start in range(0, len(labels), batch_size):
        images, _ = dd_generate(model, labels[start:start + batch_size], few, seed, start, teacher, teacher_settings)
        chunks.append(to_uint8_nhwc(images))
    return np.concatenate(chunks)


@dataclass(frozen=True)
class DDRequest:
    """The few-step flags as given on the command line (all None: a plain VAR run, or one DD step)."""

    steps: int | None = None
    t_list: str | None = None
    teacher: str | None = None
    teacher_scales: str | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.steps, self.t_list, self.teacher, self.teacher_scales))

    def check_pairing(self) -> None:
        if (self.teacher is None) != (self.teacher_scales is None):
            raise EvarError("--teacher and --teacher-scales go together (the teacher decodes those scales)")


def load_sampler(ref: str, var_ckpt, vae_ckpt, request: DDRequest):
    """(model, sample(model, labels, settings, batch_size) → uint8 images) for a VAR or a DD model reference.
    Few-step flags with a VAR are refused, and so is a DD model as --teacher, before anything is generated."""
    from evar import zoo
    from evar.samples import sample_images

    request.check_pairing()
    model = zoo.load_family(ref, ("var", "dd"), var_ckpt=var_ckpt, vae_ckpt=vae_ckpt)
    if not isinstance(model, DDModel):
        if request.given():
            raise EvarError(f"--steps, --t-list, --teacher and --teacher-scales go with a Distilled Decoding model "
                            f"(evar dd train); '{ref}' is a VAR generator")
        return model, lambda m, labels, settings, batch_size=64: sample_images(m, labels, settings, batch_size)
    few = plan(model.config.var.num_scales, request.steps, request.t_list, request.teacher_scales)
    teacher = zoo.load(request.teacher) if request.teacher is not None else None
    if teacher is not None:
        _check_teacher(model, teacher)

    def sample(m: DDModel, labels: Tensor, settings: SamplingSettings, batch_size: int = 64) -> np.ndarray:
        settings.validate()
        return dd_sample_images(m, labels, few, settings.seed, batch_size, teacher, settings)

    return model, sample
