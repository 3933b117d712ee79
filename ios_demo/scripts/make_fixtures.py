"""Write the test vectors that EVARKit (Swift, XCTest on macOS) and the Python runtime share.

    python ios_demo/scripts/make_fixtures.py            # rewrite ios_demo/Tests/Fixtures/*.json
    python ios_demo/scripts/make_fixtures.py --check    # exit 1 if a committed file differs

The vectors come from the Python reference itself, so a Swift port that passes them draws the same
tokens as `evar sample` for the same seed. tests/test_ios_demo.py rebuilds everything in memory and
asserts it equals the committed files, so the two cannot drift:
    rng.json             evar.rng: stream keys, raw SplitMix64 outputs, uniforms, per-scale slices
    sampling.json        evar.models.sampling: CFG, top-k / top-p masks, inverse-CDF draws, whole scales
    statistics.json      numpy.percentile medians / p90 (the bench statistics)
    params.json          VAR parameter counts (PyTorch) for the bench's `params`
    float16.json         numpy float16 conversions (Core ML fp16 arrays)
    image.json           evar.data.to_uint8_nhwc (decoder output → pixels)
    manifest_tiny*.json  manifests whose functions and KV layout come from export.interface (_ane: from
                         export.ane_export, host-sampled; _split, _split_io: a format_version 3 scale split
                         with CFG trimming, laid out as evar-export coreml does for iOS18 / iOS17)
    manifest_tiny_dd.json  a Distilled Decoding (family "dd") Core ML manifest of a tiny DD student: passes from
                         export.dd_graphs, the rest as export.dd_coreml writes it
    dd_noise.json        evar.contract.few_step: the per-token Gaussian noise (Box–Muller on evar.rng)
    bench_nulls.json     a bench JSON with its optional fields null (both sides write every key)

Conventions that keep the files exact and portable:
- 64-bit integers (seeds, streams, keys, raw SplitMix64 outputs) are hex strings: JSON numbers are
  doubles in many decoders and would lose bits above 2**53.
- float32 values are written as the shortest decimal of their exact value, so decoding the number as
  a double and narrowing it to Float gives the same bits back.
- No infinities (JSON has none): a masked logit appears as `false` in a `kept` list.
- Sampling cases keep every uniform away from a CDF boundary (relative margin `MIN_MARGIN`), so any
  correct float implementation picks the same index; the margin actually achieved is recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from evar import rng  # noqa: E402

FIXTURES = ROOT / "ios_demo" / "Tests" / "Fixtures"
MIN_MARGIN = 1e-4  # relative distance between a threshold and the nearest CDF / tail-mass boundary
GENERATOR = "ios_demo/scripts/make_fixtures.py"


def _hex(x: int | np.integer) -> str:
    return f"0x{int(x):016x}"


def _f32(values: Any) -> list:
    """float32 array (any shape) → nested lists of Python floats holding the exact float32 values."""
    return np.asarray(values, dtype=np.float32).astype(np.float64).tolist()


# ---------------------------------------------------------------------------------------------
# RNG: splitmix64-counter-v1


def _raw_outputs(seed: int, stream: int, count: int, start: int) -> list[int]:
    """The 64-bit SplitMix64 outputs behind `rng.uniforms` (before keeping the top 24 bits)."""
    key = rng.stream_key(seed, stream)
    with np.errstate(over="ignore"):
        return [int(v) for v in rng._splitmix(key + np.arange(start, start + count, dtype=np.uint64))]


def rng_fixture() -> dict:
    cases = []
    seeds = (0, 1, 42, 2**32 + 17, 2**63 + 5, 2**64 - 1)
    streams = (0, 1, 9, 2**40 + 3)
    for seed in seeds:
        for stream in streams:
            for start in (0, 1000, 2**40):
                if start and (seed, stream) not in ((42, 9), (2**64 - 1, 0), (1, 1)):
                    continue  # big offsets on a few streams are enough
                raw = _raw_outputs(seed, stream, 6, start)
                uniforms = rng.uniforms(seed, stream, 6, start=start)
                assert all(np.float32((r >> 40) * 2.0**-24) == u for r, u in zip(raw, uniforms))
                cases.append({
                    "seed": _hex(seed), "stream": _hex(stream), "start": start,
                    "key": _hex(rng.stream_key(seed, stream)),
                    "raw": [_hex(r) for r in raw],
                    "bits24": [r >> 40 for r in raw],
                    "uniforms": _f32(uniforms),
                })
    scale_cases = []
    for seed, scale_index, batch, tokens, first_sample in ((0, 0, 1, 1, 0), (7, 3, 2, 16, 0),
                                                          (7, 3, 2, 16, 5), (123456789, 9, 3, 4, 2)):
        u = rng.scale_uniforms(seed, scale_index, batch, tokens, first_sample)
        scale_cases.append({"seed": _hex(seed), "scale_index": scale_index, "batch": batch, "tokens": tokens,
                            "first_sample": first_sample, "uniforms": _f32(u)})
    return {"generator": GENERATOR, "rng": rng.RNG_NAME,
            "definition": "see evar/rng.py; u_i = (splitmix(key + i) >> 40) * 2^-24, key = "
                          "splitmix(splitmix(seed) ^ stream)",
            "streams": cases, "scale_uniforms": scale_cases}


# ---------------------------------------------------------------------------------------------
# Sampling: CFG ramp, top-k, top-p, inverse CDF


def _cdf_margin(probs: np.ndarray, u: float) -> float:
    """Relative distance of the threshold u·total from the nearest cumulative boundary (float64)."""
    cdf = np.cumsum(probs.astype(np.float64))
    threshold = u * cdf[-1]
    return float(np.min(np.abs(cdf - threshold)) / cdf[-1])


def _top_p_margin(filtered: np.ndarray, top_p: float) -> float:
    """Relative distance of every ascending tail mass from the cut 1 - top_p (float64)."""
    if top_p <= 0:
        return float("inf")
    finite = np.sort(filtered[np.isfinite(filtered)].astype(np.float64))
    p = np.exp(finite - finite.max())
    mass = np.cumsum(p / p.sum())
    return float(np.min(np.abs(mass - (1.0 - top_p))))


def _softmax64(logits: np.ndarray) -> np.ndarray:
    finite = np.where(np.isfinite(logits), logits, -np.inf).astype(np.float64)
    e = np.exp(finite - finite.max())
    return e / e.sum()


def _filter_case(name: str, logits: np.ndarray, top_k: int, top_p: float, uniforms: np.ndarray) -> dict:
    import torch

    from evar.models.sampling import filter_logits, sample_from_uniforms

    t_logits = torch.from_numpy(logits).unsqueeze(0)
    filtered = filter_logits(t_logits, top_k, top_p)[0].numpy()
    assert _top_p_margin(filtered, top_p) > MIN_MARGIN, f"{name}: top-p cut too close to a boundary"
    kept = np.isfinite(filtered)
    probs = _softmax64(filtered)
    # Keep only uniforms whose threshold is clearly inside one token's interval.
    usable = [float(u) for u in uniforms if _cdf_margin(probs, float(u)) > MIN_MARGIN]
    u = np.asarray(usable, dtype=np.float32)
    picked = sample_from_uniforms(torch.from_numpy(filtered).expand(len(u), -1), torch.from_numpy(u)).numpy()
    # float64 inverse CDF agrees (the margins make the choice unambiguous)
    cdf = np.cumsum(probs)
    assert [int(min(np.sum(cdf <= x * cdf[-1]), len(cdf) - 1)) for x in u.astype(np.float64)] == picked.tolist()
    assert kept[picked].all()
    margin = min([_cdf_margin(probs, float(x)) for x in u] + [_top_p_margin(filtered, top_p)])
    return {"name": name, "vocab": int(logits.shape[0]), "top_k": top_k, "top_p": top_p,
            "logits": _f32(logits), "kept": kept.tolist(), "uniforms": _f32(u),
            "indices": [int(i) for i in picked], "min_margin": round(margin, 8)}


def _cfg_case(cfg: float, scale_index: int, num_scales: int, cond: np.ndarray, uncond: np.ndarray) -> dict:
    import torch

    from evar.models.sampling import apply_cfg, cfg_ratio

    t = cfg_ratio(cfg, scale_index, num_scales)
    combined = apply_cfg(torch.from_numpy(cond), torch.from_numpy(uncond), t).numpy()
    return {"cfg": cfg, "scale_index": scale_index, "num_scales": num_scales, "t": t,
            "cond": _f32(cond), "uncond": _f32(uncond), "combined": _f32(combined)}


def _scale_case(name: str, seed: int, scale_index: int, patch: int, num_scales: int, batch: int,
                first_sample: int, vocab: int, cfg: float, top_k: int, top_p: float) -> dict:
    """One whole host-side scale step: (2B, pn², V) cond+uncond logits → tokens, as EVARPipeline does it."""
    import torch

    from evar.models.sampling import apply_cfg, cfg_ratio, filter_logits, sample_tokens

    gen = np.random.default_rng(1000 + scale_index + 31 * seed)
    tokens = patch * patch
    guided = cfg != 0
    rows = 2 * batch if guided else batch
    for _attempt in range(100):
        logits = (gen.standard_normal((rows, tokens, vocab)) * 2.0).astype(np.float32)
        t_logits = torch.from_numpy(logits)
        if guided:
            t_logits = apply_cfg(t_logits[:batch], t_logits[batch:], cfg_ratio(cfg, scale_index, num_scales))
        u = rng.scale_uniforms(seed, scale_index, batch, tokens, first_sample)
        filtered = filter_logits(t_logits, top_k, top_p).numpy()
        margins = [_top_p_margin(filtered[b, j], top_p) for b in range(batch) for j in range(tokens)]
        margins += [_cdf_margin(_softmax64(filtered[b, j]), float(u[b, j]))
                    for b in range(batch) for j in range(tokens)]
        if min(margins) > MIN_MARGIN:
            break
    else:  # pragma: no cover - 100 draws without a clean case would mean a broken generator
        raise RuntimeError(f"{name}: no logits with clear margins")
    picked = sample_tokens(t_logits, torch.from_numpy(u), top_k, top_p).numpy()
    return {"name": name, "seed": _hex(seed), "scale_index": scale_index, "patch": patch,
            "num_scales": num_scales, "batch": batch, "first_sample": first_sample, "vocab": vocab,
            "cfg": cfg, "top_k": top_k, "top_p": top_p,
            "logits": _f32(logits.reshape(rows, tokens * vocab)),
            "indices": picked.astype(int).tolist(), "min_margin": round(min(margins), 8)}


def sampling_fixture() -> dict:
    gen = np.random.default_rng(20240607)
    filters = []
    # The documented examples from tests/test_sampling.py, then random logits over several vocabularies.
    filters.append(_filter_case("top_k_2", np.array([1, 5, 3, 4, 2], np.float32), 2, 0.0,
                                rng.uniforms(11, 0, 8)))
    probs = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    filters.append(_filter_case("top_p_0.75", probs, 0, 0.75, rng.uniforms(12, 0, 8)))
    filters.append(_filter_case("top_p_0.01_keeps_best", probs, 0, 0.01, rng.uniforms(13, 0, 4)))
    filters.append(_filter_case("no_filter", probs, 0, 0.0, rng.uniforms(14, 0, 8)))
    filters.append(_filter_case("top_k_above_vocab", probs, 900, 0.0, rng.uniforms(15, 0, 4)))
    for vocab, top_k, top_p in ((16, 4, 0.0), (16, 0, 0.9), (64, 10, 0.8), (64, 1, 0.0),
                                (512, 0, 0.96), (512, 100, 0.95), (4096, 900, 0.96)):
        logits = (gen.standard_normal(vocab) * 3.0).astype(np.float32)
        for _attempt in range(20):  # avoid a top-p cut sitting on a boundary
            if top_p <= 0 or _top_p_margin(_filtered_np(logits, top_k, top_p), top_p) > MIN_MARGIN:
                break
            logits = (gen.standard_normal(vocab) * 3.0).astype(np.float32)
        filters.append(_filter_case(f"random_v{vocab}_k{top_k}_p{top_p}", logits, top_k, top_p,
                                    rng.uniforms(vocab, top_k, 16)))
    cfgs = []
    for cfg, si, num_scales in ((1.5, 0, 10), (1.5, 3, 10), (1.5, 9, 10), (4.0, 5, 6), (0.7, 1, 1)):
        cond = (gen.standard_normal(12) * 4).astype(np.float32)
        uncond = (gen.standard_normal(12) * 4).astype(np.float32)
        cfgs.append(_cfg_case(cfg, si, num_scales, cond, uncond))
    scales = [
        _scale_case("guided_scale3", seed=3, scale_index=3, patch=2, num_scales=6, batch=1, first_sample=0,
                    vocab=32, cfg=1.5, top_k=8, top_p=0.9),
        _scale_case("guided_batch2_offset", seed=99, scale_index=5, patch=3, num_scales=6, batch=2,
                    first_sample=4, vocab=24, cfg=4.0, top_k=0, top_p=0.95),
        _scale_case("unguided", seed=2**63 + 1, scale_index=1, patch=2, num_scales=4, batch=1, first_sample=1,
                    vocab=16, cfg=0.0, top_k=0, top_p=0.0),
    ]
    return {"generator": GENERATOR, "min_margin_required": MIN_MARGIN,
            "semantics": "evar/models/sampling.py: t = cfg*si/max(S-1,1); logits = (1+t)*cond - t*uncond "
                         "(float32 ops); top-k keeps logits >= k-th largest; top-p drops the ascending "
                         "tail with cumulative softmax <= 1-top_p, keeping the largest; index = "
                         "#{cdf <= u*total} clamped to V-1",
            "filters": filters, "cfg": cfgs, "scales": scales}


def _filtered_np(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    import torch

    from evar.models.sampling import filter_logits
    return filter_logits(torch.from_numpy(logits).unsqueeze(0), top_k, top_p)[0].numpy()


# ---------------------------------------------------------------------------------------------
# Latency statistics: what "median" and "p90" mean in every bench JSON


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear interpolation between closest ranks); EVARKit's Statistics matches it."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def statistics_fixture() -> dict:
    cases = []
    for values in ([5.0], [3.0, 1.0], [10.0, 12.5, 11.0, 30.0, 9.5], [float(v) for v in range(1, 11)],
                   [494.25, 480.0, 501.5, 477.75, 490.0, 530.0, 488.5]):
        cases.append({"values": values, "median": percentile(values, 50), "p90": percentile(values, 90),
                      "min": float(min(values)), "mean": float(np.mean(values))})
    return {"generator": GENERATOR, "definition": "numpy.percentile(values, q), linear interpolation",
            "cases": cases}


# ---------------------------------------------------------------------------------------------
# Parameter counts: the `params` field of a bench report, computed from the manifest's model config


D16_PARAMS = 310_283_520  # official var_d16.pth; the VAR README says 310.28M


def var_parameter_count(var: dict) -> int:
    """The formula EVARKit's `VARConfig.parameterCount` uses (checked against PyTorch below)."""
    c, head_dim = var["embed_dim"], var["head_dim"]
    seq = sum(pn * pn for pn in var["patch_nums"])
    count = c + seq * c + c * var["cvae"] + c + (var["num_classes"] + 1) * c + len(var["patch_nums"]) * c
    for heads, hidden in zip(var["num_heads"], var["ffn_dims"]):
        attn = heads * head_dim
        count += heads if var["attn_l2_norm"] else 0
        count += 2 * attn + 3 * attn * c + attn * c + c + 2 * hidden * c + hidden + c
        count += 6 * c if var["shared_aln"] else 6 * c * c + 6 * c
    count += 6 * c * c + 6 * c if var["shared_aln"] else 0
    return count + 2 * c * c + 2 * c + var["vocab_size"] * c + var["vocab_size"]


def params_fixture() -> dict:
    import dataclasses

    import torch

    from evar.checkpoints import build_model
    from evar.config import ModelConfig, VARConfig, VQVAEConfig, digits_config, official_config

    def tiny(**kw: object) -> ModelConfig:
        vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            v_patch_nums=(1, 2, 3, 4))
        var = VARConfig(depth=3, embed_dim=64, num_heads=(2, 1, 3), ffn_dims=(128, 96, 64), head_dim=16,
                        vocab_size=64, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4), **kw)
        return ModelConfig(var=var, vqvae=vqvae)

    cases = []
    for name, cfg in (("tiny_pruned", tiny()), ("tiny_shared_aln", tiny(shared_aln=True)),
                      ("tiny_no_l2norm", tiny(attn_l2_norm=False)), ("digits", digits_config())):
        torch.manual_seed(0)
        counted = sum(p.numel() for p in build_model(cfg).var.parameters())
        var = dataclasses.asdict(cfg.var)
        assert var_parameter_count(var) == counted, name
        cases.append({"name": name, "var": var, "params": counted})
    d16 = dataclasses.asdict(official_config(16).var)
    assert var_parameter_count(d16) == D16_PARAMS
    cases.append({"name": "official_d16", "var": d16, "params": D16_PARAMS})
    return {"generator": GENERATOR, "definition": "sum(p.numel() for p in model.var.parameters()), VQVAE excluded",
            "cases": cases, "dd_cases": dd_params_cases()}


def dd_student_parameter_count(var: dict) -> int:
    """EVARKit's `VARConfig.fewStepStudentParameterCount`: VAR's count + one more position and level row, the
    noise/data flag embedding (2 rows) and the regression head (C → Cvae)."""
    c = var["embed_dim"]
    return var_parameter_count(var) + c + c + 2 * c + c * var["cvae"] + var["cvae"]


def dd_params_cases() -> list[dict]:
    """DD students' parameter counts (PyTorch): the `params` of a bench report on a DD artifact."""
    import dataclasses

    import torch

    from evar.checkpoints import build_model
    from evar.config import digits_config
    from evar.dd.model import from_teacher

    cases = []
    for name, cfg in (("tiny_dd", tiny_config()), ("digits_dd", digits_config())):
        torch.manual_seed(0)
        counted = sum(p.numel() for p in from_teacher(build_model(cfg)).student.parameters())
        var = dataclasses.asdict(cfg.var)
        assert dd_student_parameter_count(var) == counted, name
        cases.append({"name": name, "var": var, "params": counted})
    return cases


# ---------------------------------------------------------------------------------------------
# float16: Core ML graphs take and return fp16 arrays; EVARKit converts without the Float16 type


def float16_fixture() -> dict:
    values = [0.0, -0.0, 1.0, -2.5, 0.1, 1 / 3, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6.1035156e-05,
              6.0e-08, 5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 1e-9, 1.00048828125, 1.00146484375,
              2049.0, 2051.0, 0.5 + 2.0**-12, 3.14159265]
    floats = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):  # overflow to infinity is one of the cases
        halves = floats.astype(np.float16)
    # "back" is the half widened to float32; null where it is infinite (JSON has no infinity)
    cases = [{"float": f, "half_bits": int(h.view(np.uint16)),
              "back": float(h.astype(np.float32)) if np.isfinite(h) else None}
             for f, h in zip(_f32(floats), halves)]
    specials = [{"half_bits": b, "back": float(np.array([b], np.uint16).view(np.float16).astype(np.float32)[0])}
                for b in (0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x8001, 0xC000)]
    return {"generator": GENERATOR, "definition": "numpy astype(float16): IEEE binary16, round to nearest even",
            "cases": cases, "decode_only": specials}


# ---------------------------------------------------------------------------------------------
# Pixels: decoder output in [-1, 1] → uint8, as evar.data.to_uint8_nhwc


def image_fixture() -> dict:
    import torch

    from evar.data import to_uint8_nhwc

    gen = np.random.default_rng(7)
    chw = (gen.standard_normal((2, 3, 4, 5)) * 0.8).astype(np.float32)
    # edges, out-of-range values and exact .5 steps: (x + 1) * 127.5 = k + 0.5 must round half to even
    special = np.array([-1.0, 1.0, 0.0, -1.5, 2.0, 1 / 127.5 - 1, 3 / 255 - 1, -0.5], dtype=np.float32)
    chw[0, 0, 0, : len(special) // 2] = special[: len(special) // 2]
    chw[1, 2, 3, : len(special) // 2] = special[len(special) // 2:]
    rgb = to_uint8_nhwc(torch.from_numpy(chw))
    # JSON has no NaN/inf: the non-finite inputs are spelled as strings Swift's Float(_:) and float() read
    names = ["nan", "inf", "-inf"]
    odd = to_uint8_nhwc(torch.tensor([float(n) for n in names]).view(1, 3, 1, 1))[0, 0, 0]
    return {"generator": GENERATOR, "definition": "evar.data.to_uint8_nhwc: round((clamp(x,-1,1)+1)*127.5), "
                                                  "half to even, float32 ops; NaN as -1",
            "shape": list(chw.shape), "chw": _f32(chw), "rgb": rgb.astype(int).tolist(),
            "non_finite": {"inputs": names, "rgb": odd.astype(int).tolist()}}


# ---------------------------------------------------------------------------------------------
# A tiny manifest: functions and KV layout from export.interface (the exporter's own declarations),
# the other sections as evar-export coreml writes them; valid against evar/contract/manifest.schema.json.


def tiny_manifest(kv_mode: str) -> dict:
    from evar.config import ModelConfig, VARConfig, VQVAEConfig
    from evar.export.interface import DecoderInterface, StepInterface

    patch_nums = (1, 2, 3, 4)
    vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=patch_nums)
    var = VARConfig(depth=3, embed_dim=64, num_heads=(2, 1, 3), ffn_dims=(128, 96, 64), head_dim=16, vocab_size=64,
                    cvae=8, num_classes=10, patch_nums=patch_nums)
    config = ModelConfig(var=var, vqvae=vqvae, provenance={"source": "ios_demo fixtures", "recipe": "pruned tiny"})
    step = StepInterface(config, "coreml", kv_mode=kv_mode, batch=1, kv_dtype="float16")
    decoder = DecoderInterface(config, "coreml", batch=1)
    target = "iOS18" if kv_mode == "state" else "iOS17"
    common = {"format": "coreml", "external_data": None, "opset": None, "target": target,
              "compute_units": "cpu_and_ne", "simplified": None, "signature": None}
    step_file, decoder_file = "decoder_step.mlpackage", "vqvae_decoder.mlpackage"
    files = []
    for package in (step_file, decoder_file):
        for inner in ("Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"):
            payload = f"{package}/{inner}".encode()
            files.append({"path": f"{package}/{inner}", "bytes": len(payload),
                          "sha256": hashlib.sha256(payload).hexdigest()})
    return {
        "format": "evar-artifact",
        "format_version": 1,
        "backend": "coreml",
        "model": config.to_dict(),
        "patch_nums": list(patch_nums),
        "image_size": vqvae.image_size,
        "batch": {"mode": "static", "size": 1, "cfg_doubled": True},
        "graphs": {  # the fields export/artifact.py writes, nulls included
            "decoder_step": {**common, "file": step_file, "functions": [f.to_json() for f in step.functions()],
                             "default_function": step.function_name(0), "scale_selection": "function",
                             "notes": ["4 functions scale_0..scale_3; identical weights are stored once"]},
            "vqvae_decoder": {**common, "file": decoder_file, "functions": [decoder.function().to_json()],
                              "default_function": "main", "scale_selection": None, "notes": []},
        },
        "kv_cache": step.kv_json(),
        "sampling": {
            "rng": rng.RNG_NAME, "method": "inverse_cdf", "in_graph": True, "top_k": 8, "top_p": 0.9,
            "filters": "baked",
            "cfg": {"input": "cfg", "ramp": "t = cfg * si / (num_scales - 1); logits = (1 + t) * cond - t * uncond",
                    "default": 1.5, "unconditional_label": var.num_classes},
            "uniforms": {"input": "uniforms", "shape": ["batch", "pn*pn"], "dtype": "float32",
                         "stream": "evar.rng.scale_uniforms(seed, si, batch, pn*pn, first_sample): token j of sample b "
                                   "takes u[(first_sample + b) * pn*pn + j] of stream si"},
        },
        "precision": {"weights": "fp16", "compute": "fp16",
                      "fp32_ops": ["sampling tail: CFG, top-k/top-p, softmax, cumsum, inverse-CDF compare"]},
        "compression": {"method": "none", "tool": None, "details": {}},
        "parity": {"passed": True,
                   "checks": [{"name": "wrapper_vs_model_logits", "passed": True, "metric": "max_abs_diff",
                               "value": 0.0, "tolerance": 1e-4, "detail": None}],
                   "skipped": ["coreml predict: macOS only"]},
        "provenance": {"model_ref": "fixtures:tiny", "created": "2025-01-01T00:00:00Z", "command": GENERATOR,
                       "tool_versions": {"evar": "0.1.0"}, "model_provenance": {"source": "ios_demo fixtures"}},
        "files": files,
    }


def tiny_ane_manifest() -> dict:
    """A host-sampled manifest (`evar-export coreml --target ane`): functions from export/ane_export.py's
    interface, three graphs, sampling.where "host", format_version 2."""
    from evar.config import ModelConfig, VARConfig, VQVAEConfig
    from evar.export.ane_export import AneInterface, sampling_json

    base = tiny_manifest("state")
    patch_nums = (1, 2, 3, 4)
    vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=patch_nums)
    var = VARConfig(depth=3, embed_dim=64, num_heads=(2, 1, 3), ffn_dims=(128, 96, 64), head_dim=16, vocab_size=64,
                    cvae=8, num_classes=10, patch_nums=patch_nums)
    iface = AneInterface(ModelConfig(var=var, vqvae=vqvae, provenance={"source": "ios_demo fixtures"}), batch=1)
    common = {"format": "coreml", "external_data": None, "opset": None, "target": "iOS18", "simplified": None,
              "signature": None, "scale_selection": "function", "notes": []}
    n = var.num_scales
    graphs = {
        "decoder_step": {**common, "file": "decoder_step.mlpackage", "compute_units": "cpu_and_ne",
                         "functions": [iface.step(si).to_json() for si in range(n)], "default_function": "scale_0"},
        "fhat_update": {**common, "file": "fhat_update.mlpackage", "compute_units": "cpu_only",
                        "functions": [iface.update(si).to_json() for si in range(n)], "default_function": "scale_0"},
        "vqvae_decoder": {**common, "file": "vqvae_decoder.mlpackage", "compute_units": "cpu_and_ne",
                          "functions": [iface.decoder().to_json()], "default_function": "main", "scale_selection": None},
    }
    files = []
    for package in ("decoder_step.mlpackage", "fhat_update.mlpackage", "vqvae_decoder.mlpackage"):
        payload = f"{package}/Manifest.json".encode()
        files.append({"path": f"{package}/Manifest.json", "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return {**base, "format_version": 2, "graphs": graphs, "kv_cache": iface.kv_json(),
            "sampling": sampling_json(iface, 8, 0.9, 1.5),
            "precision": {"weights": "fp16", "compute": "fp16", "fp32_ops": ["fhat_update (CPU); sampling on the host in float32"]},
            "files": files}


TINY_PATCH_NUMS = (1, 2, 3, 4)


def tiny_config(num_heads=(2, 1, 3), ffn_dims=(128, 96, 64), source: str = "ios_demo fixtures"):
    """The fixtures' tiny pruned VAR + VQVAE config (patch_nums 1, 2, 3, 4: L = 30 tokens)."""
    from evar.config import ModelConfig, VARConfig, VQVAEConfig

    vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        v_patch_nums=TINY_PATCH_NUMS)
    var = VARConfig(depth=3, embed_dim=64, num_heads=num_heads, ffn_dims=ffn_dims, head_dim=16, vocab_size=64,
                    cvae=8, num_classes=10, patch_nums=TINY_PATCH_NUMS)
    return ModelConfig(var=var, vqvae=vqvae, provenance={"source": source})


def _package_files(*packages: str) -> list[dict]:
    files = []
    for package in packages:
        payload = f"{package}/Manifest.json".encode()
        files.append({"path": f"{package}/Manifest.json", "bytes": len(payload),
                      "sha256": hashlib.sha256(payload).hexdigest()})
    return files


FIXED_PROVENANCE = {"created": "2025-01-01T00:00:00Z", "command": GENERATOR, "tool_versions": {"evar": "0.1.0"}}


UNGUIDED_PREFIX = "unguided_"


def _prefill_function(iface, split: int) -> dict:
    """The prefill function of a Core ML split, exactly as evar-export coreml lays it out."""
    from evar.export.coreml_ladder import prefill_spec

    return prefill_spec(iface, split).to_json()


def tiny_recipe_manifest(kv_mode: str) -> dict:
    """A Core ML scale split + CFG trimming (format_version 3), laid out as `evar-export coreml --early-model
    --split-scale 2 --cfg-until-scale 3` does: the dense tiny model's functions run scales 0-1
    (decoder_step_early), `prefill` builds the pruned model's cache from their tokens at scale 2, decoder_step
    runs scale 2 and `unguided_scale_3` (decoder_step_unguided, conditional rows only) scale 3.
    state (iOS18): the compressed model's functions are all in decoder_step.mlpackage and share its state (the
    unguided ones keep its 2B-row shape and touch rows [0, B)); the early ones have their own package and state.
    io (iOS17): one package per function (`file`); pasts cross by role and layer, rows [0, B) kept at the
    trimming scale, the prefill's presents are decoder_step's pasts at the split.
    Checked once against real exports of these tiny models by the speed ladder's Core ML export (branch
    wave2-ladder, batch 1, top-k 8, top-p 0.9): graphs, files, every function's tensors, kv_cache and generation
    equal for both layouts. Once that export is merged, build these from export/coreml_ladder instead."""
    import dataclasses

    from evar.contract import EARLY_STEP_GRAPH, PREFILL_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH, validate
    from evar.export.interface import StepInterface

    base = tiny_manifest(kv_mode)
    late, early = tiny_config(), tiny_config(num_heads=(4, 4, 4), ffn_dims=(256, 256, 256))
    split, trim, S = 2, 3, len(TINY_PATCH_NUMS)
    target = "iOS18" if kv_mode == "state" else "iOS17"
    kw = dict(kv_mode=kv_mode, batch=1)  # as evar-export coreml declares them (states fp16, presents fp32)
    eiface, liface = StepInterface(early, "coreml", **kw), StepInterface(late, "coreml", **kw)
    uiface = StepInterface(late, "coreml", guided=False, **kw)
    unguided = []
    for si in range(trim, S):
        fn = uiface.function(si)
        unguided.append(dataclasses.replace(fn, name=UNGUIDED_PREFIX + fn.name, states=liface.function(si).states))
    roles = {EARLY_STEP_GRAPH: [eiface.function(si).to_json() for si in range(split)],
             STEP_GRAPH: [liface.function(si).to_json() for si in range(S)],
             UNGUIDED_STEP_GRAPH: [fn.to_json() for fn in unguided],
             PREFILL_GRAPH: [_prefill_function(liface, split)]}
    common = {"format": "coreml", "external_data": None, "opset": None, "target": target,
              "compute_units": "cpu_and_ne", "simplified": None, "signature": None, "notes": []}
    graphs, packages = {}, []
    for role, functions in roles.items():
        if kv_mode == "state":  # every function of the compressed model in decoder_step.mlpackage
            file = f"{EARLY_STEP_GRAPH if role == EARLY_STEP_GRAPH else STEP_GRAPH}.mlpackage"
            packages.append(file)
        else:
            file = role
            for f in functions:
                f["file"] = f"{role}/{f['name']}.mlpackage"
                packages.append(f["file"])
        graphs[role] = {**common, "file": file, "functions": functions, "default_function": functions[0]["name"],
                        "scale_selection": None if role == PREFILL_GRAPH else "function"}
    graphs["vqvae_decoder"] = {**base["graphs"]["vqvae_decoder"], "target": target}
    generation = {"cfg_until_scale": trim, "unguided_graph": UNGUIDED_STEP_GRAPH, "split_scale": split,
                  "early_graph": EARLY_STEP_GRAPH, "prefill_graph": PREFILL_GRAPH,
                  "early_model": {"ref": "fixtures:tiny-dense", "var": early.to_dict()["var"]}}
    files = _package_files(*dict.fromkeys(packages + ["vqvae_decoder.mlpackage"]))
    manifest = {**base, "format_version": 3, "graphs": graphs, "generation": generation,
                "kv_cache": liface.kv_json(), "files": files}
    manifest = json.loads(json.dumps(manifest))
    validate(manifest)
    return manifest


def tiny_dd_model(continuous_from: int | None = 3):
    """A tiny DD student built from a seeded tiny VAR (as `evar dd train` starts one)."""
    import torch

    from evar.checkpoints import build_model
    from evar.dd.model import from_teacher

    torch.manual_seed(0)
    return from_teacher(build_model(tiny_config()), continuous_from).eval()


DD_T_VALUES = (0, 2)


def tiny_dd_manifest() -> dict:
    """`evar-export coreml --model DD_DIR --t-list 0,2 --batch 1` of a tiny DD student: the passes' functions from
    export/dd_graphs.PassInterface (int32 indices), the graphs and sections as export/dd_coreml.py writes them
    (manifest_body), provenance and files fixed; valid against the schema's dd_manifest."""
    from evar.contract import validate
    from evar.export.dd_coreml import PACKAGE, function_name
    from evar.export.dd_export import manifest_body
    from evar.export.dd_graphs import PassInterface, pass_role
    from evar.export.interface import DecoderInterface
    from evar.export.parity import Check, ParityReport

    from evar.export.coreml import CoremlOptions

    model, options = tiny_dd_model(), CoremlOptions(batch=1)  # the exporter's defaults (tests compare a real export)
    common = {"format": "coreml", "external_data": None, "opset": None, "target": options.target,
              "compute_units": options.compute_units, "simplified": None, "signature": None, "scale_selection": None}
    graphs = {pass_role(t): {**common, "file": PACKAGE,
                             "functions": [{**PassInterface(model, t, 1, "int32").function().to_json(),
                                            "name": function_name(t)}],
                             "default_function": function_name(t),
                             "notes": [f"student pass given {t} scales; function {function_name(t)} of the "
                                       "multifunction package (weights stored once for every pass)"]}
              for t in DD_T_VALUES}
    decoder = DecoderInterface(model.config.model, "coreml", batch=1)
    graphs["vqvae_decoder"] = {**common, "file": "vqvae_decoder.mlpackage",
                               "functions": [decoder.function().to_json()], "default_function": "main", "notes": []}
    report = ParityReport()
    report.checks.append(Check("coreml wrapper (int32) vs dd_generate, t-list 0: tokens", True))
    report.skipped.append("coreml predict: macOS only")
    body = manifest_body(model, "fixtures:tiny-dd", GENERATOR, graphs, DD_T_VALUES, report, "coreml")
    body["batch"] = {"mode": "static", "size": options.batch, "cfg_doubled": False}
    body["precision"] = {"weights": options.precision, "compute": options.precision, "fp32_ops": []}
    body["provenance"] = {"model_ref": "fixtures:tiny-dd", **FIXED_PROVENANCE,
                          "model_provenance": {"source": "ios_demo fixtures"}}
    manifest = json.loads(json.dumps({"format": "evar-artifact", "format_version": 3, **body,
                                      "files": _package_files(PACKAGE, "vqvae_decoder.mlpackage")}))
    validate(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Distilled Decoding noise: Box–Muller on evar.rng, numbered by sample (evar.contract.few_step)

NOISE_MIN_MARGIN = 1e-13  # relative distance of every float64 normal from a float32 rounding boundary (~1000 double ulps)


def _f32_rounding_margin(z64: np.ndarray) -> float:
    """Smallest relative distance of float64 values from the midpoints where float32 rounding changes: a libm
    whose log1p / cos differ from glibc's in the last bits of a double still rounds to the same float32."""
    z32 = z64.astype(np.float32)
    up = np.nextafter(z32, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(z32, np.float32(-np.inf)).astype(np.float64)
    here = z32.astype(np.float64)
    distance = np.minimum(np.abs(z64 - (here + up) / 2), np.abs(z64 - (here + down) / 2))
    return float(np.min(distance / np.maximum(np.abs(z64), 1e-300)))


def _noise64(seed: int, si: int, first_sample: int, batch: int, tokens: int, dim: int) -> np.ndarray:
    """The float64 normals before the one rounding to float32 (the recipe of few_step.token_noise)."""
    from evar.contract import few_step

    per_sample = 2 * tokens * dim
    u = rng.uniforms(seed, few_step.NOISE_STREAM + si, batch * per_sample, start=first_sample * per_sample)
    u = u.astype(np.float64).reshape(-1, 2)
    return np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])


def dd_noise_fixture() -> dict:
    from evar.contract import few_step

    cases = []
    for seed, si, first_sample, batch, tokens, dim in ((0, 0, 0, 1, 1, 8), (7, 3, 0, 2, 16, 8), (7, 3, 5, 1, 16, 8),
                                                       (2**63 + 5, 9, 2, 2, 4, 32), (123456789, 1, 1000, 1, 4, 4)):
        values = few_step.token_noise(seed, si, first_sample, batch, tokens, dim)
        z64 = _noise64(seed, si, first_sample, batch, tokens, dim)
        assert np.array_equal(z64.astype(np.float32), values.reshape(-1))
        margin = _f32_rounding_margin(z64)
        assert margin > NOISE_MIN_MARGIN, f"noise case {seed, si}: a normal sits on a float32 rounding boundary"
        cases.append({"seed": _hex(seed), "scale_index": si, "first_sample": first_sample, "batch": batch,
                      "tokens": tokens, "dim": dim, "values": _f32(values.reshape(-1)), "min_margin": margin})
    sequences = []
    for seed, first_sample, batch in ((0, 0, 1), (42, 3, 2)):
        values = few_step.sequence_noise(seed, first_sample, batch, TINY_PATCH_NUMS, 8)
        margin = min(_f32_rounding_margin(_noise64(seed, si, first_sample, batch, pn * pn, 8))
                     for si, pn in enumerate(TINY_PATCH_NUMS))
        assert margin > NOISE_MIN_MARGIN, f"noise sequence {seed}: a normal sits on a float32 rounding boundary"
        sequences.append({"seed": _hex(seed), "first_sample": first_sample, "batch": batch,
                          "patch_nums": list(TINY_PATCH_NUMS), "dim": 8, "values": _f32(values.reshape(-1)),
                          "min_margin": margin})
    return {"generator": GENERATOR, "rng": rng.RNG_NAME, "noise_stream": few_step.NOISE_STREAM,
            "definition": few_step.DESCRIPTION, "min_margin_required": NOISE_MIN_MARGIN,
            "tokens": cases, "sequences": sequences}


def bench_nulls() -> dict:
    """A bench JSON as evar-bench writes it for a run whose optional fields have no value: every key present,
    `threads`, `stage_units` and `few_step` null. EVARKit's BenchReport must read it and write the same keys back."""
    from evar.runtime.bench import FORMAT, SWIFT_FIELDS

    report = {"format": FORMAT, "tool": "evar-bench", "device": "test", "os": "test", "backend": "coreml",
              "compute_units": "cpuAndNeuralEngine", "threads": None, "precision": "fp16", "weights": "fp16",
              "compression": "none", "batch": 1, "cfg": 1.5, "top_k": 8, "top_p": 0.9, "seed": 0, "sampling": "graph",
              "kv_cache": "state", "warmup": 1, "iterations": 3, "load_ms": 12.5,
              "per_scale": [{"scale_index": 0, "patch_num": 1, "median_ms": 1.5, "p90_ms": 2.0}],
              "decode": {"median_ms": 3.0, "p90_ms": 3.5}, "end_to_end": {"median_ms": 5.0, "p90_ms": 6.0, "min_ms": 4.5},
              "throughput_images_per_s": 200.0, "params": 1234, "artifact": "tiny", "model_ref": "fixtures:tiny",
              "stage_units": None, "few_step": None}
    assert set(report) == set(SWIFT_FIELDS)
    return report


# ---------------------------------------------------------------------------------------------


def build_fixtures() -> dict[str, str]:
    """File name → exact text. Everything deterministic: no clocks, no unseeded randomness."""
    fixtures = {
        "rng.json": rng_fixture(),
        "sampling.json": sampling_fixture(),
        "statistics.json": statistics_fixture(),
        "params.json": params_fixture(),
        "float16.json": float16_fixture(),
    }
    fixtures["image.json"] = image_fixture()
    fixtures["manifest_tiny.json"] = tiny_manifest("state")
    fixtures["manifest_tiny_io.json"] = tiny_manifest("io")
    fixtures["manifest_tiny_ane.json"] = tiny_ane_manifest()
    fixtures["manifest_tiny_split.json"] = tiny_recipe_manifest("state")
    fixtures["manifest_tiny_split_io.json"] = tiny_recipe_manifest("io")
    fixtures["manifest_tiny_dd.json"] = tiny_dd_manifest()
    fixtures["dd_noise.json"] = dd_noise_fixture()
    fixtures["bench_nulls.json"] = bench_nulls()
    return {name: json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
            for name, data in fixtures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)
    fixtures = build_fixtures()
    stale = [name for name, text in fixtures.items()
             if not (args.out / name).exists() or (args.out / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"stale: {args.out / name} (run {GENERATOR})")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in fixtures.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(fixtures)} fixtures to {args.out} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
