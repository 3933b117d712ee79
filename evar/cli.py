"""`evar`: the PyTorch-side commands. A thin typer layer over the library; errors print as one line."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.errors import EvarError, run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="EVAR: compress, export and run VAR image generators on edge devices.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:digits | official:dNN | random:dNN | model dir")]
VarCkpt = Annotated[Optional[Path], typer.Option(help="official VAR .pth (with --model official:dNN)")]
VaeCkpt = Annotated[Optional[Path], typer.Option(help="official VQVAE .pth (with --model official:dNN)")]
Cfg = Annotated[float, typer.Option(help="classifier-free guidance at the last scale (VAR ramps it linearly from 0)")]
TopK = Annotated[int, typer.Option(help="keep the k most likely tokens (0 = off)")]
TopP = Annotated[float, typer.Option(help="nucleus sampling mass (0 = off)")]
Seed = Annotated[int, typer.Option(help="same seed, same tokens, on every backend")]


def _load(model: str, var_ckpt: Optional[Path], vae_ckpt: Optional[Path]):
    from evar import zoo

    return zoo.load(model, var_ckpt, vae_ckpt)


@app.command()
def info(model: ModelOpt = "builtin:digits", var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None) -> None:
    """Print a model's config, parameter counts and provenance."""
    m = _load(model, var_ckpt, vae_ckpt)
    c = m.config.var
    print(f"VAR: depth {c.depth}, width {c.embed_dim}, heads {list(c.num_heads)}, FFN {list(c.ffn_dims)}, "
          f"vocab {c.vocab_size}, patch_nums {list(c.patch_nums)} (L={c.seq_len})")
    print(f"params: VAR {sum(p.numel() for p in m.var.parameters()) / 1e6:.2f}M, "
          f"VQVAE {sum(p.numel() for p in m.vqvae.parameters()) / 1e6:.2f}M, image {m.config.vqvae.image_size}px")
    print(f"provenance: {json.dumps(m.config.provenance)}")


@app.command()
def sample(
    model: ModelOpt = "builtin:digits",
    out: Annotated[Path, typer.Option(help="writes OUT/samples.npz and OUT/grid.png")] = Path("runs/sample"),
    classes: Annotated[str, typer.Option(help="comma-separated class ids")] = "0,1,2,3,4,5,6,7,8,9",
    per_class: Annotated[int, typer.Option(help="images per class")] = 4,
    cfg: Cfg = 1.5, top_k: TopK = 900, top_p: TopP = 0.96, seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(help="images generated at once")] = 64,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None,
    artifact: Annotated[Optional[Path], typer.Option(help="generate from this exported artifact (evar-export) "
                                                          "instead of --model, with the runtime")] = None,
    backend: Annotated[str, typer.Option(help="with --artifact: cpu (onnxruntime) | torch-cpu | ort-coreml | "
                                              "coreml-cpu | coreml-gpu | ane")] = "cpu",
) -> None:
    """Generate images scale by scale with the KV cache (VAR's sampler) and write them with a grid."""
    from evar.samples import SamplingSettings, class_labels, parse_classes, sample_images, write_samples

    if artifact is not None:  # the exported graphs: same seed, same tokens as the PyTorch path at fp32
        import numpy as np

        from runtime import Generator
        from runtime.manifest import load_artifact

        SamplingSettings(cfg, top_k, top_p, seed).validate()
        art = load_artifact(artifact)
        gen = Generator(art, backend, batch_size=None if art.static_batch else batch_size)  # static: the artifact's
        if per_class < 1:
            raise EvarError(f"--per-class must be >= 1, got {per_class}")
        labels = np.repeat(parse_classes(classes, gen.artifact.num_classes), per_class)
        t0 = time.perf_counter()
        images = gen.generate(labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p).images
        write_samples(out, images, labels, columns=per_class)
        print(f"{len(images)} images from {artifact} on {backend} in {time.perf_counter() - t0:.1f}s "
              f"(load {gen.load_ms / 1e3:.1f}s) → {out / 'samples.npz'}, {out / 'grid.png'}")
        return
    m = _load(model, var_ckpt, vae_ckpt)
    labels = class_labels(parse_classes(classes, m.config.var.num_classes), per_class)
    t0 = time.perf_counter()
    images = sample_images(m, labels, SamplingSettings(cfg, top_k, top_p, seed), batch_size)
    write_samples(out, images, labels, columns=per_class)
    print(f"{len(images)} images in {time.perf_counter() - t0:.1f}s → {out / 'samples.npz'}, {out / 'grid.png'}")


@app.command("eval")
def evaluate(
    model: ModelOpt = "builtin:digits",
    out: Annotated[Optional[Path], typer.Option(help="write the report as JSON here")] = None,
    per_class: Annotated[int, typer.Option(help="samples per digit class")] = 50,
    cfg: Cfg = 1.5, top_k: TopK = 900, top_p: TopP = 0.96, seed: Seed = 0,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None,
) -> None:
    """Quality of a digits model: class accuracy and classifier-feature Fréchet distance vs held-out digits."""
    from evar.quality import evaluate_model
    from evar.samples import SamplingSettings

    m = _load(model, var_ckpt, vae_ckpt)
    report = evaluate_model(m, SamplingSettings(cfg, top_k, top_p, seed), per_class, source=model)
    _print_report(report)
    if out is not None:
        from evar.files import atomic_write_json

        atomic_write_json(out, report)
        print(f"report → {out}")


def _print_report(report: dict) -> None:
    q = report["quality"]
    print(f"class accuracy {q['class_accuracy'] * 100:.1f}%  |  Fréchet distance {q['frechet_distance']:.2f} "
          f"(real held-out digits score {q['real_data_floor']:.2f})  |  {q['n_samples']} samples, "
          f"cfg {report['sampling']['cfg']}, top-k {report['sampling']['top_k']}, top-p {report['sampling']['top_p']}")


@app.command()
def convert(
    model: ModelOpt, out: Annotated[Path, typer.Option(help="model directory to write")],
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None,
) -> None:
    """Write any model reference (e.g. the official .pth files) as an EVAR model directory."""
    from evar.checkpoints import save_model_dir

    m = _load(model, var_ckpt, vae_ckpt)
    prov = {"source": model, "var_ckpt": str(var_ckpt) if var_ckpt else None,
            "vae_ckpt": str(vae_ckpt) if vae_ckpt else None, "parent": m.config.provenance or None}
    save_model_dir(m, out, prov)
    print(f"model directory → {out}")


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    out: Annotated[Path, typer.Option(help="tokenizer directory (vqvae.safetensors + tokenizer.json)")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder")] = "digits",
    steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 500,
) -> None:
    """Train the multi-scale VQVAE (digits architecture); rerun the same command to resume."""
    from evar.train import Schedule, TokenizerTraining, train_tokenizer

    sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, ckpt_every=ckpt_every, seed=seed)
    t0 = time.perf_counter()
    path = train_tokenizer(TokenizerTraining(data=data, schedule=sched), out)
    print(f"tokenizer → {path} ({time.perf_counter() - t0:.0f}s)")


@app.command("train")
def train_cmd(
    tokenizer: Annotated[Path, typer.Option(help="from `evar train-tokenizer`, or a model directory")],
    out: Annotated[Path, typer.Option(help="run directory; the model directory is OUT/model")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder (class subfolders)")] = "digits",
    steps: int = 4000, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
    shift_augment: Annotated[int, typer.Option(help="train on copies shifted by up to N pixels")] = 1,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 500,
) -> None:
    """Train a class-conditional VAR (digits architecture) on tokens from a frozen tokenizer; resumable."""
    from evar.train import Schedule, VARTraining, train_var

    sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, ckpt_every=ckpt_every, seed=seed)
    t0 = time.perf_counter()
    path = train_var(VARTraining(tokenizer=str(tokenizer), data=data, schedule=sched, shift_augment=shift_augment), out)
    print(f"model directory → {path} ({time.perf_counter() - t0:.0f}s)")


@app.command("train-classifier")
def train_classifier_cmd(
    out: Annotated[Path, typer.Option(help="safetensors file to write")] = Path("evar/assets/digits_classifier.safetensors"),
    seed: int = 0,
) -> None:
    """Train the digit classifier behind `evar eval` on the digits training split."""
    from evar.eval.classifier import train_classifier

    print(json.dumps(train_classifier(seed=seed, out=out)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the demo writes its outputs (REPORT.md at the top)")] = Path("runs/demo"),
    model: ModelOpt = "builtin:digits",
    sparsity: Annotated[float, typer.Option(help="share of heads and FFN units to prune")] = 0.4,
    method: Annotated[str, typer.Option(help="pruning criterion: obs | taylor | magnitude")] = "obs",
) -> None:
    """The main job: prune → distill → export ONNX/Core ML → run the exported graphs → bench → REPORT.md.

    Every stage is skipped when its output exists, so a stopped demo continues where it was.
    """
    from evar.demo import DemoPlan, run_demo

    report = run_demo(DemoPlan(model=model, out=out, sparsity=sparsity, method=method))
    print(f"report → {report}")


from evar.distill.command import distill as _distill  # noqa: E402  (flags shared with `python -m evar.distill`)

app.command("distill")(_distill)


from evar.prune import commands as _pruning  # noqa: E402  (bodies of the pruning commands)

app.command("prune")(_pruning.prune)
app.command("prune-decoder")(_pruning.prune_decoder)
app.command("distill-decoder")(_pruning.distill_decoder)
app.command("prunable")(_pruning.prunable)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
