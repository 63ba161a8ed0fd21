"""Measurements every lesson repeats: language-model loss on texts, generation, addition accuracy.

Model-agnostic: they take whatever `(model, tokenizer)` `course_lib.models.load_model` returns.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .data import NAMES
from .training import causal_lm_loss_sum, text_logits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """Pad on ``side`` inside the block and restore the tokenizer's own side after it."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 256) -> float:
    """Mean next-token cross-entropy (nats/token) over all real tokens of ``texts``.

    Token-weighted, so it does not depend on how the texts are batched, nor on the tokenizer's padding
    side: the texts are padded on the right, so each starts at position 0 (right for any position
    scheme; Llama, given no position_ids, numbers positions 0…T−1 whatever the mask says), and a token
    is scored only when the token it is predicted from is real too — never the first token from a pad.
    Texts longer than ``max_length`` tokens are an error (rather than silently truncated).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        with padding_side(tokenizer, "right"):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
        if enc["input_ids"].shape[1] > max_length:
            raise ValueError(f"a text is {enc['input_ids'].shape[1]} tokens long, over max_length={max_length}")
        ids = enc["input_ids"].to(_device(model))  # (B, T)
        mask = enc["attention_mask"].to(_device(model))  # (B, T)
        predicted_from_pad = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0  # (B, T)
        labels = ids.masked_fill((mask == 0) | predicted_from_pad, -100)  # (B, T)
        summed = causal_lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        total += summed.total.item()
        count += int(summed.count)
    model.train(was_training)
    return total / count


def stop_token_ids(tokenizer, stop_tokens: tuple[str, ...]) -> list[int]:
    """The ids of ``stop_tokens``, each a single token of the vocabulary; any other is a ValueError
    naming it and the tokenizer's special tokens (no silent None, no silent unknown-token id)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in stop_tokens if t not in vocab]
    if missing:
        raise ValueError(f"stop_tokens {missing} are not tokens of this tokenizer; its special tokens are "
                         f"{tokenizer.all_special_tokens}. Pass one of them (templates.end_of_turn_token(tokenizer) "
                         f"is the chat template's end of turn), or pass text as stop_strings")
    return [vocab[t] for t in stop_tokens]


def _eos_ids(model: nn.Module, tokenizer, stop_tokens: tuple[str, ...]) -> list[int]:
    """Where generation stops: the model's own eos ids (generation_config: chat models list their
    end-of-turn there), the tokenizer's eos, and ``stop_tokens``."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    ids = [*config_eos, tokenizer.eos_token_id, *stop_token_ids(tokenizer, stop_tokens)]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 40,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             stop_strings: tuple[str, ...] = (), stop_tokens: tuple[str, ...] = ()) -> list[str]:
    """Continue each prompt; returns only the new text (special tokens removed). Generation of a row
    ends at an eos (the model's generation config and the tokenizer's) or at any of ``stop_tokens``
    (token strings, e.g. ``templates.end_of_turn_token(tokenizer)``; one the vocabulary lacks is a
    ValueError). The text is then cut at the first of ``stop_strings``."""
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    stop_tokens = (stop_tokens,) if isinstance(stop_tokens, str) else tuple(stop_tokens)
    eos_ids = _eos_ids(model, tokenizer, stop_tokens)
    was_training = model.training
    model.eval()
    with padding_side(tokenizer, "left"):  # decoder-only generation needs left padding
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(_device(model))
    with torch.random.fork_rng(devices=[] if _device(model).type == "cpu" else [_device(model)]):
        torch.manual_seed(seed)  # sampling is reproducible, and the caller's RNG is left alone
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for stop in stop_strings:
        texts = [t.split(stop)[0] for t in texts]
    return texts


def name_consistency(model, tokenizer, openers: list[str]) -> float:
    """Share of greedy story continuations that keep the opener's hero: the name is used again and
    no other character name appears before it. Tests that the model tracks who the story is about."""
    hits = 0
    for opener, text in zip(openers, generate(model, tokenizer, openers, max_new_tokens=30)):
        hero = next(name for name in NAMES if name in opener)
        first = min(((text.find(n), n) for n in NAMES if n in text), default=(-1, None))[1]
        hits += first == hero
    return hits / len(openers)


def parse_number(text: str) -> int | None:
    match = re.match(r"\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def addition_accuracy(model: nn.Module, tokenizer, pairs: list[tuple[int, int]], *, batch_size: int = 128) -> float:
    """Exact-match accuracy of greedy answers to ``Q: What is a + b?\\nA:``."""
    from .data import addition_prompt

    correct = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        answers = generate(model, tokenizer, [addition_prompt(a, b) for a, b in chunk], max_new_tokens=5)
        correct += sum(parse_number(ans) == a + b for ans, (a, b) in zip(answers, chunk))
    return correct / len(pairs)


@torch.no_grad()
def completion_logprobs(model: nn.Module, tokenizer, prompts: list[str], completions: list[str],
                        *, batch_size: int = 64) -> torch.Tensor:
    """Sum of log p(completion tokens | prompt) per row, shape (N,). The rows are built by
    ``templates.tokenize_prompt_and_completion`` (right-padded whatever the tokenizer's padding side)."""
    from .rl import token_logprobs
    from .templates import tokenize_prompt_and_completion

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenize_prompt_and_completion(prompts[i:i + batch_size], completions[i:i + batch_size],
                                               tokenizer, add_eos=False)
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        ids = batch["input_ids"]  # (B, T)
        logits = text_logits(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids.shape[1])
        labels = batch["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        token_logp = token_logprobs(logits[:, :-1], labels.clamp(min=0))  # (B, T-1)
        out.append((token_logp * mask).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def choice_accuracy(model: nn.Module, tokenizer, prompts: list[str], labels: list[str],
                    choices: tuple[str, ...], *, prefix: str = " ") -> float:
    """Zero-shot classification: the choice whose text is most likely after the prompt wins."""
    scores = torch.stack([completion_logprobs(model, tokenizer, prompts, [prefix + c] * len(prompts))
                          for c in choices], dim=-1)  # (N, C)
    predicted = [choices[i] for i in scores.argmax(-1).tolist()]
    return sum(p == y for p, y in zip(predicted, labels)) / len(labels)
