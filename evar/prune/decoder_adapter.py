"""The VQVAE decoder's adapter: its conv channels, in the sets torch-pruning's dependency graph couples.

Cutting a channel of a feature map means cutting it from every layer that writes it, normalises it or
reads it. In the decoder these sets are:
  - a level's residual stream: every block's `conv2` (and shortcut conv) and attention `proj_out` write
    it, every `norm1`/`nin_shortcut`/`conv1`, attention `norm`/`qkv`, the `upsample.conv` (or
    `norm_out`/`conv_out`) read it. The top level's stream starts at `conv_in` and runs through `mid`;
    a level whose first block adds its input unchanged continues the stream of the upsample conv above;
  - an upsample conv's output, when the next level's first block reads it through a shortcut conv;
  - each ResnetBlock's inner width (`conv1` → `norm2` → `conv2`).
torch-pruning's `DependencyGraph` finds the members of each set from a traced forward pass (residual adds,
GroupNorms and the upsampling path included) and does the cutting; this adapter names one producer per
set, checks that the sets cover every prunable conv exactly once, and reports the consumers and the
GroupNorm groups (32: each group must lose the same number of channels). The attention blocks keep
their q/k/v width. A pruned decoder records its widths in `VQVAEConfig.decoder_widths`, so it loads
without torch-pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evar.config import DecoderLevel, DecoderWidths
from evar.errors import EvarError
from evar.models.vqvae import VQVAE
from evar.prune.adapter import Prunable
from evar.prune.surgery import torch_pruning


@dataclass(frozen=True)
class Root:
    name: str  # "up.1.stream", "up.2.upsample", "up.0.block.1.inner", "mid.block_1.inner"
    producer: nn.Conv2d  # one layer that writes the set's channels (the dependency graph finds the rest)
    level: int  # the decoder level (`up.{level}`) the channels belong to


class DecoderAdapter:
    """The prunable channel sets of `vqvae.decoder`, in data-flow order (lowest resolution first)."""

    def __init__(self, vqvae: VQVAE):
        tp = torch_pruning()
        self.decoder = vqvae.decoder
        self.names = {m: f"decoder.{n}" for n, m in self.decoder.named_modules()}
        z = self.decoder.conv_in.in_channels
        self.graph = tp.DependencyGraph().build_dependency(self.decoder, example_inputs=torch.zeros(1, z, 2, 2),
                                                           verbose=False)
        self.cut_out = tp.prune_conv_out_channels
        self._prunables = [self._prunable(root) for root in self.roots()]
        self._check_cover()

    def prunables(self) -> list[Prunable]:
        return self._prunables

    def roots(self) -> list[Root]:
        d, last = self.decoder, len(self.decoder.up) - 1
        roots = [Root(f"up.{last}.stream", d.conv_in, last),
                 Root("mid.block_1.inner", d.mid.block_1.conv1, last), Root("mid.block_2.inner", d.mid.block_2.conv1, last)]
        for i in reversed(range(last + 1)):
            roots += [Root(f"up.{i}.block.{j}.inner", block.conv1, i) for j, block in enumerate(d.up[i].block)]
            if i == 0:
                continue
            first = d.up[i - 1].block[0]
            if isinstance(first.nin_shortcut, nn.Conv2d):  # the shortcut conv decouples the two widths
                roots += [Root(f"up.{i}.upsample", d.up[i].upsample.conv, i - 1),
                          Root(f"up.{i - 1}.stream", first.conv2, i - 1)]
            else:
                roots.append(Root(f"up.{i - 1}.stream", d.up[i].upsample.conv, i - 1))
        return roots

    def _group(self, root: Root, units: list[int]):
        return self.graph.get_pruning_group(root.producer, self.cut_out, idxs=units)

    def _prunable(self, root: Root) -> Prunable:
        group = self._group(root, list(range(root.producer.out_channels)))
        consumers, coupled, norms = {}, [], []
        for dep, _ in group:
            layer = dep.target.module
            if layer not in self.names:  # torch-pruning's stand-ins for adds and other functional ops
                continue
            if isinstance(layer, nn.Conv2d) and self.graph.is_in_channel_pruning_fn(dep.handler):
                consumers[self.names[layer]] = layer
            else:
                coupled.append(self.names[layer])
                if isinstance(layer, nn.GroupNorm):
                    norms.append(layer)
        groups = {n.num_groups for n in norms}
        if len(groups) > 1:
            raise EvarError(f"decoder {root.name}: its GroupNorms disagree on the group count ({sorted(groups)})")
        last = len(self.decoder.up) - 1
        return Prunable(root.name, "channels", consumers, 1, lambda units: self._group(root, units).prune(),
                        partitions=groups.pop() if groups else 1, position=last - root.level,
                        coupled=sorted(set(coupled)))

    def _check_cover(self) -> None:
        """Every conv whose output channels can go (all but `conv_out` and the attention's q/k/v) belongs to
        exactly one set: the roots above and the dependency graph agree on the decoder's structure."""
        owners: dict[str, list[str]] = {}
        for p in self._prunables:
            for name in p.coupled:
                owners.setdefault(name, []).append(p.name)
        convs = [n for m, n in self.names.items() if isinstance(m, nn.Conv2d) and not n.endswith((".qkv", "conv_out"))]
        wrong = [n for n in convs if len(owners.get(n, [])) != 1]
        if wrong:
            raise EvarError(f"decoder adapter: {wrong[0]} belongs to {owners.get(wrong[0], [])} channel sets "
                            "(expected one); the decoder's structure is not the one this adapter knows")

    def widths(self) -> DecoderWidths:
        """The current widths, as the config records them."""
        d = self.decoder
        levels = tuple(DecoderLevel(lv.block[-1].conv2.out_channels, tuple(b.conv1.out_channels for b in lv.block),
                                    lv.upsample.conv.out_channels if i else None) for i, lv in enumerate(d.up))
        return DecoderWidths((d.mid.block_1.conv1.out_channels, d.mid.block_2.conv1.out_channels), levels)
