"""The shared adapter base (course_lib.adapters) and the bugs it fixed, each reproduced against peft or
bitsandbytes: peft configs beyond plain LoRA, set_adapter followed by training, base layers with hooks or
their own forward, LoRA on a bitsandbytes 4-bit model, NF4 layers in bf16 and with a trainable bias."""

import json

import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.ia3 import add_ia3
from course_lib.ia3 import set_adapter as set_ia3
from course_lib.nf4 import NF4Linear

from .conftest import tiny_llama
from .test_lora import IDS, peft_model, randomize_B


# ------------------------------------------------------------------------------------------------
# peft configs beyond plain LoRA: honoured where cheap, refused where not
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    dict(alpha_pattern={"v_proj": 32}),
    dict(rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 2}),
])
def test_rank_and_alpha_patterns_load_with_peft_logits(tmp_path, extra):
    from peft import PeftModel

    torch.manual_seed(0)
    theirs = peft_model(tiny_llama(seed=0), r=8, lora_alpha=8, **extra)
    randomize_B(theirs, 3)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama(seed=0)
    lora.load_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)
    # and back: what course_lib saves, peft loads to the same logits
    lora.save_adapter(ours, tmp_path / "ours")
    again = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, theirs(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra, named", [
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_peft_features_are_refused_not_misloaded(tmp_path, extra, named):
    torch.manual_seed(0)
    peft_model(tiny_llama(seed=0), **extra).save_pretrained(tmp_path)
    model = tiny_llama(seed=0)
    with pytest.raises(NotImplementedError, match=named.replace("[", r"\[")):
        lora.load_adapter(model, tmp_path)
    assert not list(lora.lora_layers(model)), "a refused adapter must leave the model untouched"


def test_unknown_tensor_keys_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    peft_model(tiny_llama(seed=0)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(NotImplementedError, match="lora_magnitude_vector"):
        lora.load_adapter(tiny_llama(seed=0), tmp_path)


def test_saved_config_does_not_record_an_absolute_local_path(tmp_path, embedded):
    model = tiny_llama()
    model.config._name_or_path = str(tmp_path / "my" / "private" / "model")
    (tmp_path / "my" / "private" / "model").mkdir(parents=True)
    lora.add_lora(model)
    lora.save_adapter(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "model"
    model.config._name_or_path = "org/hub-model"  # a hub id is kept as it is
    lora.save_adapter(model, tmp_path / "adapter2")
    assert json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/hub-model"


# ------------------------------------------------------------------------------------------------
# Two adapters: the active one trains (peft's semantics), for LoRA and IA3 alike
# ------------------------------------------------------------------------------------------------
def _trainable(model):
    return {n.replace("base_model.model.", "").replace(".weight", "") for n, p in model.named_parameters() if p.requires_grad}


def test_set_adapter_then_train_trains_the_active_adapter_like_peft():
    torch.manual_seed(0)
    ours = tiny_llama(seed=0)
    lora.add_lora(ours, adapter_name="a")
    lora.add_lora(ours, adapter_name="b")
    theirs = peft_model(tiny_llama(seed=0), r=8)
    from peft import LoraConfig

    theirs.add_adapter("b", LoraConfig(task_type="CAUSAL_LM"))
    for name in ("a", "b"):
        lora.set_adapter(ours, name)
        theirs.set_adapter(name if name == "b" else "default")
        ours_names = {n.replace(f".{name}", ".X") for n in _trainable(ours)}
        theirs_names = {n.replace(f".{name if name == 'b' else 'default'}", ".X") for n in _trainable(theirs)}
        assert ours_names == theirs_names and ours_names, name
        loss = ours(IDS, labels=IDS).loss
        loss.backward()  # raised "element 0 of tensors does not require grad" when "a" was active
        grads = {n for n, p in ours.named_parameters() if p.grad is not None}
        assert grads and all(f".{name}" in n for n in grads)
        ours.zero_grad(set_to_none=True)
    lora.set_adapter(ours, None)
    assert not _trainable(ours)


def test_ia3_and_lora_share_set_adapter_semantics():
    model = tiny_llama(seed=0)
    add_ia3(model, adapter_name="x")
    add_ia3(model, adapter_name="y")
    assert all(".x" in n for n in _trainable(model))  # the first added is active, and alone trains
    set_ia3(model, "y")
    assert _trainable(model) and all(".y" in n for n in _trainable(model))


def test_disable_adapters_runs_the_base_and_restores():
    model = tiny_llama(seed=0)
    with torch.no_grad():
        base_logits = model(IDS).logits
    lora.add_lora(model)
    randomize_B(model, 2)
    with torch.no_grad():
        adapted = model(IDS).logits
        with lora.disable_adapters(model):
            torch.testing.assert_close(model(IDS).logits, base_logits, rtol=0, atol=0)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=0)
    assert _trainable(model)


# ------------------------------------------------------------------------------------------------
# The fused path only where it is provably the base layer's forward
# ------------------------------------------------------------------------------------------------
def test_forward_hook_on_the_base_layer_fires():
    model = tiny_llama(seed=0)
    lora.add_lora(model)
    calls = []
    model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model(IDS).logits.sum().backward()
    assert calls == [torch.Size([3, 10, 32])]


class DoublingLinear(nn.Linear):
    """A Linear subclass with its own forward (as quantized or tensor-parallel layers have)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclass_with_its_own_forward_is_called():
    layer = lora.LoRALinear(DoublingLinear(8, 6).requires_grad_(False))  # frozen, as add_lora leaves it
    layer.add_adapter("default", r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(4, 8)
    expected = 2 * (x @ layer.base_layer.weight.T + layer.base_layer.bias) + layer.lora_output(x, "default")
    torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------------------------
# LoRA on a bitsandbytes 4-bit model, and NF4Linear details
# ------------------------------------------------------------------------------------------------
def test_lora_on_a_bitsandbytes_model_trains_and_equals_peft(embedded):
    from course_lib.models import load_model

    _, tokenizer = embedded
    ids = tokenizer(["Q: What color is the sky?\nA: blue"], return_tensors="pt")["input_ids"]
    ours, _ = load_model(None, device="cpu", quantization="bnb-nf4")
    torch.manual_seed(0)
    lora.add_lora(ours, "all-linear", r=4, alpha=8)  # raised "Only Tensors of floating point … can require gradients"
    layer = ours.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.lora_A["default"].dtype == torch.float32
    theirs_base, _ = load_model(None, device="cpu", quantization="bnb-nf4")
    torch.manual_seed(0)
    theirs = peft_model(theirs_base, r=4, lora_alpha=8, target_modules="all-linear")
    randomize_B(ours, 5)
    randomize_B(theirs, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    ours_grad = layer.lora_A["default"].grad
    theirs_grad = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="cannot merge LoRA into a 4-bit"):
        lora.merge_lora(ours)


def _nf4_layer(bias=True, seed=0):
    torch.manual_seed(seed)
    return NF4Linear(nn.Linear(128, 64, bias=bias))


def test_nf4_bf16_input_with_float32_bias():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = NF4Linear(linear)
    x = torch.randn(3, 128).to(torch.bfloat16)
    ours = layer(x)  # raised a dtype error
    theirs_layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.bfloat16, compress_statistics=False)
    theirs_layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=False)
    theirs_layer.bias = nn.Parameter(linear.bias.data.clone())  # float32, as NF4Linear keeps it
    theirs = theirs_layer.to("cpu")(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert layer.bias.dtype == torch.float32  # used in bf16, kept in its own precision


def test_nf4_model_cast_to_bf16_keeps_its_quantization_state():
    layer = _nf4_layer()
    before = layer.dequantized_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.float32
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), before, rtol=0, atol=0)
    double = NF4Linear(nn.Linear(128, 64), double_quant=True)
    before = double.dequantized_weight(torch.float32)
    double.to(torch.bfloat16)
    torch.testing.assert_close(double.dequantized_weight(torch.float32), before, rtol=0, atol=0)


def test_nf4_trainable_bias_gets_its_gradient():
    layer = _nf4_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 128, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    dense = nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float32))
        dense.bias.copy_(layer.bias)
    x2 = x.detach().clone().requires_grad_(True)
    (dense(x2) ** 2).sum().backward()
    assert layer.bias.grad is not None  # was silently None
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    torch.testing.assert_close(x.grad, x2.grad)


# ------------------------------------------------------------------------------------------------
# load_model: the device of a 4-bit load, and the offline probe
# ------------------------------------------------------------------------------------------------
def test_bnb_load_honours_device(monkeypatch):
    import transformers

    from course_lib import models

    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        models.load_model(None, device="cpu", quantization="bnb-nf4")
    assert seen["device_map"] == {"": "cpu"}


def test_offline_probe_uses_hf_endpoint_and_trusts_a_proxy(monkeypatch):
    from course_lib import models

    hosts = []

    def fake_connect(address, timeout):
        hosts.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr(models.socket, "create_connection", fake_connect)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert models._hub_reachable() is False and hosts == [("mirror.example", 8080)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert models._hub_reachable() is True and len(hosts) == 1  # no direct probe behind a proxy


# ------------------------------------------------------------------------------------------------
# bf16 bases: every adapter layer type against peft
# ------------------------------------------------------------------------------------------------
def test_ia3_on_a_bf16_base_equals_peft():
    from peft import IA3Config, get_peft_model

    ours = tiny_llama(seed=0).to(torch.bfloat16)
    add_ia3(ours)
    theirs = get_peft_model(tiny_llama(seed=0).to(torch.bfloat16), IA3Config(task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                target = ours.get_submodule(name.removeprefix("base_model.model.").replace(".ia3_l.default", ""))
                assert target.ia3_l["default"].dtype == p.dtype  # float32 vectors on a bf16 base, as peft
                target.ia3_l["default"].copy_(p)
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=0)


def test_soft_prompt_files_for_two_submodules_are_refused(tmp_path):
    """A prompt saved for an encoder-decoder (num_transformer_submodules=2) would load as half its tensor."""
    from peft import PromptTuningConfig, get_peft_model

    from course_lib.soft_prompts import load_adapter

    torch.manual_seed(0)
    get_peft_model(tiny_llama(seed=0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    load_adapter(tiny_llama(seed=0), tmp_path)  # peft's own file loads
    config["num_transformer_submodules"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="num_transformer_submodules=2"):
        load_adapter(tiny_llama(seed=0), tmp_path)
