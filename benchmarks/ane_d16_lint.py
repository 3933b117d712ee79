"""The Neural Engine lint on VAR d16 (random:d16: the release shapes, noise weights), one function at a time.

    python benchmarks/ane_d16_lint.py [--model random:d16] [--scales 9] [--compress none,palettize6]

A full `evar-export coreml --model random:d16 --target ane` converts ten 16-block step functions, ten
f_hat updates and the decoder, which takes longer than a shared 2-core machine gives; the lint's verdict is per
function, so this converts the chosen scales' step functions and the VQVAE decoder exactly as the exporter
does (export/ane_export.py `_convert`), saves them, and runs the `--strict-ane` rules (export/ane_lint.py) on
each. The weights of every step function are the same tensors, so one palettized step package is the size of
the whole multifunction decoder_step package (identical weight blobs are stored once) up to its small program.
Writes benchmarks/results/ane_d16_lint.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from evar import zoo
from evar.export.ane import AneDecoder, ane_steps
from evar.export.ane_export import ANE_UNITS, AneInterface, _convert
from evar.export.ane_lint import lint_function, read_ops
from evar.export.artifact import export_ready
from evar.export.coreml import weight_bytes
from evar.files import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "ane_d16_lint.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:d16")
    ap.add_argument("--scales", default="9")
    ap.add_argument("--compress", default="none,palettize6")
    ap.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = export_ready(zoo.load(args.model, attn_impl="math"))
    iface = AneInterface(model.config, 1)
    steps = ane_steps(model, 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="evar-d16-lint-") as tmp:
        jobs = [(f"decoder_step/scale_{si}", steps[si], iface.step(si)) for si in map(int, args.scales.split(","))]
        if args.decoder:
            jobs.append(("vqvae_decoder/main", AneDecoder(model).eval(), iface.decoder()))
        for compress in args.compress.split(","):
            for name, module, fn in jobs:
                t = time.perf_counter()
                path = Path(tmp) / f"{name.replace('/', '-')}-{compress}.mlpackage"
                mlmodel = _convert(module, fn, "fp16", ANE_UNITS, compress)
                mlmodel.save(str(path))
                del mlmodel
                ops = next(iter(read_ops(path).values()))
                lint = lint_function(*name.split("/"), ops, [s.to_json() for s in fn.states], True)
                rows.append({"function": name, "compress": compress, "ops": lint.ops, "on_ane": lint.on_ane,
                             "findings": lint.findings, "weight_bytes": weight_bytes(path),
                             "seconds": time.perf_counter() - t})
                print(rows[-1], flush=True)
                result = write(args, iface, rows, t0)  # after every function: a long run keeps what it measured
    print(f"strict ANE lint passes: {result['strict_ane_passes']} → {OUT}")


def write(args, iface: AneInterface, rows: list[dict], t0: float) -> dict:
    result = {"model": args.model, "functions": rows, "strict_ane_passes": all(not r["findings"] for r in rows),
              "kv_padded_length": iface.padded_length, "load_average": list(os.getloadavg()),
              "seconds": time.perf_counter() - t0,
              "command": f"python benchmarks/ane_d16_lint.py --model {args.model} --scales {args.scales} "
                         f"--compress {args.compress}" + ("" if args.decoder else " --no-decoder")}
    atomic_write_json(OUT, result)
    return result


if __name__ == "__main__":
    main()
