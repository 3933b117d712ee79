"""`evar sparsify`: load → check the layers → one-shot masks, or learnt ones from a one-shot prior → a model
directory with the masks beside the weights. The model is a VAR generator, a ViT classifier or a DiT; what differs
between them is their adapter's (`evar.sparsity.family`)."""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from evar import zoo
from evar.errors import EvarError
from evar.sparsity.family import family_for, params
from evar.sparsity.oneshot import check_layers, sparsify
from evar.sparsity.recipe import LEARNABLE, SparsifyRecipe
from evar.sparsity.storage import Sparsity
from evar.sparsity.targets import linear

KINDS = ("var", "vit", "dit")  # the families evar sparsify takes


def run(model_ref: str, recipe: SparsifyRecipe, out: Path, work: Path, var_ckpt=None, vae_ckpt=None,
        teacher_ref: str | None = None) -> str:
    """Sparsify `model_ref` into the model directory `out`; a learnable run keeps its progress in `work`."""
    check_teacher_flag(recipe, teacher_ref)
    model = zoo.load_family(model_ref, KINDS, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt)
    if model.sparsity is not None:
        raise EvarError(f"'{model_ref}' is already {model.sparsity.pattern.name} sparse "
                        f"({model.sparsity.method}); sparsify its dense parent instead")
    check_layers(model, recipe)  # before any calibration: a layer that cannot hold N:M groups is one line
    teacher = _teacher(teacher_ref, model, var_ckpt, vae_ckpt) if recipe.method == LEARNABLE else None
    t0 = time.perf_counter()
    if teacher is None:
        sparsity = sparsify(model, recipe)
    else:
        sparsity = learnable(model, teacher, recipe, work, model_ref, teacher_ref)
    sparsity.details["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    model.sparsity = sparsity
    provenance = {"source": "evar sparsify", "parent": model_ref, "pattern": sparsity.pattern.name,
                  "method": sparsity.method, "teacher": teacher_ref}
    family_for(model).save(out, provenance)
    if work.exists():
        shutil.rmtree(work)
    return summary(model, sparsity)


def check_teacher_flag(recipe: SparsifyRecipe, teacher_ref: str | None) -> None:
    """Learnable masks need a dense teacher; one-shot methods take none (checked before anything is loaded)."""
    if recipe.method == LEARNABLE and not teacher_ref:
        raise EvarError("--method learnable trains its masks against a dense teacher: pass --teacher REF (the model "
                        "itself, or its dense parent before structured pruning)")
    if recipe.method != LEARNABLE and teacher_ref:
        raise EvarError("--teacher goes with --method learnable (one-shot methods need no teacher)")


def _teacher(ref: str, student: Any, var_ckpt, vae_ckpt) -> Any:
    ckpts = {"var_ckpt": var_ckpt, "vae_ckpt": vae_ckpt} if ref.startswith("official:") else {}
    teacher = zoo.load_family(ref, KINDS, **ckpts)
    if teacher.sparsity is not None:
        raise EvarError(f"--teacher '{ref}' is itself sparse; learnable masks learn from a dense model")
    family_for(student).check_teacher(family_for(teacher), ref)
    return teacher


def learnable(model: Any, teacher: Any, recipe: SparsifyRecipe, work: Path, model_ref: str,
              teacher_ref: str) -> Sparsity:
    """A one-shot prior on a copy (its weight update, if any, is not kept), then gates trained from it."""
    from evar.sparsity.learnable import learn_masks

    t0 = time.perf_counter()
    prior = sparsify(copy.deepcopy(model), recipe, method=recipe.prior)
    t_prior = time.perf_counter() - t0
    record = {"parent": model_ref, "teacher": teacher_ref, "recipe": recipe.to_dict()}
    masks = learn_masks(teacher, model, prior.masks, recipe, work, record)
    root = family_for(model).root
    with torch.no_grad():
        for name, mask in masks.items():
            linear(root, name).weight.mul_(mask)
    agree = sum(int((masks[n] == prior.masks[n]).sum()) for n in masks) / sum(m.numel() for m in masks.values())
    return Sparsity(prior.pattern, LEARNABLE, masks,
                    {"recipe": recipe.to_dict(), "prior": prior.method, "agreement_with_prior": round(agree, 6),
                     "seconds": {"prior": round(t_prior, 2), "training": round(time.perf_counter() - t0 - t_prior, 2)}})


def summary(model: Any, sparsity: Sparsity) -> str:
    family = family_for(model)
    zeros = sum(int((~m).sum()) for m in sparsity.masks.values())
    total = sum(m.numel() for m in sparsity.masks.values())
    n = params(family)
    s = sparsity.details["seconds"]
    return (f"{sparsity.pattern.name} {sparsity.method}: {len(sparsity.masks)} layers, {zeros / max(1, total):.1%} of "
            f"their {total / 1e6:.2f}M weights zero ({zeros / n:.1%} of the {family.what}'s {n / 1e6:.2f}M "
            f"parameters); {s['total']:.0f}s")
