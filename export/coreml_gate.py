"""The quality gate of `evar-export coreml --compress palettize6|palettize4|int8`.

Compressed weights give other tokens, and Linux cannot run the package, so the gate runs what the package
computes on the CPU: the fp16 ANE wrappers carrying the weights the converter stores (export/coreml_emulate.py,
equal tensor by tensor to what `ct.convert` writes), scale by scale on the fp32 wrappers' own f_hat, the
protocol of the fp16 check in `ane_export.ane_parity` (one seed, the export's batch). Per scale it measures
what the `--quantize int8` ONNX gate measures (export/quantize.py, same helpers): the mean per-token
KL(fp32 ‖ compressed) and the best coupling's agreement, mean 1 − TV, both of the guided logits before top-k/
top-p (the int8 gate's choice too: filtered distributions can have different supports, where KL is
infinite), and the compressed decoder's image PSNR against the fp32 decoder's on the reference f_hat
(the `--quantize-decoder int8` gate's measure). The thresholds are written next to the values in the
manifest's parity checks; a breach fails the export in one line naming the flag that relaxes it.
The default target (`--target iOS18/iOS17`) is gated the same way with its own wrappers carrying the stored
weights, computed in fp32 (`default_target_gate`: VAR's modules do not run in fp16 on the CPU).

Torch-free at import: the CLI reads the defaults for its help text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evar.errors import EvarError

GATED = ("palettize6", "palettize4", "int8")  # what coreml_emulate reproduces; 2:4 stores the weights exactly
# metric of a gate check → the `evar-export coreml` flag that sets its threshold
FLAGS = {"mean_token_kl": "--compress-max-kl", "token_agreement": "--compress-min-agreement",
         "psnr_db": "--compress-min-psnr"}
BOUND = {"mean_token_kl": "≤", "token_agreement": "≥", "psnr_db": "≥"}


@dataclass(frozen=True)
class CompressGate:
    """Thresholds of the gate: the ONNX int8 gates' (`Int8Options`, `DecoderInt8Options`)."""
    max_kl: float = 0.05  # per scale: mean per-token KL(fp32 ‖ compressed) of the guided logits
    min_token_agreement: float = 0.85  # per scale: mean over tokens of 1 − TV(fp32, compressed)
    min_psnr_db: float = 30.0  # the compressed decoder's image vs the fp32 decoder's, [-1, 1] (peak-to-peak 2)

    def validate(self) -> None:
        if not self.max_kl > 0:
            raise EvarError(f"{FLAGS['mean_token_kl']} must be > 0, got {self.max_kl}")
        if not 0 < self.min_token_agreement <= 1:
            raise EvarError(f"{FLAGS['token_agreement']} must be in (0, 1], got {self.min_token_agreement}")
        if not np.isfinite(self.min_psnr_db):
            raise EvarError(f"{FLAGS['psnr_db']} must be a finite number of dB, got {self.min_psnr_db}")

    def to_json(self, method: str) -> dict[str, Any]:
        """The manifest's `compression.details.gate`."""
        return {"against": "the fp32 wrappers (and fp32 decoder) of the same model",
                "how": f"the wrappers on the CPU carrying the weights --compress {method} stores (coremltools' own "
                       "routines; fp16 for --target ane, fp32 otherwise), scale by scale on the fp32 run's inputs; "
                       "not run on a device",
                "max_mean_token_kl_per_scale": self.max_kl, "min_token_agreement_per_scale": self.min_token_agreement,
                "min_psnr_db": self.min_psnr_db,
                "token_agreement": "mean over tokens of 1 - total variation (best coupling) of the guided logits "
                                   "before top-k/top-p", "psnr": "on [-1, 1] images, peak-to-peak 2"}


def ungated_note(method: str) -> str | None:
    """The parity report's `skipped` line for a --compress method the gate cannot emulate (None: gated, or
    nothing lossy: 2:4 alone stores every weight exactly)."""
    if method in GATED or method in ("none", "2:4"):
        return None
    return f"--compress {method}: no quality gate (its weights are not emulated on the CPU)"


def label(method: str) -> str:
    return f"--compress {method} (CPU emulation) vs fp32 wrappers"


def step_checks(method: str, ref_logits: list[np.ndarray], got_logits: list[np.ndarray], gate: CompressGate) -> list:
    """Per scale: the mean token KL and 1 − TV of the compressed run's guided logits against the fp32 run's."""
    from evar.export.parity import Check
    from evar.export.quantize import token_agreement, token_kl

    checks = []
    for si, (r, g) in enumerate(zip(ref_logits, got_logits)):
        kl, agree = token_kl(r, g), token_agreement(r, g)
        checks.append(Check(f"{label(method)}: mean token KL scale {si}", bool(kl <= gate.max_kl), "mean_token_kl",
                            kl, gate.max_kl))
        checks.append(Check(f"{label(method)}: token agreement (1 - TV) scale {si}",
                            bool(agree >= gate.min_token_agreement), "token_agreement", agree, gate.min_token_agreement))
    return checks


def decoder_check(method: str, ref_image: np.ndarray, got_image: np.ndarray, gate: CompressGate):
    from evar.export.parity import Check
    from evar.export.quantize import psnr_db

    value = psnr_db(ref_image, got_image)
    return Check(f"--compress {method} decoder (CPU emulation) vs fp32 decoder: image PSNR (dB)",
                 bool(value >= gate.min_psnr_db), "psnr_db", value, gate.min_psnr_db)


def raise_if_failed(report, what: str, method: str) -> None:
    """When only gate checks failed: one line naming the method, each failing scale, value, threshold and the
    flag that relaxes it. Any other failure is a broken export: the report's own error says which."""
    from evar.export.parity import ParityError

    failed = [c for c in report.checks if not c.passed]
    gate = [c for c in failed if c.name.startswith((label(method), f"--compress {method} decoder"))]
    if not failed or len(gate) != len(failed):
        report.raise_if_failed(what)
        return
    parts = []
    for metric, flag in FLAGS.items():
        hits = [c for c in gate if c.metric == metric]
        if hits:
            where = ", ".join(f"{c.value:.4g}" + (f" at scale {c.name.rsplit(' ', 1)[1]}" if metric != "psnr_db" else "")
                              for c in hits)
            parts.append(f"{_metric_name(metric)} {where} (threshold {BOUND[metric]} {hits[0].tolerance}; relax with {flag})")
    raise ParityError(f"{what}: --compress {method} fails its quality gate (emulated on the CPU against the fp32 "
                      f"wrappers): " + "; ".join(parts))


def _metric_name(metric: str) -> str:
    return {"mean_token_kl": "mean token KL", "token_agreement": "token agreement (1 - TV)",
            "psnr_db": "decoder image PSNR (dB)"}[metric]


def default_target_gate(report, model, iface, wrappers: list, run, ref, options) -> None:
    """The gate of `--target iOS18/iOS17 --compress X` (X in GATED): the step wrappers carrying the stored
    weights (`coreml_emulate.compressed_wrappers`) driven scale by scale on the fp32 wrappers' inputs (`run`:
    f_hat, uniforms and, for iOS17, past KV), and the compressed VQVAE decoder on the reference f_hat against
    the fp32 one. Computed in fp32: VAR's modules cast to float32 inside (the head, the norms), so unlike the
    ANE wrappers they do not run in fp16 on the CPU. The gate measures the weights; fp16 compute adds to it
    (on the ANE layout, fp16 alone costs 0.3% of 1 − TV on builtin:digits against int8's 1.8%)."""
    import torch
    from evar.export import parity as pt
    from evar.export.coreml_emulate import compressed_copy, compressed_wrappers
    from evar.export.graphs import VQVAEDecoder

    steps = compressed_wrappers(wrappers, options.compress, half=False)
    if iface.kv_mode == "state":
        pt.reset_state(steps)
    got = pt.drive(pt.torch_step(steps, iface), iface, run.inputs[0]["labels"], pt.PARITY_SEED, pt.PARITY_CFG,
                   teacher=run)
    report.checks.extend(step_checks(options.compress, [o["logits"] for o in run.outputs],
                                     [o["logits"] for o in got.outputs], options.gate))
    decoder = VQVAEDecoder(model).eval()
    packed = compressed_copy(decoder, options.compress, lambda n: n.startswith("vqvae.encoder."), half=False)
    with torch.no_grad():
        f_hat = torch.from_numpy(ref.f_hat)
        image, imagec = decoder(f_hat).numpy(), packed(f_hat).numpy()
    report.checks.append(decoder_check(options.compress, image, imagec, options.gate))
