"""`--compress` emulated on the ANE wrappers (export/coreml_emulate.py): the weights the converter stores,
computed with coremltools' own routines, loaded into the fp16 wrappers. Compared tensor by tensor with what
`ct.convert` stores (the converter runs on Linux; only prediction needs macOS)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import _seeded_model, few_scale_model, tiny_config
from evar.errors import EvarError
from evar.export import coreml as cm
from evar.export import coreml_emulate as ce
from evar.export.ane import AneDecoder, ane_steps
from evar.export.ane_export import AneInterface, _convert, half_steps
from evar.export.artifact import export_ready

PATCH_NUMS = (1, 2, 3, 4, 6)  # scale 4's position buffer (64 channels × 36 tokens) is over the threshold


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, var=dataclasses.replace(cfg.var, patch_nums=PATCH_NUMS),
                              vqvae=dataclasses.replace(cfg.vqvae, v_patch_nums=PATCH_NUMS))
    return export_ready(_seeded_model(cfg, 0))


def _tensors(module):
    return dict([*module.named_parameters(), *module.named_buffers()])


@pytest.mark.parametrize("method,levels", [("palettize6", 64), ("palettize4", 16)])
def test_palettized_steps_hold_a_table_per_weight_and_leave_the_rest(model, method, levels):
    steps = ane_steps(model, 2)
    plain, packed = half_steps(steps), ce.compressed_half_steps(steps, method)
    si = len(PATCH_NUMS) - 1
    before, after = _tensors(plain[si]), _tensors(packed[si])
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert {"core.blocks.0.qkv.weight", "core.head.weight", "position"} <= changed
    for name in changed:
        assert len(torch.unique(after[name])) <= levels
        assert after[name].numel() > cm.WEIGHT_THRESHOLD and after[name].dim() >= 2
    # what the converter leaves in fp16: the class tables (even when large), caches, biases, small weights
    assert before["core.blocks.0.modulation_table"].numel() > cm.WEIGHT_THRESHOLD
    kept = ["core.blocks.0.modulation_table", "core.head_table", "key_cache_0", "core.blocks.0.qkv.bias",
            "core.word_embed.weight"]
    assert not changed & set(kept)
    assert all(after[n].dtype == torch.float16 for n in after if after[n].is_floating_point())


def test_int8_error_is_half_a_step_per_output_channel(model):
    decoder = AneDecoder(model).eval()
    packed = _tensors(ce.compressed_half_decoder(decoder, "int8"))
    name = "decoder.conv_in.weight"
    w = _tensors(decoder)[name].detach().numpy()
    q = packed[name].detach().float().numpy()
    step = np.abs(w).reshape(len(w), -1).max(1) / 127  # symmetric int8, per output channel
    err = np.abs(q - w).reshape(len(w), -1).max(1)
    assert np.all(err <= 0.5 * step + np.abs(w).reshape(len(w), -1).max(1) * 2 ** -11 + 1e-8)
    assert np.all(err > 0) and not np.array_equal(q, w.astype(np.float16).astype(np.float32))


def test_none_is_the_plain_fp16_wrappers(model):
    steps = ane_steps(model, 2)
    a, b = _tensors(half_steps(steps)[2]), _tensors(ce.compressed_half_steps(steps, "none")[2])
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", ["2:4", "palettize5", "none"])
def test_only_the_emulated_methods(method):
    with pytest.raises(EvarError, match="cannot emulate"):
        ce.op_config(method)


def _stored(mlmodel) -> dict[str, np.ndarray]:
    """The converter's compressed constants, decompressed by MIL itself, by the name of the tensor they replace."""
    out = {}
    for fn in mlmodel._mil_program.functions.values():
        for op in fn.operations:
            if op.op_type.startswith("constexpr_"):
                out[op.name.rsplit("_palettized", 1)[0].rsplit("_quantized", 1)[0]] = op.materialized_val_inference()
    return out


def _converter_name(name: str, parameters: set[str]) -> str:
    return ("p_" if name in parameters else "b_") + name.replace(".", "_")


def _assert_same_as_converter(module, spec, method, keep):
    mlmodel = _convert(module, spec, "fp16", "cpu_and_ne", method)
    stored = _stored(mlmodel)
    ours = ce.compressed_tensors([module], method, keep)[0]
    params = {n for n, _ in module.named_parameters()}
    ours = {_converter_name(n, params): v for n, v in ours.items()}
    ours.pop("b_core_level_pos", None)  # compressed here too, but no function reads it (positions are per scale)
    assert set(stored) == set(ours) and stored
    for name, v in ours.items():
        np.testing.assert_array_equal(stored[name], v, err_msg=name)


@pytest.mark.parametrize("method", ["palettize4", "int8"])
def test_a_small_step_equals_what_the_converter_stores(method):
    model = export_ready(few_scale_model())
    steps = ane_steps(model, 2)
    _assert_same_as_converter(steps[1], AneInterface(model.config, 2).step(1), method, ce.ane_kept)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["palettize6", "int8"])
def test_every_tensor_equals_what_the_converter_stores(model, method):
    """Every compressed tensor of a step (weights, the scale's position) and of the decoder, bit for bit."""
    iface = AneInterface(model.config, 2)
    si = len(PATCH_NUMS) - 1
    _assert_same_as_converter(ane_steps(model, 2)[si], iface.step(si), method, ce.ane_kept)
    _assert_same_as_converter(AneDecoder(model).eval(), iface.decoder(), method, lambda n: False)


@pytest.mark.parametrize("method", ["int8", pytest.param("palettize6", marks=pytest.mark.slow)])
def test_the_default_targets_step_equals_what_the_converter_stores(model, method):
    """`--target iOS18`: every constant the converter compresses in a step function (ScaleStep: nn.Linear
    weights, the position table) is, bit for bit, what `compressed_wrappers` loads; nothing else is changed
    but tensors the function does not read (the VQVAE's other parts are left out altogether)."""
    from evar.export.graphs import ScaleStep
    from evar.export.interface import StepInterface

    si = 1
    step = ScaleStep(model, si, top_k=40, top_p=0.9, kv_mode="state", batch=1, index_dtype=torch.int32).eval()
    iface = StepInterface(model.config, "coreml", kv_mode="state", batch=1)
    options = cm.CoremlOptions(compress=method, top_k=40, top_p=0.9)
    stored = _stored(cm._convert(step, iface.function(si), iface.example_inputs(si, 1, seed=0), options,
                                 model.config.var.vocab_size))
    packed = _tensors(ce.compressed_wrappers([step], method, half=False)[0])
    before = _tensors(step)
    changed = {_converter_name(n, set(dict(step.named_parameters()))).lower(): n for n in before
               if not torch.equal(before[n], packed[n])}
    assert set(stored) <= set(changed) and "p_var_pos_1lc" in stored and "p_var_head_weight" in stored
    for name, values in stored.items():
        np.testing.assert_array_equal(values, packed[changed[name]].detach().numpy().astype(np.float16), err_msg=name)
    assert set(changed) - set(stored) <= {"b_var_lvl_1l"}, set(changed) - set(stored)
