"""Typed model configs with a JSON round trip.

A VAR config records the head count and FFN width of *every* block, so a pruned model is fully
described by its config: loading it needs no pruning library and no replay of a recipe.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from evar.errors import EvarError

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_DEPTHS = (16, 20, 24, 30)


class ConfigError(EvarError, ValueError):
    """A config that cannot describe a working model."""


@dataclass(frozen=True)
class DecoderLevel:
    """One resolution of the VQVAE decoder, `decoder.up.{i}`."""

    width: int  # its residual stream: every block's output, its attention's input/output, its upsample's input
    blocks: tuple[int, ...]  # each ResnetBlock's inner width (conv1's output = conv2's input)
    upsample: int | None  # the upsample conv's output width; None at level 0 (full resolution: no upsample)


@dataclass(frozen=True)
class DecoderWidths:
    """The channel widths of a pruned VQVAE decoder, so that it is built from config.json alone.

    The attention blocks keep their inner (q, k, v) width, the architecture's; the mid blocks' residual
    stream is the top level's (`conv_in` writes it, `up.{n-1}` continues it)."""

    mid: tuple[int, ...]  # inner widths of mid.block_1 and mid.block_2
    levels: tuple[DecoderLevel, ...]  # up.0 (full resolution) … up.{n-1} (lowest)

    @classmethod
    def dense(cls, cfg: VQVAEConfig) -> DecoderWidths:
        """The architecture's own widths: ch·ch_mult[i] everywhere at level i."""
        widths = [cfg.ch * m for m in cfg.ch_mult]
        levels = tuple(DecoderLevel(w, (w,) * (cfg.num_res_blocks + 1), w if i else None) for i, w in enumerate(widths))
        return cls((widths[-1], widths[-1]), levels)

    @classmethod
    def from_json(cls, data: Any) -> DecoderWidths:
        try:
            levels = tuple(DecoderLevel(int(lv["width"]), tuple(int(b) for b in lv["blocks"]),
                                        None if lv["upsample"] is None else int(lv["upsample"]))
                           for lv in data["levels"])
            return cls(tuple(int(m) for m in data["mid"]), levels)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"decoder_widths must be {{'mid': [..], 'levels': [{{'width', 'blocks', 'upsample'}}]}}: "
                              f"{type(err).__name__} {err}") from None

    def check(self, cfg: VQVAEConfig) -> None:
        n, blocks = len(cfg.ch_mult), cfg.num_res_blocks + 1
        if len(self.levels) != n or len(self.mid) != 2:
            raise ConfigError(f"decoder_widths needs 2 mid widths and {n} levels, got {len(self.mid)} and {len(self.levels)}")
        for i, lv in enumerate(self.levels):
            if len(lv.blocks) != blocks:
                raise ConfigError(f"decoder_widths level {i} needs {blocks} block widths, got {len(lv.blocks)}")
            if (lv.upsample is None) != (i == 0):
                raise ConfigError(f"decoder_widths: level {i} {'has no' if i else 'has an'} upsample width")
            # Level i-1 adds its input to its output unchanged when the architecture's widths agree.
            if i and cfg.ch_mult[i] == cfg.ch_mult[i - 1] and lv.upsample != self.levels[i - 1].width:
                raise ConfigError(f"decoder_widths: level {i}'s upsample width {lv.upsample} must equal level "
                                  f"{i - 1}'s width {self.levels[i - 1].width} (added without a shortcut conv)")
        widths = [*self.mid, *(w for lv in self.levels for w in (lv.width, *lv.blocks, lv.upsample) if w is not None)]
        if any(w < 32 or w % 32 for w in widths):
            raise ConfigError(f"decoder widths must be positive multiples of 32 (GroupNorm with 32 groups), got {widths}")


@dataclass(frozen=True)
class VQVAEConfig:
    """Multi-scale residual VQVAE (VAR's tokenizer). Defaults are the official `vae_ch160v4096z32`."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of codebook vectors and of f_hat
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    dropout: float = 0.0
    using_sa: bool = True  # self-attention at the lowest resolution of encoder and decoder
    using_mid_sa: bool = True
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # Phi(h) = h*(1-r) + conv(h)*r
    share_quant_resi: int = 4  # number of Phi convs shared across scales
    v_patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    decoder_widths: DecoderWidths | None = None  # a pruned decoder's widths; None: the architecture's own

    def __post_init__(self) -> None:
        if self.decoder_widths is not None and not isinstance(self.decoder_widths, DecoderWidths):
            object.__setattr__(self, "decoder_widths", DecoderWidths.from_json(self.decoder_widths))

    def decoder_plan(self) -> DecoderWidths:
        return self.decoder_widths or DecoderWidths.dense(self)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.v_patch_nums[-1] * self.downsample

    def validate(self) -> None:
        if self.ch % 32 or any((self.ch * m) % 32 for m in self.ch_mult):
            raise ConfigError("VQVAE channel widths must be multiples of 32 (GroupNorm with 32 groups)")
        if list(self.v_patch_nums) != sorted(set(self.v_patch_nums)):
            raise ConfigError(f"v_patch_nums must be strictly increasing, got {self.v_patch_nums}")
        if self.share_quant_resi < 1:
            raise ConfigError("share_quant_resi must be >= 1")
        if self.decoder_widths is not None:
            self.decoder_widths.check(self)


@dataclass(frozen=True)
class VARConfig:
    """VAR transformer. `num_heads[i]` and `ffn_dims[i]` are block i's own (pruning changes them)."""

    depth: int
    embed_dim: int  # C, the residual width (never pruned)
    num_heads: tuple[int, ...]
    ffn_dims: tuple[int, ...]
    head_dim: int = 64
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000  # label `num_classes` is the unconditional class
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    shared_aln: bool = False
    cond_drop_rate: float = 0.1

    @classmethod
    def uniform(cls, depth: int, embed_dim: int, heads: int, mlp_ratio: float = 4.0, **kw: Any) -> VARConfig:
        """All blocks alike, as every unpruned model is."""
        ffn = round(embed_dim * mlp_ratio)
        return cls(depth=depth, embed_dim=embed_dim, num_heads=(heads,) * depth, ffn_dims=(ffn,) * depth, **kw)

    @classmethod
    def official(cls, depth: int) -> VARConfig:
        """The FoundationVision ImageNet-256 models: C = 64*depth, heads = depth, head_dim 64."""
        if depth not in OFFICIAL_DEPTHS:
            raise ConfigError(f"no official VAR of depth {depth}; known: {', '.join(f'd{d}' for d in OFFICIAL_DEPTHS)}")
        return cls.uniform(depth, 64 * depth, depth)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def scale_ranges(self) -> list[tuple[int, int]]:
        """[begin, end) token range of each scale in the flattened sequence."""
        ranges, begin = [], 0
        for pn in self.patch_nums:
            ranges.append((begin, begin + pn * pn))
            begin += pn * pn
        return ranges

    def attn_dim(self, block: int) -> int:
        return self.num_heads[block] * self.head_dim

    def with_blocks(self, num_heads: tuple[int, ...], ffn_dims: tuple[int, ...]) -> VARConfig:
        return dataclasses.replace(self, num_heads=tuple(num_heads), ffn_dims=tuple(ffn_dims))

    def is_uniform(self) -> bool:
        return len(set(self.num_heads)) == 1 and len(set(self.ffn_dims)) == 1

    def validate(self) -> None:
        if len(self.num_heads) != self.depth or len(self.ffn_dims) != self.depth:
            raise ConfigError(
                f"depth {self.depth} needs one head count and one FFN width per block, "
                f"got {len(self.num_heads)} and {len(self.ffn_dims)}"
            )
        if any(h < 1 for h in self.num_heads):
            raise ConfigError(f"every block needs at least one attention head, got {self.num_heads}")
        if any(f < 1 for f in self.ffn_dims):
            raise ConfigError(f"every block needs at least one FFN unit, got {self.ffn_dims}")
        if self.patch_nums[0] != 1:
            raise ConfigError("the first scale must be 1x1 (it holds the class token)")
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ConfigError(f"patch_nums must be strictly increasing, got {self.patch_nums}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model directory's modules, plus how it was made."""

    var: VARConfig
    vqvae: VQVAEConfig
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.var.validate()
        self.vqvae.validate()
        if self.var.vocab_size != self.vqvae.vocab_size:
            raise ConfigError(f"VAR vocab {self.var.vocab_size} != VQVAE vocab {self.vqvae.vocab_size}")
        if self.var.cvae != self.vqvae.z_channels:
            raise ConfigError(f"VAR Cvae {self.var.cvae} != VQVAE z_channels {self.vqvae.z_channels}")
        if tuple(self.var.patch_nums) != tuple(self.vqvae.v_patch_nums):
            raise ConfigError(f"VAR patch_nums {self.var.patch_nums} != VQVAE {self.vqvae.v_patch_nums}")

    def to_dict(self) -> dict[str, Any]:
        vqvae = dataclasses.asdict(self.vqvae)
        if vqvae["decoder_widths"] is None:  # an unpruned decoder's config reads as it always did
            del vqvae["decoder_widths"]
        return {"var": dataclasses.asdict(self.var), "vqvae": vqvae, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        try:
            var = _build(VARConfig, data["var"])
            vqvae = _build(VQVAEConfig, data["vqvae"])
        except KeyError as err:
            raise ConfigError(f"config is missing the section {err}") from None
        cfg = cls(var=var, vqvae=vqvae, provenance=dict(data.get("provenance", {})))
        cfg.validate()
        return cfg


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Dataclass from JSON: lists become tuples; unknown, missing or mistyped fields are named in the error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {k: _typed(f"{cls.__name__}.{k}", v, hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type (JSON lists → tuples, ints → floats), or a ConfigError naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0]
        return tuple(_typed(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str)}.get(hint)
    if ok is None:  # nested structures (provenance) are kept as read
        return value
    if not ok(value):
        raise ConfigError(f"{name} must be {'a finite number' if hint is float else hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def official_config(depth: int) -> ModelConfig:
    return ModelConfig(var=VARConfig.official(depth), vqvae=VQVAEConfig())


def digits_config() -> ModelConfig:
    """The embedded default: 16x16 digits, 2x VQVAE downsampling to an 8x8 token map, 6 scales."""
    patch_nums = (1, 2, 3, 4, 6, 8)
    vqvae = VQVAEConfig(vocab_size=512, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        v_patch_nums=patch_nums)
    var = VARConfig.uniform(depth=4, embed_dim=128, heads=4, head_dim=32, vocab_size=512, cvae=32,
                            num_classes=10, patch_nums=patch_nums)
    return ModelConfig(var=var, vqvae=vqvae)

