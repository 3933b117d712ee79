"""DiT's diffusion: the linear beta schedule it trains with, the noise-prediction loss, and DDIM sampling.

Sampling is deterministic given the seed (DDIM with eta = 0: the only randomness is the starting noise), and
the starting noise of sample i comes from EVAR's portable random source (numbers i·D .. (i+1)·D-1 of one
stream, through Box-Muller), so a sample does not depend on the batch it was generated in, as for VAR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evar.dit.model import DiT
from evar.errors import EvarError
from evar.rng import uniforms

NOISE_STREAM = 0xD17  # the rng stream DiT's starting noise is drawn from


def alphas_cumprod(steps: int) -> torch.Tensor:
    """ᾱ_t of DiT's linear schedule (β from 1e-4 to 0.02, rescaled to `steps`), float64."""
    scale = 1000.0 / steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = abar[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output: the noise, or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    if prediction == "eps":
        return noise
    a = abar[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def diffusion_loss(model: DiT, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MSE between the target and the prediction at uniformly drawn timesteps (DiT's simple loss)."""
    abar = alphas_cumprod(model.cfg.diffusion_steps)
    t = torch.randint(0, model.cfg.diffusion_steps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return F.mse_loss(model.predict(q_sample(x0, t, noise, abar), t, labels),
                      target(model.cfg.prediction, x0, noise, t, abar))


def to_x0_eps(prediction: str, pred: torch.Tensor, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a prediction at ᾱ = a; x0 clamped to the image range and eps made consistent with it."""
    if prediction == "eps":
        x0 = (x - math.sqrt(1 - a) * pred) / math.sqrt(a)
    else:
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * pred
    x0 = x0.clamp(-1, 1)
    return x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


@dataclass(frozen=True)
class DiTSampling:
    guidance: float = 1.5  # EVAR's --cfg w, as for VAR: eps = (1 + w)·eps_c − w·eps_u (the DiT paper's scale is 1 + w)
    steps: int = 25  # DDIM steps, evenly spaced over the training schedule
    seed: int = 0

    def validate(self, train_steps: int) -> None:
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise EvarError(f"--cfg must be a finite number >= 0, got {self.guidance}")
        if not 1 <= self.steps <= train_steps:
            raise EvarError(f"--steps must be in 1..{train_steps} (the model's diffusion steps), got {self.steps}")
        if not 0 <= self.seed < 2**64:
            raise EvarError(f"--seed must be in [0, 2**64), got {self.seed}")


def start_noise(seed: int, first_sample: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(n, *shape) standard normals; sample i takes its own run of the stream (Box-Muller on uniform pairs)."""
    d = math.prod(shape)
    u = uniforms(seed, NOISE_STREAM, 2 * d * n, start=2 * d * first_sample).astype(np.float64).reshape(n, 2, d)
    z = np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])  # 1 - u in (0, 1]: log is finite
    return torch.from_numpy(z.astype(np.float32)).view(n, *shape)


def ddim_timesteps(train_steps: int, steps: int) -> list[int]:
    """Descending, evenly spaced, ending at 0."""
    return sorted({round(i * (train_steps - 1) / max(1, steps - 1)) for i in range(steps)}, reverse=True) \
        if steps > 1 else [train_steps - 1]


def guided(model: DiT, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided prediction (guidance is linear, so it applies to noise and v alike)."""
    if guidance == 0:  # the conditional model alone: no unconditional half to run
        return model.predict(x, t, labels)
    both = model.predict(torch.cat([x, x]), torch.cat([t, t]),
                         torch.cat([labels, torch.full_like(labels, model.cfg.num_classes)]))
    cond, uncond = both.chunk(2)
    return cond + guidance * (cond - uncond)


@torch.no_grad()
def ddim_sample(model: DiT, labels: torch.Tensor, settings: DiTSampling, first_sample: int = 0) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for `labels`, by DDIM (eta 0) from the seeded starting noise."""
    cfg = model.cfg
    settings.validate(cfg.diffusion_steps)
    abar = alphas_cumprod(cfg.diffusion_steps)
    x = start_noise(settings.seed, first_sample, len(labels), (cfg.in_channels, cfg.input_size, cfg.input_size))
    times = ddim_timesteps(cfg.diffusion_steps, settings.steps)
    for i, t in enumerate(times):
        a_t = abar[t].item()
        a_prev = abar[times[i + 1]].item() if i + 1 < len(times) else 1.0
        pred = guided(model, x, torch.full((len(x),), t, dtype=torch.long), labels, settings.guidance)
        x0, eps = to_x0_eps(cfg.prediction, pred, x, a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x.clamp(-1, 1)
