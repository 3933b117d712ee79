"""How often the Neural Engine layout in fp16 draws the tokens it draws in fp32 (what a Mac cannot be asked here).

    python benchmarks/ane_fp16_agreement.py [--model builtin:digits] [--seeds 0,1,2] [--batch 10]
                                            [--compress none|palettize6|palettize4|int8]

For each seed: the ANE-layout wrappers (export/ane.py, what `evar-export coreml --target ane` converts) run
at fp32, fed in float32, with the host sampler against `generate` (tokens must be identical and logits within
fp32 reassociation: the layout is exact), then the same wrappers cast to fp16 run on the CPU scale by scale
on the fp32 run's f_hat (the parity protocol of fp16 exports: a flipped token cannot cascade). Two agreements
per scale: the share of equal sampled tokens (both runs draw with the same uniforms, inverse CDF in vocabulary
order), and the best coupling's, 1 − TV between the two distributions the tokens are drawn from (guided logits
after top-k/top-p), averaged over tokens: the int8 export gate's measure (export/quantize.py). The first counts
every near-tie a shifted CDF boundary flips, so it measures the sampler as much as the model; the control adds
Gaussian noise of 0.001 to the fp32 guided logits and reports both for it. Also the
decoder (overflow-free GroupNorm) in fp16 against the reference image. torch's CPU fp16 kernels are not the
ANE's, so this bounds what fp16 arithmetic does to the layout, not the device's exact numbers.
`--compress` gives the fp16 wrappers (steps and decoder) the weights `evar-export coreml --target ane
--compress X` stores, compressed by coremltools' own routines (export/coreml_emulate.py): still an emulation
on the CPU, with the converter's look-up tables and int8 scales.
Also what the export's `--compress` gate measures (export/coreml_gate.py), per scale: the mean token KL and
1 − TV of the guided logits before top-k/top-p, and the decoder's image PSNR against fp32 (`gate`).
Writes benchmarks/results/ane_fp16_agreement.json (ane_fp16_agreement_<compress>.json with --compress;
_b<batch> before .json for a batch other than 10).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from evar import zoo
from evar import rng
from evar.contract.host_sampling import filter_logits, guided_logits, sample_from_uniforms
from evar.export.ane import AneDecoder, FhatUpdate, ane_steps
from evar.export.ane_export import AneInterface, host_run, loop_manifest
from evar.export.artifact import export_ready
from evar.export.coreml_emulate import EMULATED, compressed_half_decoder, compressed_half_steps
from evar.export.quantize import psnr_db, token_agreement, token_kl
from evar.files import atomic_write_json
from evar.models.decoding import generate

OUT = Path(__file__).resolve().parent / "results" / "ane_fp16_agreement.json"
NOISE = 0.001  # the control: Gaussian noise on the fp32 guided logits (a sixteenth of an fp16 logit's spacing at 16-32)


def setup(doc: str, seeds: str, compress: bool = False):
    """The ANE benchmarks' shared command line and inputs: (args, the export-ready model, one label per row)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if compress:
        ap.add_argument("--compress", choices=EMULATED, default="none")
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    args = ap.parse_args()
    model = export_ready(zoo.load(args.model, attn_impl="math"))
    return args, model, np.arange(args.batch) % model.config.var.num_classes


def agreements(tokens, logits, ref_tokens, ref_logits, top_k: int, top_p: float) -> dict:
    """Per scale and over every token: the share of equal sampled tokens and the best coupling's 1 − TV of the
    sampled distributions (the filtered guided logits)."""
    n = [t.size for t in ref_tokens]
    sampled = [float((a == b).mean()) for a, b in zip(tokens, ref_tokens)]
    coupled = [token_agreement(filter_logits(r, top_k, top_p), filter_logits(g, top_k, top_p))
               for r, g in zip(ref_logits, logits)]
    return {"sampled_token_agreement": float(np.average(sampled, weights=n)), "sampled_token_agreement_per_scale": sampled,
            "best_coupling_agreement": float(np.average(coupled, weights=n)), "best_coupling_agreement_per_scale": coupled}


def noise_control(run, seed: int, top_k: int, top_p: float) -> dict:
    """`agreements` of the fp32 run against itself with NOISE on its guided logits, drawn with the same uniforms."""
    gen = np.random.default_rng(seed)
    logits = [g + gen.standard_normal(g.shape).astype(np.float32) * np.float32(NOISE) for g in run.logits]
    tokens = [sample_from_uniforms(filter_logits(g, top_k, top_p), rng.scale_uniforms(seed, si, *t.shape))
              for si, (g, t) in enumerate(zip(logits, run.tokens))]
    return agreements(tokens, logits, run.tokens, run.logits, top_k, top_p)


def gate_metrics(ref_logits, logits, image32: np.ndarray, image16: np.ndarray) -> dict:
    """What the export's `--compress` gate measures (export/coreml_gate.py): per scale the mean token KL and
    1 − TV of the guided logits before top-k/top-p, and the decoder image's PSNR against fp32."""
    return {"gate_token_kl_per_scale": [token_kl(r, g) for r, g in zip(ref_logits, logits)],
            "gate_token_agreement_per_scale": [token_agreement(r, g) for r, g in zip(ref_logits, logits)],
            "gate_decoder_psnr_db": psnr_db(image32, image16)}


def mean_std(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {f"{key}_mean": float(np.mean(values)), f"{key}_std": float(np.std(values))}


def main() -> None:
    t0 = time.perf_counter()
    args, model, labels = setup(__doc__, "0,1,2", compress=True)
    out = OUT if args.compress == "none" else OUT.with_name(f"{OUT.stem}_{args.compress}.json")
    if args.batch != 10:  # another protocol (batch 1: what an export's parity runs), kept beside the default's
        out = out.with_name(f"{out.stem}_b{args.batch}.json")
    c = model.config.var
    iface, iface32 = AneInterface(model.config, args.batch), AneInterface(model.config, args.batch).at_fp32()
    specs = [iface.step(si) for si in range(c.num_scales)], [iface.update(si) for si in range(c.num_scales)]
    specs32 = [iface32.step(si) for si in range(c.num_scales)], specs[1]
    steps = ane_steps(model, args.batch)
    steps16 = compressed_half_steps(steps, args.compress)
    updates = [FhatUpdate(model, si).eval() for si in range(c.num_scales)]
    decoder = AneDecoder(model).eval()
    decoder16 = compressed_half_decoder(decoder, args.compress)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        ref = generate(model.var, model.vqvae, torch.from_numpy(labels), guidance=args.cfg, top_k=args.top_k,
                       top_p=args.top_p, seed=seed, keep_logits=True)
        run = host_run(loop_manifest(iface32), steps, updates, labels, seed, args.cfg, args.top_k, args.top_p, *specs32)
        run16 = host_run(loop_manifest(iface), steps16, updates, labels, seed, args.cfg, args.top_k, args.top_p, *specs,
                         teacher=run, dtype=torch.float16)
        exact = all(np.array_equal(a, b.numpy()) for a, b in zip(run.tokens, ref.tokens))
        ref_logits = [guided_logits(r.numpy(), args.batch, args.cfg, si, c.num_scales) for si, r in enumerate(ref.scale_logits)]
        agree = agreements(run16.tokens, run16.logits, run.tokens, run.logits, args.top_k, args.top_p)
        control = noise_control(run, seed, args.top_k, args.top_p)
        with torch.no_grad():
            f_hat = torch.from_numpy(run.f_hat)
            image32 = decoder(f_hat)
            image16 = decoder16(f_hat.half()).float()
        rows.append({"seed": seed, "fp32_tokens_equal_reference": exact,
                     "fp32_logits_max_rel_vs_reference_per_scale": [
                         float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(run.logits, ref_logits)],
                     **{f"fp16_{k}": v for k, v in agree.items()},
                     **{f"noise_control_{k}": v for k, v in control.items()},
                     "fp32_image_max_abs_vs_reference": float((image32 - ref.images).abs().max()),
                     "fp16_decoder_max_abs_vs_fp32": float((image16 - image32).abs().max()),
                     **gate_metrics(run.logits, run16.logits, image32.numpy(), image16.numpy())})
        print(rows[-1])
    keys = [f"{who}_{k}" for who in ("fp16", "noise_control") for k in ("sampled_token_agreement", "best_coupling_agreement")]
    result = {"model": args.model, "compress": args.compress, "batch": args.batch, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
              "seeds": rows, "fp32_exact_on_every_seed": all(r["fp32_tokens_equal_reference"] for r in rows),
              **{k: v for key in keys for k, v in mean_std(rows, key).items()},
              "per_scale_mean": {key: np.mean([r[f"{key}_per_scale"] for r in rows], axis=0).tolist() for key in keys},
              "gate": {"token_kl_per_scale_mean": np.mean([r["gate_token_kl_per_scale"] for r in rows], axis=0).tolist(),
                       "token_kl_per_scale_max": np.max([r["gate_token_kl_per_scale"] for r in rows], axis=0).tolist(),
                       "token_agreement_per_scale_mean": np.mean([r["gate_token_agreement_per_scale"] for r in rows],
                                                                 axis=0).tolist(),
                       "token_agreement_per_scale_min": np.min([r["gate_token_agreement_per_scale"] for r in rows],
                                                               axis=0).tolist(),
                       **mean_std(rows, "gate_decoder_psnr_db"),
                       "measures": "export/coreml_gate.py: guided logits before top-k/top-p; per seed over the batch"},
              "protocol": "fp16 wrappers on the CPU, scale by scale on the fp32 run's f_hat; host sampling in float32"
                          + ("" if args.compress == "none" else f"; their weights compressed as --compress {args.compress} "
                             "stores them (coremltools' own routines, export/coreml_emulate.py), not run on a device"),
              "metrics": {"sampled_token_agreement": "share of equal tokens drawn with shared uniforms (inverse CDF)",
                          "best_coupling_agreement": "mean over tokens of 1 - TV(fp32, other) of the filtered guided "
                                                     "logits' distributions (export/quantize.py token_agreement)",
                          "noise_control": f"the fp32 run vs itself with Gaussian noise {NOISE} on its guided logits"},
              "load_average": list(os.getloadavg()), "seconds": time.perf_counter() - t0,
              "command": "python benchmarks/ane_fp16_agreement.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    atomic_write_json(out, result)
    for key in keys:
        print(f"{key} {result[key + '_mean']:.4f} ± {result[key + '_std']:.4f}")
    gate = result["gate"]
    print("gate: KL per scale (max over seeds)", " ".join(f"{v:.4f}" for v in gate["token_kl_per_scale_max"]),
          "| 1 - TV per scale (min over seeds)", " ".join(f"{v:.4f}" for v in gate["token_agreement_per_scale_min"]),
          f"| decoder PSNR {gate['gate_decoder_psnr_db_mean']:.1f} ± {gate['gate_decoder_psnr_db_std']:.1f} dB")
    print(f"fp32 exact: {result['fp32_exact_on_every_seed']} → {out}")


if __name__ == "__main__":
    main()
