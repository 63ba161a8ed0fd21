"""Lesson 03 (LoRA): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import math

import torch
from torch import nn


def fwd_ok(x, W, A, B, alpha, r):
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def init_ok(i, o, r):
    A = nn.Parameter(torch.empty(r, i))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, nn.Parameter(torch.zeros(o, r))


def merge_ok(W, A, B, alpha, r):
    return W + alpha / r * B @ A


def mixed_ok(x, A, B, s, idx):
    safe = idx.clamp(min=0)
    out = torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, A[safe]), B[safe]) * s[safe, None, None]
    return out * (idx >= 0)[:, None, None]


def match_ok(names, targets):
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


class LoRAOk(nn.Module):
    """Exercise 03.6 fixed: dropout on A's input only, the merge scaled by alpha / r."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.scaling * (self.dropout(x) @ self.A.T) @ self.B.T

    def merged_weight(self):
        return self.base.weight + self.scaling * self.B @ self.A


RIGHT = {"03.1": fwd_ok, "03.2": init_ok, "03.3": merge_ok, "03.4": mixed_ok, "03.5": match_ok, "03.6": LoRAOk}


def match_endswith(names, targets):
    return [n for n in names if any(n.endswith(t) for t in targets)]


def match_substring(names, targets):
    return [n for n in names if any(t in n for t in targets)]


def match_exact(names, targets):
    return [n for n in names if n in targets]


def match_sorted(names, targets):
    return sorted(match_ok(names, targets))


def fwd_alpha(x, W, A, B, alpha, r):
    return x @ W.T + alpha * (x @ A.T) @ B.T


def fwd_no_base(x, W, A, B, alpha, r):
    return (alpha / r) * (x @ A.T) @ B.T


def fwd_inverted(x, W, A, B, alpha, r):
    return x @ W.T + (r / alpha) * (x @ A.T) @ B.T


def init_B_random(i, o, r):
    A, _ = init_ok(i, o, r)
    return A, nn.Parameter(torch.randn(o, r) * 0.01)


def init_both_zero(i, o, r):
    return nn.Parameter(torch.zeros(r, i)), nn.Parameter(torch.zeros(o, r))


def init_transposed(i, o, r):
    A, B = init_ok(i, o, r)
    return A.T, B.T


def init_gaussian(i, o, r):
    return nn.Parameter(torch.randn(r, i)), nn.Parameter(torch.zeros(o, r))


def init_frozen(i, o, r):
    A, B = init_ok(i, o, r)
    return A.detach(), B.detach()


def merge_transposed(W, A, B, alpha, r):
    return W + alpha / r * (B @ A).T


def merge_unscaled(W, A, B, alpha, r):
    return W + B @ A


def merge_in_place(W, A, B, alpha, r):
    W += alpha / r * B @ A
    return W


def mixed_negative_index(x, A, B, s, idx):
    return torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, A[idx]), B[idx]) * s[idx, None, None]


def mixed_first_row(x, A, B, s, idx):
    k = idx[0]
    return (x @ A[k].T @ B[k].T) * s[k]


def mixed_wrong_B(x, A, B, s, idx):  # B gathered with a shifted index
    safe = idx.clamp(min=0)
    out = torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, A[safe]), B[(safe + 1) % len(B)])
    return out * s[safe, None, None] * (idx >= 0)[:, None, None]


class LoRAAsGiven(LoRAOk):  # both planted bugs left in (the merge's shows first)
    def forward(self, x):
        x = self.dropout(x)
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T

    def merged_weight(self):
        return self.base.weight + self.B @ self.A


class LoRABaseDropped(LoRAOk):  # merge fixed, dropout still on the frozen path
    forward = LoRAAsGiven.forward


class LoRAMergeUnscaled(LoRAOk):  # dropout fixed, the merge still unscaled
    merged_weight = LoRAAsGiven.merged_weight


class LoRANoDropout(LoRAOk):  # "fixed" the dropout bug by deleting dropout
    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T


class LoRAScaledByAlpha(LoRAOk):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.scaling = alpha


class LoRARandomB(LoRAOk):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.normal_(self.B, std=0.02)


class LoRABaseTrains(LoRAOk):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.base.requires_grad_(True)


class LoRAMergeInPlace(LoRAOk):
    def merged_weight(self):
        with torch.no_grad():
            self.base.weight += self.scaling * self.B @ self.A
        return self.base.weight


CATALOGUE = [
    ("03.1", fwd_alpha, "alpha / r"), ("03.1", fwd_no_base, "frozen path"), ("03.1", fwd_inverted, "inverted"),
    ("03.2", init_B_random, "B must start at zero"), ("03.2", init_both_zero, "nothing trains"),
    ("03.2", init_transposed, "transposed"), ("03.2", init_gaussian, "Kaiming-uniform"),
    ("03.2", init_frozen, "trainable"),
    ("03.3", merge_transposed, "transpose"), ("03.3", merge_unscaled, "scaling"), ("03.3", merge_in_place, "in place"),
    ("03.4", mixed_negative_index, "-1"), ("03.4", mixed_first_row, "first row"), ("03.4", mixed_wrong_B, "expected"),
    ("03.5", match_endswith, "kv_proj"), ("03.5", match_substring, "kv_proj"), ("03.5", match_exact, "only exact"),
    ("03.5", match_sorted, "order"),
    ("03.6", LoRAAsGiven, "no alpha / r scaling, so the merged model serves another function than the adapter: it must carry the forward pass's scale — and: train-mode output (dropout active): dropout reached the frozen path"), ("03.6", LoRABaseDropped, "dropout reached the frozen path"),
    ("03.6", LoRAMergeUnscaled, "no alpha / r scaling"), ("03.6", LoRANoDropout, "dropout is missing"),
    ("03.6", LoRAScaledByAlpha, "scaled by alpha"), ("03.6", LoRARandomB, "B must start at zero"),
    ("03.6", LoRABaseTrains, "only A and B may train"), ("03.6", LoRAMergeInPlace, "in place"),
]
