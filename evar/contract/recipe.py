"""Which graph runs which scale of an artifact, and what happens to the KV cache between scales: the manifest's
`generation` read once, for every runtime (onnxruntime, Core ML) and the export's pipelines. torch-free.

    scales < split_scale         early_graph (the early model, its own cache); its tokens are kept
    scale == split_scale         first prefill_graph(labels, those tokens) → the compressed model's cache
    scale == cfg_until_scale     first keep rows [0, B) of every cached key/value (a Core ML state: the unguided
                                 functions touch rows [0, B) only, so there is nothing to cut) and of the pruned
                                 graph's update map (`hidden`, fed back as `cached_hidden`)
    scales >= cache_scale        pruned_graph (token pruning), or pruned_unguided_graph from cfg_until_scale on
    scales >= cfg_until_scale    unguided_graph
    otherwise                    decoder_step
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evar.contract import (EARLY_STEP_GRAPH, PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH, STEP_GRAPH,
                           UNGUIDED_STEP_GRAPH)


@dataclass(frozen=True)
class Recipe:
    num_scales: int
    split_scale: int | None = None
    cfg_until_scale: int | None = None
    cache_scale: int | None = None  # token pruning: the pruned graph runs from here on

    @classmethod
    def of(cls, artifact: Any) -> Recipe:
        """The recipe an `evar.contract.Artifact`'s manifest states."""
        return cls(artifact.num_scales, artifact.split_scale, artifact.cfg_until_scale,
                   artifact.cache_scale if artifact.token_keep else None)

    def role(self, si: int) -> str:
        if self.split_scale is not None and si < self.split_scale:
            return EARLY_STEP_GRAPH
        trimmed = self.cfg_until_scale is not None and si >= self.cfg_until_scale
        if self.cache_scale is not None and si >= self.cache_scale:
            return PRUNED_UNGUIDED_STEP_GRAPH if trimmed else PRUNED_STEP_GRAPH
        return UNGUIDED_STEP_GRAPH if trimmed else STEP_GRAPH

    def roles(self) -> list[str]:
        """The step roles a generation runs, in order of first use."""
        return list(dict.fromkeys(self.role(si) for si in range(self.num_scales)))

    def prefills_at(self, si: int) -> bool:
        return si == self.split_scale

    def trims_at(self, si: int) -> bool:
        return si == self.cfg_until_scale
