"""Lesson 00: right answers in several styles, and plausible wrong answers with the phrase the
grader's feedback must contain (written independently of the checks' own diagnoses)."""

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- right answers (several styles)
def count_ok(model):
    trainable, total = 0, 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def memory_ok(n, bits):
    return n * (bits / 8) * 1.2 / 1e9


def loss_ok(logits, labels):
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def lr_ok(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


RIGHT = {"00.1": count_ok, "00.2": memory_ok, "00.3": loss_ok, "00.4": lr_ok}


# ---------------------------------------------------------------- the catalogue of mistakes
def count_state_dict(model):  # tied weights twice
    sd = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    total = sum(v.numel() for v in sd.values())
    return total - sum(sd[n].numel() for n in frozen), total


def count_ignores_requires_grad(model):
    n = sum(p.numel() for p in model.parameters())
    return n, n


def count_swapped(model):
    t, n = count_ok(model)
    return n, t


def count_named_params_no_dedup(model):
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def memory_no_overhead(n, bits):
    return n * 4 / (32 / bits) / 1e9


def memory_inverted(n, bits):
    return n * 4 / (bits / 32) * 1.2 / 1e9


def memory_gib(n, bits):
    return n * 4 / (32 / bits) * 1.2 / 2**30


def memory_bytes(n, bits):
    return n * 4 / (32 / bits) * 1.2


def loss_no_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def loss_counts_masked(logits, labels):
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none")
    return per.mean()


def loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def loss_per_sequence(logits, labels):
    return torch.stack([F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100)
                        for i in range(len(logits))]).mean()


def loss_detached(logits, labels):
    return loss_ok(logits.detach(), labels)


def lr_no_warmup(step, peak, warmup, total):
    return peak * (1 + math.cos(math.pi * step / total)) / 2


def lr_warmup_off_by_one(step, peak, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    return lr_ok(step, peak, warmup, total)


def lr_progress_over_total(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * step / total)) / 2


def lr_linear_decay(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 - (step - warmup) / (total - warmup))


def lr_full_cosine(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(2 * math.pi * (step - warmup) / (total - warmup))) / 2


def not_implemented(*args):
    raise NotImplementedError("Exercise: replace this line with your code")


def crashes(*args):
    return 1 / 0


CATALOGUE = [
    ("00.1", count_state_dict, "counted twice"),
    ("00.1", count_ignores_requires_grad, "requires_grad"),
    ("00.1", count_swapped, "order is (trainable, total)"),
    ("00.1", count_named_params_no_dedup, "counted twice"),
    ("00.2", memory_no_overhead, "1.2"),
    ("00.2", memory_inverted, "32 / bits"),
    ("00.2", memory_gib, "GiB"),
    ("00.2", memory_bytes, "not bytes"),
    ("00.3", loss_no_shift, "shift"),
    ("00.3", loss_counts_masked, "-100"),
    ("00.3", loss_sum, "not the sum"),
    ("00.3", loss_per_sequence, "per sequence"),
    ("00.3", loss_detached, "no gradient"),
    ("00.4", lr_no_warmup, "no warm-up"),
    ("00.4", lr_warmup_off_by_one, "off by one"),
    ("00.4", lr_progress_over_total, "(step − warmup) / (total − warmup)"),
    ("00.4", lr_linear_decay, "half cosine"),
    ("00.4", lr_full_cosine, "expected"),  # no named diagnosis: still caught, with the values
]
