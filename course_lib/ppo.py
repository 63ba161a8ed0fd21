"""PPO for RLHF (RLHF step 3): the algorithm of Ziegler et al. 2019 / InstructGPT and classic TRL ≤ 0.11.

A policy π (here: the model with a LoRA adapter) continues prompts; a reward model scores each whole
continuation; PPO (Schulman et al. 2017) raises the score while a per-token KL penalty keeps π near
the reference π_ref (the same model with the adapter switched off: one copy of the weights).

* ``kl_shaped_rewards`` — r_t = −β·(log π(y_t) − log π_ref(y_t)), plus the score on the LAST response
  token (Ziegler et al. eq. 2: R(x, y) = r(x, y) − β·log(π(y|x)/π_ref(y|x)), spread over the tokens);
* ``gae`` — generalised advantage estimation (Schulman et al. 2016, eq. 16): δ_t = r_t + γV_{t+1} − V_t,
  A_t = Σ_l (γλ)^l δ_{t+l}, with V = 0 after the last token; returns R_t = A_t + V_t;
* ``policy_loss`` — the clipped surrogate (PPO eq. 7) with ρ_t = π(y_t)/π_old(y_t):
  mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε));
* ``value_loss`` — ½·mean_t max((V_t − R_t)², (clip(V_t, V_old ± ε_v) − R_t)²);
* ``AdaptiveKLController`` — β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. eq. 3);
* ``run_ppo`` — the loop: sample, score, log-probs of π and π_ref, values, shaped rewards, GAE,
  whitened advantages, several epochs of minibatches, the KL update; a progress bar and a History.

Tensors of one batch of rollouts are (B, T): B continuations, T response positions, right-padded,
``mask`` 1 on real response tokens (up to and including the eos) and 0 on padding. Masked means,
whitening, log-probs and entropy come from :mod:`course_lib.rl`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .data import ending_sentiment
from .lora import disable_adapters
from .rl import entropy_from_logits, masked_mean, masked_whiten, token_logprobs
from .training import History


# ------------------------------------------------------------------------------------------------
# Checks shared by the maths
# ------------------------------------------------------------------------------------------------
def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{', '.join(shapes)} must have one shape (B, T); got {shapes}")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must be (B, T), one row per sequence; got shape {tuple(mask.shape)}")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask row(s) {empty} have no active token: every sequence needs at least one "
                         f"response token (drop empty continuations)")


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), e.g. at "
                         f"{bad.nonzero()[0].tolist()}: check what produced it (a reward model out of range?)")


def last_active_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last active position per row: (B, T) → (B,)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.bool()).argmax(-1)


# ------------------------------------------------------------------------------------------------
# The maths
# ------------------------------------------------------------------------------------------------
def kl_shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): −kl_coef·(logp − ref_logp) on every response token, plus ``scores``
    (B,) on each row's last response token; 0 on padding.

    The score goes on the last real token (the one that completes the text the reward model read),
    not on every token and not on the first pad after the eos (classic TRL v2's quirk)."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    _check_mask(mask)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be (B,) = ({mask.shape[0]},), one per sequence; got {tuple(scores.shape)}")
    _check_finite("scores", scores)
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number ≥ 0, got {kl_coef}")
    m = mask.to(logp.dtype)
    rewards = -kl_coef * (logp - ref_logp) * m  # (B, T)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_active_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens: (advantages, returns), each (B, T),
    0 on padding. Not whitened (the loop whitens over the active tokens of the batch).

    Backwards from the end: δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V and A equal to
    0 after the last token (the episode ends there: no bootstrap). Padding must come after the
    response (right padding), as sampling produces it."""
    _check_shapes(rewards=rewards, values=values, mask=mask)
    _check_mask(mask)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0 <= x <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {x}")
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m  # (B, T): padding contributes nothing
    steps = values.shape[1]
    advantage = torch.zeros_like(values[:, 0])  # (B,): A_{t+1}, 0 past the end
    advantages = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(values[:, t])  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        advantages.append(advantage)
    advantages = torch.stack(advantages[::-1], dim=1) * m  # (B, T)
    returns = (advantages + values) * m  # (B, T): the value targets
    return advantages, returns


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, a token mean: masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) with
    ρ = exp(logp − old_logp). Stats: ``clipfrac`` (share of tokens where the clipped term won),
    ``approx_kl`` (½·mean (logp − old_logp)², classic TRL's), ``ratio`` (mean ρ)."""
    _check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    _check_mask(mask)
    if not cliprange > 0:
        raise ValueError(f"cliprange must be positive, got {cliprange}")
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": 0.5 * masked_mean((logp - old_logp) ** 2, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """½·masked_mean(max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)): the new value may not
    leave the old one's ±ε_v band to lower its loss. Stats: ``clipfrac``."""
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    _check_mask(mask)
    if not cliprange_value > 0:
        raise ValueError(f"cliprange_value must be positive, got {cliprange_value}")
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).item()}
    return loss, stats


class AdaptiveKLController:
    """Ziegler et al. 2019 eq. 3: the KL coefficient follows a proportional controller towards a target
    KL per sequence, β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be ≥ 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target (the KL per sequence to hold, in nats) must be positive, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            raise FloatingPointError(f"current_kl is {current_kl}: the policy has diverged from the reference")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


# ------------------------------------------------------------------------------------------------
# Rollouts: sampling, log-probs, values
# ------------------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """V(s_t): the policy's last hidden state at the position that predicts token t → one number.
    Zero-initialised, so the first advantages are the rewards-to-go themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) → (B, T)
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


@dataclass
class Rollout:
    """Prompts (left-padded to P) and sampled continuations (right-padded to T) of one batch."""

    prompts: list[str]
    continuations: list[str]
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T): prompt padding 0, response padding after the eos 0
    response_mask: torch.Tensor  # (B, T)
    prompt_length: int  # P

    def select(self, rows: torch.Tensor) -> "Rollout":
        picked = rows.tolist()
        return Rollout([self.prompts[i] for i in picked], [self.continuations[i] for i in picked],
                       self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_length)


def response_mask_after_eos(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on sampled tokens up to and including the first eos, 0 after it: (B, T) ids → (B, T) mask.
    Reads the eos, not the pad id, so a tokenizer whose pad is its eos is handled."""
    is_eos = (response == eos_token_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


@torch.no_grad()
def sample_rollout(policy: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int,
                   temperature: float = 1.0, seed: int = 0) -> Rollout:
    """Sample one continuation per prompt from ``policy`` (pure sampling at ``temperature``: no top-k,
    no top-p, so the samples come from the distribution the log-probs describe)."""
    if not prompts:
        raise ValueError("prompts is empty: PPO needs at least one prompt per batch")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token, so prompts cannot be batched: set one first "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            out = policy.generate(**enc, do_sample=True, temperature=temperature, top_k=None, top_p=None,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    policy.train(was_training)
    prompt_length = enc["input_ids"].shape[1]
    response = out[:, prompt_length:]  # (B, T)
    response_mask = response_mask_after_eos(response, tokenizer.eos_token_id)  # (B, T)
    response = response.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    continuations = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout(list(prompts), continuations, torch.cat([enc["input_ids"], response], 1),
                   torch.cat([enc["attention_mask"], response_mask], 1), response_mask, prompt_length)


def response_forward(model: nn.Module, rollout: Rollout, value_head: nn.Module | None = None,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward pass over prompt + response: per-token log-probs of the sampled tokens (B, T), the
    values V(s_t) (B, T) when a value head is given, and the logits (B, T, V) of the response positions.

    The logits at position P − 1 + t predict response token t; the value is read at the same position
    (the state before the token is chosen). Position ids follow the attention mask, as in generation."""
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + T)
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids,
                output_hidden_states=value_head is not None)
    start, stop = rollout.prompt_length - 1, rollout.input_ids.shape[1] - 1
    logits = out.logits[:, start:stop]  # (B, T, V)
    response = rollout.input_ids[:, rollout.prompt_length:]  # (B, T)
    logp = token_logprobs(logits, response, temperature=temperature)  # (B, T)
    values = value_head(out.hidden_states[-1][:, start:stop]) if value_head is not None else None  # (B, T)
    return logp, values, logits


@torch.no_grad()
def sampled_kl(policy: nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """KL(π‖π_ref) of each sampled sequence, (B,) nats: Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)
    over its response tokens, read from the sampled ids (so it stays a measurement when the samples are no
    longer readable text), π_ref being ``policy`` with its adapter switched off. The mean over rows
    estimates the KL of the policy's samples; the PPO loop shapes its rewards with the same numbers."""
    logp, _, _ = response_forward(policy, rollout, None, temperature)  # (B, T)
    with disable_adapters(policy):
        ref_logp, _, _ = response_forward(policy, rollout, None, temperature)  # (B, T)
    return ((logp - ref_logp) * rollout.response_mask).sum(-1)  # (B,)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
@dataclass
class PPOConfig:
    """Classic TRL's defaults where they fit a small model on a CPU (its lr 1.41e-5 and horizon 10 000
    suit full fine-tuning of GPT-2 on 256-sample batches; a LoRA adapter on a tiny model needs more)."""

    iterations: int = 20
    batch_size: int = 32  # rollouts per iteration
    minibatch_size: int = 8
    ppo_epochs: int = 4
    max_new_tokens: int = 60
    temperature: float = 1.0
    lr: float = 1e-3
    init_kl_coef: float = 0.2
    target_kl: float | None = 6.0  # None: no controller, the coefficient stays init_kl_coef
    horizon: float = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float | None = 1.0
    whiten_advantages: bool = True
    seed: int = 0
    progress: bool = True
    desc: str = "ppo"

    def __post_init__(self):
        for name in ("iterations", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) cannot exceed batch_size ({self.batch_size})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (PPO samples), got {self.temperature}")


def happy_ending_rate(prompts: list[str], continuations: list[str]) -> float:
    """The ground truth no model trains on: share of continuations that reach a happy ending
    (:func:`course_lib.data.ending_sentiment`); unfinished or garbled ones count as not happy."""
    return sum(ending_sentiment(c) == "happy" for c in continuations) / len(continuations)


@dataclass
class PPOResult:
    history: History  # one entry per iteration; stats in history.extra
    value_head: ValueHead
    kl_controller: AdaptiveKLController | None
    last_rollout: Rollout | None = None  # the final iteration's samples


STATS = ("reward", "oracle", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "value_clipfrac",
         "approx_kl", "entropy", "response_length", "advantage_std")


def run_ppo(policy: nn.Module, tokenizer, prompts: list[str],
            reward_fn: Callable[[list[str], list[str]], torch.Tensor | list[float]], config: PPOConfig, *,
            value_head: ValueHead | None = None,
            oracle: Callable[[list[str], list[str]], float] | None = happy_ending_rate,
            callback: Callable[[int, nn.Module, History], None] | None = None) -> PPOResult:
    """Train the active LoRA adapter of ``policy`` with PPO; the reference is ``policy`` with its adapters
    disabled. ``reward_fn(prompts, continuations)`` returns one score per continuation (e.g.
    :func:`course_lib.reward_model.reward_fn`); ``oracle`` (the ground truth, logged only) likewise
    returns a rate. Per iteration ``history.extra`` gets every name in ``STATS``; ``history.loss`` is the
    mean of pg + vf_coef·vf over the iteration's minibatches. ``callback(iteration, policy, history)``
    runs after each iteration (raise StopIteration to stop early).

    Stops with FloatingPointError when a loss or the KL becomes non-finite (nothing is skipped)."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: PPO needs prompts to continue")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad token and an eos token to batch and end continuations: "
                         "set tokenizer.pad_token (e.g. to its eos_token) first")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the policy has no trainable parameters: add a LoRA adapter first "
                         "(course_lib.lora.add_lora), which is also what makes the reference")
    device = next(policy.parameters()).device
    value_head = value_head or ValueHead(policy.config.hidden_size)
    value_head.to(device)
    params = trainable + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    controller = (AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
                  if config.target_kl is not None else None)
    kl_coef = config.init_kl_coef
    rng, order = random.Random(config.seed), []
    torch.manual_seed(config.seed)
    history = History()
    history.extra.update({name: [] for name in STATS})
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iterations, desc=config.desc, leave=False)
    start = time.perf_counter()
    rollout = None
    try:
        for iteration in range(config.iterations):
            while len(order) < config.batch_size:  # prompts in shuffled epochs
                epoch = list(range(len(prompts)))
                rng.shuffle(epoch)
                order.extend(epoch)
            batch_prompts = [prompts[i] for i in order[:config.batch_size]]
            del order[:config.batch_size]

            # 1. Rollout: sample, score, and everything the update compares against (no gradient).
            rollout = sample_rollout(policy, tokenizer, batch_prompts, max_new_tokens=config.max_new_tokens,
                                     temperature=config.temperature, seed=config.seed * 100_003 + iteration)
            mask = rollout.response_mask  # (B, T)
            scores = torch.as_tensor(reward_fn(rollout.prompts, rollout.continuations), dtype=torch.float32,
                                     device=device).flatten()  # (B,)
            policy.eval()
            with torch.no_grad():
                old_logp, old_values, logits = response_forward(policy, rollout, value_head, config.temperature)
                entropy = masked_mean(entropy_from_logits(logits), mask).item()
                del logits
                with disable_adapters(policy):
                    ref_logp, _, _ = response_forward(policy, rollout, None, config.temperature)
            kl_per_sequence = ((old_logp - ref_logp) * mask).sum(-1)  # (B,)
            kl = kl_per_sequence.mean().item()
            if not math.isfinite(kl):
                raise FloatingPointError(f"iteration {iteration}: the KL to the reference is {kl}; lower lr "
                                         f"({config.lr}) or raise the KL coefficient")
            rewards = kl_shaped_rewards(scores, old_logp, ref_logp, mask, kl_coef)  # (B, T)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)  # (B, T) each
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, mask) * mask  # over real tokens only

            # 2. Update: several epochs of minibatches against the frozen rollout.
            policy.train()
            step_stats: dict[str, list[float]] = {k: [] for k in ("loss", "pg", "vf", "clipfrac", "vclip",
                                                                  "approx_kl", "grad_norm")}
            for _ in range(config.ppo_epochs):
                perm = torch.randperm(config.batch_size, device=device)
                for lo in range(0, config.batch_size, config.minibatch_size):
                    rows = perm[lo:lo + config.minibatch_size]
                    logp, values, _ = response_forward(policy, rollout.select(rows), value_head, config.temperature)
                    pg, pg_stats = policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], config.cliprange)
                    vf, vf_stats = value_loss(values, old_values[rows], returns[rows], mask[rows],
                                              config.cliprange_value)
                    loss = pg + config.vf_coef * vf
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"iteration {iteration}: the loss became {loss.item()} (policy {pg.item()}, value "
                            f"{vf.item()}); lower lr ({config.lr}) or check the rewards")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = (nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                                 if config.max_grad_norm is not None else
                                 torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                    optimizer.step()
                    for key, value in (("loss", loss.item()), ("pg", pg.item()), ("vf", vf.item()),
                                       ("clipfrac", pg_stats["clipfrac"]), ("vclip", vf_stats["clipfrac"]),
                                       ("approx_kl", pg_stats["approx_kl"]), ("grad_norm", float(grad_norm))):
                        step_stats[key].append(value)
            optimizer.zero_grad(set_to_none=True)
            policy.eval()

            # 3. Bookkeeping: the coefficient used this iteration, then the controller's update.
            mean = lambda key: sum(step_stats[key]) / len(step_stats[key])  # noqa: E731
            history.step.append(iteration)
            history.loss.append(mean("loss"))
            history.lr.append(config.lr)
            history.grad_norm.append(mean("grad_norm"))
            row = {"reward": scores.mean().item(),
                   "oracle": oracle(rollout.prompts, rollout.continuations) if oracle is not None else float("nan"),
                   "kl": kl, "kl_coef": kl_coef, "policy_loss": mean("pg"), "value_loss": mean("vf"),
                   "clipfrac": mean("clipfrac"), "value_clipfrac": mean("vclip"), "approx_kl": mean("approx_kl"),
                   "entropy": entropy, "response_length": mask.sum(-1).float().mean().item(),
                   "advantage_std": advantages[mask.bool()].std().item()}
            for key, value in row.items():
                history.extra[key].append(value)
            if controller is not None:
                kl_coef = controller.update(kl, config.batch_size)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{kl:.2f}", oracle=f"{row['oracle']:.2f}")
            if callback is not None:
                try:
                    callback(iteration, policy, history)
                except StopIteration:
                    break
    finally:
        if bar is not None:
            bar.close()
        history.seconds = time.perf_counter() - start
    return PPOResult(history, value_head, controller, rollout)


def sampled_happy_rate(model: nn.Module, tokenizer, openers: list[str], *, max_new_tokens: int = 60,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> float:
    """The lesson's measure: share of ``openers`` the model continues to a happy ending when it
    SAMPLES at ``temperature`` (greedy decoding already ends most stories happily)."""
    from .evaluate import generate

    texts = []
    for i in range(0, len(openers), batch_size):
        texts += generate(model, tokenizer, openers[i:i + batch_size], max_new_tokens=max_new_tokens,
                          do_sample=True, temperature=temperature, seed=seed + i)
    return happy_ending_rate(openers, texts)
