"""IA3 against peft: same vectors → same logits (fp32 and bf16), same merged weights, peft's files both
ways, task switching, clear errors."""

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

from course_lib.ia3 import (IA3Linear, add_ia3, load_adapter, merge_and_unload, merge_ia3, save_adapter, set_adapter,
                            unmerge_ia3)

from .conftest import tiny_llama

IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))


def _randomise(model, seed):
    """IA3 starts at ones (the identity); give every vector other values so the tests can see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _copy_vectors(theirs, ours, adapter="default"):
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                module = name.removeprefix("base_model.model.").rsplit(".ia3_l", 1)[0]
                ours.get_submodule(module).ia3_l[adapter].copy_(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_vectors_same_logits_and_merged_weights_as_peft(dtype):
    theirs = get_peft_model(tiny_llama().to(dtype), IA3Config(task_type="CAUSAL_LM"))
    ours = tiny_llama().to(dtype)
    names = add_ia3(ours)
    assert [n.rsplit(".", 1)[1] for n in names] == ["k_proj", "v_proj", "down_proj"] * 2  # peft's Llama defaults
    # the same shapes (and dtypes) of vector: (out, 1) for output scaling, (1, in) for input scaling
    their_vectors = {n.removeprefix("base_model.model.").replace(".ia3_l.default", ""): p
                     for n, p in theirs.named_parameters() if "ia3_l" in n}
    for name in names:
        mine = ours.get_submodule(name).ia3_l["default"]
        assert mine.shape == their_vectors[name].shape and mine.dtype == their_vectors[name].dtype
        torch.testing.assert_close(mine, their_vectors[name], rtol=0, atol=0)  # ones
    _randomise(theirs, 3)
    _copy_vectors(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=0)
        unmerged = ours(input_ids=IDS).logits
        theirs.merge_adapter()
        merge_ia3(ours)
        their_weights = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
        for key, value in ours.state_dict().items():
            if "ia3_l" not in key:
                torch.testing.assert_close(value, their_weights[key], rtol=0, atol=0)
        merged = ours(input_ids=IDS).logits
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16 rounds the merged weight once more
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol)


def test_output_scaling_scales_the_bias_and_input_scaling_does_not():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    add_ia3(model, ["0", "1"], feedforward_modules=["1"])
    _randomise(model, 1)
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = model(x)
        out_layer, in_layer = model[0], model[1]
        assert not out_layer.is_feedforward and in_layer.is_feedforward
        torch.testing.assert_close(out_layer(x), out_layer.base_layer(x) * out_layer.ia3_l["default"].flatten())
        h = torch.randn(5, 4)
        torch.testing.assert_close(in_layer(h), in_layer.base_layer(h * in_layer.ia3_l["default"].flatten()))
        bias_before = (out_layer.base_layer.bias.clone(), in_layer.base_layer.bias.clone())
        merge_ia3(model)
        torch.testing.assert_close(out_layer.base_layer.bias, bias_before[0] * out_layer.ia3_l["default"].flatten())
        torch.testing.assert_close(in_layer.base_layer.bias, bias_before[1], rtol=0, atol=0)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
        unmerge_ia3(model)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_peft_files_move_both_ways(tmp_path):
    torch.manual_seed(0)
    theirs = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    _randomise(theirs, 5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=0)
        save_adapter(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=0, atol=0)


def test_one_frozen_model_switches_between_task_vectors():
    model = tiny_llama()
    add_ia3(model, adapter_name="a")
    add_ia3(model, adapter_name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, IA3Linear)):
            layer.ia3_l["a"].copy_(1 + 0.3 * torch.randn(layer.ia3_l["a"].shape, generator=g))
            layer.ia3_l["b"].copy_(1 + 0.3 * torch.randn(layer.ia3_l["b"].shape, generator=g))
        set_adapter(model, "a")
        a = model(input_ids=IDS).logits
        set_adapter(model, "b")
        b = model(input_ids=IDS).logits
        set_adapter(model, None)
        base = model(input_ids=IDS).logits
        set_adapter(model, "a")
        torch.testing.assert_close(model(input_ids=IDS).logits, a, rtol=0, atol=0)
    assert (a - b).abs().max() > 1e-3 and (a - base).abs().max() > 1e-3
    torch.testing.assert_close(base, tiny_llama()(input_ids=IDS).logits, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(".ia3_l.a")}


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\['o_projj'\] match no nn.Linear"):
        add_ia3(tiny_llama(), ["k_proj", "o_projj"])
    with pytest.raises(ValueError, match="must also be a target"):
        add_ia3(tiny_llama(), ["k_proj"], feedforward_modules=["down_proj"])
    model = tiny_llama()
    add_ia3(model)
    with pytest.raises(KeyError, match="unknown IA3 adapter 'x'"):
        set_adapter(model, "x")
    merge_ia3(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_ia3(model)
    with pytest.raises(ValueError, match="no IA3 layers"):
        merge_ia3(tiny_llama())
    unmerge_ia3(model)
    save_adapter(model, tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(deeper, tmp_path / "a")


@pytest.mark.parametrize("merge_first", [False, True])
def test_merge_and_unload_gives_peft_s_plain_model(merge_first):
    """peft's merge_and_unload and ours: the same module types, the same state dict (bit for bit) and the
    same logits — a plain Llama again, whether or not the vectors were merged before."""
    theirs = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    ours = tiny_llama()
    add_ia3(ours)
    _randomise(theirs, 5)
    _copy_vectors(theirs, ours)
    if merge_first:
        merge_ia3(ours)
    plain = merge_and_unload(ours)
    their_plain = theirs.merge_and_unload()
    assert plain is ours and not any(isinstance(m, IA3Linear) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in their_plain.modules()] == \
        [type(m) for m in tiny_llama().modules()]
    theirs_sd = their_plain.state_dict()
    assert list(plain.state_dict()) == list(theirs_sd)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, theirs_sd[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, their_plain(input_ids=IDS).logits, rtol=0, atol=0)


def test_merge_and_unload_needs_ia3_layers():
    with pytest.raises(ValueError, match="add_ia3"):
        merge_and_unload(tiny_llama())
