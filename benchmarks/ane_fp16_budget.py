"""Where the ANE layout's fp16 token disagreement comes from: the fp16 error of each kind of op, measured.

    python benchmarks/ane_fp16_budget.py [--model builtin:digits] [--seeds 0,1,2,3,4,5] [--batch 10]

fp16 is emulated on the real wrappers (export/ane.py's `AneStep`, unchanged): the fp32 step runs under a
torch function mode that rounds the output of every op of the chosen phases to fp16 (what an fp16 kernel
that computes internally in fp32 returns), and `weights` rounds the parameters. With every phase rounded
this reproduces the `.half()` wrappers of benchmarks/ane_fp16_agreement.py; with none it is the fp32 run.
Phases: which code the op belongs to (`PHASES`: a conv module by name, a function of export/ane.py, the rest
of attention or of the MLP, the scale's input).

Per phase: token agreement (scale by scale on the fp32 run's f_hat, as the agreement benchmark) with only
that phase in fp16, and with every phase but it in fp16. Also the agreement under Gaussian noise added to
the fp32 raw logits (how many tokens a given logit error costs with these weights and sampling settings).
Writes benchmarks/results/ane_fp16_budget.json.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from evar import rng
from evar.contract import host_sampling as hs
from evar.export import ane
from evar.export.ane_export import AneInterface, host_run, loop_manifest
from evar.export.parity import reset_state
from evar.files import atomic_write_json

from ane_fp16_agreement import setup  # beside this script: the same command line and inputs

OUT = Path(__file__).resolve().parent / "results" / "ane_fp16_budget.json"
CONVS = {"qkv": "qkv", "proj": "proj", "fc1": "mlp", "fc2": "mlp", "head": "head", "word_embed": "input"}
# functions of export/ane.py → their phase (looked up at call time, so wrapping the module attribute reaches every caller)
FUNCTIONS = {"norm_channels": "layernorm", "l2_normalize_channels": "l2norm", "modulate": "adaln_apply",
             "residual": "residual", "by_class": "class_condition"}
FLOOR = ["weights", "input", "head", "residual"]
PHASES = ["weights", "input", "class_condition", "adaln_apply", "layernorm", "qkv", "l2norm", "attention", "proj", "mlp",
          "residual", "head"]  # what no phase claims runs in "rest", never rounded: only views (split, squeeze)


class Rounding(TorchFunctionMode):
    """Rounds every floating output of a torch function to fp16 while the current phase is in `half`."""

    def __init__(self, half: set[str]):
        super().__init__()
        self.half, self.stack = half, ["rest"]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack[-1] in self.half and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            return out.half().float()
        return out

    @contextlib.contextmanager
    def phase(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()


def _in_phase(mode: Rounding, name: str, fn):
    def wrapped(*args, **kwargs):
        with mode.phase(name):
            return fn(*args, **kwargs)
    return wrapped


class Emulated(torch.nn.Module):
    """A step run under the rounding mode (only the step: the fp32 f_hat update stays exact)."""

    def __init__(self, step: ane.AneStep, mode: Rounding):
        super().__init__()
        self.step, self.mode = step, mode

    def forward(self, *args):
        with self.mode:
            return self.step(*args)


@contextlib.contextmanager
def emulate(steps: list[ane.AneStep], half: set[str]):
    """`steps` (fp32) wrapped to round to fp16 in the phases `half` (fp16 weights and constants if "weights" is in it)."""
    tensors = {id(t): t for m in [steps[0].core, *steps] for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()}
    saved = {k: t.detach().clone() for k, t in tensors.items()} if "weights" in half else {}
    with torch.no_grad():
        for k in saved:
            tensors[k].copy_(tensors[k].half().float())
    mode = Rounding(half)
    hooks = []
    for name, module in steps[0].core.named_modules():
        phase = CONVS.get(name.rsplit(".", 1)[-1])
        if phase is not None and isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_pre_hook(lambda m, a, p=phase: mode.stack.append(p)))
            hooks.append(module.register_forward_hook(lambda m, a, o: mode.stack.pop() and None))
    originals = {n: getattr(ane, n) for n in FUNCTIONS}
    for n, phase in FUNCTIONS.items():
        setattr(ane, n, _in_phase(mode, phase, originals[n]))
    attention, tokens_in, mlp = ane.AneBlock.attention, ane.AneStep.tokens_in, ane.AneBlock.mlp
    ane.AneBlock.attention = lambda self, *a: _in_phase(mode, "attention", attention)(self, *a)
    ane.AneBlock.mlp = lambda self, h: _in_phase(mode, "mlp", mlp)(self, h)
    ane.AneStep.tokens_in = lambda self, cond, f_hat: _in_phase(mode, "input", tokens_in)(
        self, cond, f_hat.half().float() if "input" in half else f_hat)
    try:
        yield [Emulated(s, mode) for s in steps]
    finally:
        for n, fn in originals.items():
            setattr(ane, n, fn)
        ane.AneBlock.attention, ane.AneStep.tokens_in, ane.AneBlock.mlp = attention, tokens_in, mlp
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, t in saved.items():
                tensors[k].copy_(t)


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b)])))


def main() -> None:
    t0 = time.perf_counter()
    args, model, labels = setup(__doc__, "0,1,2,3,4,5")
    c = model.config.var
    iface = AneInterface(model.config, args.batch).at_fp32()
    specs = [iface.step(si) for si in range(c.num_scales)], [iface.update(si) for si in range(c.num_scales)]
    steps = ane.ane_steps(model, args.batch)
    updates = [ane.FhatUpdate(model, si).eval() for si in range(c.num_scales)]
    seeds = [int(s) for s in args.seeds.split(",")]
    sampling = (args.cfg, args.top_k, args.top_p)

    def run(seed, teacher=None, wrappers=None):
        reset_state(steps)
        return host_run(loop_manifest(iface), wrappers or steps, updates, labels, seed, *sampling, *specs,
                        teacher=teacher, reset=False)

    with torch.no_grad():
        teachers = {s: run(s) for s in seeds}

        def measure(half: set[str]) -> dict:
            with torch.no_grad(), emulate(steps, half) as wrappers:
                runs = {s: run(s, teachers[s], wrappers) for s in seeds}
            err = [max(float(np.abs(a - b).max()) for a, b in zip(runs[s].logits, teachers[s].logits)) for s in seeds]
            return {"token_agreement": float(np.mean([agreement(runs[s].tokens, teachers[s].tokens) for s in seeds])),
                    "guided_logits_max_abs_error": max(err)}

        rows = {"none": measure(set()), "all": measure(set(PHASES))}
        print("none", rows["none"], "\nall", rows["all"], flush=True)
        for p in PHASES:
            rows[p] = {"only_this_fp16": measure({p}), "all_but_this_fp16": measure(set(PHASES) - {p})}
            print(p, rows[p], flush=True)
        floors = {}  # what any fp16 function keeps in fp16, added one at a time; every other phase exact
        for i in range(1, len(FLOOR) + 1):
            floors["+".join(FLOOR[:i])] = measure(set(FLOOR[:i]))
            print("only", FLOOR[:i], floors["+".join(FLOOR[:i])], flush=True)
        noise = {}
        for sigma in (0.001, 0.003, 0.01, 0.03):
            agree = []
            for s in seeds:
                gen = np.random.default_rng(s)
                tokens = []
                for si, pn in enumerate(c.patch_nums):
                    raw = teachers[s].logits[si]  # guided fp32 logits; noise on the guided logits
                    noisy = raw + gen.standard_normal(raw.shape).astype(np.float32) * sigma
                    u = rng.scale_uniforms(s, si, args.batch, pn * pn)
                    tokens.append(hs.sample_from_uniforms(hs.filter_logits(noisy, args.top_k, args.top_p), u))
                agree.append(agreement(tokens, teachers[s].tokens))
            noise[str(sigma)] = float(np.mean(agree))
        print("noise", noise)
    result = {"model": args.model, "batch": args.batch, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
              "seeds": seeds, "phases": rows,
              "floors": floors,
              "floors_why": "an fp16 Neural Engine function holds fp16 weights, takes f_hat in fp16 (input), returns "
                            "fp16 logits (head: the rounding of its output) and carries its residual stream in fp16",
              "agreement_under_gaussian_noise_on_guided_logits": noise,
              "protocol": "fp16 emulated per op (fp32 op, output rounded to fp16) on the ANE-layout wrappers, scale by "
                          "scale on the fp32 run's f_hat; host sampling in float32",
              "load_average": list(os.getloadavg()), "seconds": time.perf_counter() - t0,
              "command": "python benchmarks/ane_fp16_budget.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    atomic_write_json(OUT, result)
    print(f"→ {OUT}")


if __name__ == "__main__":
    main()
