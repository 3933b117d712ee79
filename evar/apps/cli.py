"""`evar`: the PyTorch-side commands. A thin typer layer over the library; errors print as one line."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import Guidance, ModelOpt, Overwrite, Seed, TopK, TopP, VaeCkpt, VarCkpt, VerifyHashes
from evar.dd.options import DDSteps, DDTeacher, DDTeacherScales, DDTList
from evar.dit.commands import DDIMSteps
from evar.errors import EvarError, run_cli
from evar.outputs import claim_output, mark_output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="EVAR: compress, export and run VAR image generators on edge devices.")


def _load(model: str, var_ckpt: Optional[Path], vae_ckpt: Optional[Path]):
    from evar import zoo

    return zoo.load(model, var_ckpt, vae_ckpt)


@app.command()
def info(model: ModelOpt = "builtin:digits", var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None) -> None:
    """Print a model's config, parameter counts and provenance."""
    from evar import zoo

    if zoo.kind_of(model) == "vit":  # a classifier: evar.vit says what it is
        from evar.vit.commands import describe_and_sparsity

        print(describe_and_sparsity(zoo.load_family(model, ("vit",))))
        return
    m = _load_generator(model, var_ckpt, vae_ckpt)
    if _is_dit(m):
        from evar.dit.commands import describe

        print(describe(m))
        return
    c = m.config.var
    print(f"VAR: depth {c.depth}, width {c.embed_dim}, heads {list(c.num_heads)}, FFN {list(c.ffn_dims)}, "
          f"vocab {c.vocab_size}, patch_nums {list(c.patch_nums)} (L={c.seq_len})")
    print(f"params: VAR {sum(p.numel() for p in m.var.parameters()) / 1e6:.2f}M, "
          f"VQVAE {sum(p.numel() for p in m.vqvae.parameters()) / 1e6:.2f}M, image {m.config.vqvae.image_size}px")
    print(f"provenance: {json.dumps(m.config.provenance)}")
    if m.sparsity is not None:
        from evar.sparsity.report import sparsity_lines

        print("\n".join(sparsity_lines(m)))
    if m.config.vqvae.image_size == 16:  # a digits-sized tokenizer: its codebook health on held-out digits
        from evar.data import load_digits
        from evar.models.codebook import describe_usage, tokenizer_report

        print(f"tokenizer: {describe_usage(tokenizer_report(m.vqvae, load_digits('test', 16)[0]))} (digits test split)")


def _load_generator(model: str, var_ckpt: Optional[Path], vae_ckpt: Optional[Path]):
    """A VAR or a DiT: the families `evar sample`, `evar eval` and `evar info` take."""
    from evar import zoo

    return zoo.load_family(model, ("var", "dit"), var_ckpt=var_ckpt, vae_ckpt=vae_ckpt)


def _is_dit(model) -> bool:
    from evar.dit.checkpoint import DiTModel

    return isinstance(model, DiTModel)


@app.command()
def sample(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="builtin:digits | official:dNN | random:dNN "
                                                                       "| model dir (default builtin:digits)")] = None,
    out: Annotated[Path, typer.Option(help="writes OUT/samples.npz and OUT/grid.png")] = Path("runs/sample"),
    classes: Annotated[str, typer.Option(help="comma-separated class ids")] = "0,1,2,3,4,5,6,7,8,9",
    per_class: Annotated[int, typer.Option(help="images per class")] = 4,
    guidance: Guidance = 1.5, top_k: TopK = 900, top_p: TopP = 0.96, seed: Seed = 0,
    ddim_steps: DDIMSteps = 25,
    batch_size: Annotated[int, typer.Option(help="images generated at once")] = 64,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None,
    artifact: Annotated[Optional[Path], typer.Option(help="generate from this exported artifact (evar-export) "
                                                          "instead of --model, with the runtime")] = None,
    backend: Annotated[Optional[str], typer.Option(help="with --artifact: cpu (onnxruntime, the default) | torch-cpu "
                                                        "| ort-coreml | coreml-cpu | coreml-gpu | ane")] = None,
    verify_hashes: VerifyHashes = False,
    overwrite: Overwrite = False,
    steps: DDSteps = None, t_list: DDTList = None, teacher: DDTeacher = None, teacher_scales: DDTeacherScales = None,
    early_model: Annotated[Optional[str], typer.Option(help="scale split (with --split-scale): this model (same "
                                                            "tokenizer) generates the scales before it")] = None,
    split_scale: Annotated[Optional[int], typer.Option(help="scale split: the first scale --model generates")] = None,
    token_keep: Annotated[Optional[str], typer.Option(help="late-scale token pruning: SCALE:RATIO,… (as evar-export "
                                                           "onnx --token-keep)")] = None,
) -> None:
    """Generate images scale by scale with the KV cache (VAR's sampler), or in 1-2 steps with a DD model, and
    write them with a grid."""
    from evar.dd.sampler import DDRequest
    from evar.samples import SamplingSettings

    settings = SamplingSettings(guidance, top_k, top_p, seed)
    settings.validate()
    _check_count("--per-class", per_class)
    _check_count("--batch-size", batch_size)
    if artifact is None and (backend is not None or verify_hashes):
        raise EvarError("--backend and --verify-hashes go with --artifact (an exported model)")
    if artifact is not None and (model is not None or var_ckpt or vae_ckpt):
        raise EvarError("--artifact and --model exclude each other: the artifact is the model")
    dd = DDRequest(steps, t_list, teacher, teacher_scales)
    recipe = (early_model, split_scale, token_keep)
    if any(r is not None for r in recipe) and (artifact is not None or dd.given()):
        raise EvarError("--early-model, --split-scale and --token-keep go with --model (a VAR); an artifact states "
                        "its own recipe (evar-export onnx takes the same flags)")
    if artifact is not None and (teacher is not None or teacher_scales is not None):
        raise EvarError("--teacher and --teacher-scales go with --model (a DD model directory); an exported DD "
                        "artifact takes --steps / --t-list")
    with claim_output(out, "dir", overwrite=overwrite, inputs=[artifact, model, teacher]):
        if artifact is not None:
            images, labels, what = _sample_artifact(artifact, backend or "cpu", classes, per_class, settings,
                                                    batch_size, verify_hashes, dd)
        elif any(r is not None for r in recipe):
            images, labels, what = _sample_recipe(model or "builtin:digits", var_ckpt, vae_ckpt, classes, per_class,
                                                  settings, batch_size, *recipe)
        else:
            images, labels, what, settings = _sample_model(model or "builtin:digits", var_ckpt, vae_ckpt, classes,
                                                           per_class, settings, batch_size, dd, ddim_steps)
        from evar.samples import write_samples

        write_samples(out, images, labels, columns=per_class, settings=settings, source=str(artifact or model))
    print(f"{what} → {out / 'samples.npz'}, {out / 'grid.png'}")


def _check_count(flag: str, value: int) -> None:
    if value < 1:
        raise EvarError(f"{flag} must be >= 1, got {value}")


def _sample_model(model: str, var_ckpt, vae_ckpt, classes: str, per_class: int, settings, batch_size: int, dd,
                  ddim_steps: int):
    """Images from a VAR (VAR's sampler), a DD model (its few-step plan) or a DiT (DDIM), and the settings used."""
    from evar.samples import class_labels, parse_classes

    t0 = time.perf_counter()
    if _names_dit(model, dd):
        from evar.dit.commands import settings_for
        from evar.dit.sample import sample_dit_images

        m = _load_generator(model, var_ckpt, vae_ckpt)
        settings = settings_for(settings.guidance, ddim_steps, settings.seed)
        labels = class_labels(parse_classes(classes, m.config.num_classes), per_class)
        images = sample_dit_images(m, labels, settings, batch_size)
    else:
        from evar.dd.sampler import load_sampler

        m, sample_images = load_sampler(model, var_ckpt, vae_ckpt, dd)  # a VAR, or a DD model with its few-step plan
        labels = class_labels(parse_classes(classes, m.config.var.num_classes), per_class)
        images = sample_images(m, labels, settings, batch_size)
    return images, labels, f"{len(images)} images in {time.perf_counter() - t0:.1f}s", settings


def _sample_recipe(model: str, var_ckpt, vae_ckpt, classes: str, per_class: int, settings, batch_size: int,
                   early_model: str | None, split_scale: int | None, token_keep: str | None):
    """A VAR with a scale split and/or token pruning: `generate`'s PyTorch reference of those export options."""
    from evar import zoo
    from evar.export.split import check_plan
    from evar.models.token_keep import keep_counts, parse_token_keep
    from evar.samples import class_labels, parse_classes, sample_images

    if zoo.kind_of(model) != "var" or (early_model is not None and zoo.kind_of(early_model) != "var"):
        raise EvarError("--early-model, --split-scale and --token-keep take VAR generators")
    t0 = time.perf_counter()
    m = zoo.load(model, var_ckpt, vae_ckpt)
    early = zoo.load(early_model) if early_model is not None else None
    check_plan(m, early, split_scale, None)
    pns = m.config.var.patch_nums
    counts = keep_counts(parse_token_keep(token_keep, pns), pns) or None
    labels = class_labels(parse_classes(classes, m.config.var.num_classes), per_class)
    images = sample_images(m, labels, settings, batch_size, early=early.var if early is not None else None,
                           split_scale=split_scale, token_keep=counts)
    return images, labels, f"{len(images)} images in {time.perf_counter() - t0:.1f}s"


def _names_dit(model: str, dd) -> bool:
    """A DiT reference (checked before loading, so few-step flags with a DiT fail first)."""
    from evar import zoo

    if zoo.kind_of(model) != "dit":
        return False
    if dd.given():
        raise EvarError(f"--steps, --t-list, --teacher and --teacher-scales go with a Distilled Decoding model; "
                        f"'{model}' is a DiT (its sampler's steps: --ddim-steps)")
    return True


def _sample_artifact(artifact: Path, backend: str, classes: str, per_class: int, settings, batch_size: int,
                     verify_hashes: bool, dd=None):
    """The exported graphs: same seed, same tokens as the PyTorch path at fp32."""
    import numpy as np

    from evar.samples import parse_classes
    from evar.runtime import Generator
    from evar.contract import load_artifact

    art = load_artifact(artifact, verify_hashes=verify_hashes)
    gen = Generator(art, backend, batch_size=None if art.static_batch else batch_size)  # static: the artifact's
    labels = np.repeat(parse_classes(classes, gen.artifact.num_classes), per_class)
    t_list = None
    if dd is not None and dd.given():  # an exported DD student's passes (the Generator refuses them for a VAR)
        from evar.dd.sampler import plan

        t_list = list(plan(art.num_scales, dd.steps, dd.t_list, None).t_list)
    t0 = time.perf_counter()
    images = gen.generate(labels, seed=settings.seed, cfg=settings.guidance, top_k=settings.top_k,
                          top_p=settings.top_p, t_list=t_list).images
    return images, labels, (f"{len(images)} images from {artifact} on {backend} in {time.perf_counter() - t0:.1f}s "
                            f"(load {gen.load_ms / 1e3:.1f}s)")


@app.command("eval")
def evaluate(
    model: ModelOpt = "builtin:digits",
    out: Annotated[Optional[Path], typer.Option(help="write the report as JSON here")] = None,
    per_class: Annotated[int, typer.Option(help="samples per digit class")] = 50,
    guidance: Guidance = 1.5, top_k: TopK = 900, top_p: TopP = 0.96, seed: Seed = 0, ddim_steps: DDIMSteps = 25,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
    steps: DDSteps = None, t_list: DDTList = None, teacher: DDTeacher = None, teacher_scales: DDTeacherScales = None,
) -> None:
    """Quality of a digits model (VAR, DD or DiT): class accuracy, classifier-feature Fréchet distance and
    precision/recall vs held-out digits; of a ViT classifier: top-1 on the held-out digits."""
    from evar.dd.sampler import DDRequest
    from evar.samples import SamplingSettings

    settings = SamplingSettings(guidance, top_k, top_p, seed)
    settings.validate()
    _check_count("--per-class", per_class)
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(claim_output(out, "file", overwrite=overwrite, inputs=[model, teacher]))
        from evar import zoo
        from evar.dd.sampler import load_sampler
        from evar.quality import evaluate_model

        dd = DDRequest(steps, t_list, teacher, teacher_scales)
        if zoo.kind_of(model) == "vit":  # a classifier: top-1 on the held-out digits
            from evar.vit.commands import evaluate_vit

            report = evaluate_vit(zoo.load_family(model, ("vit",)), source=model)
        elif _names_dit(model, dd):
            from evar.dit.commands import evaluate_dit, settings_for

            report = evaluate_dit(_load_generator(model, var_ckpt, vae_ckpt), settings_for(guidance, ddim_steps, seed),
                                  per_class, source=model)
        else:
            m, sample_images = load_sampler(model, var_ckpt, vae_ckpt, dd)
            report = evaluate_model(m, settings, per_class, source=model, sample=sample_images)
        _print_report(report)
        if out is not None:
            from evar.files import atomic_write_json

            atomic_write_json(out, report)
            print(f"report → {out}")


def _print_report(report: dict) -> None:
    if report.get("task") == "classification":  # a ViT: top-1, not sample quality
        print(f"top-1 {report['top1'] * 100:.2f}% on the digits {report['split']} split ({report['images']} images)")
        return
    q = report["quality"]
    how = ", ".join(f"{k.replace('_', '-').replace('guidance', 'cfg')} {v}" for k, v in report["sampling"].items()
                    if k != "seed")
    pr = "" if q.get("recall") is None else f", precision {q['precision']:.3f}, recall {q['recall']:.3f} (k={q['k']})"
    real_pr = ("" if q.get("real_data_recall") is None else
               f", precision {q['real_data_precision']:.3f}, recall {q['real_data_recall']:.3f}")
    real = f"{q['real_data_samples']} real training digits" if q.get("real_data_samples") else "real training digits"
    print(f"class accuracy {q['class_accuracy'] * 100:.1f}%  |  Fréchet distance {q['frechet_distance']:.2f}{pr}  |  "
          f"{real}: Fréchet distance {q['real_data_floor']:.2f}{real_pr}  |  {q['n_samples']} samples, {how}")


@app.command()
def convert(
    model: ModelOpt, out: Annotated[Path, typer.Option(help="model directory to write")],
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
) -> None:
    """Write any model reference (e.g. the official .pth files) as an EVAR model directory."""
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model, var_ckpt, vae_ckpt]):
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
    restart_every: Annotated[int, typer.Option(help="move dead codes onto encoder residuals every N steps "
                                                    "(0: never)")] = 50,
    init: Annotated[Optional[Path], typer.Option(help="start from this tokenizer (train-tokenizer or model "
                                                      "directory) instead of random weights")] = None,
) -> None:
    """Train the multi-scale VQVAE (digits architecture); rerun the same command to resume.

    Prints (and writes into OUT/tokenizer.json) the held-out reconstruction MSE and the codes used per scale."""
    _check_count("--steps", steps)
    if restart_every < 0:
        raise EvarError(f"--restart-every must be >= 0, got {restart_every}")
    with _training_run(out, "tokenizer", inputs=[init]):
        from evar.models.codebook import describe_usage
        from evar.train import CodebookCare, Schedule, TokenizerTraining, train_tokenizer

        sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, ckpt_every=ckpt_every, seed=seed)
        t0 = time.perf_counter()
        job = TokenizerTraining(data=data, schedule=sched, codebook=CodebookCare(restart_every=restart_every),
                                init=None if init is None else str(init))
        path = train_tokenizer(job, out)
    report = json.loads((path / "tokenizer.json").read_text())["codebook"]
    print(f"{describe_usage(report)} ({report['split']} split)")
    print(f"tokenizer → {path} ({time.perf_counter() - t0:.0f}s)")


@app.command("train")
def train_cmd(
    tokenizer: Annotated[Path, typer.Option(help="from `evar train-tokenizer`, or a model directory")],
    out: Annotated[Path, typer.Option(help="run directory; the model directory is OUT/model")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder (class subfolders)")] = "digits",
    steps: int = 4000, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
    shift_augment: Annotated[int, typer.Option(help="train on copies shifted by up to N pixels")] = 1,
    unshifted_share: Annotated[Optional[float], typer.Option(
        help="share of each batch drawn from the unshifted images (default: uniform over all copies)")] = None,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 500,
) -> None:
    """Train a class-conditional VAR (digits architecture) on tokens from a frozen tokenizer; resumable."""
    with _training_run(out, "training run", inputs=[tokenizer]):
        from evar.train import Schedule, VARTraining, train_var

        sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, ckpt_every=ckpt_every,
                         seed=seed)
        t0 = time.perf_counter()
        path = train_var(VARTraining(tokenizer=str(tokenizer), data=data, schedule=sched, shift_augment=shift_augment,
                                         unshifted_share=unshifted_share), out)
    print(f"model directory → {path} ({time.perf_counter() - t0:.0f}s)")


@contextlib.contextmanager
def _training_run(out: Path, kind: str, inputs=()):
    """A run folder trained in place: rerunning the command into it resumes; anything else there is refused."""
    with claim_output(out, "dir", resumes=(kind, "training run"), inputs=inputs,
                      progress_note=f"the last checkpoint waits in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, kind)
        yield


@app.command("train-classifier")
def train_classifier_cmd(
    out: Annotated[Path, typer.Option(help="safetensors file to write")] = Path("evar/assets/digits_classifier.safetensors"),
    seed: int = 0, overwrite: Overwrite = False,
) -> None:
    """Train the digit classifier behind `evar eval` on the digits training split."""
    with claim_output(out, "file", overwrite=overwrite or out.resolve() == _default_classifier()):
        from evar.eval.classifier import train_classifier

        print(json.dumps(train_classifier(seed=seed, out=out)))


def _default_classifier() -> Path:
    return (Path(__file__).resolve().parent / "assets" / "digits_classifier.safetensors")


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
    with claim_output(out, "dir", resumes=("demo run",), inputs=[model],
                      progress_note=f"finished stages wait in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "demo run", model=model)
        from evar.apps.demo import DemoPlan, run_demo

        report = run_demo(DemoPlan(model=model, out=out, sparsity=sparsity, method=method))
    print(f"report → {report}")


from evar.distill.command import distill as _distill  # noqa: E402  (flags shared with `python -m evar.distill`)

app.command("distill")(_distill)
from evar.eval.imagenet import eval_imagenet as _eval_imagenet  # noqa: E402  (also `python -m evar.eval.imagenet`)

app.command("eval-imagenet")(_eval_imagenet)


from evar.prune import commands as _pruning  # noqa: E402  (bodies of the pruning commands)

app.command("prune")(_pruning.prune)
app.command("prune-decoder")(_pruning.prune_decoder)
app.command("distill-decoder")(_pruning.distill_decoder)
app.command("prunable")(_pruning.prunable)
from evar.sparsity.command import sparsify as _sparsify  # noqa: E402  (2:4 / N:M / unstructured masks)

app.command("sparsify")(_sparsify)

from evar.dd.commands import app as _dd  # noqa: E402  (also `python -m evar.dd`, for torchrun)

app.add_typer(_dd, name="dd")

from evar.dit import commands as _dit  # noqa: E402  (a second model family: diffusion transformers)

app.command("train-dit")(_dit.train_dit_cmd)
app.command("convert-dit")(_dit.convert_dit)
app.command("prune-dit")(_dit.prune_dit_cmd)
app.command("distill-dit")(_dit.distill_dit_cmd)
from evar.vit import commands as _vit  # noqa: E402  (a classifier family: ViT in timm's layout)

app.command("train-vit")(_vit.train_vit_cmd)
app.command("convert-vit")(_vit.convert_vit)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
