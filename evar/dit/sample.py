"""DiT sample sets: what `evar sample` and `evar eval` call for a DiT model (VAR's are in evar.samples)."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from evar.data import to_uint8_nhwc
from evar.dit.checkpoint import DiTModel
from evar.dit.diffusion import DiTSampling, ddim_sample
from evar.errors import EvarError


def check_pixel_space(model: DiTModel, what: str = "sampling") -> None:
    if not model.pixel_space or model.config.in_channels != 3:
        raise EvarError(f"{what} needs a pixel-space DiT (3 channels); this one denoises "
                        f"{model.config.in_channels}-channel latents, whose decoder (the SD-VAE) EVAR does not have")


@torch.no_grad()
def sample_dit_images(model: DiTModel, labels: torch.Tensor, settings: DiTSampling, batch_size: int = 64,
                      progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W, 3); chunking does not change them (each sample's noise is numbered)."""
    check_pixel_space(model)
    settings.validate(model.config.diffusion_steps)
    starts = range(0, len(labels), batch_size)
    chunks = [to_uint8_nhwc(ddim_sample(model.dit, labels[s:s + batch_size], settings, first_sample=s))
              for s in tqdm(starts, desc="sampling", disable=not progress or len(starts) < 2, dynamic_ncols=True)]
    return np.concatenate(chunks)
