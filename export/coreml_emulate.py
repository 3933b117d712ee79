"""What `evar-export coreml --compress X` does to the weights, done to PyTorch modules (no Mac needed).

The converter compresses inside its pass pipeline (`coreml.pass_pipeline`, before any other pass, on the
fp32 constants the torch frontend made): every constant of a function whose rank is at least 2 and whose
size exceeds `coreml.WEIGHT_THRESHOLD` (a parameter or buffer of the converted module, under its own name)
is replaced by a look-up table over indices (palettize) or int8 data and scales (int8), both stored in fp16.
Here the same coremltools routines (`palettize_weights.blockwise_compress`: the same k-means, seeded;
`linear_quantize_weights.blockwise_compress_by_dtype`), with the same configs, run on each tensor, and the
result is stored back dense, with the values the device decompresses. So fp16 wrappers carrying them compute,
on the CPU, what the compressed package computes up to the kernels' arithmetic (torch's fp16, not the ANE's).
Tests compare every tensor with what `ct.convert` itself stores for a tiny model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from evar.errors import EvarError
from evar.export import coreml as cm
from evar.export.ane_export import COMPRESSION_PASSES, half_steps, is_class_table

EMULATED = ("none", "palettize6", "palettize4", "int8")


def op_config(method: str):
    """(the compression pass's name, its op config) exactly as `coreml.pass_pipeline` sets them for `method`."""
    if method not in EMULATED or method == "none":
        raise EvarError(f"cannot emulate --compress {method}: one of {', '.join(EMULATED[1:])}")
    ct = cm._ct()
    with cm._quiet():
        pipeline = cm.pass_pipeline(ct, method)
    for name in COMPRESSION_PASSES:
        for option in pipeline.get_options(name) or []:
            if option.option_name == "config":
                return name, option.option_val.global_config
    raise AssertionError(f"coreml.pass_pipeline({method!r}) sets no compression config")


def converter_compresses(shape: torch.Size, threshold: int) -> bool:
    """The converter's rule for a constant (`need_compress_const`): rank >= 2 and more than `threshold` values."""
    return len(shape) >= 2 and int(np.prod(shape)) > threshold


def _block_sizes(config, rank: int) -> list[int]:
    """`infer_block_sizes` for a constant feeding a convolution, linear or elementwise op: output channels
    on axis 0 (a matmul's right operand would differ: these wrappers feed none that is compressed)."""
    from coremltools.optimize.coreml._config import CompressionGranularity as G

    sizes = [0] * rank
    if config.granularity == G.PER_CHANNEL:
        sizes[0] = 1
    elif config.granularity != G.PER_TENSOR:
        raise NotImplementedError(f"emulating {config.granularity} compression")
    return sizes


def compress_array(w: np.ndarray, pass_name: str, config) -> np.ndarray:
    """w (fp32) → the dense fp16 values the compressed constant decompresses to."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights, palettize_weights

    w = np.asarray(w, np.float32)
    sizes = _block_sizes(config, w.ndim)
    if pass_name == "compression::palettize_weights":
        if config.enable_per_channel_scale or config.cluster_dim != 1:
            raise NotImplementedError("emulating per-channel-scaled or vector palettization")
        with cm._quiet():
            params = palettize_weights.blockwise_compress(w, config.mode, config.nbits, sizes, config.lut_function,
                                                          config.cluster_dim, channel_axis=0,
                                                          num_kmeans_workers=config.num_kmeans_workers)
        return palettize_weights.decompress(params).astype(np.float16)  # the table is cast to fp16, then read
    with cm._quiet():
        params = linear_quantize_weights.blockwise_compress_by_dtype(w, config.dtype, config.mode, sizes)
    # the scale (and offset) are stored in fp16; data × scale is rounded once to fp16 (MIL's value of
    # constexpr_blockwise_shift_scale)
    data = params.data.astype(np.float32)
    if params.offset is not None:
        data = data - _expand(params.offset, w.ndim).astype(np.float32)
    scale = _expand(params.scale, w.ndim).astype(np.float16).astype(np.float32)
    return (data * scale).astype(np.float16)


def _expand(a: np.ndarray, rank: int) -> np.ndarray:
    return a.reshape(a.shape + (1,) * (rank - a.ndim))


def compressed_tensors(modules: Iterable[torch.nn.Module], method: str, keep: Callable[[str], bool] = lambda n: False,
                       threshold: int = cm.WEIGHT_THRESHOLD) -> list[dict[str, np.ndarray]]:
    """Per module: {parameter or buffer name: its compressed fp16 values} for every tensor the converter would
    compress (floating, `converter_compresses`, not `keep(name)`). A tensor shared by several modules is
    compressed once (the k-means is seeded: each function's copy would be identical)."""
    pass_name, config = op_config(method)
    done: dict[int, np.ndarray] = {}
    out = []
    for module in modules:
        chosen = {}
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and converter_compresses(t.shape, threshold) and not keep(name):
                if id(t) not in done:
                    done[id(t)] = compress_array(t.detach().float().numpy(), pass_name, config)
                chosen[name] = done[id(t)]
        out.append(chosen)
    return out


def load_tensors(module: torch.nn.Module, values: dict[str, np.ndarray]) -> None:
    """Copy `values` (by name) into the module's parameters and buffers, in their dtype."""
    tensors = dict([*module.named_parameters(), *module.named_buffers()])
    with torch.no_grad():
        for name, v in values.items():
            tensors[name].copy_(torch.from_numpy(v.astype(np.float32)))


# ---------------------------------------------------------------- the `--target ane` graphs
def ane_kept(name: str) -> bool:
    """What `--target ane` never compresses: the class tables (`keep_tables_uncompressed`) and the KV caches
    (state, not constants, in the package)."""
    leaf = name.rsplit(".", 1)[-1]
    return is_class_table(name) or leaf.startswith(("key_cache_", "value_cache_"))


def compressed_half_steps(steps, method: str):
    """`half_steps(steps)` carrying the weights `--target ane --compress method` stores in decoder_step: each
    scale's function compressed as the converter compresses it (shared weights once, its own position)."""
    steps16 = half_steps(steps)
    if method != "none":
        for s16, values in zip(steps16, compressed_tensors(steps, method, ane_kept)):
            load_tensors(s16, values)
    return steps16


def compressed_half_decoder(decoder: torch.nn.Module, method: str) -> torch.nn.Module:
    """The decoder (fp32, not changed) in fp16 with the weights `--compress method` stores in vqvae_decoder."""
    return compressed_copy(decoder, method)


def compressed_copy(module: torch.nn.Module, method: str, keep: Callable[[str], bool] = lambda n: False,
                    half: bool = True) -> torch.nn.Module:
    """A copy of `module` (fp16 when `half`, else as it is) carrying the compressed values of the tensors the
    converter compresses (but not `keep(name)`); `module` is not changed."""
    import copy

    out = copy.deepcopy(module).eval()
    if half:
        out.half()
    if method != "none":
        load_tensors(out, compressed_tensors([module], method, keep)[0])
    return out


# ---------------------------------------------------------------- the default (`--target iOS18/iOS17`) graphs
def default_kept(name: str) -> bool:
    """What the default target's step functions do not store compressed: the KV caches (state) and the VQVAE's
    encoder and decoder (a `ScaleStep` holds the whole model but runs neither; the decoder is its own package)."""
    return name.rsplit(".", 1)[-1].startswith(("key_cache_", "value_cache_")) or \
        name.startswith(("vqvae.encoder.", "vqvae.decoder."))


def compressed_wrappers(wrappers: list[torch.nn.Module], method: str, half: bool) -> list[torch.nn.Module]:
    """Copies of the default target's step wrappers (`graphs.ScaleStep`, sharing modules and state as the
    originals do) carrying the weights `--compress method` stores, in fp16 when `half`. Tensors that are not
    finite are left alone: VAR's attention mask of -inf, which cached decoding never reads (the converter stores
    no copy of it) and which no quantizer could represent."""
    import copy

    tensors = dict([*wrappers[0].named_parameters(), *wrappers[0].named_buffers()])
    infinite = {n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    values = compressed_tensors(wrappers, method, lambda n: default_kept(n) or n in infinite)
    copies = copy.deepcopy(wrappers)  # one memo: what the originals share, the copies share
    for module, chosen in zip(copies, values):
        if half:
            module.half()
        load_tensors(module, chosen)
    return [m.eval() for m in copies]
