"""What TrainConfig.seed seeds, and what it does not (its docstring): torch's generator when train() starts,
so two runs from identical adapters are identical, dropout masks included; not the adapter's initial weights,
which add_lora draws when it is called — seeding torch before add_lora is what makes two adapters equal."""

import copy
import functools

import torch

from course_lib.lora import add_lora
from course_lib.training import TrainConfig, train

from .conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _batch(step: int) -> dict:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))  # (B, T)
    return {"input_ids": ids, "labels": ids}


@functools.cache
def _base() -> torch.nn.Module:
    return tiny_llama(seed=0)


def _adapted(adapter_seed: int | None) -> torch.nn.Module:
    model = copy.deepcopy(_base())  # the same base weights every time, without touching torch's generator
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    add_lora(model, TARGETS, r=4, alpha=8, dropout=0.3)  # dropout: the run draws random numbers
    return model


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, seed: int):
    history = train(model, _batch, TrainConfig(steps=4, lr=1e-2, seed=seed, progress=False))
    return history.loss, _adapter_weights(model)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_on_identically_initialised_adapters_gives_identical_runs():
    torch.manual_seed(123)  # whatever the generator held before: train() reseeds it
    first_loss, first_weights = _run(_adapted(adapter_seed=0), seed=7)
    torch.rand(5)  # and whatever was drawn in between
    second_loss, second_weights = _run(_adapted(adapter_seed=0), seed=7)
    assert first_loss == second_loss
    assert _equal(first_weights, second_weights)


def test_the_seed_is_what_the_run_draws_from():
    same_start = [_adapted(adapter_seed=0) for _ in range(2)]
    assert _equal(_adapter_weights(same_start[0]), _adapter_weights(same_start[1]))
    loss_7, weights_7 = _run(same_start[0], seed=7)
    loss_8, weights_8 = _run(same_start[1], seed=8)
    assert loss_7 != loss_8 and not _equal(weights_7, weights_8)  # other dropout masks


def test_the_seed_does_not_initialise_the_adapter_torch_manual_seed_before_add_lora_does():
    torch.manual_seed(0)
    unseeded = [_adapted(adapter_seed=None) for _ in range(2)]  # the generator moves on between them
    assert not _equal(_adapter_weights(unseeded[0]), _adapter_weights(unseeded[1]))
    loss_a, weights_a = _run(unseeded[0], seed=7)
    loss_b, weights_b = _run(unseeded[1], seed=7)
    assert loss_a != loss_b and not _equal(weights_a, weights_b)  # the same seed, different runs
    seeded = [_adapted(adapter_seed=5) for _ in range(2)]
    assert _equal(_adapter_weights(seeded[0]), _adapter_weights(seeded[1]))
