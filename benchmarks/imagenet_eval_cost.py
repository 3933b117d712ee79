"""What a 50k-sample ImageNet evaluation costs, counted in FLOPs, and the GPU time that implies (an estimate).

    python benchmarks/imagenet_eval_cost.py → benchmarks/results/imagenet_eval_cost.json

Per image: the VAR transformer over the 10 scales with the CFG batch (`runtime.cost`, as the KV-cached
generation runs it), the VQVAE decoder at 256 px and the FID Inception at 299 px (both counted by PyTorch's
FLOP counter on meta tensors: nothing is computed). For d16 and EVAR's 20% and 40% pruning (40%: 6 of 16 heads and
1638 of 4096 FFN units removed per block). Time = FLOPs / (GPUs × sustained rate); the sustained rates are
assumptions, written into the JSON, not measurements: on a GPU node, `python -m evar.eval.imagenet` reports
the real `run.seconds`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from evar.config import official_config
from evar.eval.inception import FIDInception
from evar.files import atomic_write_json
from evar.models.vqvae import VQVAE
from evar.runtime.cost import generation_macs

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = 50_000
REFERENCE_IMAGES = 10_000  # ADM's VIRTUAL_imagenet256_labeled.npz
# Sustained per-GPU rates assumed for the estimate (about a third of the bf16 peak, 60% of the fp32 one without
# TF32) for batch-64 generation with a KV cache. Peaks: A100 312 bf16 / 19.5 fp32; H100 SXM 989 / 67 TFLOP/s.
ASSUMED_TFLOPS = {"A100 bf16 autocast": 100.0, "A100 fp32": 12.0, "H100 SXM bf16 autocast": 300.0,
                  "H100 SXM fp32": 40.0}


def counted_flops(module: torch.nn.Module, fn, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(module, *inputs)
    return int(counter.get_total_flops())


def per_image_flops(pruned_fraction: float) -> dict[str, int]:
    config = official_config(16)
    var = config.var
    heads = var.num_heads[0] - round(var.num_heads[0] * pruned_fraction)
    ffn = var.ffn_dims[0] - round(var.ffn_dims[0] * pruned_fraction)
    var = var.with_blocks((heads,) * var.depth, (ffn,) * var.depth)
    transformer = 2 * generation_macs(config.to_dict()["var"] | {"num_heads": list(var.num_heads),
                                                                 "ffn_dims": list(var.ffn_dims)})["transformer"]
    with torch.device("meta"):
        vqvae = VQVAE(config.vqvae).eval()
        inception = FIDInception().eval()
        side = var.patch_nums[-1]
        decoder = counted_flops(vqvae, lambda m, f: m.fhat_to_img(f), torch.zeros(1, var.cvae, side, side))
        images = torch.zeros(1, config.vqvae.image_size, config.vqvae.image_size, 3, dtype=torch.uint8)
        fid_inception = counted_flops(inception, lambda m, x: m(x), images)
    return {"var_transformer": transformer, "vqvae_decoder": decoder, "fid_inception": fid_inception,
            "total": transformer + decoder + fid_inception}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "imagenet_eval_cost.json")
    args = ap.parse_args()
    rows = {}
    for name, fraction in (("VAR d16", 0.0), ("EVAR d16 20%", 0.2), ("EVAR d16 40%", 0.4)):
        flops = per_image_flops(fraction)
        total = flops["total"] * SAMPLES
        minutes = {gpu: round(total / (args.gpus * rate * 1e12) / 60, 1) for gpu, rate in ASSUMED_TFLOPS.items()}
        rows[name] = {"gflop_per_image": {k: round(v / 1e9, 1) for k, v in flops.items()},
                      "pflop_for_50k": round(total / 1e15, 1), f"estimated_minutes_on_{args.gpus}_gpus": minutes}
        print(f"{name}: {flops['total'] / 1e9:.0f} GFLOP/image (transformer {flops['var_transformer'] / 1e9:.0f}, "
              f"decoder {flops['vqvae_decoder'] / 1e9:.0f}, Inception {flops['fid_inception'] / 1e9:.1f}); "
              f"50k: {total / 1e15:.1f} PFLOP; minutes on {args.gpus} GPUs (estimate): {minutes}")
    # precision/recall on the CPU (numpy, float64): k-NN radii of both sets and the cross distances, 2·D per pair
    pairs = SAMPLES ** 2 + REFERENCE_IMAGES ** 2 + 2 * SAMPLES * REFERENCE_IMAGES
    knn_tflop = round(pairs * 2 * 2048 / 1e12, 1)
    print(f"precision/recall: {knn_tflop} TFLOP of float64 distances on rank 0's CPU")
    atomic_write_json(args.out, {"samples": SAMPLES, "reference_images": REFERENCE_IMAGES, "knn_cpu_tflop": knn_tflop, "gpus": args.gpus, "assumed_sustained_tflops_per_gpu": ASSUMED_TFLOPS,
                                 "note": "an estimate from FLOP counts and assumed sustained rates, not a measurement",
                                 "models": rows})
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
