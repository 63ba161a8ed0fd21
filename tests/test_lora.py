"""course_lib.lora against peft's LoraConfig on a seeded Llama: same init, same logits, same merged
weights, adapters that move both ways, and mixed-adapter batches."""


import contextlib

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


def test_dropout_in_training_equals_peft(monkeypatch):
    """lora_dropout > 0 in train mode, the same seed before each forward: the same dropout masks in the same
    layers, so the same logits and gradients as peft's ``lora_B(lora_A(dropout(x))) · s`` on an undropped
    base path. The comparison has teeth: dropping the base path's input too disagrees."""
    from course_lib.lora import LoRALinear

    ours, theirs = tiny_llama(seed=0), tiny_llama(seed=0)
    torch.manual_seed(123)
    add_lora(ours, "all-linear", r=4, alpha=8, dropout=0.3)
    torch.manual_seed(123)
    theirs = peft_model(theirs, r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear")
    randomize_B(ours, 8)
    randomize_B(theirs, 8)
    ours.train(), theirs.train()

    def run(model):
        torch.manual_seed(7)  # the same masks in both
        out = model(IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach()

    logits, expected = run(ours), run(theirs)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    ours_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # in eval mode dropout is the identity: the dropped-out run differed from it
        assert (ours.eval()(IDS).logits - logits).abs().max() > 1e-3
        torch.testing.assert_close(ours(IDS).logits, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)
    ours.train()

    def dropped_base(self, x):  # the mistake: dropout(x) fed to the frozen layer too
        name = self.active_adapter
        x = self.lora_dropout[name](x)
        return self.base_layer(x) + self.scaling[name] * (x @ self.lora_A[name].T) @ self.lora_B[name].T

    monkeypatch.setattr(LoRALinear, "forward", dropped_base)
    with torch.no_grad():
        torch.manual_seed(7)
        assert (ours(IDS).logits - expected).abs().max() > 1e-3


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


def _layer_grads(layer, x, grad, fused):
    from course_lib.lora import autograd_backward

    x.grad = None
    layer.zero_grad()
    with contextlib.nullcontext() if fused else autograd_backward():
        y = layer(x)
        y.backward(grad)
    return y.detach(), x.grad.clone(), layer.lora_A["default"].grad.clone(), layer.lora_B["default"].grad.clone()


@pytest.mark.parametrize("base_kind", ["linear", "linear+bias", "nf4"])
def test_hand_written_backward_equals_autograd_bit_for_bit_in_float32(base_kind):
    from course_lib.lora import LoRALinear
    from course_lib.nf4 import NF4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=base_kind == "linear+bias").requires_grad_(False)
    layer = LoRALinear(NF4Linear(linear) if base_kind == "nf4" else linear)
    layer.add_adapter("default", r=8, alpha=12)  # s = 1.5: not a power of two, so its rounding shows
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 7, 64, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    fused, plain = _layer_grads(layer, x, grad, True), _layer_grads(layer, x, grad, False)
    for name, a, b in zip(["output", "x.grad", "A.grad", "B.grad"], fused, plain):
        assert torch.equal(a, b), name


def test_hand_written_backward_in_bf16_rounds_the_input_gradient_once():
    """bf16 base, float32 adapters: output and adapter gradients are bit-identical to autograd's; the
    input gradient is summed in float32 and rounded once (autograd rounds the adapter's share to bf16
    first), so it is at least as close to the float64 answer."""
    from course_lib.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False))
    layer.add_adapter("default", r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3, 7, 48, dtype=torch.bfloat16)
    fused, plain = _layer_grads(layer, x, grad, True), _layer_grads(layer, x, grad, False)
    for name, a, b in zip(["output", "A.grad", "B.grad"], [fused[0], *fused[2:]], [plain[0], *plain[2:]]):
        assert torch.equal(a, b), name
    A, B, W = (t.double() for t in (layer.lora_A["default"], layer.lora_B["default"], layer.base_layer.weight))
    exact = grad.double() @ W + (grad.double() * 2.0) @ B @ A
    assert not torch.equal(fused[1], plain[1])  # the two roundings really differ somewhere
    assert (fused[1].double() - exact).abs().max() <= (plain[1].double() - exact).abs().max()


def test_autograd_path_is_used_where_the_hand_written_one_does_not_apply(monkeypatch):
    from course_lib import lora
    from course_lib.lora import LoRALinear

    def refuse(*args):
        raise AssertionError("LoRAFunction used")

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    dropped = LoRALinear(torch.nn.Linear(16, 8).requires_grad_(False))
    dropped.add_adapter("default", r=2, alpha=4, dropout=0.5)
    trainable_base = LoRALinear(torch.nn.Linear(16, 8))
    trainable_base.add_adapter("default", r=2, alpha=4)
    plain = LoRALinear(torch.nn.Linear(16, 8).requires_grad_(False))
    plain.add_adapter("default", r=2, alpha=4)
    monkeypatch.setattr(lora.LoRAFunction, "apply", refuse)
    dropped(x).sum().backward()  # dropout active in training: the mask lives in autograd's graph
    trainable_base(x).sum().backward()
    assert trainable_base.base_layer.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x)
    with pytest.raises(AssertionError, match="LoRAFunction used"):
        plain(x)


def test_bf16_training_keeps_no_float32_copy_of_each_layer_input():
    """What autograd keeps for the backward pass, counted exactly: peft keeps a float32 copy of every
    adapted layer's input (for ∂L/∂A); course_lib keeps the bf16 input, once for the layers that read
    the same tensor (q, k, v; gate, up). Same logits, gradients as close to peft's as bf16 allows."""
    from course_lib.memory import saved_activation_bytes

    ours, theirs = tiny_llama(seed=0).to(torch.bfloat16), tiny_llama(seed=0).to(torch.bfloat16)
    torch.manual_seed(7)
    names = add_lora(ours, "all-linear", r=4, alpha=8)
    torch.manual_seed(7)
    theirs = peft_model(theirs, r=4, lora_alpha=8, target_modules="all-linear")
    randomize_B(ours, 8)
    randomize_B(theirs, 8)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    out_ours, saved_ours = saved_activation_bytes(lambda: ours(ids, labels=ids), exclude=ours.parameters())
    out_theirs, saved_theirs = saved_activation_bytes(lambda: theirs(input_ids=ids, labels=ids),
                                                      exclude=theirs.parameters())
    assert torch.equal(out_ours.logits, out_theirs.logits)
    float32_copies = sum(ids.numel() * ours.get_submodule(n).in_features * 4 for n in names)
    first_readers = [n for n in names if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
    bf16_inputs = sum(ids.numel() * ours.get_submodule(n).in_features * 2 for n in first_readers)
    # at most one bf16 input per group of readers is new storage (o_proj's input can be a view of the
    # attention output that attention keeps anyway, depending on the attention kernel)
    assert float32_copies - bf16_inputs <= saved_theirs - saved_ours <= float32_copies
    out_ours.loss.backward(), out_theirs.loss.backward()
    grads_theirs = {n.replace("base_model.model.", "").replace(".default.weight", ".default"): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            theirs_grad = grads_theirs[name]  # bf16 activations: differences at bf16 rounding level
            assert (p.grad - theirs_grad).abs().max() <= 0.01 * theirs_grad.abs().max(), name


def test_hand_written_backward_under_gradient_checkpointing(monkeypatch):
    """Checkpointing re-runs each layer's forward inside the backward pass; the gradients must not change."""
    from course_lib.lora import LoRAFunction

    calls = []
    forward = LoRAFunction.forward
    monkeypatch.setattr(LoRAFunction, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a)))
    grads, forwards = [], []
    for checkpointing in (False, True):
        calls.clear()
        model = tiny_llama(seed=0)
        torch.manual_seed(1)
        add_lora(model, "all-linear", r=4, alpha=8)
        randomize_B(model, 2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        forwards.append(len(calls))
    assert forwards == [14, 28]  # 2 layers × 7 adapted linears, run again in the backward when checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
