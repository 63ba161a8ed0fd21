"""Turning (prompt, completion) pairs into training tensors with the loss on the completion only.

Lesson 05 grows this module (FLAN-style templates, chat templates, packing); lesson 00 already
needs its core: `tokenize_prompt_and_completion`.
"""

from __future__ import annotations

import torch


def tokenize_prompt_and_completion(prompts: list[str], completions: list[str], tokenizer,
                                   max_length: int | None = None, add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (−100 on prompt and padding).

    The prompt is tokenized alone and the completion's ids follow it, so the boundary is exact
    (tokenizing the concatenated text could merge the last prompt and first completion characters).
    An eos closes each completion so the model learns to stop. A row over ``max_length`` is an error
    naming the row, never silently truncated.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not completion:
            raise ValueError(f"row {i}: empty completion (nothing to learn); drop the row or fill it")
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if add_eos:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"row {i}: {len(ids)} tokens (prompt {len(prompt_ids)}), over max_length={max_length}")
        rows.append((ids, [-100] * len(prompt_ids) + completion_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
