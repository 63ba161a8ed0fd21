"""course_lib.compare: merging and unloading against peft, dequantizing against the NF4 layer's own outputs,
the KL estimate against a separately held reference model, and the clear errors."""

import copy
import json

import peft
import pytest
import torch
from torch import nn

from course_lib import compare
from course_lib.evaluate import completion_logprobs
from course_lib.lora import LoRALinear, add_lora, load_adapter, save_adapter
from course_lib.nf4 import NF4Linear, quantize_model

from .conftest import tiny_llama


def _ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, model.config.vocab_size, (2, 7), generator=g),
            "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_merge_and_unload_lora_equals_peft(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomise_lora(theirs)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    load_adapter(ours, tmp_path)
    batch = _ids(ours)
    with torch.no_grad():
        adapted_logits = ours(**batch).logits
    compare.merge_and_unload_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert [type(m) for m in ours.modules()] == [type(m) for m in tiny_llama().modules()]
    their_state = merged_theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_dequantize_model_keeps_the_nf4_outputs_and_lets_qlora_merge():
    model = tiny_llama()
    quantize_model(model, double_quant=True)
    torch.manual_seed(0)
    add_lora(model, "all-linear", r=4, alpha=8)
    _randomise_lora(model)
    batch = _ids(model)
    with torch.no_grad():
        qlora_logits = model(**batch).logits
    expected = {name: m.dequantized_weight() for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    with pytest.raises(RuntimeError, match="dequantize_model"):
        compare.merge_and_unload_lora(copy.deepcopy(model))
    names = compare.dequantize_model(model)
    assert sorted(names) == sorted(expected) and not any(isinstance(m, NF4Linear) for m in model.modules())
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
        assert torch.equal(layer.weight, expected[name])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, qlora_logits, rtol=1e-5, atol=1e-5)
    compare.merge_and_unload_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, qlora_logits, rtol=1e-4, atol=1e-4)


def test_sequence_kl_matches_a_separate_reference_model(embedded):
    base, tokenizer = embedded
    policy = copy.deepcopy(base)
    torch.manual_seed(0)
    add_lora(policy, "all-linear", r=4, alpha=8)
    prompts, continuations = ["Once upon a time", "Tom had a dog."], [" there was a cat.", " It was happy."]
    assert compare.sequence_kl(policy, tokenizer, prompts, continuations) == 0  # B = 0: policy is the reference
    _randomise_lora(policy)
    expected = (completion_logprobs(policy, tokenizer, prompts, continuations)
                - completion_logprobs(base, tokenizer, prompts, continuations)).mean().item()
    got = compare.sequence_kl(policy, tokenizer, prompts + ["x"], continuations + [""])  # the empty row is left out
    assert got == pytest.approx(expected, abs=1e-5) and abs(got) > 1e-3


def test_saved_bytes_counts_every_file(tmp_path):
    model = tiny_llama()
    add_lora(model, "all-linear", r=2, alpha=4)
    save_adapter(model, tmp_path)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert compare.saved_bytes(lambda d: save_adapter(model, d)) == on_disk
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(ValueError, match="wrote no file"):
        compare.saved_bytes(lambda d: None)
    with pytest.raises(TypeError, match="function of a folder"):
        compare.saved_bytes("folder")


def test_forward_ms_times_every_model():
    a, b = tiny_llama(), tiny_llama(seed=1)
    times = compare.forward_ms({"a": a, "b": b}, _ids(a), rounds=2, repeats=1)
    assert set(times) == {"a", "b"} and all(t["ms"] > 0 and t["half_range"] >= 0 for t in times.values())
    with pytest.raises(ValueError, match="models is empty"):
        compare.forward_ms({}, _ids(a))
    with pytest.raises(ValueError, match="rounds and repeats"):
        compare.forward_ms({"a": a}, _ids(a), rounds=0)


def test_clear_errors_without_the_layers_they_need():
    with pytest.raises(ValueError, match="no NF4Linear"):
        compare.dequantize_model(tiny_llama())
    with pytest.raises(ValueError, match="no LoRA layers"):
        compare.merge_and_unload_lora(tiny_llama())
