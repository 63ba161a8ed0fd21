"""GRPO (Shao et al. 2024, DeepSeekMath §4.1) and RLOO (Ahmadian et al. 2024): policy gradients without a critic.

For each prompt q, sample a *group* of G completions o_1…o_G from the current policy, score them with
verifiable reward functions, and use the group itself as the baseline:

    Â_i = (r_i − mean(r_1…r_G)) / (std(r_1…r_G) + ε)                               (GRPO, eq. 3 / §4.1.2)
    L = −1/G Σ_i 1/|o_i| Σ_t [ min(ρ_i,t Â_i, clip(ρ_i,t, 1−ε_low, 1+ε_high) Â_i) − β KL_k3 ]   (eq. 3)
    ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | …),  KL_k3 = π_ref/π_θ − log(π_ref/π_θ) − 1  (eq. 4)

RLOO keeps the group but replaces the baseline by the mean of the *other* G − 1 rewards, divides by
nothing, and applies the ratio to whole sequences.

The forms and defaults are TRL 1.16's (``GRPOTrainer._generate_and_score_completions`` and
``_compute_loss``, ``RLOOTrainer``); tests/test_grpo.py runs TRL's own code on the same tensors. Where
this module differs it says so: NaN / None rewards are an error here (TRL treats them as "unscorable"
and zeroes their advantage), and log-probs are computed with position ids that skip the left padding,
as generation does.

Each prompt runs through the model once for its G completions (``GRPOConfig.share_prompt``, on by
default): generation prefills the prompt once and repeats its KV cache G times, and the log-probs come
from one row per prompt, prompt ++ its G completions, under a prefix-sharing mask
(:mod:`course_lib.shared_prefix`). The samples and log-probs are those of the G-copies computation up to
float rounding (tests/test_shared_prefix.py); ``share_prompt=False`` runs the G copies, as TRL does.

The task of lesson 08: additions (``course_lib.data``) in the corpus's ``Q: What is a + b?\\nA:``
format, rewarded by :func:`correctness_reward` and :func:`format_reward`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from .evaluate import parse_number
from .rl import entropy_from_logits, masked_mean, token_logprobs
from .training import History, TrainConfig, train

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
RewardFunc = Callable[..., list]


# --------------------------------------------------------------------------------------------
# Reward functions: TRL's signature f(prompts, completions, **columns) -> list[float]
# --------------------------------------------------------------------------------------------
def answer_is_correct(completion: str, answer) -> bool:
    """The completion starts with the right number (``" 46"`` for 12 + 34; what follows is the format
    reward's business). Unparsable text is simply wrong, never an exception."""
    return parse_number(completion) == int(answer)


def correctness_reward(prompts: list[str], completions: list[str], answer: list, **kwargs) -> list[float]:
    """1.0 when the completion's number equals the row's ``answer`` column, else 0.0."""
    return [float(answer_is_correct(c, a)) for c, a in zip(completions, answer, strict=True)]


_ANSWER_ONLY = re.compile(r"\s*-?\d+\s*")


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is a bare number and nothing else (the generation stopped right after
    the answer), else 0.0. Pays for the shape, not for being right."""
    return [float(_ANSWER_ONLY.fullmatch(c) is not None) for c in completions]


def reward_name(func: RewardFunc) -> str:
    """How TRL names a reward function in its logs: its ``__name__``."""
    return getattr(func, "__name__", type(func).__name__)


def _row_of_failure(func: RewardFunc, prompts, completions, columns) -> int | None:
    """Re-run ``func`` one row at a time to find the first row it raises on (None if none does)."""
    for i in range(len(prompts)):
        try:
            func(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                 **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001 — we are locating the failure, then re-raising with context
            return i
    return None


def compute_rewards(reward_funcs: Sequence[RewardFunc], prompts: list[str], completions: list[str],
                    columns: dict[str, list] | None = None,
                    weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function on the batch as TRL does — ``f(prompts=…, completions=…, **columns)``
    — and combine them: ``total = Σ_k w_k · r_k`` (TRL's ``reward_weights``, default all 1).

    Returns ``(per_function (N, K), total (N,))``. A function that raises, returns the wrong number of
    values, or returns None / NaN / ±inf for a row is an error that names the function and the row.
    """
    columns = dict(columns or {})
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: one completion per prompt row "
                         f"(repeat each prompt G times)")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions; repeat it per completion")
    if not reward_funcs:
        raise ValueError("no reward functions: pass at least one, e.g. [correctness_reward]")
    weights = [1.0] * len(reward_funcs) if weights is None else list(weights)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_funcs)} reward functions: "
                         f"give one weight each")
    per_function = torch.zeros(n, len(reward_funcs))
    for k, func in enumerate(reward_funcs):
        name = reward_name(func)
        try:
            values = func(prompts=prompts, completions=completions, **columns)
        except Exception as error:
            row = _row_of_failure(func, prompts, completions, columns)
            where = (f" on row {row} (prompt {prompts[row]!r}, completion {completions[row]!r})" if row is not None
                     else " on the batch (no single row fails on its own)")
            raise RuntimeError(f"reward function {name!r} raised {type(error).__name__}: {error}{where}; "
                               f"make it return 0.0 for text it cannot score") from error
        values = list(values)
        if len(values) != n:
            raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {n} completions: "
                             f"it must return exactly one reward per completion")
        for i, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"reward function {name!r} returned {v!r} for row {i} (prompt {prompts[i]!r}, "
                                 f"completion {completions[i]!r}): rewards must be finite numbers "
                                 f"(return 0.0 for text you cannot score)")
        per_function[:, k] = torch.tensor([float(v) for v in values])
    total = (per_function * torch.tensor(weights, dtype=torch.float32)).sum(dim=1)  # (N,)
    return per_function, total


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------
def _grouped(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    """Rewards (N,) as (N/G, G), with the checks every advantage needs."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one value per completion, shape (N,), got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer ≥ 2 (a group of one has no baseline), got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}: "
                         f"the batch must hold G completions for every prompt (N = prompts × G)")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"reward {rewards[bad[0]].item()} at row {bad[0].item()} is not finite: fix the reward "
                         f"function (return 0.0 for what it cannot score)")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor | Sequence[float], group_size: int,
                     scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4) -> torch.Tensor:
    """Â = (r − group mean) / (std + eps), rows grouped as ``[q0·G, q1·G, …]`` (each prompt's G
    completions adjacent). ``scale``: "group" divides by each group's std (GRPO), "batch" by the std of
    the whole batch (the mean subtracted is still the group's, as TRL does), "none" not at all
    (Dr. GRPO). The std is the **unbiased** one (n − 1), as ``torch.std`` and TRL. (N,) → (N,)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = _grouped(rewards, group_size)  # (N/G, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()  # (N,)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).flatten()  # (N,)
    elif scale == "batch":
        std = grouped.flatten().std()
    else:
        return centred
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor | Sequence[float], group_size: int, normalize: bool = False,
                    eps: float = 1e-4) -> torch.Tensor:
    """Leave-one-out baseline (Ahmadian et al. 2024, eq. 4; Kool et al. 2019):
    Â_i = r_i − (Σ_j r_j − r_i)/(G − 1) = G/(G − 1)·(r_i − mean). No division by a std, unless
    ``normalize`` (TRL's ``normalize_advantages``: whiten over the whole batch). (N,) → (N,)."""
    grouped = _grouped(rewards, group_size)  # (N/G, G)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (N/G, G)
    advantages = (grouped - baseline).flatten()
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + eps)
    return advantages


def zero_signal_fraction(rewards: torch.Tensor | Sequence[float], group_size: int) -> float:
    """Share of groups whose G rewards are all equal: their advantages are 0, so they teach nothing."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1).float().mean().item()


# --------------------------------------------------------------------------------------------
# KL and the clipped objective
# --------------------------------------------------------------------------------------------
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref) per token, sampled from π_θ:
    exp(ref − logp) − (ref − logp) − 1 ≥ 0, unbiased, and 0 where the two agree. (B, T) → (B, T)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    log_ratio = ref_logp - logp  # log π_ref/π_θ
    return torch.exp(log_ratio) - log_ratio - 1


def _check_loss_inputs(logp, old_logp, advantages, mask, ref_logp, beta, epsilon, epsilon_high,
                       max_completion_length) -> torch.Tensor:
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has {tuple(logp.shape)}: both are "
                             f"(B, T), one entry per completion token")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T) per-token log-probs, got shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage per sequence, broadcast over its tokens
    if advantages.shape not in ((logp.shape[0], 1), tuple(logp.shape)):
        raise ValueError(f"advantages must be (B,) or (B, T) with B={logp.shape[0]}, T={logp.shape[1]}; "
                         f"got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be ≥ 0 (it weighs a penalty), got {beta}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp: the reference model's per-token log-probs (the model with "
                         f"its adapter disabled), or set beta=0.0")
    for name, eps in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
        if eps is not None and not 0 <= eps:
            raise ValueError(f"{name} must be ≥ 0 (the clip range is [1 − epsilon, 1 + epsilon_high]), got {eps}")
    if max_completion_length is not None:
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be a positive number of tokens (the generation's "
                             f"max_new_tokens), got {max_completion_length}")
        longest = int(mask.sum(dim=1).max())
        if longest > max_completion_length:
            raise ValueError(f"a completion has {longest} tokens, more than max_completion_length="
                             f"{max_completion_length}: pass the generation's max_new_tokens")
    return advantages


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo",
              max_completion_length: int | None = None, kl_bias_correction: bool = False, *,
              return_stats: bool = False):
    """The clipped per-token GRPO objective (eq. 3), to minimise. Shapes: ``logp``, ``old_logp``,
    ``ref_logp``, ``mask``: (B, T); ``advantages``: (B,) (or (B, T)).

    Per token: ρ = exp(logp − old_logp) (the gradient flows through ``logp`` only),
    L = −min(ρ·Â, clip(ρ, 1 − ε, 1 + ε_high)·Â) + β·KL_k3, where ε_high defaults to ε and a larger one
    is DAPO's clip-higher. ``kl_bias_correction`` multiplies the KL by ρ (TRL's
    ``use_bias_correction_kl``: same value on-policy, unbiased reverse-KL gradient).

    Aggregation over the completion tokens (m = mask; padding never counts):
      "grpo"    mean over sequences of Σ_t m·L / Σ_t m   (the paper; favours short right answers)
      "bnpo"    Σ m·L / Σ m over the batch
      "dapo"    the same token mean; TRL normalises by the tokens of the whole generation batch, which
                equals "bnpo" whenever one batch is one optimiser step (as in :func:`grpo_train`)
      "dr_grpo" Σ m·L / (B · max_completion_length)   (Dr. GRPO: a constant, no length bias)

    Returns the scalar loss, or ``(loss, stats)`` with ``return_stats=True``; stats (floats, token
    means over the mask): ``clip_fraction`` (ratio clipped where it binds: ρ < 1−ε with Â < 0 or
    ρ > 1+ε_high with Â > 0, as TRL's ``clip_ratio/region_mean``), ``clip_low``, ``clip_high``,
    ``ratio`` and ``kl`` (the KL term as it enters the loss, when ``ref_logp`` is given).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' divides by B · max_completion_length: pass max_completion_length "
                         "(the generation's max_new_tokens)")
    advantages = _check_loss_inputs(logp, old_logp, advantages, mask, ref_logp, beta, epsilon, epsilon_high,
                                    max_completion_length)  # (B, 1) or (B, T)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # (B, T)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)  # (B, T)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach())  # (B, T)
        if kl_bias_correction:
            kl = kl * ratio
        if beta != 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = masked_mean(per_token, mask)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (logp.shape[0] * max_completion_length)
    if not return_stats:
        return loss
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (advantages < 0)).to(logp.dtype)  # (B, T)
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(logp.dtype)
        stats = {"clip_fraction": masked_mean(torch.maximum(low, high), mask).item(),
                 "clip_low": masked_mean(low, mask).item(), "clip_high": masked_mean(high, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask).item()
    return loss, stats


def rloo_kl_rewards(rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """RLOO's KL penalty lives in the reward, per sequence: r − β·Σ_t m·(logp_old − logp_ref) (the
    first-order estimate, which can be negative per token). (N,), (N, T) → (N,)."""
    return rewards - beta * ((old_logp - ref_logp) * mask.to(old_logp.dtype)).sum(dim=1)


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None, *, return_stats: bool = False):
    """RLOO's clipped objective on whole sequences (TRL 1.16 ``RLOOTrainer``): ρ = exp(Σ_t m·logp −
    Σ_t m·logp_old), L = −min(ρ·Â, clip(ρ, 1−ε, 1+ε_high)·Â), averaged over sequences.
    (B, T) log-probs and mask, (B,) advantages → scalar (and stats with ``return_stats``)."""
    if advantages.dim() != 1 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages must be (B,) with B={logp.shape[0]}, one per sequence; got "
                         f"{tuple(advantages.shape)}")
    _check_loss_inputs(logp, old_logp, advantages, mask, None, 0.0, epsilon, epsilon_high, None)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp((logp * mask).sum(1) - (old_logp.detach() * mask).sum(1))  # (B,)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages).mean()
    if not return_stats:
        return loss
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        stats = {"clip_fraction": (low | high).float().mean().item(), "clip_low": low.float().mean().item(),
                 "clip_high": high.float().mean().item(), "ratio": ratio.mean().item()}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Sampling G completions per prompt, and their log-probs
# --------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """G completions for each of P prompts, rows ordered prompt by prompt (N = P·G rows)."""

    prompt_ids: torch.Tensor  # (N, Tp) left-padded
    prompt_mask: torch.Tensor  # (N, Tp)
    completion_ids: torch.Tensor  # (N, Tc) right-padded after the first end token
    completion_mask: torch.Tensor  # (N, Tc) 1 up to and including the first end token
    completions: list[str]  # (N,) decoded completion texts, special tokens removed
    rows: list[dict]  # (N,) the dataset row behind each completion (prompt and columns)
    group_size: int

    @property
    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.rows]

    def columns(self) -> dict[str, list]:
        """The rows' extra columns (all but "prompt"), one value per completion: the reward functions' kwargs."""
        return {key: [row[key] for row in self.rows] for key in self.rows[0] if key != "prompt"}


def _end_token_ids(model: nn.Module, tokenizer, stop_tokens: Sequence[str]) -> list[int]:
    ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(stop_tokens))}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask_from_ids(completion_ids: torch.Tensor, end_ids: Sequence[int]) -> torch.Tensor:
    """1 on every token up to and including the first end token of each row, 0 after it (TRL's rule;
    a row that never ends keeps all its tokens). (N, T) → (N, T) long."""
    is_end = torch.isin(completion_ids, torch.tensor(list(end_ids), device=completion_ids.device))  # (N, T)
    length = completion_ids.shape[1]
    first_end = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), length)  # (N,)
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first_end.unsqueeze(1)).long()


def _prefilled_cache(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """The KV cache of every prompt but its last token, computed once per prompt and then repeated for
    its G completions — (P, Tp − 1) → a cache of N = P·G rows; None if a prompt is one token long.
    ``generate`` then runs only the last prompt token and the new ones (prefix caching, as vLLM and
    SGLang share a prompt's cache between the sequences sampled from it)."""
    from transformers import DynamicCache

    if prompt_ids.shape[1] < 2 or not bool(prompt_mask[:, :-1].any(dim=1).all()):
        return None  # a one-token prompt leaves nothing to prefill
    head, head_mask = prompt_ids[:, :-1], prompt_mask[:, :-1]  # (P, Tp − 1)
    cache = DynamicCache(config=model.config)
    model(input_ids=head, attention_mask=head_mask, position_ids=(head_mask.cumsum(dim=1) - 1).clamp(min=0),
          use_cache=True, logits_to_keep=1, **{_cache_argument(model): cache})
    cache.batch_repeat_interleave(group_size)  # every layer's keys and values: (P, …) → (P·G, …)
    return cache


def _cache_argument(model: nn.Module) -> str:
    """transformers 5.2x names the forward's cache argument ``cache`` (``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer, rows: list[dict], group_size: int, *, max_new_tokens: int,
                       temperature: float = 1.0, stop_tokens: Sequence[str] = (),
                       share_prompt: bool = False) -> Rollout:
    """Sample ``group_size`` completions of every row's ``"prompt"`` in ONE batched ``model.generate``
    call (KV cache on, left padding, pure sampling at ``temperature``: no top-k / top-p, like TRL's
    defaults). Uses the global torch RNG, so seed it for a reproducible rollout.

    ``share_prompt``: encode each prompt once and hand ``generate`` its cache repeated G times, instead
    of encoding every prompt G times (what ``generate`` does with repeated prompts, and TRL with it). The
    logits are the same up to float rounding, so with the same seed the samples are the same."""
    if group_size < 2:
        raise ValueError(f"group_size must be ≥ 2 (GRPO's baseline is the group), got {group_size}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    if not rows or any("prompt" not in row for row in rows):
        raise ValueError("every row needs a 'prompt' (TRL's prompt-only format), e.g. {'prompt': ..., 'answer': ...}")
    device = next(model.parameters()).device
    repeated = [row for row in rows for _ in range(group_size)]  # each prompt G times, adjacent
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end together
    try:
        distinct = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True).to(device)  # (P, Tp)
    finally:
        tokenizer.padding_side = side
    enc = {key: value.repeat_interleave(group_size, dim=0) for key, value in distinct.items()}  # (N, Tp)
    end_ids = _end_token_ids(model, tokenizer, stop_tokens)
    was_training = model.training
    model.eval()
    try:
        cache = _prefilled_cache(model, distinct["input_ids"], distinct["attention_mask"], group_size) if share_prompt else None
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_k=None, top_p=None, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=end_ids,
                             **({_cache_argument(model): cache} if cache is not None else {}))  # (N, Tp + Tc)
    finally:
        model.train(was_training)
    completion_ids = out[:, enc["input_ids"].shape[1]:]  # (N, Tc)
    completion_mask = completion_mask_from_ids(completion_ids, end_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(completion_ids.tolist(),
                                                               completion_mask.sum(1).tolist())],
                                   skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, texts, repeated,
                   group_size)


def completion_logprobs(model: nn.Module, rollout: Rollout, *, temperature: float = 1.0,
                        with_entropy: bool = False, share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(o_t | q, o_<t) of the rollout's completion tokens under ``model``, from logits
    divided by the sampling ``temperature`` (as TRL): (N, Tc), and the entropy of each predicted
    distribution (N, Tc) when asked. Position ids skip the left padding, so each token sees the same
    positions as during generation. Gradients flow unless the caller disables them.

    ``share_prompt``: each prompt runs once for its G completions (packed with a prefix-sharing mask,
    :mod:`course_lib.shared_prefix`): the same values up to float rounding on the completion tokens, and
    0 (log-prob and entropy) on the padding after a completion's end. A rollout whose groups do not
    share one prompt row, or a model that cannot run packed rows, falls back to the full sequences."""
    if share_prompt:
        shared = _shared_prompt_logprobs(model, rollout, temperature, with_entropy)
        if shared is not None:
            return shared
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # (N, Tp + Tc)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    n_completion = rollout.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_completion + 1).logits[:, :-1]  # (N, Tc, V): position t predicts token t+1
    logp = token_logprobs(logits, rollout.completion_ids, temperature=temperature)  # (N, Tc)
    entropy = entropy_from_logits(logits.detach().float() / temperature) if with_entropy else None
    return logp, entropy


def _shared_prompt_logprobs(model: nn.Module, rollout: Rollout, temperature: float,
                            with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    from .shared_prefix import completion_logits_shared_prompt, supports_shared_prompt

    group = rollout.group_size
    n_rows, prompt_width = rollout.prompt_ids.shape
    if n_rows % group or not supports_shared_prompt(model):
        return None
    prompt_ids, prompt_mask = rollout.prompt_ids[::group], rollout.prompt_mask[::group]  # (P, Tp)
    grouped_ids = rollout.prompt_ids.view(-1, group, prompt_width)
    grouped_mask = rollout.prompt_mask.view(-1, group, prompt_width)
    if not (torch.equal(grouped_ids, prompt_ids[:, None].expand_as(grouped_ids))
            and torch.equal(grouped_mask, prompt_mask[:, None].expand_as(grouped_mask))):
        return None  # rows of one group carry different prompts
    mask = rollout.completion_mask
    logits = completion_logits_shared_prompt(model, prompt_ids, prompt_mask, rollout.completion_ids, mask,
                                             group)  # (N, Tc, V)
    logp = token_logprobs(logits, rollout.completion_ids, temperature=temperature) * mask  # (N, Tc)
    entropy = entropy_from_logits(logits.detach().float() / temperature) * mask if with_entropy else None
    return logp, entropy


# --------------------------------------------------------------------------------------------
# The task and the training loop
# --------------------------------------------------------------------------------------------
def addition_rows(pairs: Sequence[tuple[int, int]]) -> list[dict]:
    """TRL prompt-only rows for additions: ``{"prompt": "Q: What is a + b?\\nA:", "answer": a + b}``."""
    from .data import addition_prompt

    return [{"prompt": addition_prompt(a, b), "answer": a + b} for a, b in pairs]


@dataclass
class GRPOConfig:
    """What one GRPO (or RLOO) run needs; defaults are TRL's where TRL has one (ε, β, scale, loss)."""

    steps: int
    prompts_per_step: int = 16
    group_size: int = 8  # G, TRL's num_generations
    max_new_tokens: int = 8  # TRL's max_completion_length
    temperature: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    max_grad_norm: float | None = 1.0
    algorithm: Literal["grpo", "rloo"] = "grpo"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    kl_bias_correction: bool = True  # TRL's use_bias_correction_kl default
    num_iterations: int = 1  # μ: optimiser steps per generation batch (ρ ≠ 1 only when μ > 1)
    reward_weights: list[float] | None = None
    log_kl: bool = True  # measure KL to the reference even when beta = 0 (one extra forward)
    stop_tokens: tuple[str, ...] = ()
    seed: int = 0
    progress: bool = True
    desc: str = "grpo"
    eval_every: int = 0  # run eval_fn every this many steps (and after the last); 0 = never
    share_prompt: bool = True  # each prompt encoded once for its G completions, in sampling and scoring (exact)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be ≥ 2 (GRPO's baseline is the group), got {self.group_size}")
        if self.prompts_per_step <= 0:
            raise ValueError(f"prompts_per_step must be positive, got {self.prompts_per_step}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be ≥ 1, got {self.num_iterations}")
        if self.algorithm not in ("grpo", "rloo"):
            raise ValueError(f"algorithm must be 'grpo' or 'rloo', got {self.algorithm!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards must be one of {SCALES}, got {self.scale_rewards!r}")


def _has_adapter(model: nn.Module) -> bool:
    from .lora import lora_layers

    return next(lora_layers(model), None) is not None


def grpo_train(model: nn.Module, tokenizer, rows: list[dict], reward_funcs: Sequence[RewardFunc],
               config: GRPOConfig, *, eval_fn: Callable[[nn.Module], float] | None = None) -> History:
    """Train ``model`` (a LoRA-adapted policy; :func:`course_lib.lora.add_lora`) with GRPO or RLOO on
    prompt-only ``rows`` (``{"prompt", …columns}``; columns reach the reward functions).

    Each step: take ``prompts_per_step`` rows, sample G completions of each in one batched generation,
    score them, compute advantages (group-normalised, or leave-one-out for RLOO), and take one
    optimiser step on the clipped objective through :func:`course_lib.training.train` (AdamW, grad
    clipping, tqdm bar). The reference policy is the same model with its adapter switched off
    (:func:`course_lib.lora.disable_adapters`), so it costs no memory.

    The returned History's ``extra`` holds, per step: ``reward``, ``reward/<function name>``,
    ``accuracy`` (rows with an ``answer`` column), ``kl``, ``completion_length``, ``clip_fraction``,
    ``entropy``, ``zero_signal_fraction`` (groups with all-equal rewards); and ``eval_step`` /
    ``eval`` when ``eval_fn`` is given.
    """
    from .lora import disable_adapters

    if not rows:
        raise ValueError("no rows to train on")
    needs_reference = config.beta != 0 or config.log_kl
    if needs_reference and not _has_adapter(model):
        if config.beta != 0:
            raise ValueError("beta > 0 needs a reference policy: add a LoRA adapter (course_lib.lora.add_lora) so the "
                             "base model, with the adapter off, is the reference")
        needs_reference = False
    names = [reward_name(f) for f in reward_funcs]
    order = random.Random(config.seed)
    shuffled: list[dict] = []
    pending: dict[str, float] = {}
    current: dict = {}

    def next_rows() -> list[dict]:
        nonlocal shuffled
        if len(shuffled) < config.prompts_per_step:
            fresh = list(rows)
            order.shuffle(fresh)
            shuffled = shuffled + fresh
        taken, shuffled = shuffled[:config.prompts_per_step], shuffled[config.prompts_per_step:]
        return taken

    @torch.no_grad()
    def rollout_batch() -> dict:
        rollout = sample_completions(model, tokenizer, next_rows(), config.group_size,
                                     max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                     stop_tokens=config.stop_tokens, share_prompt=config.share_prompt)
        per_function, rewards = compute_rewards(reward_funcs, rollout.prompts, rollout.completions,
                                                rollout.columns(), config.reward_weights)  # (N, K), (N,)
        batch = {"rollout": rollout}
        old_logp = ref_logp = None
        if config.num_iterations > 1 or (config.algorithm == "rloo" and config.beta != 0):
            old_logp, _ = completion_logprobs(model, rollout, temperature=config.temperature,
                                              share_prompt=config.share_prompt)
            batch["old_logp"] = old_logp
        if needs_reference:
            with disable_adapters(model):
                ref_logp, _ = completion_logprobs(model, rollout, temperature=config.temperature,
                                                  share_prompt=config.share_prompt)
            batch["ref_logp"] = ref_logp
        if config.algorithm == "rloo":
            if config.beta != 0:
                rewards_for_advantage = rloo_kl_rewards(rewards, old_logp, ref_logp, rollout.completion_mask,
                                                        config.beta)
            else:
                rewards_for_advantage = rewards
            batch["advantages"] = rloo_advantages(rewards_for_advantage, config.group_size)
        else:
            batch["advantages"] = group_advantages(rewards, config.group_size, config.scale_rewards)
        stats = {"reward": rewards.mean().item(),
                 **{f"reward/{n}": per_function[:, k].mean().item() for k, n in enumerate(names)},
                 "completion_length": rollout.completion_mask.sum(1).float().mean().item(),
                 "zero_signal_fraction": zero_signal_fraction(rewards, config.group_size)}
        if "answer" in rollout.rows[0]:
            stats["accuracy"] = sum(answer_is_correct(c, r["answer"])
                                    for c, r in zip(rollout.completions, rollout.rows)) / len(rollout.rows)
        batch["stats"] = stats
        return batch

    def batches(micro_step: int) -> dict:
        if micro_step % config.num_iterations == 0:
            current.clear()
            current.update(rollout_batch())
        return current

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        rollout = batch["rollout"]
        logp, entropy = completion_logprobs(model, rollout, temperature=config.temperature, with_entropy=True,
                                            share_prompt=config.share_prompt)
        old_logp = batch.get("old_logp", logp.detach())  # μ = 1: on-policy, ρ = 1 in value
        mask = rollout.completion_mask
        if config.algorithm == "rloo":
            loss, stats = rloo_loss(logp, old_logp, batch["advantages"], mask, config.epsilon, config.epsilon_high,
                                    return_stats=True)
            if "ref_logp" in batch:
                stats["kl"] = masked_mean(k3_kl(logp.detach(), batch["ref_logp"]), mask).item()
        else:
            loss, stats = grpo_loss(logp, old_logp, batch["advantages"], mask, ref_logp=batch.get("ref_logp"),
                                    beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                                    loss_type=config.loss_type, max_completion_length=config.max_new_tokens,
                                    kl_bias_correction=config.kl_bias_correction, return_stats=True)
        pending.update(batch["stats"])
        pending.update(clip_fraction=stats["clip_fraction"], entropy=masked_mean(entropy, mask).item())
        if "kl" in stats:
            pending["kl"] = stats["kl"]
        return loss

    def callback(step: int, model: nn.Module, history: History) -> None:
        for key, value in pending.items():
            history.extra.setdefault(key, []).append(value)
        pending.clear()
        last = step == config.steps - 1
        if eval_fn is not None and config.eval_every and ((step + 1) % config.eval_every == 0 or last):
            history.extra.setdefault("eval_step", []).append(step + 1)
            history.extra.setdefault("eval", []).append(eval_fn(model))

    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
                               schedule=config.schedule, max_grad_norm=config.max_grad_norm, seed=config.seed,
                               progress=config.progress, desc=config.desc)
    return train(model, batches, train_config, loss_fn=loss_fn, callback=callback)
