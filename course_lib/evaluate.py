"""Measurements every lesson repeats: language-model loss on texts, generation, addition accuracy.

Model-agnostic: they take whatever `(model, tokenizer)` `course_lib.models.load_model` returns.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .data import NAMES


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _text_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens, in float32. A prompt-tuned model also returns logits for its
    virtual tokens, which come first (B, NV+T, V); its last T positions are the text's."""
    if logits.shape[1] < ids.shape[1]:
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions, fewer than the "
                         f"{ids.shape[1]} input tokens")
    return logits[:, logits.shape[1] - ids.shape[1]:].float()


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 256) -> float:
    """Mean next-token cross-entropy (nats/token) over all real tokens of ``texts``.

    Token-weighted, so it does not depend on how the texts are batched. Texts longer than
    ``max_length`` tokens are an error (rather than silently truncated).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
        if enc["input_ids"].shape[1] > max_length:
            raise ValueError(f"a text is {enc['input_ids'].shape[1]} tokens long, over max_length={max_length}")
        ids = enc["input_ids"].to(_device(model))
        mask = enc["attention_mask"].to(_device(model))
        logits = _text_logits(model(input_ids=ids, attention_mask=mask).logits, ids)  # (B, T, V)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                           ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 40,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             stop_strings: tuple[str, ...] = (), stop_tokens: tuple[str, ...] = ()) -> list[str]:
    """Continue each prompt; returns only the new text (special tokens removed). Generation of a row
    ends at the tokenizer's eos or at any of ``stop_tokens`` (e.g. a chat template's end-of-turn)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs left padding
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(_device(model))
        with torch.random.fork_rng(devices=[] if _device(model).type == "cpu" else [_device(model)]):
            torch.manual_seed(seed)  # sampling is reproducible, and the caller's RNG is left alone
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=[tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(stop_tokens))])
    finally:
        tokenizer.padding_side = side
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
    """Sum of log p(completion tokens | prompt) per row, shape (N,)."""
    from .templates import tokenize_prompt_and_completion

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenize_prompt_and_completion(prompts[i:i + batch_size], completions[i:i + batch_size],
                                               tokenizer, add_eos=False)
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        logits = _text_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"])  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
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
