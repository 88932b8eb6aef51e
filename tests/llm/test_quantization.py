"""4-bit NF4 loading (llm/quantization.py) for every family: what is quantised and what is not, that the 4-bit
model computes exactly the full-precision model with NF4-rounded weights (checked against an NF4 decoder written
here from the published code table, not bitsandbytes'), how far its logits are from the full-precision ones,
and the one-line refusals (no bitsandbytes, an unknown choice, a layer bitsandbytes' CPU kernel gets wrong)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import family_named
from llm.quantization import QuantizationError, quantization_of

ROOT = Path(__file__).resolve().parents[2]

# The 16 NF4 levels (QLoRA paper, appendix E), in code order 0..15.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# Measured on these fixtures (torch 2.13 CPU, bitsandbytes 0.50.2): weights within 0.155 of their block's absmax
# (half the widest NF4 step is 0.139; the 8-bit scales add the rest); logits: max |difference| 0.074 (QWen) and
# 0.121 (Qwen2.5), mean 0.0055 and 0.0125, on logits of standard deviation 0.16.
WEIGHT_TOLERANCE = 0.17  # x the block's absmax
LOGIT_MAX_TOLERANCE = 0.2
LOGIT_MEAN_TOLERANCE = 0.025


def nf4_decode(weight) -> torch.Tensor:
    """The values a bitsandbytes 4-bit weight holds: two codes per byte (high nibble first), each an NF4 level
    times its block's scale; with double quantisation the scales are 8-bit codes of a second, blockwise map."""
    state = weight.quant_state
    packed = weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    n = state.shape.numel()
    scales = state.absmax
    if state.nested:
        inner = state.state2
        scales = (inner.code[state.absmax.long()] * inner.absmax.repeat_interleave(inner.blocksize)[: scales.numel()]
                  + state.offset)
    return (NF4_LEVELS[codes[:n]] * scales.repeat_interleave(state.blocksize)[:n]).reshape(state.shape)


@pytest.fixture(scope="module")
def qwen64_dir(tmp_path_factory):
    """A tiny QWen whose widths are multiples of 64 (bitsandbytes' block), in the official layout."""
    from qwen.tiny import write_tiny_qwen_checkpoint

    return write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen64") / "tiny-qwen", seed=3, bias_std=0.02,
                                      hidden_size=64, intermediate_size=256)


@pytest.fixture(params=["qwen", "qwen2.5"])
def pair(request, qwen64_dir, llm_tiny_qwen2_5_dir):
    """(full-precision model, 4-bit model) of a tiny QWen v1 (our code) and a tiny Qwen2.5 (transformers')."""
    family, folder = {"qwen": ("qwen", qwen64_dir), "qwen2.5": ("qwen2", llm_tiny_qwen2_5_dir)}[request.param]
    load = family_named(family).load_model
    return load(folder), load(folder, quantization="nf4")


def test_only_the_decoder_layers_linear_weights_are_4bit(pair):
    full, nf4 = pair
    assert quantization_of(full) == "none" and quantization_of(nf4) == "nf4"
    quantised = {name for name, p in nf4.named_parameters() if hasattr(p, "quant_state")}
    layer_linears = {f"{name}.weight" for name, m in full.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not full.get_output_embeddings()}
    assert quantised == layer_linears and quantised
    for state in (nf4.get_parameter(name).quant_state for name in quantised):
        assert (state.quant_type, state.blocksize, state.nested, state.dtype) == ("nf4", 64, True, torch.float32)
    kept = dict(full.named_parameters())
    for name, p in nf4.named_parameters():  # embeddings, norms, biases, LM head: the published values, fp32
        if name not in quantised:
            assert p.dtype == torch.float32 and torch.equal(p, kept[name]), name


def test_the_4bit_model_is_the_full_model_with_nf4_rounded_weights(pair):
    """Its logits are exactly those of the full-precision model whose linear weights are replaced by the decoded
    NF4 values; each weight within WEIGHT_TOLERANCE of its block's absmax; the logits within the stated bounds."""
    full, nf4 = pair
    rounded = copy.deepcopy(full)
    with torch.no_grad():
        for name, p in nf4.named_parameters():
            if hasattr(p, "quant_state"):
                original = rounded.get_parameter(name)
                decoded = nf4_decode(p)
                blocks = original.reshape(-1, 64).abs().amax(dim=1)  # every width here is a multiple of 64
                error = (decoded - original).reshape(-1, 64).abs().amax(dim=1) / blocks
                assert error.max() <= WEIGHT_TOLERANCE, (name, error.max())
                original.copy_(decoded)
    ids = torch.randint(0, 1000, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, exact, reference = nf4(ids).logits, rounded(ids).logits, full(ids).logits
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    difference = (got - reference).abs()
    assert difference.max() <= LOGIT_MAX_TOLERANCE and difference.mean() <= LOGIT_MEAN_TOLERANCE, (
        difference.max(), difference.mean())
    assert difference.max() > 1e-3  # (the weights really are rounded)


def test_the_compute_dtype_follows_the_model(llm_tiny_qwen2_5_dir):
    """bf16 weights (a GPU run) compute in bf16; the unquantised weights stay bf16, not upcast to fp32."""
    model = family_named("qwen2").load_model(llm_tiny_qwen2_5_dir, dtype=torch.bfloat16, quantization="nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if not hasattr(p, "quant_state")} == {torch.bfloat16}


def test_a_layer_the_cpu_kernel_gets_wrong_is_refused(tiny_llm_dir):
    """bitsandbytes 0.50.2 dequantises, on CPU, a weight whose rows are not a multiple of 64 with wrong scales:
    the hidden-32 QWen is refused, naming a layer, instead of computing something else silently."""
    with pytest.raises(QuantizationError, match=r"transformer\.h\.0\.\S+: in_features 32 is not a multiple of the "
                                                r"4-bit block size 64"):
        family_named("qwen").load_model(tiny_llm_dir, quantization="nf4")


@pytest.mark.parametrize("family", ["qwen", "qwen2"])
def test_without_bitsandbytes_nf4_says_what_to_install(monkeypatch, family, qwen64_dir, llm_tiny_qwen2_5_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if not installed
    folder = qwen64_dir if family == "qwen" else llm_tiny_qwen2_5_dir
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes.*: pip install bitsandbytes==0\.50\.2"):
        family_named(family).load_model(folder, quantization="nf4")
    assert quantization_of(family_named(family).load_model(folder)) == "none"  # without the switch: no need


def test_an_unknown_quantization_names_the_choices(qwen64_dir):
    with pytest.raises(QuantizationError, match="'int4' is not one of: none, nf4"):
        family_named("qwen").load_model(qwen64_dir, quantization="int4")


def test_train_py_without_bitsandbytes_is_one_line(tmp_path, qwen64_dir, tiny_clip_dir):
    """The switch on a machine without bitsandbytes: exit 2 and one line saying what to install, before any
    model loads or any output is written."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{llm_path: {qwen64_dir}, vision_path: {tiny_clip_dir}, quantization: nf4}}\n"
                      f"training: {{output_dir: {tmp_path / 'out'}}}\n")
    hide = "import sys, runpy; sys.modules['bitsandbytes'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_path('train.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", hide, "train.py", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install bitsandbytes==0.50.2" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
