"""Maths shared by the alignment lessons (PPO, DPO, GRPO): masked statistics, per-token log-probs, entropy.

Every function takes a ``mask`` of the same shape as the values (1 = a real completion token, 0 =
prompt or padding) so that padding never enters a mean, a variance or a loss. The forms are TRL's
(``trl.trainer.utils`` for log-probs and entropy, classic TRL ≤ 0.11 ``core`` for whitening); the tests
compare with TRL where it still ships the function and with hand-computed vectors where it does not.
"""

from __future__ import annotations

import torch


def _check_mask(x: torch.Tensor, mask: torch.Tensor, what: str = "x") -> torch.Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {what} has shape {tuple(x.shape)}: "
                         f"they must match (one mask entry per value)")
    return mask.to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σ m over all entries (``dim=None``) or along ``dim``. A mean over no active entry is an
    error rather than a silent NaN (0/0)."""
    m = _check_mask(x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    if bool((count == 0).any()):
        raise ValueError("masked_mean over a mask with no active entry" + ("" if dim is None else f" along dim {dim}")
                         + ": every row needs at least one real token")
    return (x * m).sum() / count if dim is None else (x * m).sum(dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the active entries; ``unbiased`` applies Bessel's correction n/(n−1), as TRL does."""
    m = _check_mask(x, mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if n < 2:
            raise ValueError("the unbiased variance needs at least two active entries in the mask")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / √(var + eps) over the active entries (unbiased variance, TRL's eps); with
    ``shift_mean=False`` the mean is added back, so only the scale changes. Padding is left as it is
    computed, so mask it again before it enters a loss."""
    m = _check_mask(x, mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[t] | …) read from ``logits[t]``: (…, V) logits and (…) token ids → (…) log-probs.

    The caller aligns them (logits at position t predict the token at t + 1). Computed in float32 as
    log_softmax then gather; TRL's ``selective_log_softmax`` gives the same values."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} must agree on every "
                         f"dimension but the last (the vocabulary)")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ p log p over the last axis (nats), in float32: (…, V) → (…)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
