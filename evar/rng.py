"""EVAR's portable random source: SplitMix64 counters → float32 uniforms.

Sampling consumes explicit uniforms instead of a framework generator, so PyTorch, onnxruntime,
Core ML and the Swift app draw the same tokens for the same seed. The algorithm is named in every
manifest as `RNG_NAME`; the Swift port in ios_demo must match it bit for bit (shared fixtures test it).

Definition (all arithmetic on uint64, wrapping):
    mix(z)       = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    splitmix(x)  = mix(x + 0x9E3779B97F4A7C15)
    key(seed, s) = splitmix(splitmix(seed) ^ s)           # s: the stream, EVAR uses the scale index
    u_i          = (splitmix(key + i) >> 40) * 2^-24       # 24 random bits, exact in float32, in [0, 1)
For scale `si` with batch B and pn*pn tokens, token j of sample b takes u_{b*pn*pn + j} of stream si,
so a sample's tokens do not depend on the batch it was generated in.
Only numpy is imported here: the runtime uses this module without torch.
"""
from __future__ import annotations

import numpy as np

RNG_NAME = "splitmix64-counter-v1"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MAX_SEED = 2**64


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _splitmix(x: np.ndarray) -> np.ndarray:
    return _mix(x + _GOLDEN)


def stream_key(seed: int, stream: int) -> np.uint64:
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= stream < _MAX_SEED:
        raise ValueError(f"stream must be in [0, 2**64), got {stream}")
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the definition
        seeded = _splitmix(np.array([seed], dtype=np.uint64))
        return _splitmix(seeded ^ np.uint64(stream))[0]


def uniforms(seed: int, stream: int, count: int, start: int = 0) -> np.ndarray:
    """float32 uniforms in [0, 1): numbers start .. start+count-1 of stream (seed, stream)."""
    key = stream_key(seed, stream)
    with np.errstate(over="ignore"):
        bits = _splitmix(key + np.arange(start, start + count, dtype=np.uint64)) >> np.uint64(40)
    return bits.astype(np.float32) * np.float32(2.0**-24)


def scale_uniforms(seed: int, scale_index: int, batch: int, tokens: int, first_sample: int = 0) -> np.ndarray:
    """(batch, tokens) uniforms for one scale; sample b of the batch is sample `first_sample + b` overall."""
    return uniforms(seed, scale_index, batch * tokens, start=first_sample * tokens).reshape(batch, tokens)
