"""The scale loop every graph-sampling backend shares: it follows the manifest's recipe (`evar.contract.recipe`)
the same way on onnxruntime and Core ML, so a backend only says how one function runs.

A backend subclasses `RecipeLoop` and implements `_call(role, si, feeds) -> outputs by name` (si None: the
prefill) and, for roles with their own extras (token pruning), may override `_step`. The loop owns the values
fed by role (labels, cfg, f_hat, …), the cache crossing scales by name (`past`), the early tokens of a split,
and the order: prefill at the split, keep the conditional rows at the trimming scale, then the scale's role.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from evar.contract import NP_DTYPES, PREFILL_GRAPH, Artifact, step_feeds
from evar.contract.recipe import EARLY_STEP_GRAPH, Recipe


def as_array(value: Any) -> np.ndarray:
    """A numpy view of a runtime-owned buffer (an OrtValue) or an array."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class RecipeLoop:
    artifact: Artifact

    def _init_recipe(self, artifact: Artifact) -> None:
        self.artifact, self.recipe = artifact, Recipe.of(artifact)
        self.role_of_scale = [self.recipe.role(si) for si in range(artifact.num_scales)]
        self.links = {role: artifact.kv_links(role) if role == EARLY_STEP_GRAPH else artifact.past_of_present()
                      for role in self.recipe.roles()}  # present output → past input, per step role
        self.idx_name = {role: self._role_of(role, "idx") for role in self.recipe.roles()}
        self.f_hat_name = {role: self._role_of(role, "f_hat") for role in self.recipe.roles()}

    def _role_of(self, role: str, what: str) -> str:
        first = next(si for si in range(self.artifact.num_scales) if self.recipe.role(si) == role)
        return next(t["name"] for t in self.artifact.function(role, first)["outputs"] if t.get("role") == what)

    def _call(self, role: str, si: int | None, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- one generation
    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        var = self.artifact.var
        H = var["patch_nums"][-1]
        self.batch = len(labels)
        self.values: dict[str, Any] = {"labels": labels, "cfg": np.array([cfg]),
                                       "f_hat": np.zeros((self.batch, var["cvae"], H, H), np.float32)}
        self.past: dict[str, Any] = {}  # past input name → value; empty at scale 0
        self.tokens: list[np.ndarray] = []  # scale split: the early scales' tokens, for the prefill

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        role = self.role_of_scale[si]
        if self.recipe.prefills_at(si):
            self.past = self._prefill()
        if self.recipe.trims_at(si):  # keep the conditional rows [0, B) of the cache (a state has none here)
            self.past = {name: np.ascontiguousarray(as_array(value)[: self.batch]) for name, value in self.past.items()}
            if "cached_hidden" in self.values:  # token pruning: and of the update map the next pruned scale restores
                self.values["cached_hidden"] = np.ascontiguousarray(as_array(self.values["cached_hidden"])[: self.batch])
        idx = self._step(role, si, uniforms)
        if role == EARLY_STEP_GRAPH:
            self.tokens.append(idx)
        return idx

    def _prefill(self) -> dict[str, Any]:
        """The compressed model's cache of the early scales from their tokens, in one pass (a Core ML state:
        written by the function itself, nothing comes back as pasts)."""
        feeds = step_feeds(self.artifact.function(PREFILL_GRAPH)["inputs"],
                           {"labels": self.values["labels"], "idx": np.concatenate(self.tokens, 1)}, {}, None)
        links = self.artifact.past_of_present()
        return {links[name]: value for name, value in self._call(PREFILL_GRAPH, None, feeds).items() if name in links}

    def _feeds(self, role: str, si: int, uniforms: np.ndarray) -> dict[str, Any]:
        return step_feeds(self.artifact.function(role, si)["inputs"],
                          {**self.values, "uniforms": uniforms, "scale_index": np.array([si])}, self.past,
                          self._empty_past)

    def _empty_past(self, tensor: dict[str, Any]) -> np.ndarray:
        """A cache input before anything is cached, of its own graph's heads (the early model has others)."""
        heads, dim = tensor["shape"][1], tensor["shape"][3]
        if isinstance(heads, int) and isinstance(dim, int):
            return np.zeros((2 * self.batch, heads, 0, dim), NP_DTYPES[tensor["dtype"]])
        return self.artifact.empty_past(tensor, self.batch)

    def _step(self, role: str, si: int, uniforms: np.ndarray) -> np.ndarray:
        outs = self._call(role, si, self._feeds(role, si, uniforms))
        return self._take(role, outs)

    def _take(self, role: str, outs: dict[str, Any]) -> np.ndarray:
        """Keep what crosses to the next scale (f_hat, the cache by name) → this scale's tokens."""
        self.values["f_hat"] = outs[self.f_hat_name[role]]
        links = self.links[role]
        self.past = {links[name]: value for name, value in outs.items() if name in links}
        return np.asarray(as_array(outs[self.idx_name[role]])).astype(np.int64, copy=False)
