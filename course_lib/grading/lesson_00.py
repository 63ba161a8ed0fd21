"""Hidden checks for lesson 00 (foundations). References are course_lib's and transformers' own code."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import CheckFailed, Exercise, expect


# ---------------------------------------------------------------------------------------------
# 00.1 count_parameters(model) -> (trainable, total)
# ---------------------------------------------------------------------------------------------
def _tied_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def check_count_parameters(count_parameters) -> str:
    from ..models import count_parameters as reference

    model = _tied_llama(0)
    for name, p in model.named_parameters():  # freeze the embedding (tied to the head) and layer 0
        if "embed_tokens" in name or ".layers.0." in name:
            p.requires_grad_(False)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # untied, all trainable
    for model_ in (model, mlp):
        got = count_parameters(model_)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(f"return a tuple (trainable, total), got {type(got).__name__} {got!r}")
        trainable, total = reference(model_)
        tied = model_.lm_head.weight.numel() if model_ is model else 0
        twice = ("the tied embedding / output-head weight was counted twice: model.parameters() yields a "
                 "shared tensor once, state_dict() and named_parameters(remove_duplicate=False) list it twice")
        expect(got, (trainable, total), what="(trainable, total)", atol=0, rtol=0, mistakes={
            "the order is (trainable, total), you returned (total, trainable)": (total, trainable),
            "frozen parameters were counted as trainable: count only tensors with p.requires_grad": (total, total),
            twice: (trainable, total + tied),
            twice + " (and the frozen copy as trainable)": (trainable + tied, total + tied),
            twice + ", and frozen parameters were counted as trainable": (total + tied, total + tied),
        })
    return "tied weights counted once, frozen ones left out"


# ---------------------------------------------------------------------------------------------
# 00.2 estimate_memory_gb(n_params, bits) — the serving rule of thumb (Stoelinga, Substratus blog)
# ---------------------------------------------------------------------------------------------
def check_estimate_memory_gb(estimate_memory_gb) -> str:
    for n, bits in [(7e9, 32), (7e9, 16), (7e9, 4), (1.1e9, 8), (123_456, 16)]:
        expected = n * 4 / (32 / bits) * 1.2 / 1e9
        expect(estimate_memory_gb(n, bits), expected, what=f"estimate_memory_gb({n:g}, {bits})", rtol=1e-9, atol=0,
               mistakes={
                   "the 1.2 (20 % overhead) factor is missing": expected / 1.2,
                   "divide by (32 / bits), not by bits / 32": n * 4 / (bits / 32) * 1.2 / 1e9,
                   "GB here means 1e9 bytes (7B × 16-bit = 16.8 GB, quoted as ≈ 17 GB), not GiB (2**30)": expected * 1e9 / 2**30,
                   "the result must be in GB, not bytes": expected * 1e9,
                   "4 bytes is the size of a 32-bit parameter; at `bits` bits a parameter takes 4 / (32 / bits) "
                   "bytes — you used bits bytes": n * bits * 1.2 / 1e9,
               })
    return "7B at 16-bit = 16.8 GB, as the rule of thumb gives"


# ---------------------------------------------------------------------------------------------
# 00.3 causal_lm_loss(logits, labels)
# ---------------------------------------------------------------------------------------------
def _loss_variants(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = nn.functional.cross_entropy
    V = logits.shape[-1]
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    mask = shifted_labels != -100
    per_token = ce(shifted_logits.reshape(-1, V), shifted_labels.reshape(-1), reduction="none",
                   ignore_index=-100).view_as(shifted_labels)
    per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return {
        "logits at position t predict the token at t+1: shift (logits[:, :-1] against labels[:, 1:])":
            ce(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100),
        "the mean must be over real tokens only; positions labelled -100 count in your denominator":
            per_token.sum() / per_token.numel(),
        "return the mean over tokens, not the sum": per_token.sum(),
        "average over all tokens of the batch, not per sequence then over sequences (sequences have "
        "different numbers of real tokens)": per_sequence.mean(),
    }


def check_causal_lm_loss(causal_lm_loss) -> str:
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[1, 6:] = -100  # right padding
    labels[2, :1] = -100
    got = causal_lm_loss(logits.clone(), labels.clone())
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise CheckFailed(f"return a scalar tensor, got {got!r}"[:200])
    expected = ForCausalLMLoss(logits, labels, vocab_size=V)
    expect(got, expected, what="loss", mistakes=_loss_variants(logits, labels), rtol=1e-5, atol=1e-6)
    logits.requires_grad_(True)
    loss = causal_lm_loss(logits, labels)
    if not loss.requires_grad:
        raise CheckFailed("the loss carries no gradient: compute it with torch operations on the logits "
                          "(no .item(), .detach() or numpy)")
    return "equals transformers' ForCausalLMLoss"


# ---------------------------------------------------------------------------------------------
# 00.4 lr_at_step(step, peak_lr, warmup_steps, total_steps)
# ---------------------------------------------------------------------------------------------
def _transformers_lrs(peak: float, warmup: int, total: int) -> list[float]:
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def check_lr_at_step(lr_at_step) -> str:
    for peak, warmup, total in [(1e-3, 10, 50), (3e-4, 0, 20), (2e-3, 5, 6)]:
        expected = _transformers_lrs(peak, warmup, total)
        got = [float(lr_at_step(s, peak, warmup, total)) for s in range(total)]

        def cosine(progress: float) -> float:
            return peak * 0.5 * (1 + math.cos(math.pi * progress))

        expect(got, expected, what=f"learning rates for peak={peak}, warmup={warmup}, total={total}", rtol=1e-6,
               atol=1e-12, mistakes={
                   "there is no warm-up: the rate must rise linearly from 0 over the first warmup_steps steps":
                       [cosine(s / total) for s in range(total)],
                   "warm-up is off by one: at step 0 the rate is 0, at step s it is peak · s / warmup_steps":
                       [peak * min(1, (s + 1) / warmup) if s < warmup else e for s, e in
                        zip(range(total), expected)] if warmup else expected,
                   "the cosine must run over the steps after warm-up: progress = (step − warmup) / (total − warmup)":
                       [peak * s / warmup if s < warmup else cosine(s / total) for s in range(total)],
                   "the decay is a half cosine, not a straight line":
                       [peak * s / warmup if s < warmup else peak * (1 - (s - warmup) / (total - warmup))
                        for s in range(total)],
               })
    return "matches transformers.get_cosine_schedule_with_warmup"


EXERCISES = [
    Exercise("00.1", "count trainable and total parameters", ("count_parameters",), check_count_parameters),
    Exercise("00.2", "a serving-memory rule of thumb", ("estimate_memory_gb",), check_estimate_memory_gb),
    Exercise("00.3", "causal language-model loss", ("causal_lm_loss",), check_causal_lm_loss),
    Exercise("00.4", "cosine schedule with warm-up", ("lr_at_step",), check_lr_at_step),
]
