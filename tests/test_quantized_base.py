"""TailLoR on bitsandbytes quantized bases (Linear4bit nf4 / fp4, with and without double quantization;
Linear8bitLt): outputs and gradients against the float64 oracle built from the dequantized weight, B = 0 gives the
quantized base's own output, consolidations stay an exact frozen term, save/load and PEFT export reproduce the
model, merging is refused with the model untouched. Skipped, with the reason, where bitsandbytes is missing."""
from __future__ import annotations

import copy

import pytest
import torch

import taillor
from taillor.base import base_for
from conftest import TOLERANCE, assert_close, assert_matches_oracle, assert_scalar_matches, dense_delta, \
    dense_layer_oracle, normalized_error

QUANTIZED = ["nf4", "nf4-double", "fp4", "fp4-double", "int8"]


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install taillor[quant])")


def quantize(bnb, linear: torch.nn.Linear, kind: str) -> torch.nn.Module:
    """A bitsandbytes copy of ``linear`` (quantized on the CPU by .to("cpu"))."""
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double = kind.split("-")[0], kind.endswith("-double")
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  quant_type=quant_type, compress_statistics=double, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


class TwoLayers(torch.nn.Module):
    # On a CPU with AVX512-BF16, bitsandbytes' eval-mode 4-bit kernel repacks the weight in blocks of 32 output rows
    # and 64 input columns (its quantization block) and fails on other widths, under PEFT's wrapper and TailLoR's
    # alike: these widths run on every CPU.
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def quantized_model(bnb, float_model: TwoLayers, kind: str) -> TwoLayers:
    """The same quantized model every time from the same float model (bitsandbytes quantizes deterministically);
    ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` are the flags PEFT reads to wrap bitsandbytes layers."""
    model = copy.deepcopy(float_model)
    model.up, model.down = quantize(bnb, model.up, kind), quantize(bnb, model.down, kind)
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return model


def randomize_B(model) -> None:
    with torch.no_grad():
        for _, layer in taillor.iter_taillor_layers(model):
            layer.lora_B.normal_(0.0, 0.5)


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantized_layer_matches_float64_oracle_of_dequantized_weight(bnb, kind, frame):
    torch.manual_seed(0)
    base = quantize(bnb, torch.nn.Linear(48, 40), kind)
    packed = base.weight.data.clone()
    W = base_for(base).weight().double()
    x = torch.randn(6, 48)
    y_base = base(x)
    layer = taillor.TailLoRLinear.from_linear(base, rank=3, head=5, frame=frame)
    assert layer.base.quantized and layer.frame.U.dtype == torch.float32
    # B = 0: exactly the quantized layer's own output.
    assert torch.equal(layer(x), y_base)
    # The frame is the SVD of the dequantized weight.
    assert_matches_oracle(layer.frame.S, torch.linalg.svdvals(W)[:layer.frame.rank], torch.float32, "σ")
    randomize_B(layer)
    xq = x.clone().requires_grad_(True)
    y = layer(xq)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Oracle: x Wᵀ + b + s·x ΔWᵀ in float64, W the dequantized weight.
    y64, dx64, dA64, dB64 = dense_layer_oracle(layer, x, dy, W, base.bias)
    assert_matches_oracle(y, y64, torch.float32, f"{kind} output")
    assert_matches_oracle(xq.grad, dx64, torch.float32, f"{kind} dx")
    assert_matches_oracle(layer.lora_A.grad, dA64, torch.float32, f"{kind} dA")
    assert_matches_oracle(layer.lora_B.grad, dB64, torch.float32, f"{kind} dB")
    # Gradients never touch the quantized weight.
    assert base.weight.grad is None and not base.weight.requires_grad
    assert torch.equal(base.weight.data, packed)


@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "fp4-double"])
def test_weight_of_a_layer_repacked_for_the_cpu_kernel_is_read_without_changing_the_layer(bnb, kind):
    # On an AVX512-BF16 CPU an eval-mode forward repacks a 4-bit weight for bitsandbytes' CPU kernel, with its block
    # scales in bfloat16. The repacking itself is plain torch, so it is done here by hand and runs on every CPU.
    import bitsandbytes.functional as bnbf
    torch.manual_seed(3)
    layer = quantize(bnb, torch.nn.Linear(128, 64), kind)
    state = layer.weight.quant_state
    blocks = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested else state.absmax
    before = base_for(layer).weight().double()
    rounded = blocks.bfloat16().double() / blocks.double()  # what bfloat16 scales do to each block of 64 weights
    expected = (before.reshape(-1, state.blocksize) * rounded[:, None]).reshape(before.shape)
    layer.weight.data, _ = bnbf._convert_weight_packed_for_cpu(layer.weight.data, state)
    packed, scales = layer.weight.data.clone(), state.absmax.clone()
    assert normalized_error(before, expected) > 10 * TOLERANCE["oracle"][torch.float32]  # the scales' rounding shows
    for _ in range(2):
        assert_matches_oracle(base_for(layer).weight(), expected, torch.float32, f"{kind} repacked weight")
    # The layer still holds its repacked weight, described as repacked.
    assert state.packing_format_for_cpu and layer.weight.quant_state is state
    assert torch.equal(layer.weight.data, packed) and torch.equal(state.absmax, scales)


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_quantized_consolidation_save_load_and_peft_export_reproduce_the_model(bnb, kind, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(1)
    float_model = TwoLayers()
    model = quantized_model(bnb, float_model, kind)
    config = taillor.TailLoRConfig(rank=3, target_modules=["up", "down"], head=4)
    taillor.apply_taillor(model, config, progress=False)
    x = torch.randn(5, 64)
    layers = dict(taillor.iter_taillor_layers(model))
    finished = {name: 0.0 for name in layers}  # float64 oracle: Σ s·U B A Vᵀ of the tasks, captured before each end
    for _ in range(2):  # two finished tasks: each stays a frozen low-rank term, outputs unchanged
        randomize_B(model)
        before = model(x)
        finished = {name: finished[name] + dense_delta(layer) for name, layer in layers.items()}
        assert taillor.consolidate(model) == 2
        assert_close(model(x), before, "reordered", "consolidate")
    randomize_B(model)
    expected = model(x)
    for name, layer in layers.items():
        assert layer.tasks_consolidated == 2 and layer.consolidated_up.shape[1] == 6
        assert_matches_oracle(layer.learned_delta(), finished[name] + dense_delta(layer), torch.float32,
                              f"{name}: learned ΔW")

    taillor.save_adapter(model, str(tmp_path / "adapter"))
    reloaded = quantized_model(bnb, float_model, kind)
    taillor.load_adapter(reloaded, str(tmp_path / "adapter"))
    assert_close(reloaded(x), expected, "reloaded", "save/load")

    taillor.export_lora(model, str(tmp_path / "lora"))
    with_peft = peft.PeftModel.from_pretrained(quantized_model(bnb, float_model, kind), str(tmp_path / "lora"))
    wrapped = type(with_peft.base_model.model.up)
    assert wrapped.__module__.startswith("peft.tuners.lora.bnb"), wrapped
    # PEFT puts its model in eval mode, and bitsandbytes' CPU products depend on it (8-bit: int8 activations in
    # eval; 4-bit on an AVX512-BF16 CPU: a repacked bfloat16 kernel in eval when the input needs no gradient), so
    # both sides run in eval mode without autograd.
    model.eval()
    with torch.no_grad():
        assert_close(with_peft(x), model(x), "reloaded", "PEFT export")


def test_merge_and_unload_on_quantized_base_is_refused_and_changes_nothing(bnb):
    torch.manual_seed(2)
    model = quantized_model(bnb, TwoLayers(), "nf4")
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, target_modules=["up", "down"]), progress=False)
    randomize_B(model)
    x = torch.randn(3, 64)
    before = model(x)
    with pytest.raises(TypeError, match="quantized base.*export_lora"):
        taillor.merge_and_unload(model)
    assert len(list(taillor.iter_taillor_layers(model))) == 2
    assert torch.equal(model(x), before)
    with pytest.raises(TypeError, match="cannot be folded"):
        model.up.merge()
    assert not model.up.merged and torch.equal(model(x), before)  # the refused merge left the layer as it was
    taillor.consolidate(model)  # and the layer still works


@pytest.mark.parametrize("kind", QUANTIZED)
def test_merge_and_requantize_puts_back_the_requantized_layer_and_reports_the_loss(bnb, kind):
    """The merged weight W + ΔW (ΔW: a consolidated task plus the current adapter) is requantized in the layer's
    own format: the same packed weight as quantizing W + ΔW directly, and the report's errors are the norms it
    defines, recomputed here."""
    torch.manual_seed(4)
    model = quantized_model(bnb, TwoLayers(), kind)
    kinds = {name: type(getattr(model, name)) for name in ("up", "down")}
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, target_modules=["up", "down"]), progress=False)
    randomize_B(model)
    taillor.consolidate(model)
    randomize_B(model)
    layers = dict(taillor.iter_taillor_layers(model))
    before = {n: base_for(layer.base_layer).weight().float() for n, layer in layers.items()}
    delta = {n: layer.learned_delta().detach().float() for n, layer in layers.items()}
    report = taillor.merge_and_requantize(model)
    assert set(report) == {"up", "down"} and not list(taillor.iter_taillor_layers(model))
    inputs = {"up": torch.randn(5, 64), "down": torch.randn(5, 64)}
    for name in ("up", "down"):
        module, target = getattr(model, name), before[name] + delta[name]
        assert type(module) is kinds[name]
        reference = torch.nn.Linear(target.shape[1], target.shape[0])
        with torch.no_grad():
            reference.weight.copy_(target)
            reference.bias.copy_(module.bias)
        direct = quantize(bnb, reference, kind)
        assert torch.equal(module.weight.data, direct.weight.data)
        assert torch.equal(module(inputs[name]), direct(inputs[name]))
        after = base_for(module).weight().double()  # the norms in float64 from the same float32 tensors
        target64, before64, delta64 = target.double(), before[name].double(), delta[name].double()
        assert_scalar_matches(report[name].weight_error, float((after - target64).norm() / target64.norm()),
                              f"{name}: weight_error")
        assert_scalar_matches(report[name].update_error, float((after - before64 - delta64).norm() / delta64.norm()),
                              f"{name}: update_error")
        assert 0 < report[name].weight_error < 0.2


def test_requantizing_loses_an_update_smaller_than_the_quantization_step(bnb):
    torch.manual_seed(5)
    model = quantized_model(bnb, TwoLayers(), "nf4")
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, target_modules=["up"]), progress=False)
    with torch.no_grad():
        model.up.lora_B.normal_(0.0, 1e-5)  # ΔW far below nf4's step: requantization cannot represent it
    report = taillor.merge_and_requantize(model)
    assert report["up"].update_error > 0.9

def test_target_that_is_not_a_linear_names_the_supported_kinds():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv1d(8, 8, 1))
    with pytest.raises(TypeError, match="Linear4bit or Linear8bitLt"):
        taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, target_modules=["1"]), progress=False)


@pytest.mark.slow  # a fresh interpreter that imports torch and taillor
def test_taillor_works_where_bitsandbytes_cannot_be_imported():
    """bitsandbytes is optional: with it blocked, taillor imports and wraps nn.Linear as before."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, taillor\n"
            "model = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            "taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, target_modules=['0']), progress=False)\n"
            "assert 'bitsandbytes' not in sys.modules or sys.modules['bitsandbytes'] is None\n"
            "print(type(model[0]).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "TailLoRLinear"
