"""The bodies of `evar train-vit` and `evar convert-vit` (registered in evar/apps/cli.py); `evar info` and
`evar eval` reach ViT models through `describe` and `evaluate_vit`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import Overwrite
from evar.errors import EvarError
from evar.outputs import claim_output, mark_output


def train_vit_cmd(
    out: Annotated[Path, typer.Option(help="run directory; the model directory is OUT/model")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder (class subfolders)")] = "digits",
    steps: int = 4000, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
    shift_augment: Annotated[int, typer.Option(help="train on copies shifted by up to N pixels")] = 1,
    label_smoothing: float = 0.1,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 500,
) -> None:
    """Train a ViT classifier (builtin:vit-digits' architecture); rerun to resume."""
    from evar.train import Schedule
    from evar.vit.train import ViTTraining, train_vit

    job = ViTTraining(data=data, schedule=Schedule(steps=steps, batch_size=batch_size, lr=lr,
                                                   weight_decay=weight_decay, ckpt_every=ckpt_every, seed=seed),
                      shift_augment=shift_augment, label_smoothing=label_smoothing)
    job.validate()
    with claim_output(out, "dir", resumes=("ViT training run",), inputs=[data],
                      progress_note=f"the last checkpoint waits in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "ViT training run")
        t0 = time.perf_counter()
        path = train_vit(job, out)
    top1 = json.loads((path / "config.json").read_text())["provenance"]["top1"]
    print(f"top-1 {top1['accuracy'] * 100:.2f}% on the {top1['split']} split ({top1['images']} images); "
          f"ViT model directory → {path} ({time.perf_counter() - t0:.0f}s)")


def convert_vit(
    ckpt: Annotated[Path, typer.Option(help="a timm VisionTransformer state dict in safetensors (model.safetensors)")],
    out: Annotated[Path, typer.Option(help="ViT model directory to write")],
    arch: Annotated[str, typer.Option(help="timm name: vit_tiny|small|base|large_patch16_224, "
                                           "vit_small|base_patch32_224")] = "vit_base_patch16_224",
    img_size: Annotated[Optional[int], typer.Option(help="input side if not 224 (pos_embed must match)")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="head size if not 1000")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Turn a timm ViT checkpoint into an EVAR ViT model directory (checked key by key and shape by shape)."""
    from evar.vit.checkpoint import load_timm, save_vit_dir, timm_config

    config = timm_config(arch, img_size, num_classes)
    if ckpt.suffix != ".safetensors":
        raise EvarError(f"{ckpt}: expected a .safetensors file (timm's model.safetensors, or safetensors' "
                        "save_file of model.state_dict())")
    with claim_output(out, "dir", overwrite=overwrite, inputs=[ckpt]):
        model = load_timm(ckpt, config)
        model.provenance["arch"] = arch
        save_vit_dir(model, out)
    print(f"ViT model directory → {out}")


# ---------------------------------------------------------------- what evar info / eval call
def describe(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.vit.parameters())
    return (f"ViT: depth {c.depth}, width {c.embed_dim}, heads {c.num_heads}, MLP {c.mlp_dim}, patch {c.patch_size} "
            f"on {c.in_chans}×{c.img_size}² ({c.num_patches} tokens + class token), {c.num_classes} classes\n"
            f"params: {params / 1e6:.3f}M\nprovenance: {json.dumps(model.provenance)}")


def describe_and_sparsity(model) -> str:
    """`evar info` of a ViT: the architecture, then a sparse model's masks per layer."""
    text = describe(model)
    if model.sparsity is not None:
        from evar.sparsity.report import sparsity_lines

        text += "\n" + "\n".join(sparsity_lines(model))
    return text


def evaluate_vit(model, source: str) -> dict:
    """`evar eval` for a ViT: top-1 on the digits held-out split (the test split training never sees)."""
    from evar.eval.classifier import NUM_CLASSES
    from evar.vit.train import held_out, top1

    c = model.config
    if c.num_classes != NUM_CLASSES or c.in_chans != 3:
        raise EvarError(f"evar eval scores ViTs on the digits ({NUM_CLASSES} classes, 3 channels); this ViT has "
                        f"{c.num_classes} classes and {c.in_chans} channels")
    t0 = time.perf_counter()
    images, labels, split = held_out("digits", c.img_size)
    acc = top1(model.vit, images, labels)
    return {"model": source, "task": "classification", "split": split, "images": len(labels), "top1": acc,
            "params": sum(p.numel() for p in model.vit.parameters()), "seconds": round(time.perf_counter() - t0, 2)}
