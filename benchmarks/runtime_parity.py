"""Same seed, same tokens: the exported ONNX graphs run by `evar.runtime.Generator` vs `evar sample`'s PyTorch path.

    python benchmarks/runtime_parity.py [--models random:digits,builtin:digits] [--per-class 20]

For each model: `evar-export onnx` (cached under --work), then for several seeds and guidance scales, every
class × --per-class samples from both paths at fp32; counts tokens that differ and the largest pixel
difference. A token can differ only where a draw sits within float rounding of a top-k / top-p / CDF
boundary (onnxruntime and PyTorch round the logits differently in the last bits); each such token is
listed with its scale. Writes benchmarks/results/runtime_parity.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.latency import RESULTS, ensure_export  # noqa: E402
from evar import zoo  # noqa: E402
from evar.data import to_uint8_nhwc  # noqa: E402
from evar.files import atomic_write_json  # noqa: E402
from evar.models.decoding import generate  # noqa: E402
from evar.runtime import Generator  # noqa: E402

CASES = ((0, 1.5), (12345, 4.0), (7, 0.0))  # (seed, cfg)


def model_dir(ref: str) -> Path:
    if ref.startswith("builtin:"):
        return ROOT / "evar" / "assets" / ref.split(":", 1)[1]
    return Path(ref)


def check(ref: str, work: Path, per_class: int) -> dict:
    src = ref
    if ref.startswith("random:"):  # a model dir, so the export and the check load the same weights
        src = str(work / "models" / ref.replace(":", "-"))
        if not (Path(src) / "config.json").exists():
            from evar.checkpoints import save_model_dir

            save_model_dir(zoo.load(ref), src, {"source": ref})
    elif ref.startswith("builtin:"):
        src = str(model_dir(ref))
    art = ensure_export(Path(src), work / "export" / f"parity-{ref.replace(':', '-')}")
    model = zoo.load(src)
    gen = Generator(art, "cpu")
    labels = np.repeat(np.arange(model.config.var.num_classes), per_class)
    cases = []
    for seed, cfg in CASES:
        out = gen.generate(labels, seed=seed, cfg=cfg)
        with torch.no_grad():
            ref_gen = generate(model.var, model.vqvae, torch.from_numpy(labels), guidance=cfg, top_k=gen.artifact.top_k,
                               top_p=gen.artifact.top_p, seed=seed)
        differing = [{"scale": si, "sample": int(b), "token": int(j)}
                     for si, (a, r) in enumerate(zip(out.tokens, ref_gen.tokens))
                     for b, j in np.argwhere(a != r.numpy())]
        total = sum(t.size for t in out.tokens)
        pixels = np.abs(out.images.astype(int) - to_uint8_nhwc(ref_gen.images).astype(int))
        same_images = int((pixels.reshape(len(labels), -1).max(1) == 0).sum())
        cases.append({"seed": seed, "cfg": cfg, "samples": len(labels), "tokens": total,
                      "tokens_equal": total - len(differing), "differing_tokens": differing,
                      "images_identical": same_images, "max_pixel_diff": int(pixels.max())})
        print(f"{ref} seed {seed} cfg {cfg}: {total - len(differing)}/{total} tokens equal, "
              f"{same_images}/{len(labels)} images identical, max |pixel diff| {int(pixels.max())}", flush=True)
    return {"model": ref, "artifact": str(art), "top_k": gen.artifact.top_k, "top_p": gen.artifact.top_p, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="random:digits,builtin:digits")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = []
    for ref in args.models.split(","):
        if ref.startswith("builtin:") and not (model_dir(ref) / "config.json").exists():
            print(f"skip {ref}: not built yet ({model_dir(ref)} has no config.json)")
            continue
        results.append(check(ref, args.work, args.per_class))
    out = {"benchmark": "runtime_parity", "backend": "onnxruntime CPU, fp32", "results": results,
           "command": "python benchmarks/runtime_parity.py " + " ".join(sys.argv[1:]),
           "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(RESULTS / "runtime_parity.json", out)
    print(f"→ {RESULTS / 'runtime_parity.json'}")


if __name__ == "__main__":
    main()
