"""Supervised fine-tuning (SFT) on instruction data, with the shared training loop.

    L(θ) = − Σ_t m_t log p_θ(y_t | y_<t)  /  Σ_t m_t        (m_t = 1 on completion / assistant tokens)

summed over every row of an optimizer step — all micro-batches and processes — as TRL does.

Data comes in TRL's formats — ``{"prompt", "completion"}`` or ``{"messages"}`` — and becomes the same
``input_ids`` / ``labels`` TRL's ``SFTTrainer`` builds (tests/test_sft.py checks labels and loss
against it). LoRA is the default; ``full_finetune=True`` trains every weight. ``packing=True`` packs
examples into rows with restarting position ids (no cross-example attention, no padding compute).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .templates import (end_of_turn_token, pack_examples, pad_right, tokenize_messages,
                        tokenize_prompt_and_completion, unpad)
from .training import History, LossSum, ShuffledEpochs, TrainConfig, causal_lm_loss_sum, train


def data_format(rows: list[dict]) -> str:
    """"messages" or "prompt-completion"; every row must have the fields of one format, else an error
    naming the first bad row."""
    if not rows:
        raise ValueError("no rows to train on")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"row {i}: a row is a dict ({{'prompt', 'completion'}} or {{'messages'}}), "
                            f"got {type(row).__name__} {row!r:.80}")
    kind = "messages" if "messages" in rows[0] else "prompt-completion"
    need = ("messages",) if kind == "messages" else ("prompt", "completion")
    for i, row in enumerate(rows):
        missing = [f for f in need if f not in row or row[f] is None]
        if missing:
            raise ValueError(f"row {i}: missing field(s) {missing} (rows are in the {kind!r} format, like row 0: "
                             f"{sorted(rows[0])})")
        if kind == "prompt-completion" and not str(row["completion"]).strip():
            raise ValueError(f"row {i}: empty completion (nothing to learn); drop the row or fill it")
    return kind


def tokenize_rows(rows: list[dict], tokenizer, max_length: int | None = None, *,
                  answer_only_loss: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` with the loss on the completion
    (prompt-completion rows; TRL's ``completion_only_loss``) or on the assistant's turns (messages rows;
    TRL's ``assistant_only_loss``). ``answer_only_loss=False``: the loss on every real token (the
    full-sequence loss), prompt included."""
    if data_format(rows) == "messages":
        return tokenize_messages([r["messages"] for r in rows], tokenizer, max_length=max_length,
                                 assistant_only_loss=answer_only_loss)
    return tokenize_prompt_and_completion([r["prompt"] for r in rows], [r["completion"] for r in rows],
                                          tokenizer, max_length=max_length, completion_only_loss=answer_only_loss)


def sft_loss(model: nn.Module, batch: dict) -> LossSum:
    """Cross-entropy summed over the label tokens, with their count: :func:`training.train` divides by
    the count of the whole accumulation window (TRL's token mean over the window); ``.mean()`` / ``.item()``
    is this batch's mean. ``use_cache=False``: a cache would make transformers skip the packed-sequence
    detection that keeps attention inside each packed example."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return causal_lm_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])


def sft_batches(rows: list[dict], tokenizer, batch_size: int, *, packing: bool = False,
                max_length: int | None = None, seed: int = 0, answer_only_loss: bool = True) -> Callable[[int], dict]:
    """Batch ``step`` → tensors; epochs reshuffle with ``seed``. Rows are tokenized once, up front, so
    errors surface before training starts. With ``packing`` each batch's examples are packed into rows
    of ``max_length`` tokens."""
    if packing and max_length is None:
        raise ValueError("packing needs max_length: the length of the packed rows")
    examples = unpad(tokenize_rows(rows, tokenizer, max_length=max_length, answer_only_loss=answer_only_loss))
    pad = tokenizer.pad_token_id
    order = ShuffledEpochs(len(examples), seed)

    def batch(step: int) -> dict:
        chosen = [examples[i] for i in order.take(step * batch_size, batch_size)]
        if packing:
            return pack_examples(chosen, max_length, pad)
        return pad_right([(e["input_ids"], e["labels"]) for e in chosen], pad)
    return batch


def run_sft(model: nn.Module, rows: list[dict], tokenizer, config: TrainConfig, *, batch_size: int = 16,
            full_finetune: bool = False, lora_targets="all-linear", r: int = 8, alpha: float = 16,
            packing: bool = False, max_length: int | None = None, answer_only_loss: bool = True, device=None,
            autocast_dtype=None) -> History:
    """SFT ``model`` in place on ``rows`` (LoRA by default) with the shared loop; returns the history.
    ``answer_only_loss=False`` trains on the whole sequence, prompt included (:func:`tokenize_rows`)."""
    if not full_finetune:
        from .lora import add_lora

        add_lora(model, lora_targets, r=r, alpha=alpha)
    batches = sft_batches(rows, tokenizer, batch_size, packing=packing, max_length=max_length, seed=config.seed,
                          answer_only_loss=answer_only_loss)
    return train(model, batches, config, loss_fn=sft_loss, device=device, autocast_dtype=autocast_dtype)


def chat_prompt(messages: list[dict], tokenizer) -> str:
    """The text a chat model sees before answering: the conversation up to the last user turn plus the
    assistant header (``add_generation_prompt``), without the BOS the tokenizer adds again."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token or "")


def instruction_replies(model: nn.Module, tokenizer, rows: list[dict], *, max_new_tokens: int = 8) -> list[str]:
    """The greedy reply to each chat row's conversation without its last (assistant) message, up to the
    end of its turn or first line, stripped. The turn ends at the chat template's own end-of-turn token
    (:func:`templates.end_of_turn_token`), whatever the model."""
    from .evaluate import generate

    prompts = [chat_prompt(r["messages"][:-1], tokenizer) for r in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=("\n",),
                       stop_tokens=(end_of_turn_token(tokenizer),))
    return [a.strip() for a in answers]


def instruction_accuracy(model: nn.Module, tokenizer, rows: list[dict], *, max_new_tokens: int = 8) -> float:
    """Exact match (case-insensitive) of the greedy reply (:func:`instruction_replies`) with the reference
    assistant reply, over chat rows ``{"messages": [user, assistant]}``."""
    answers = instruction_replies(model, tokenizer, rows, max_new_tokens=max_new_tokens)
    return sum(a.lower() == r["messages"][-1]["content"].strip().lower() for a, r in zip(answers, rows)) / len(rows)
