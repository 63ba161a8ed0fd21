"""A reward model learned from preferences: a causal LM's body with a scalar head (RLHF step 2).

InstructGPT (Ouyang et al. 2022, eq. 1) and Ziegler et al. (2019) fit r_θ(x, y) to human choices with
the Bradley–Terry model: the probability that completion y_c is preferred to y_r is
σ(r_θ(x, y_c) − r_θ(x, y_r)), so the loss on a pair is

    L = −log σ(r_c − r_r − m)  [+ c · mean((r_c + r_r)²)]

with an optional margin m per pair (Llama 2, Touvron et al. 2023, eq. 2) and TRL's optional centering
term (Eisenstein et al. 2023), which pins the rewards' mean near 0 since Bradley–Terry only sees
differences.

* ``RewardModel`` — the backbone (the causal LM without its LM head) and ``score``, a ``Linear(hidden, 1)``
  read at the **last non-pad token** of each sequence, found from the attention mask, so a tokenizer
  whose pad token is its eos (the usual fix for hub models without a pad token) cannot hide the eos;
* ``bradley_terry_loss`` — equal to TRL 1.16 ``RewardTrainer.compute_loss`` (tests/test_reward_model.py);
* ``encode_pairs`` / ``train_reward_model`` / ``pairwise_accuracy`` — TRL's tokenization (prompt +
  completion + eos as one text), the training loop (``training.train``), the held-out metric;
* ``save_reward_model`` — a transformers sequence-classification checkpoint: the same key names and
  config, so ``AutoModelForSequenceClassification.from_pretrained(dir)`` and TRL read it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import check_preference_rows
from .training import History, TrainConfig, train


class RewardModel(nn.Module):
    """r_θ(x, y): hidden state of the last real token → one number. Backbone and head both train.

    ``forward(input_ids, attention_mask) -> (B,)`` scores. The key names of ``state_dict`` after
    :func:`to_transformers` are those of ``<Arch>ForSequenceClassification`` (``model.…``, ``score.weight``).
    """

    def __init__(self, backbone: nn.Module, config, pad_token_id: int):
        super().__init__()
        self.backbone = backbone  # e.g. LlamaModel: (B, T) ids → (B, T, H) hidden states
        self.config = config
        self.pad_token_id = pad_token_id
        self.score = nn.Linear(config.hidden_size, 1, bias=False)  # transformers' head: no bias

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, tokenizer, *, seed: int = 0, init_std: float | None = None):
        """Take the body of ``causal_lm`` (shared, not copied: pass a fresh copy to keep the policy apart)
        and add a head initialised as transformers does: N(0, initializer_range), seeded."""
        require_pad_token(tokenizer)
        prefix = getattr(causal_lm, "base_model_prefix", "model")
        backbone = getattr(causal_lm, prefix, None)
        if backbone is None:
            raise ValueError(f"{type(causal_lm).__name__} has no `{prefix}` body: pass a transformers causal LM "
                             f"(e.g. from course_lib.models.load_model)")
        model = cls(backbone, causal_lm.config, tokenizer.pad_token_id)
        std = init_std if init_std is not None else getattr(causal_lm.config, "initializer_range", 0.02)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(model.score.weight.shape, generator=generator) * std
            model.score.weight.copy_(weight.to(model.score.weight))
        first = next(backbone.parameters())
        return model.to(device=first.device, dtype=first.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        last = last_token_index(attention_mask)  # (B,)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, last]).squeeze(-1)  # (B,)


def require_pad_token(tokenizer) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token, so pairs cannot be batched: set one first, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token (the reward model reads the attention mask, "
                         "so pad == eos is safe here), or add a dedicated one")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost attended position per row: (B, T) mask → (B,). Works for right and left
    padding, and never confuses a real eos with padding (it reads the mask, not the token ids — unlike
    transformers' ``…ForSequenceClassification``, which looks for ``input_ids != pad_token_id``)."""
    mask = attention_mask.bool()
    empty = ~mask.any(-1)
    if bool(empty.any()):
        raise ValueError(f"attention_mask row(s) {empty.nonzero().flatten().tolist()} have no real token: "
                         f"there is nothing to score (drop empty texts)")
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return (positions * mask).argmax(-1)  # (B,)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """mean_pairs −log σ(r_c − r_r − m) + c·mean((r_c + r_r)²); (B,) scores → scalar (TRL's RewardTrainer).

    −log σ is computed as ``-logsigmoid`` (stable for large differences, where log(sigmoid) gives −inf)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must have "
                         f"one shape (one score per pair)")
    difference = r_chosen - r_rejected  # (B,)
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=difference.dtype, device=difference.device)
        if margin.ndim and margin.shape != difference.shape:
            raise ValueError(f"margin {tuple(margin.shape)} must be a number or one value per pair "
                             f"{tuple(difference.shape)}")
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coef is not None:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


# ------------------------------------------------------------------------------------------------
# Data → tensors, training, accuracy
# ------------------------------------------------------------------------------------------------
def encode_texts(texts: list[str], tokenizer, *, add_eos: bool = True, max_length: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Texts → right-padded ``input_ids`` and ``attention_mask`` (B, T). As TRL's RewardTrainer does
    for plain text, an eos closes each text (the score is read there), and each text is tokenized as a
    whole. A text over ``max_length`` tokens is an error, never cut."""
    require_pad_token(tokenizer)
    if not texts:
        raise ValueError("texts is empty: nothing to score")
    eos = tokenizer.eos_token
    ids = [tokenizer(t + eos if add_eos and eos and not t.endswith(eos) else t)["input_ids"] for t in texts]
    longest = max(len(x) for x in ids)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a text is {longest} tokens long, over max_length={max_length}")
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)  # (B, T)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        attention_mask[row, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_pairs(rows: list[dict], tokenizer, *, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Preference rows → one batch of 2B sequences, the B ``prompt + chosen`` first, then the B
    ``prompt + rejected`` (TRL's ``DataCollatorForPreference`` layout), plus ``margin`` (B,) when every
    row has one."""
    check_preference_rows(rows)
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    batch = encode_texts(texts, tokenizer, max_length=max_length)
    if all("margin" in r for r in rows):
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows])  # (B,)
    return batch


def pair_scores(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from a batch of :func:`encode_pairs`."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (2B,)
    return scores.chunk(2)


def reward_loss(center_coef: float | None = None) -> Callable[[nn.Module, dict], torch.Tensor]:
    """A ``loss_fn`` for ``training.train`` on :func:`encode_pairs` batches (its mean over the pairs)."""

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        r_chosen, r_rejected = pair_scores(model, batch)
        return bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"), center_coef)

    return loss_fn


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """r_θ of each text (an eos appended, as in training): (N,) on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = encode_texts(texts[i:i + batch_size], tokenizer)
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def as_reward_fn(model: nn.Module, tokenizer, *, batch_size: int = 64) -> Callable[[list[str], list[str]], torch.Tensor]:
    """``reward_fn(prompts, continuations) -> (B,) scores`` of ``prompt + continuation`` (an eos appended),
    the form ``ppo.run_ppo`` takes. Checks the tokenizer now, not at the first rollout."""
    require_pad_token(tokenizer)

    def reward_fn(prompts: list[str], continuations: list[str]) -> torch.Tensor:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        return score_texts(model, tokenizer, [p + c for p, c in zip(prompts, continuations)], batch_size=batch_size)

    return reward_fn


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, tokenizer, rows: list[dict], *, batch_size: int = 64) -> float:
    """Share of pairs whose chosen completion scores strictly higher than the rejected one (TRL's
    ``accuracy``; a tie counts as wrong, so a constant model scores 0, a random head ≈ 0.5)."""
    check_preference_rows(rows)
    chosen = score_texts(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], batch_size=batch_size)
    rejected = score_texts(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], batch_size=batch_size)
    return (chosen > rejected).float().mean().item()


def train_reward_model(model: RewardModel, tokenizer, rows: list[dict], *, steps: int, batch_size: int = 16,
                       lr: float = 3e-4, center_coef: float | None = None, seed: int = 0,
                       eval_rows: list[dict] | None = None, eval_every: int = 0, progress: bool = True,
                       desc: str = "reward model") -> History:
    """Fit ``model`` to preference ``rows`` with the Bradley–Terry loss (a ``margin`` column is used
    when every row has one), AdamW with warm-up and cosine decay through ``training.train``.

    With ``eval_rows`` and ``eval_every`` > 0, held-out :func:`pairwise_accuracy` is recorded every
    ``eval_every`` steps (and after the last) in ``history.extra["eval_step" / "eval_accuracy"]``.
    Batches reshuffle every epoch from ``seed``; the rows are checked and tokenized before step 1."""
    check_preference_rows(rows)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if eval_every and not eval_rows:
        raise ValueError("eval_every is set but eval_rows is empty: pass held-out rows to evaluate on")
    rng, order = random.Random(seed), []

    def batches(step: int) -> dict:
        while len(order) < (step + 1) * batch_size:  # one shuffled epoch at a time
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order.extend(epoch)
        return encode_pairs([rows[i] for i in order[step * batch_size:(step + 1) * batch_size]], tokenizer)

    def evaluate(step: int, model: nn.Module, history: History) -> None:
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            history.extra.setdefault("eval_step", []).append(step + 1)
            history.extra.setdefault("eval_accuracy", []).append(pairwise_accuracy(model, tokenizer, eval_rows))
            model.train()

    config = TrainConfig(steps=steps, lr=lr, warmup_steps=min(steps // 10, 20), seed=seed, progress=progress, desc=desc)
    return train(model, batches, config, loss_fn=reward_loss(center_coef), callback=evaluate)


# ------------------------------------------------------------------------------------------------
# The transformers / TRL format
# ------------------------------------------------------------------------------------------------
def to_transformers(model: RewardModel, tokenizer):
    """The same weights as an ``AutoModelForSequenceClassification`` (num_labels = 1, pad id set),
    the class TRL's RewardTrainer trains and the one a PPO/RLOO trainer loads as its reward model.

    Refuses a tokenizer whose pad token is its eos: transformers' class finds the last token as the
    last id ≠ pad, so it would read the score one token early (before the eos this model reads)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    require_pad_token(tokenizer)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "tokenizer.pad_token is its eos_token: transformers' sequence classifier takes the last token "
            "≠ pad as the one to score, so it would skip the eos this reward model scores and give other "
            "numbers. Give the tokenizer its own pad token before training "
            "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and resize the embeddings)")
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None  # set by save_pretrained from the class
    hf = AutoModelForSequenceClassification.from_config(config)
    prefix = hf.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in model.backbone.state_dict().items()}
    state["score.weight"] = model.score.weight.detach()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(hf, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device).eval()


def save_reward_model(model: RewardModel, tokenizer, directory: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer: a checkpoint that
    ``AutoModelForSequenceClassification.from_pretrained(directory)`` loads with the same scores."""
    if not isinstance(model, RewardModel):
        raise TypeError(f"save_reward_model saves a RewardModel (RewardModel(causal_lm, …)), got "
                        f"{type(model).__name__}")
    directory = Path(directory)
    to_transformers(model, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
