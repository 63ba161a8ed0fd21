"""course_lib.lora against peft's LoraConfig on a seeded Llama: same init, same logits, same merged
weights, adapters that move both ways, and mixed-adapter batches."""


import pytest
import torch

from course_lib.lora import (BASE, add_lora, find_targets, load_adapter, lora_layers, merge_lora, mixed_batch,
                             save_adapter, set_adapter, unmerge_lora)

from .conftest import tiny_llama


def peft_model(base, **kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kwargs))


def randomize_B(model, seed):
    """B starts at zero (LoRA = base model); give it values so the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("kwargs", [
    dict(),  # peft defaults: r=8, alpha=8, q_proj + v_proj
    dict(r=4, lora_alpha=16, target_modules="all-linear"),
    dict(r=16, lora_alpha=8, target_modules=["k_proj", "down_proj"], use_rslora=True),
])
def test_same_seed_same_init_and_same_logits_as_peft(kwargs):
    ours = tiny_llama(seed=0)
    torch.manual_seed(123)
    add_lora(ours, kwargs.get("target_modules", ("q_proj", "v_proj")), r=kwargs.get("r", 8),
             alpha=kwargs.get("lora_alpha", 8), rslora=kwargs.get("use_rslora", False))
    base = tiny_llama(seed=0)
    torch.manual_seed(123)
    theirs = peft_model(base, **kwargs)
    ours_lora = {n.replace(".default", ""): p for n, p in ours.named_parameters() if "lora_" in n}
    theirs_lora = {n.replace("base_model.model.", "").replace(".default.weight", ""): p
                   for n, p in theirs.named_parameters() if "lora_" in n}
    assert ours_lora.keys() == theirs_lora.keys()
    for name in ours_lora:
        assert torch.equal(ours_lora[name], theirs_lora[name]), name  # bit-identical initialisation
    randomize_B(ours, 1)
    randomize_B(theirs, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(ours.named_parameters()) if "lora_" in n}


def test_merged_weights_equal_peft_and_unmerge_restores():
    ours, theirs = tiny_llama(seed=0), peft_model(tiny_llama(seed=0), r=4, lora_alpha=8, target_modules="all-linear")
    add_lora(ours, "all-linear", r=4, alpha=8)
    randomize_B(ours, 2)
    randomize_B(theirs, 2)
    with torch.no_grad():  # same A too
        for (n, p), (_, q) in zip([x for x in ours.named_parameters() if "lora_A" in x[0]],
                                  [x for x in theirs.named_parameters() if "lora_A" in x[0]]):
            p.copy_(q)
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged_logits = ours(IDS).logits
    merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs.get_submodule(name).weight, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(ours)
    unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)  # not bit-exact: float subtraction
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(ours)


def test_adapters_move_both_ways_between_course_lib_and_peft(tmp_path):
    from peft import PeftModel

    ours = tiny_llama(seed=0)
    add_lora(ours, ["q_proj", "o_proj", "up_proj"], r=4, alpha=8)
    randomize_B(ours, 3)
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-6)

    theirs = peft_model(tiny_llama(seed=0), r=2, lora_alpha=4, target_modules=["v_proj", "gate_proj"])
    randomize_B(theirs, 4)
    theirs.save_pretrained(tmp_path / "theirs")
    back = tiny_llama(seed=0)
    load_adapter(back, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)


def test_mixed_batch_matches_each_adapter_alone_and_peft():
    ours = tiny_llama(seed=0)
    torch.manual_seed(5)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="a")
    add_lora(ours, ["q_proj", "v_proj"], r=2, alpha=2, adapter_name="b")
    randomize_B(ours, 6)
    rows = ["a", BASE, "b", "a"]
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mixed_batch(ours, rows):
        mixed = ours(ids).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            set_adapter(ours, None if name == BASE else name)
            torch.testing.assert_close(mixed[i], ours(ids[i:i + 1]).logits[0], rtol=1e-5, atol=1e-6)

    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                            adapter_name="a")
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                key = n.replace("base_model.model.", "").replace(".weight", "")
                p.copy_(ours_params[key])
        theirs.eval()
        torch.testing.assert_close(theirs(ids, adapter_names=rows).logits, mixed, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"rank r=0 must be an integer in 1..min\(in, out\)"):
        add_lora(model, "q_proj", r=0)
    with pytest.raises(ValueError, match=r"rank r=999"):
        add_lora(tiny_llama(), "q_proj", r=999)
    with pytest.raises(ValueError, match=r"\['qproj'\] match no nn.Linear.*'q_proj'"):
        find_targets(model, ["qproj"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_llama())
    add_lora(model := tiny_llama(), "q_proj", r=2)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['zzz'\]"), mixed_batch(model, ["zzz"] * 3):
        model(IDS)
    assert "lm_head" not in find_targets(tiny_llama(), "all-linear")


def test_loading_into_another_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = tiny_llama()
    add_lora(ours, "q_proj", r=4)
    save_adapter(ours, tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"saved shape \(4, 32\) does not fit this model's \(4, 48\)"):
        load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(other, tmp_path / "nothing")


def test_dropout_acts_on_the_lora_branch_only():
    from course_lib.lora import LoRALinear

    layer = LoRALinear(torch.nn.Linear(16, 12))
    layer.add_adapter("default", r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 16)
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    expected = layer.base_layer(x) + layer.lora_output(x, "default")  # same dropout mask, base path undropped
    torch.testing.assert_close(out, expected)
    layer.eval()
    assert not torch.allclose(out, layer(x))  # in training the branch was dropped out; in eval it is not
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ layer.lora_A["default"].T) @ layer.lora_B["default"].T * 2)


def test_bf16_base_keeps_float32_adapters_like_peft():
    ours, theirs = tiny_llama(seed=0).to(torch.bfloat16), tiny_llama(seed=0).to(torch.bfloat16)
    torch.manual_seed(7)
    add_lora(ours, ["q_proj"], r=4, alpha=8)
    torch.manual_seed(7)
    theirs = peft_model(theirs, r=4, lora_alpha=8, target_modules=["q_proj"])
    ours_A = [p for n, p in ours.named_parameters() if "lora_A" in n]
    theirs_A = [p for n, p in theirs.named_parameters() if "lora_A" in n]
    assert all(a.dtype == b.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(ours_A, theirs_A))
    randomize_B(ours, 8)
    randomize_B(theirs, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=0)
