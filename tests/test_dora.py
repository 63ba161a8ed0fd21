"""course_lib's DoRA (``add_lora(..., use_dora=True)``) against peft's ``LoraConfig(use_dora=True)``: the
same initial magnitudes, logits, gradients (A, B and m), merged weights, files both ways, dropout in
training, and the hub-shaped Qwen2 (biased q/k/v, bf16). Float32 tolerances are 1e-6 (the two compute
the same operations in the same order; in practice they agree bit for bit).

Each comparison is shown able to fail: a from-the-paper reference (eq. 5) written here agrees with peft,
and the same reference with the norm left in the graph (§4.3 not applied) or with dropout applied the
naive way does not.
"""

import copy

import pytest
import torch
from torch import nn

from course_lib.lora import (BASE, LoRALinear, add_lora, load_adapter, lora_layers, merge_lora, mixed_batch,
                             save_adapter, set_adapter, unmerge_lora)

from .conftest import tiny_llama
from .test_hub_model import _batch, _copy, _copy_lora, _lora_params, _peft_lora, _randomize, _real

IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(9))


def perturb_magnitude(model, seed, scale=0.1):
    """m starts at ‖W₀‖_c; move it (m ← m·(1 + 0.1·ε)) so that a wrong magnitude would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))


def a_model(which, request):
    """A fresh float32 model: the seeded tiny Llama or a copy of the session's embedded model."""
    return tiny_llama(seed=0) if which == "tiny" else copy.deepcopy(request.getfixturevalue("embedded")[0])


def paper_dora_output(layer, x, result, name, detach_norm=True, peft_dropout=True):
    """DoRA's extra output written from the paper (eq. 5) for the mutation checks, (..., out): m / ‖W₀ + s·BA‖_c
    rescales W₀x + s·BAx. ``detach_norm=False`` lets the gradient flow through the norm (§4.3 not applied);
    ``peft_dropout=False`` applies dropout to the LoRA path only, W₀x taken from the undropped input."""
    A, B, m, s = layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name], layer.scaling[name]
    W0, bias = layer.base_layer.weight, layer.base_layer.bias
    dropout = layer.lora_dropout[name]
    dropped = layer.training and not isinstance(dropout, nn.Identity)
    x_tilde = dropout(x) if dropped else x
    norm = torch.linalg.norm(W0 + s * (B @ A), dim=1)  # (out,)
    g = m / (norm.detach() if detach_norm else norm)
    W0x = x_tilde @ W0.T if dropped and peft_dropout else (result if bias is None else result - bias)
    return (g - 1) * W0x + g * s * (x_tilde @ A.T @ B.T)


def use_reference(monkeypatch, **flags):
    monkeypatch.setattr(LoRALinear, "dora_output",
                        lambda self, x, result, name: paper_dora_output(self, x, result, name, **flags))


def ours_and_peft(base_ours, base_theirs, seed=123, **config):
    """The same DoRA config on two copies of a model, each from the same seed; B randomised alike."""
    torch.manual_seed(seed)
    add_lora(base_ours, config.get("target_modules", ("q_proj", "v_proj")), r=config.get("r", 8),
             alpha=config.get("lora_alpha", 8), rslora=config.get("use_rslora", False),
             dropout=config.get("lora_dropout", 0.0), use_dora=True)
    torch.manual_seed(seed)
    theirs = _peft_lora(base_theirs, use_dora=True, **config)
    return base_ours, theirs


def grads(model):
    return {name: p.grad for name, p in _lora_params(model).items()}


# ------------------------------------------------------------------------------------------------
# (1) initialisation and logits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "embedded"])
@pytest.mark.parametrize("config", [
    dict(),  # peft's defaults: r=8, alpha=8, q_proj + v_proj
    dict(r=4, lora_alpha=16, target_modules="all-linear"),
    dict(r=2, lora_alpha=8, target_modules=["k_proj", "down_proj"], use_rslora=True),
])
def test_same_seed_same_magnitude_and_logits_as_peft(which, config, request):
    ours, theirs = ours_and_peft(a_model(which, request), a_model(which, request), **config)
    mine, peft_params = _lora_params(ours), _lora_params(theirs)
    assert mine.keys() == peft_params.keys() and any("lora_magnitude_vector" in n for n in mine)
    for name in mine:
        assert torch.equal(mine[name], peft_params[name]), name  # A, B and m bit-identical
    base = a_model(which, request)
    for name, layer in lora_layers(ours):  # m = ‖W₀‖_c: the norm of each output's row of the pretrained weight
        torch.testing.assert_close(layer.lora_magnitude_vector["default"],
                                   torch.linalg.norm(base.get_submodule(name).weight, dim=1), rtol=0, atol=1e-6)
    with torch.no_grad():  # B = 0 and m = ‖W₀‖_c: DoRA starts as the base model
        torch.testing.assert_close(ours(IDS).logits, base(IDS).logits, rtol=0, atol=1e-5)
    _randomize(ours, "lora_B", 1)
    _randomize(theirs, "lora_B", 1)
    with torch.no_grad():
        logits = ours(IDS).logits
        torch.testing.assert_close(logits, theirs(IDS).logits, rtol=0, atol=1e-6)
        # DoRA is live: the same A and B as plain LoRA give other logits
        plain = a_model(which, request)
        torch.manual_seed(123)
        add_lora(plain, config.get("target_modules", ("q_proj", "v_proj")), r=config.get("r", 8),
                 alpha=config.get("lora_alpha", 8), rslora=config.get("use_rslora", False))
        _copy_lora(ours, plain)
        assert (plain(IDS).logits - logits).abs().max() > 1e-3
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(ours.named_parameters()) if "lora_" in n}


# ------------------------------------------------------------------------------------------------
# (2) gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_gradients_of_A_B_and_magnitude_equal_peft(which, request, monkeypatch):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours, theirs = ours_and_peft(a_model(which, request), a_model(which, request), **config)
    _randomize(theirs, "lora_B", 2)
    perturb_magnitude(theirs, 3)
    _copy_lora(theirs, ours)
    ours(IDS, labels=IDS).loss.backward()
    theirs(IDS, labels=IDS).loss.backward()
    mine, expected = grads(ours), grads(theirs)
    assert mine.keys() == expected.keys() and any("lora_magnitude_vector" in n for n in mine)
    for name in mine:
        assert mine[name] is not None and mine[name].abs().max() > 0, name
        torch.testing.assert_close(mine[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # The check has teeth: the paper's formula written here agrees; without the detach it does not.
    for detach_norm in (True, False):
        reference = a_model(which, request)
        torch.manual_seed(123)
        add_lora(reference, "all-linear", r=4, alpha=8, use_dora=True)
        _copy_lora(theirs, reference)
        use_reference(monkeypatch, detach_norm=detach_norm)
        reference(IDS, labels=IDS).loss.backward()
        monkeypatch.undo()
        got = grads(reference)
        differs = max((got[n] - expected[n]).abs().max().item() for n in got if "lora_magnitude_vector" not in n)
        if detach_norm:
            assert differs < 1e-5
        else:
            assert differs > 1e-4, "the norm's gradient should change A's and B's gradients"


# ------------------------------------------------------------------------------------------------
# (3) merge and unmerge
# ------------------------------------------------------------------------------------------------
def test_merge_equals_peft_and_unmerge_restores_the_base_weight():
    config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours, theirs = ours_and_peft(tiny_llama(seed=0), tiny_llama(seed=0), **config)
    _randomize(theirs, "lora_B", 4)
    perturb_magnitude(theirs, 5)
    _copy_lora(theirs, ours)
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged_logits = ours(IDS).logits
    merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, layer in lora_layers(ours):
        merged = layer.base_layer.weight
        torch.testing.assert_close(merged, merged_theirs.get_submodule(name).weight, rtol=0, atol=1e-6)
        assert (merged - before[f"{name}.base_layer.weight"]).abs().max() > 1e-3, "the merge changed nothing"
    with torch.no_grad():  # merged: the base layers alone give the adapter's logits
        torch.testing.assert_close(ours(IDS).logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(ours)
    unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)  # float division and subtraction: not bit-exact
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, unmerged_logits, rtol=0, atol=1e-5)


def test_a_merged_dora_adapter_merges_alone():
    """DoRA rescales the whole weight, so it is merged only into an unmerged layer and nothing merges on top."""
    model = tiny_llama(seed=0)
    add_lora(model, ["q_proj"], r=2, alpha=4, use_dora=True, adapter_name="dora")
    add_lora(model, ["q_proj"], r=2, alpha=4, adapter_name="plain")
    _randomize(model, "lora_B", 6)
    merge_lora(model, "dora")
    with pytest.raises(RuntimeError, match="merges only alone"):
        merge_lora(model, "plain")
    unmerge_lora(model, "dora")
    merge_lora(model, "plain")
    with pytest.raises(RuntimeError, match="merges only alone"):
        merge_lora(model, "dora")


# ------------------------------------------------------------------------------------------------
# (4) files, both ways
# ------------------------------------------------------------------------------------------------
def test_adapters_move_both_ways_between_course_lib_and_peft(tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    ours = tiny_llama(seed=0)
    add_lora(ours, ["q_proj", "o_proj", "up_proj"], r=4, alpha=8, use_dora=True)
    _randomize(ours, "lora_B", 7)
    perturb_magnitude(ours, 8)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-6)
    # the same key names as peft's own file for that config
    _peft_lora(tiny_llama(seed=0), r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
               use_dora=True).save_pretrained(tmp_path / "peft_keys")
    assert (load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
            == load_file(tmp_path / "peft_keys" / "adapter_model.safetensors").keys())

    theirs = _peft_lora(tiny_llama(seed=0), r=2, lora_alpha=4, target_modules=["v_proj", "gate_proj"], use_dora=True)
    _randomize(theirs, "lora_B", 9)
    perturb_magnitude(theirs, 10)
    theirs.save_pretrained(tmp_path / "theirs")
    back = tiny_llama(seed=0)
    load_adapter(back, tmp_path / "theirs")
    assert all(layer.is_dora("default") for _, layer in lora_layers(back))
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)


def test_a_dora_file_without_its_magnitudes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _peft_lora(tiny_llama(seed=0), use_dora=True).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="q_proj.lora_magnitude_vector"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model)), "a refused adapter must leave the model untouched"


# ------------------------------------------------------------------------------------------------
# (5) dropout in training
# ------------------------------------------------------------------------------------------------
def test_dropout_in_training_equals_peft(monkeypatch):
    """peft recomputes W₀·dropout(x) for DoRA's term when dropout is active (the base output keeps the
    undropped x): the outputs and gradients agree with the same dropout masks."""
    config = dict(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear")
    ours, theirs = ours_and_peft(tiny_llama(seed=0), tiny_llama(seed=0), **config)
    _randomize(theirs, "lora_B", 11)
    perturb_magnitude(theirs, 12)
    _copy_lora(theirs, ours)
    ours.train(), theirs.train()

    def run(model):
        torch.manual_seed(7)  # the same dropout masks
        out = model(IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach()

    logits, expected = run(ours), run(theirs)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    for name, grad in grads(ours).items():
        torch.testing.assert_close(grad, grads(theirs)[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        assert (ours.eval()(IDS).logits - logits).abs().max() > 1e-3, "dropout should be active in training"
    ours.train()
    for peft_dropout, agrees in ((True, True), (False, False)):  # the check has teeth
        use_reference(monkeypatch, peft_dropout=peft_dropout)
        with torch.no_grad():
            torch.manual_seed(7)
            gap = (ours(IDS).logits - expected).abs().max()
        monkeypatch.undo()
        assert (gap < 1e-5) == agrees, (peft_dropout, gap)


# ------------------------------------------------------------------------------------------------
# (6) the hub-shaped model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hub_model_logits_equal_peft(hub_model_dir, hub, dtype):
    """Qwen2 with biased q/k/v (so W₀x = result − b is exercised), float32 and a bf16 load (float32
    adapters over a bf16 base, as peft's autocast_adapter_dtype makes them)."""
    from course_lib.models import load_model

    def fresh():
        return _copy(hub) if dtype == torch.float32 else load_model(hub_model_dir, device="cpu", dtype=dtype)[0]

    ours, theirs = ours_and_peft(fresh(), fresh(), r=4, lora_alpha=16, target_modules="all-linear")
    mine, peft_params = _lora_params(ours), _lora_params(theirs)
    assert mine.keys() == peft_params.keys()
    for name in mine:
        assert mine[name].dtype == peft_params[name].dtype == torch.float32, name  # float32 adapters on a bf16 base
        assert torch.equal(mine[name], peft_params[name]), name
    assert any(layer.base_layer.bias is not None for _, layer in lora_layers(ours))
    _randomize(theirs, "lora_B", 13)
    perturb_magnitude(theirs, 14)
    _copy_lora(theirs, ours)
    ids, mask = _batch(hub[1])
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(_real(a, mask), _real(b, mask), rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


# ------------------------------------------------------------------------------------------------
# NF4 base, and what is refused
# ------------------------------------------------------------------------------------------------
def test_dora_on_nf4_equals_dora_on_the_dequantized_model():
    from course_lib.nf4 import quantize_model

    quantized, dense = tiny_llama(seed=0), tiny_llama(seed=0)
    names = quantize_model(quantized)
    with torch.no_grad():
        for name in names:
            dense.get_submodule(name).weight.copy_(quantized.get_submodule(name).dequantized_weight())
    for model in (quantized, dense):
        torch.manual_seed(0)
        add_lora(model, "all-linear", r=4, alpha=8, use_dora=True)
    for name in _lora_params(dense):
        assert torch.equal(_lora_params(quantized)[name], _lora_params(dense)[name]), name  # m = ‖Ŵ‖_c
    _randomize(dense, "lora_B", 15)
    _copy_lora(dense, quantized)
    quantized(IDS, labels=IDS).loss.backward()
    dense(IDS, labels=IDS).loss.backward()
    for name, grad in grads(dense).items():
        torch.testing.assert_close(grads(quantized)[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_dora_input_is_named():
    model = tiny_llama(seed=0)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        add_lora(model, use_dora="yes")

    packed = tiny_llama(seed=0)  # a packed 4-bit weight course_lib cannot take norms of (as bitsandbytes')
    layer = packed.get_submodule("model.layers.0.self_attn.q_proj")
    layer.weight = nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="use_dora=True needs the base weight's row norms"):
        add_lora(packed, use_dora=True)
    assert not list(lora_layers(packed)), "a refused adapter must leave the model untouched"

    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=2, adapter_name="plain")
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=2, adapter_name="dora", use_dora=True)
    with pytest.raises(ValueError, match=r"\['dora'\] use DoRA"):
        with mixed_batch(model, ["plain", "dora", BASE]):
            pass
    with torch.no_grad(), mixed_batch(model, ["plain", BASE, "plain"]):  # plain LoRA rows still mix
        model(IDS)
    set_adapter(model, "dora")
    assert all(layer.lora_magnitude_vector["dora"].requires_grad for _, layer in lora_layers(model))
    assert not any(layer.lora_A["plain"].requires_grad for _, layer in lora_layers(model))
