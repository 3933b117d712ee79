"""The prunable components of a loaded model, by name: each is an adapter (`evar.prune.adapter`).
A new family registers its adapter here (`register_component`) and `evar prunable` lists its units."""
from __future__ import annotations

from collections.abc import Callable

from evar.checkpoints import Model
from evar.errors import EvarError
from evar.prune.adapter import Adapter


def _var(model: Model) -> Adapter:
    from evar.prune.var_adapter import VARAdapter

    return VARAdapter(model.var)


def _decoder(model: Model) -> Adapter:
    from evar.prune.decoder_adapter import DecoderAdapter

    return DecoderAdapter(model.vqvae)


def _dit(model) -> Adapter:  # an evar.dit.checkpoint.DiTModel
    from evar.prune.dit_adapter import DiTAdapter

    return DiTAdapter(model.dit)


COMPONENTS: dict[str, Callable[[Model], Adapter]] = {"var": _var, "decoder": _decoder, "dit": _dit}


def register_component(name: str, factory: Callable[[Model], Adapter]) -> None:
    if name in COMPONENTS:
        raise ValueError(f"a prunable component named '{name}' is already registered")
    COMPONENTS[name] = factory


def check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise EvarError(f"unknown component '{component}'; choose one of {', '.join(COMPONENTS)}")


def adapter_for(model: Model, component: str) -> Adapter:
    check_component(component)
    return COMPONENTS[component](model)
