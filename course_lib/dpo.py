"""Direct Preference Optimization (DPO, Rafailov et al. 2023): preferences without a reward model.

The RLHF objective max_π E[r(x, y)] − β·KL(π ‖ π_ref) has the closed-form optimum (paper eq. 4)

    π*(y | x) = π_ref(y | x) · exp(r(x, y) / β) / Z(x),

so a reward is a log-ratio, r(x, y) = β·log(π(y | x) / π_ref(y | x)) + β·log Z(x) (eq. 5). In the
Bradley–Terry model of a preference y_w ≻ y_l the partition Z(x) cancels, leaving a logistic loss on the
log-ratio margin (eq. 7):

    L_DPO = −log σ(β·d),   d = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)].

β·(log π − log π_ref) is the *implicit reward* of a completion (TRL's ``rewards/chosen`` and
``rewards/rejected``). log π(y | x) is the **sum** of the completion's token log-probs: the prompt and
the padding never count.

What this module holds, each checked against TRL 1.16's ``DPOTrainer`` in tests/test_dpo.py:

* ``tokenize_preference_rows`` / ``dpo_batches`` — rows ``{"prompt", "chosen", "rejected"}`` (TRL's
  explicit-prompt format) → one batch of 2B sequences, the B chosen then the B rejected, with a
  ``completion_mask`` (TRL's collator layout);
* ``sequence_logprobs`` — Σ log p over completion tokens for all 2B sequences in ONE forward pass
  (TRL's concatenated forward), or with each pair's prompt run once (``share_prompt``: prefix sharing,
  the default of the training loss); ``reference_logprobs`` — the same with the LoRA adapter switched off
  (the base model is the reference, no second copy) or with a separate reference model;
* ``dpo_loss`` — the loss family ``sigmoid`` · ``robust`` · ``hinge`` · ``ipo`` and the implicit rewards;
* ``DPOLoss`` / ``run_dpo`` — a loss for ``training.train`` and the loop, logging TRL's metric names;
* ``precompute_reference_logprobs`` — reference log-probs once per dataset (then the reference model
  need not be in memory at all while training); ``preference_metrics`` — held-out implicit-reward accuracy.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import check_preference_rows
from .rl import token_logprobs
from .shared_prefix import completion_logps_shared_prompt, split_prompt_and_completion, supports_shared_prompt
from .templates import pad_right, tokenize_prompt_and_completion, unpad
from .training import History, ShuffledEpochs, TrainConfig, train

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")  # TRL's names


# ------------------------------------------------------------------------------------------------
# The loss family
# ------------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards: four (B,) log-prob tensors → (losses, chosen_rewards,
    rejected_rewards), each (B,). Average ``losses`` for the batch loss.

    With d = (π_c − ref_c) − (π_r − ref_r) (log-probs of the chosen and rejected completions):

    * ``sigmoid`` — −log σ(βd), Rafailov et al. 2023 eq. 7. With ``label_smoothing`` ε > 0 it is
      *conservative* DPO (cDPO, labels flipped with probability ε): −(1−ε)·log σ(βd) − ε·log σ(−βd).
      Note: TRL 1.16 ignores ε for ``sigmoid`` (its loss stays −log σ(βd)); ε = 0 agrees with it exactly.
    * ``robust`` — the unbiased noisy-label estimate of Chowdhury et al. 2024 (eq. 9):
      [−(1−ε)·log σ(βd) + ε·log σ(−βd)] / (1 − 2ε), ε ∈ [0, 0.5).
    * ``hinge`` — max(0, 1 − βd), the SLiC hinge (Zhao et al. 2023) on the log-ratio margin.
    * ``ipo`` — (d − 1/(2β))², Azar et al. 2023 eq. 17: a squared loss whose target margin is 1/(2β),
      so the margin cannot run off to infinity. **Convention:** pass per-token AVERAGE log-probs
      (Σ log p / number of completion tokens) for ``ipo``, as TRL does before its IPO term.

    Implicit rewards: β·(π_c − ref_c) and β·(π_r − ref_r) of the log-probs passed in (eq. 5 without
    the β·log Z(x) that cancels in every pair), detached — they are metrics, not part of the graph.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known loss types are {list(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive (it scales the KL penalty; TRL's default is 0.1), got {beta}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape (one value per pair), got {sorted(shapes)}")
    if label_smoothing:
        if loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to 'sigmoid' (cDPO) and 'robust' only, not {loss_type!r}; "
                             f"leave it at 0.0")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing is the probability that a label is flipped: it must lie in [0, 0.5), "
                             f"got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    d = chosen_logratios - rejected_logratios  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:  # ipo
        losses = (d - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's batch metrics from the per-pair implicit rewards (B,): means, margin, and the share of pairs
    whose chosen reward is strictly higher (``rewards/accuracies``)."""
    return {"rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item()}


# ------------------------------------------------------------------------------------------------
# Data: {"prompt", "chosen", "rejected"} → one concatenated batch
# ------------------------------------------------------------------------------------------------
def _tokenize_row_pairs(rows: list[dict], tokenizer, max_length: int | None) -> list[tuple[dict, dict]]:
    """Per row, the chosen and the rejected example ({"input_ids", "labels"}, labels −100 on the prompt),
    an eos closing each completion (as TRL adds it)."""
    check_preference_rows(rows)
    prompts = [r["prompt"] for r in rows]
    chosen = unpad(tokenize_prompt_and_completion(prompts, [r["chosen"] for r in rows], tokenizer, max_length))
    rejected = unpad(tokenize_prompt_and_completion(prompts, [r["rejected"] for r in rows], tokenizer, max_length))
    for i, ex in enumerate(chosen):
        if ex["labels"][0] != -100:
            raise ValueError(f"row {i}: the prompt has no tokens (and the tokenizer adds no BOS), so nothing "
                             f"predicts the first completion token; give the row a prompt")
    return list(zip(chosen, rejected))


def collate_pairs(pairs: list[tuple[dict, dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """(chosen, rejected) examples → ``input_ids``, ``attention_mask``, ``completion_mask`` (2B, T),
    right-padded, the B chosen sequences first and the B rejected after them (TRL's collator layout)."""
    examples = [c for c, _ in pairs] + [r for _, r in pairs]
    batch = pad_right([(e["input_ids"], e["labels"]) for e in examples], pad_id)
    labels = batch.pop("labels")  # (2B, T)
    batch["completion_mask"] = (labels != -100).long()  # (2B, T)
    batch["row_blocks"] = 2  # rows i and B + i are one pair: under DDP they stay on one process (training._split_rows)
    return batch


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def tokenize_preference_rows(rows: list[dict], tokenizer, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows ``{"prompt", "chosen", "rejected"}`` → one concatenated batch (see :func:`collate_pairs`).

    The prompt is tokenized alone and each completion after it (``templates.tokenize_prompt_and_completion``),
    so the boundary is exact; TRL tokenizes prompt + completion together and splits at the longest
    common prefix — the same ids whenever the completion starts a new word, as here. Rows carrying
    precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` pass them on as (B,) tensors."""
    batch = collate_pairs(_tokenize_row_pairs(rows, tokenizer, max_length), tokenizer.pad_token_id)
    return _with_reference(batch, rows)


def _with_reference(batch: dict, rows: list[dict]) -> dict:
    if all("ref_chosen_logps" in r and "ref_rejected_logps" in r for r in rows):
        batch["ref_chosen_logps"] = torch.tensor([float(r["ref_chosen_logps"]) for r in rows])  # (B,)
        batch["ref_rejected_logps"] = torch.tensor([float(r["ref_rejected_logps"]) for r in rows])  # (B,)
    return batch


def dpo_batches(rows: list[dict], tokenizer, batch_size: int, *, max_length: int | None = None,
                seed: int = 0) -> Callable[[int], dict]:
    """Batch ``step`` → a concatenated batch of ``batch_size`` pairs; epochs reshuffle with ``seed``. Rows
    are checked and tokenized once, up front, so a bad row fails before training starts."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pairs = _tokenize_row_pairs(rows, tokenizer, max_length)
    pad = tokenizer.pad_token_id
    order = ShuffledEpochs(len(pairs), seed)

    def batch(step: int) -> dict:
        picked = order.take(step * batch_size, batch_size)
        return _with_reference(collate_pairs([pairs[i] for i in picked], pad), [rows[i] for i in picked])
    return batch


# ------------------------------------------------------------------------------------------------
# Sequence log-probs: policy and reference
# ------------------------------------------------------------------------------------------------
def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], *, share_prompt: bool = False) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each sequence's completion tokens: (2B, T) batch → (2B,).

    One forward pass for chosen and rejected together. Only the logits that predict a completion token
    are computed (``logits_to_keep``: positions from the earliest completion start on), so the prompt
    costs no LM-head work; the mask then drops the prompt and padding positions that remain.

    ``share_prompt``: run each pair's prompt once for both completions (prefix sharing, Wang et al. 2024;
    :mod:`course_lib.shared_prefix`) — the same values up to float rounding, with ~⅓ fewer tokens
    through the model here. Pairs whose chosen and rejected rows carry different prompts, or a model that
    cannot run packed rows (not a transformers causal LM, or an attention without custom masks), make the
    whole batch fall back to the concatenated forward."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (2B, T) each
    width = input_ids.shape[1]
    has_completion = completion_mask.any(dim=1)
    if not bool(has_completion.all()):
        raise ValueError(f"sequence(s) {has_completion.logical_not().nonzero().flatten().tolist()} have no "
                         f"completion tokens: every sequence needs at least one")
    first = int(completion_mask.float().argmax(dim=1).min())  # earliest completion token in the batch
    if first == 0:
        raise ValueError("a completion starts at position 0: nothing predicts it; every sequence needs a prompt")
    if share_prompt:
        shared = _shared_prompt_logprobs(model, batch)
        if shared is not None:
            return shared
    keep = width - first + 1  # logits at positions first−1 … T−1
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False).logits  # (2B, keep, V)
    per_token = token_logprobs(logits[:, :-1], input_ids[:, first:])  # (2B, T − first): predicts tokens first…T−1
    return (per_token * completion_mask[:, first:]).sum(dim=1)  # (2B,)


def _shared_prompt_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """:func:`sequence_logprobs` with each pair's prompt run once (packed prompt ++ chosen ++ rejected);
    None when some pair's two rows do not carry the same prompt, or the model cannot run packed rows
    (:func:`course_lib.shared_prefix.supports_shared_prompt`)."""
    if not supports_shared_prompt(model):
        return None
    prompt_ids, prompt_mask, completion_ids, completion_mask = split_prompt_and_completion(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # (2B, Tp) ×2, (2B, Tc) ×2
    pairs = prompt_ids.shape[0] // 2
    if not (torch.equal(prompt_ids[:pairs], prompt_ids[pairs:]) and torch.equal(prompt_mask[:pairs], prompt_mask[pairs:])):
        return None
    interleaved = torch.arange(2 * pairs, device=prompt_ids.device).view(2, pairs).T.flatten()  # c0, r0, c1, r1, …
    per_token = completion_logps_shared_prompt(model, prompt_ids[:pairs], prompt_mask[:pairs],
                                               completion_ids[interleaved], completion_mask[interleaved],
                                               n_per_prompt=2)  # (2B, Tc), 0 on padding
    return per_token.sum(dim=1).view(pairs, 2).T.flatten()  # (2B,): the B chosen, then the B rejected


def completion_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of completion tokens per sequence (2B,), eos included (TRL's IPO normaliser)."""
    return batch["completion_mask"].sum(dim=1)


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """The reference policy π_ref: ``model`` with its LoRA adapter switched off (the frozen base).
    The reference is never trained, so it needs no second copy of the weights."""
    from .lora import LoRALinear, disable_adapters

    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has no LoRA adapter to switch off, so it cannot be its own reference: add one "
                         "with course_lib.lora.add_lora, pass reference=<a frozen copy>, or precompute the "
                         "reference log-probs before training (precompute_reference_logprobs)")
    with disable_adapters(model):
        yield model


def reference_logprobs(model: nn.Module, batch: dict[str, torch.Tensor],
                       reference: nn.Module | None = None, *, share_prompt: bool = False) -> torch.Tensor:
    """Σ log π_ref over completion tokens (2B,), without gradient: the batch's precomputed values if it
    carries them, else a forward of ``reference`` (a separate frozen model) or of ``model`` with its
    adapter off."""
    if "ref_chosen_logps" in batch:
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
    with torch.no_grad():
        if reference is not None:
            return sequence_logprobs(reference, batch, share_prompt=share_prompt)
        with as_reference(model):
            return sequence_logprobs(model, batch, share_prompt=share_prompt)


def precompute_reference_logprobs(model: nn.Module, rows: list[dict], tokenizer, *, batch_size: int = 32,
                                  reference: nn.Module | None = None, max_length: int | None = None,
                                  share_prompt: bool = True) -> list[dict]:
    """The rows with ``ref_chosen_logps`` / ``ref_rejected_logps`` added (TRL's column names), computed
    once. Batches built from them skip the reference forward, and the reference need not stay in memory.
    ``share_prompt``: each pair's prompt run once (see :func:`sequence_logprobs`)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    pairs = _tokenize_row_pairs(rows, tokenizer, max_length)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = {k: _to(v, device) for k, v in collate_pairs(pairs[start:start + batch_size], pad).items()}
        chosen, rejected = reference_logprobs(model, batch, reference, share_prompt=share_prompt).chunk(2)  # (B,) each
        for row, c, r in zip(rows[start:start + batch_size], chosen.tolist(), rejected.tolist()):
            out.append({**row, "ref_chosen_logps": c, "ref_rejected_logps": r})
    return out


# ------------------------------------------------------------------------------------------------
# The training loss and loop
# ------------------------------------------------------------------------------------------------
class DPOLoss:
    """``loss_fn(model, batch)`` for :func:`training.train`: policy and reference log-probs of one
    concatenated batch → the mean of :func:`dpo_loss` over its pairs.

    Each call keeps its batch's metrics (TRL's names) in ``pending``; :meth:`log` averages them into a
    History once per optimizer step (over the gradient-accumulation micro-batches, as TRL logs).
    The reward metrics use summed log-probs for every loss type, as TRL's do (also for ``ipo``, whose
    loss sees the per-token averages).

    ``share_prompt`` (default on: exact up to float rounding) runs each pair's prompt once for chosen and
    rejected, in the policy and in the reference forward (prefix sharing, Wang et al. 2024, arXiv:2410.20305;
    :mod:`course_lib.shared_prefix`); off, both run TRL's concatenated forward over the 2B full sequences."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: nn.Module | None = None, share_prompt: bool = True):
        dpo_loss(*[torch.zeros(1)] * 4, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # validate now
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference
        self.share_prompt = share_prompt
        self.pending: list[dict[str, float]] = []

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = sequence_logprobs(model, batch, share_prompt=self.share_prompt)  # (2B,)
        ref = reference_logprobs(model, batch, self.reference, share_prompt=self.share_prompt).to(policy.device)  # (2B,)
        losses, metrics = self.pair_losses(policy, ref, completion_lengths(batch))
        self.pending.append(metrics)
        return losses.mean()

    def pair_losses(self, policy: torch.Tensor, ref: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(2B,) summed policy and reference log-probs (and completion lengths) → (B,) losses, metrics."""
        policy_c, policy_r = policy.chunk(2)  # (B,) each: the batch is [chosen; rejected]
        ref_c, ref_r = ref.chunk(2)
        if self.loss_type == "ipo":  # per-token averages (see dpo_loss)
            len_c, len_r = lengths.to(policy.dtype).chunk(2)
            losses, _, _ = dpo_loss(policy_c / len_c, policy_r / len_r, ref_c / len_c, ref_r / len_r,
                                    self.beta, self.loss_type, self.label_smoothing)
        else:
            losses, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.beta, self.loss_type, self.label_smoothing)
        chosen_rewards = self.beta * (policy_c - ref_c).detach()  # (B,)
        rejected_rewards = self.beta * (policy_r - ref_r).detach()  # (B,)
        metrics = {"loss": losses.mean().item(), **reward_metrics(chosen_rewards, rejected_rewards),
                   "logps/chosen": policy_c.mean().item(), "logps/rejected": policy_r.mean().item()}
        return losses, metrics

    def log(self, history: History) -> None:
        if not self.pending:
            return
        for name in METRICS:
            history.extra.setdefault(name, []).append(sum(m[name] for m in self.pending) / len(self.pending))
        self.pending.clear()


@torch.no_grad()
def preference_metrics(model: nn.Module, tokenizer, rows: list[dict], *, beta: float = 0.1,
                       batch_size: int = 32, reference: nn.Module | None = None,
                       max_length: int | None = None, share_prompt: bool = True) -> dict[str, float]:
    """TRL's reward metrics over all ``rows`` (e.g. held-out pairs), in eval mode: ``rewards/accuracies``
    is the share of pairs whose chosen completion gets the higher implicit reward β·log(π/π_ref).
    ``share_prompt``: each pair's prompt run once (see :func:`sequence_logprobs`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = _tokenize_row_pairs(rows, tokenizer, max_length)
    chosen, rejected = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = {k: _to(v, device) for k, v in collate_pairs(pairs[start:start + batch_size],
                                                               tokenizer.pad_token_id).items()}
            policy_c, policy_r = sequence_logprobs(model, batch, share_prompt=share_prompt).chunk(2)
            ref_c, ref_r = reference_logprobs(model, batch, reference, share_prompt=share_prompt).chunk(2)
            chosen.append(beta * (policy_c - ref_c))
            rejected.append(beta * (policy_r - ref_r))
    finally:
        model.train(was_training)
    return reward_metrics(torch.cat(chosen), torch.cat(rejected))


def run_dpo(model: nn.Module, rows: list[dict], tokenizer, config: TrainConfig, *, beta: float = 0.1,
            loss_type: str = "sigmoid", label_smoothing: float = 0.0, batch_size: int = 8,
            lora_targets="all-linear", r: int = 8, alpha: float = 16, reference: nn.Module | None = None,
            precompute_reference: bool = False, max_length: int | None = None,
            eval_rows: list[dict] | None = None, eval_every: int = 0, device=None,
            autocast_dtype=None, share_prompt: bool = True) -> History:
    """DPO-train ``model`` in place on preference ``rows`` with the shared loop; returns the History.

    A LoRA adapter is added unless the model already has LoRA layers (then those train) or a separate
    ``reference`` model is given (then every trainable weight trains: full fine-tuning against the frozen
    copy). The reference is the model with its adapter off, or ``reference``; ``precompute_reference``
    computes its log-probs once before the first step (and the loss then holds no reference model).
    ``share_prompt`` runs each pair's prompt once for chosen and rejected (exact; see :class:`DPOLoss`).
    ``history.extra`` holds TRL's metric names per optimizer step (loss, rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/…); with ``eval_rows`` and ``eval_every`` > 0 also
    ``eval/step`` and ``eval/rewards/…`` on those rows, before training and every ``eval_every`` steps.
    Under DDP each process must get whole pairs: a batch's rows are [chosen; rejected], so splitting
    its rows in halves would separate every chosen sequence from its rejected twin."""
    from .lora import LoRALinear, add_lora

    DPOLoss(beta, loss_type, label_smoothing)  # a bad argument fails before any work
    check_preference_rows(rows)
    if eval_rows is not None:
        check_preference_rows(eval_rows)
    if reference is None and not any(isinstance(m, LoRALinear) for m in model.modules()):
        add_lora(model, lora_targets, r=r, alpha=alpha)
    if precompute_reference:
        rows = precompute_reference_logprobs(model, rows, tokenizer, reference=reference, max_length=max_length,
                                             share_prompt=share_prompt)
    loss_fn = DPOLoss(beta, loss_type, label_smoothing, None if precompute_reference else reference, share_prompt)
    batches = dpo_batches(rows, tokenizer, batch_size, max_length=max_length, seed=config.seed)

    evaluating = eval_rows is not None and eval_every > 0
    evals: dict[str, list] = {}

    def evaluate(step: int) -> None:
        metrics = preference_metrics(model, tokenizer, eval_rows, beta=beta, reference=reference,
                                     max_length=max_length, share_prompt=share_prompt)
        for name, value in {"step": step, **metrics}.items():
            evals.setdefault(f"eval/{name}", []).append(value)

    if evaluating:
        evaluate(0)  # before training

    def callback(step: int, model: nn.Module, history: History) -> None:
        loss_fn.log(history)
        if evaluating and ((step + 1) % eval_every == 0 or step + 1 == config.steps):
            evaluate(step + 1)
            history.extra.update({name: list(values) for name, values in evals.items()})

    return train(model, batches, config, loss_fn=loss_fn, callback=callback, device=device,
                 autocast_dtype=autocast_dtype)
