"""NF4 against bitsandbytes (CPU): the code, packed bytes, absmax and dequantized values, bit for bit;
double quantization within the documented tolerance; clear errors for bad input."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from course_lib.nf4 import (DYNAMIC_MAP, NF4_CODE, NF4_OFFSET, NF4State, build_nf4_code, dequantize_nf4,
                            quantize_nf4)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_codebook_is_built_from_normal_quantiles_and_equals_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and (NF4_CODE == 0).sum() == 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7  # asymmetric, with an exact zero
    unrounded = build_nf4_code(1 - 0.5 * (1 / 30 + 1 / 32))
    assert 0 < (unrounded - NF4_CODE).abs().max() < 1e-6 and abs(NF4_OFFSET - 0.96770833) < 1e-7
    assert torch.equal(DYNAMIC_MAP, bnbf.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (5,), (128, 300)])  # block multiples, tails, odd counts
def test_quantize_and_dequantize_bit_exact_with_bitsandbytes(dtype, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(dtype)
    packed, state = quantize_nf4(w)
    their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4")
    assert torch.equal(packed, their_packed) and torch.equal(state.absmax, their_state.absmax)
    ours = dequantize_nf4(packed, state)
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, bnbf.dequantize_4bit(their_packed, their_state))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_block_sizes_bit_exact(blocksize):
    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(blocksize))
    packed, state = quantize_nf4(w, blocksize=blocksize)
    their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize)
    assert torch.equal(packed, their_packed) and torch.equal(state.absmax, their_state.absmax)


def test_high_nibble_holds_the_first_element_and_ties_go_to_the_lower_level():
    w = torch.tensor([1.0, -1.0, 0.0, float(NF4_CODE[8] + NF4_CODE[9]) / 2])  # the last is a midpoint
    packed, state = quantize_nf4(w)
    assert packed.flatten().tolist() == [(15 << 4) | 0, (7 << 4) | 8]


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_matches_bitsandbytes_within_the_documented_tolerance(dtype):
    """bitsandbytes' CPU 8-bit kernel rounds through a lookup table, not to the nearest level; our nearest
    rounding picks the neighbouring 8-bit index for under 1 % of the absmax values. Everything else —
    packed 4-bit data, the mean offset, the second-level scales, and every weight whose absmax index
    agrees — is bit-exact."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(7)).to(dtype)
    packed, state = quantize_nf4(w, double_quant=True)
    their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, their_packed)
    assert torch.equal(state.offset, their_state.offset) and torch.equal(state.absmax_scale, their_state.state2.absmax)
    agree = state.absmax == their_state.absmax
    assert agree.float().mean() >= 0.99
    assert (state.absmax.int() - their_state.absmax.int()).abs().max() <= 1  # a neighbour when not equal
    ours, theirs = dequantize_nf4(packed, state), bnbf.dequantize_4bit(their_packed, their_state)
    same_block = agree.repeat_interleave(64).view(w.shape)
    assert torch.equal(ours[same_block], theirs[same_block])


def test_bits_per_parameter():
    w = torch.randn(4096, 256)
    assert quantize_nf4(w)[1].bits_per_parameter == 4.5  # 4 + 32/64
    assert abs(quantize_nf4(w, double_quant=True)[1].bits_per_parameter - 4.127) < 1e-3  # 4 + 8/64 + 32/(64·256)


def test_bad_input_gets_clear_errors():
    with pytest.raises(TypeError, match="float tensors"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4(torch.randn(100), blocksize=48)
    w = torch.randn(100)
    w[3], w[50] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf"):
        quantize_nf4(w)
    packed, state = quantize_nf4(torch.randn(100))
    other = quantize_nf4(torch.randn(300))[1]
    with pytest.raises(ValueError, match="does not match its state"):
        dequantize_nf4(packed, other)
    with pytest.raises(TypeError, match="NF4State"):
        dequantize_nf4(packed, {"absmax": state.absmax})
    assert isinstance(state, NF4State)


# ------------------------------------------------------------------------------------------------
# The 4-bit layer and QLoRA
# ------------------------------------------------------------------------------------------------
def test_nf4_linear_equals_bitsandbytes_linear4bit_and_backpropagates_to_its_input():
    import bitsandbytes as bnb

    from course_lib.nf4 import NF4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    ours = NF4Linear(linear)
    theirs = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32, compress_statistics=False)
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=False)
    theirs.bias = torch.nn.Parameter(linear.bias.data.clone())
    theirs = theirs.to("cpu")
    x = torch.randn(3, 5, 64, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ours(x).sum().backward()
    expected = torch.ones(3, 5, 48) @ ours.dequantized_weight()  # dL/dx = dL/dy · Ŵ
    torch.testing.assert_close(x.grad, expected)
    assert not any(p.requires_grad for p in ours.parameters())


def test_qlora_equals_lora_on_the_dequantized_model():
    import copy

    from course_lib.lora import add_lora, merge_lora
    from course_lib.nf4 import NF4Linear, quantize_model

    from .conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    quantized, dense = copy.deepcopy(model), copy.deepcopy(model)
    names = quantize_model(quantized)
    assert len(names) == 14 and isinstance(quantized.model.embed_tokens, torch.nn.Embedding)  # 2 layers × 7 linears
    with torch.no_grad():
        for name in names:
            dense.get_submodule(name).weight.copy_(quantized.get_submodule(name).dequantized_weight())
        torch.testing.assert_close(quantized(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=0)
    torch.manual_seed(1)
    add_lora(quantized, "all-linear")
    torch.manual_seed(1)
    add_lora(dense, "all-linear")
    with torch.no_grad():
        for (_, p), (_, q) in zip([x for x in quantized.named_parameters() if "lora_B" in x[0]],
                                  [x for x in dense.named_parameters() if "lora_B" in x[0]]):
            p.normal_(std=0.1), q.copy_(p)
    quantized(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    ours = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    reference = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(reference) and len(ours) == 28
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="cannot merge LoRA into a 4-bit"):
        merge_lora(quantized)
    assert all(isinstance(quantized.get_submodule(n).base_layer, NF4Linear) for n in names)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_weight_is_the_checked_dequantization(double_quant):
    """NF4Linear skips dequantize_nf4's checks on its hot path; its weight must still be exactly it."""
    from course_lib.nf4 import NF4Linear, dequantize_nf4

    torch.manual_seed(0)
    layer = NF4Linear(torch.nn.Linear(96, 40).to(torch.bfloat16), double_quant=double_quant)
    expected = dequantize_nf4(layer.packed, layer.state)
    assert layer.dequantized_weight().dtype == torch.bfloat16 and torch.equal(layer.dequantized_weight(), expected)
    assert torch.equal(layer.dequantized_weight(torch.float32), expected.float())


@pytest.mark.parametrize("chunk_bytes", [32, 100, 1 << 18])
def test_torch_path_is_the_same_for_any_chunking(chunk_bytes):
    """The torch path works through the packed bytes in chunks (whole blocks each); chunk edges, a
    chunk size that is not a multiple of the block and a partial last block must not change a bit."""
    from course_lib.nf4 import dequantize_nf4_torch

    w = torch.randn(3 * 1000 + 17, generator=torch.Generator().manual_seed(3))
    packed, state = quantize_nf4(w)
    their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4")
    out = dequantize_nf4_torch(packed, state.absmax, w.numel(), 64, torch.float32, chunk_bytes=chunk_bytes)
    assert torch.equal(out, bnbf.dequantize_4bit(their_packed, their_state).reshape(-1))
