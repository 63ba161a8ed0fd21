import math

import pytest
import torch

from torch import nn

from course_lib.memory import (TrainingStateBytes, bytes_of, estimate_serving_memory_gb, gradient_bytes,
                               measure_peak_memory, optimizer_state_bytes, parameter_bytes, saved_activation_bytes,
                               tensor_bytes, training_state_bytes)

from .conftest import tiny_llama


def test_serving_rule_of_thumb_gives_the_blogs_7b_figure_at_16_bits():
    assert math.isclose(estimate_serving_memory_gb(7e9, 16), 16.8)  # the blog's "around 17 GB"
    assert math.isclose(estimate_serving_memory_gb(7e9, 32), 33.6)
    assert math.isclose(estimate_serving_memory_gb(7e9, 4), 4.2)
    with pytest.raises(ValueError, match="bits must be in 1..32"):
        estimate_serving_memory_gb(1e9, 0)


def test_tensor_bytes_counts_tied_weights_once():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    assert tensor_bytes(untied) - tensor_bytes(tied) == tied.lm_head.weight.numel() * 4


def test_bytes_of_counts_each_tensor_by_its_dtype_and_shared_memory_once():
    a, b = torch.zeros(10), torch.zeros(3, 4, dtype=torch.bfloat16)
    assert bytes_of([a, b]) == 10 * 4 + 12 * 2
    assert bytes_of([a, a, b]) == bytes_of([a, b]) and bytes_of([]) == 0


def test_peak_memory_sees_a_large_temporary_allocation():
    def allocate():
        x = torch.ones(50_000_000)  # 200 MB, freed before returning
        return float(x[0])
    result, peak = measure_peak_memory(allocate)
    assert result == 1.0
    assert 180e6 < peak.peak_bytes < 400e6, peak


def _freeze_all_but(model, fragments):
    for name, p in model.named_parameters():
        p.requires_grad_(any(f in name for f in fragments))


def _one_real_step(model, optimizer):
    """A real forward, backward and optimizer step on a small batch."""
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("tied, fragments", [(True, ("",)), (False, ("",)), (True, ("q_proj", "v_proj", "norm")),
                                             (True, ("embed_tokens",)), (False, ("lm_head", "mlp"))])
def test_training_state_prediction_equals_what_a_real_adamw_step_creates(tied, fragments):
    model = tiny_llama(tied=tied)
    _freeze_all_but(model, fragments)
    predicted = training_state_bytes(model, "adamw")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _one_real_step(model, optimizer)
    # the count of the real objects, written independently of the prediction
    real_grads = sum(p.grad.numel() * p.grad.element_size() for p in {id(p): p for p in model.parameters()}.values()
                     if p.grad is not None)
    real_state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    assert gradient_bytes(model) == predicted.gradients == real_grads > 0
    assert optimizer_state_bytes(optimizer) == predicted.optimizer == real_state
    assert predicted.weights == sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied one once
    assert predicted.total == predicted.weights + predicted.gradients + predicted.optimizer


def test_training_state_prediction_for_sgd_with_momentum_and_for_bf16():
    model = tiny_llama().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    predicted = training_state_bytes(model, "sgd")
    _one_real_step(model, optimizer)
    assert optimizer_state_bytes(optimizer) == predicted.optimizer == predicted.gradients == parameter_bytes(model)
    assert parameter_bytes(model) == sum(p.numel() * 2 for p in model.parameters())
    with pytest.raises(ValueError, match="use 'adamw' or 'sgd'"):
        training_state_bytes(model, "adam8bit")


def test_training_state_counts_a_meta_model_like_the_real_one():
    """A 7 B config can be counted on the meta device (no memory): same bytes as a real model."""
    from transformers import LlamaForCausalLM

    real = tiny_llama(tied=True)
    with torch.device("meta"):
        meta = LlamaForCausalLM(real.config)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert training_state_bytes(meta) == training_state_bytes(real)
    assert isinstance(training_state_bytes(meta), TrainingStateBytes)


def test_saved_activation_bytes_equals_a_hand_count():
    linear = nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4, requires_grad=True)  # an input that needs a gradient: the layer must keep its weight

    def forward():
        h = linear(x)  # saves its input x (5×4 fp32 = 80 B) and its weight (excluded: not an activation)
        y = torch.sigmoid(h)  # saves its output y (5×3 fp32 = 60 B)
        return (y * y).sum()  # saves y twice: the same storage, counted once

    loss, saved = saved_activation_bytes(forward, exclude=linear.parameters())
    assert saved == 5 * 4 * 4 + 5 * 3 * 4
    loss.backward()  # the hook kept the graph intact
    assert linear.weight.grad is not None
    _, with_weight = saved_activation_bytes(forward)
    assert with_weight == saved + 3 * 4 * 4
    with torch.no_grad():
        assert saved_activation_bytes(forward, exclude=linear.parameters())[1] == 0  # inference saves nothing


def test_checkpointing_keeps_fewer_bytes_and_gives_the_same_gradients():
    """With activation checkpointing each decoder layer keeps its input (B, T, hidden) and nothing inside;
    backward recomputes the rest, so the gradients are the same."""
    model = tiny_llama()
    model.train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, saved = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss, exclude=params)
        loss.backward()
        return saved, [p.grad.clone() for p in params]

    plain, plain_grads = loss_and_grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    checkpointed, checkpointed_grads = loss_and_grads()
    layer_inputs = model.config.num_hidden_layers * 2 * 9 * 32 * 4  # one (B, T, hidden) fp32 per layer
    assert layer_inputs <= checkpointed < plain - layer_inputs
    for a, b in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(a, b)
