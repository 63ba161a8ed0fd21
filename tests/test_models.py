import copy

import pytest
import torch

from course_lib.models import count_parameters, load_model

from .conftest import tiny_llama


@pytest.fixture
def connections(monkeypatch):
    """Every connection or DNS lookup the test's code attempts (each refused). Failing fast means failing
    without one: a wall-clock bound here would measure the machine's load (6.3 s for the first test
    under a load of 12 on 2 cores). tests/test_no_network.py checks the same without HF_HUB_OFFLINE."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_missing_local_path_is_a_clear_error(connections):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model("./data/no_such_model")
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model("data/embeded")  # a typo of a local folder is not mistaken for a hub id
    assert connections == []


def test_hub_id_offline_fails_fast_and_says_what_to_do(connections):
    with pytest.raises(OSError, match="cannot be reached.*hf download"):
        load_model("some-org/some-model-that-is-not-cached")
    assert connections == []


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_quantization():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model(None, quantization="int3")


def test_local_checkpoint_loads_in_float32(tmp_path, embedded):
    model, tokenizer = embedded
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)  # the shared model stays float32, unrounded
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, device="cpu")
    assert loaded.dtype == torch.float32  # not the bf16 of the checkpoint


def test_bnb_nf4_loading_runs_on_cpu(embedded):
    model, tokenizer = embedded
    quantized, _ = load_model(None, device="cpu", quantization="bnb-nf4")
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = tokenizer(["Q: What color is the sky?\nA:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, quantized(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7  # close, not equal: weights are 4-bit


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama(tied=True)
    trainable, total = count_parameters(model)
    assert total == sum(t.numel() for t in model.state_dict().values()) - model.lm_head.weight.numel()
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model) == (total - model.lm_head.weight.numel(), total)
