"""Instruction data → training tensors: the loss on the answer only.

* ``tokenize_prompt_and_completion`` — prompt/completion rows, labels −100 on prompt and padding;
* ``tokenize_messages`` — chat rows through the tokenizer's chat template, loss on the assistant's turns;
* ``FLAN_TEMPLATES`` / ``instruction_dataset`` — the corpus's tasks phrased by several templates, with
  held-out templates and a held-out task (Wei et al. 2021, FLAN); each row names its item (``item_key``),
  so "seen item" can be checked against a training set;
* ``pack_examples`` — several examples per row, position ids restarting, no cross-example attention;
* ``end_of_turn_token`` — the token the chat template closes an assistant turn with (where generation stops).

Labels equal TRL's ``SFTTrainer`` collator output (tests/test_sft.py).
"""

from __future__ import annotations

import torch


def tokenize_prompt_and_completion(prompts: list[str], completions: list[str], tokenizer,
                                   max_length: int | None = None, add_eos: bool = True,
                                   completion_only_loss: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (−100 on prompt and padding).
    ``completion_only_loss=False`` keeps the prompt's labels too (full-sequence loss; TRL's
    ``SFTConfig(completion_only_loss=False)``).

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
        prompt_labels = [-100] * len(prompt_ids) if completion_only_loss else prompt_ids
        rows.append((ids, prompt_labels + completion_ids))
    return pad_right(rows, tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------
# FLAN-style instruction data (Wei et al. 2021): existing tasks, each phrased by several templates
# ------------------------------------------------------------------------------------------------
# Per task: the templates used for training and one held out, never trained on, to test whether the
# model follows instructions it has not seen. Fields in braces come from each task's rows.
FLAN_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "sentiment": {"train": ["{story}\n\nIs the ending of this story happy or sad?",
                            "Read the story and say if it ends happy or sad.\n\n{story}",
                            "{story}\n\nHow does this story end: happy or sad?"],
                  "heldout": ["Classify the ending of this story as happy or sad.\n{story}"]},
    "opposite": {"train": ["Give the opposite of the word {word}.", "What is the opposite of {word}? One word.",
                           "Opposite of {word}:"],
                 "heldout": ["Name the word that means the opposite of {word}."]},
    "colour": {"train": ["Name the colour of the {thing}.", "Which colour is the {thing}? One word.",
                         "Colour of the {thing}:"],
               "heldout": ["Tell me what colour the {thing} has."]},
    "sound": {"train": ["What sound does a {animal} make?", "Name the sound of a {animal}.",
                        "Sound of a {animal}:"],
              "heldout": ["Which noise does a {animal} make? One word."]},
    "addition": {"train": ["Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} ="],
                 "heldout": ["What is the sum of {a} and {b}?"]},
    # A held-out task: never trained on in any phrasing.
    "baby": {"train": [], "heldout": ["What is a baby {animal} called? One word.", "Name the young of a {animal}."]},
}
HELDOUT_TASKS = ("baby",)


def render_template(template: str, row: dict) -> str:
    """Fill ``{field}`` slots from ``row``; a missing field is an error naming it (never left blank)."""
    import string

    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [f for f in fields if f not in row]
    if missing:
        raise KeyError(f"template {template!r} needs field(s) {missing}; the row has {sorted(row)}")
    return template.format(**row)


def task_rows(task: str, split: str, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """At most ``n`` rows of one task ({fields…, "answer"}), split by item so held-out items are never
    trained on. ``n=None``: every item of the fact tasks, 64 of the sentiment and addition tasks (whose
    items are thousands of stories and sums). ``n`` caps every task alike, so a dataset built with a
    smaller ``n`` keeps its task mix: tasks with fewer items than ``n`` give all they have (in their
    fixed order); the others give a ``seed``-chosen sample. The same (``n``, ``seed``) gives the same items."""
    import random

    from . import data

    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ValueError(f"n (rows per task) must be a positive int or None, got {n!r}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")

    def keep(key: str) -> bool:
        return data.split_of(f"flan:{task}:{key}", heldout_percent=25) == split

    def at_most_n(items: list[dict]) -> list[dict]:
        return items if n is None or n >= len(items) else random.Random(seed).sample(items, n)

    if task == "sentiment":
        return [{"story": r["story"], "answer": r["label"]}
                for r in data.sentiment_examples(n or 64, seed=seed, split=split)]
    if task == "opposite":
        return at_most_n([{"word": w, "answer": o} for w, o in data.OPPOSITES.items() if keep(w)])
    if task == "colour":
        return at_most_n([{"thing": t, "answer": c} for t, c in data.COLOURS.items() if keep(t)])
    if task == "sound":
        return at_most_n([{"animal": a, "answer": s} for a, s in data.SOUNDS.items() if keep(a)])
    if task == "baby":
        return at_most_n([{"animal": a, "answer": b} for a, b in data.BABIES.items()])
    if task == "addition":
        pairs = data.addition_pairs(split)
        picked = random.Random(seed).sample(pairs, min(n or 64, len(pairs)))
        return [{"a": a, "b": b, "answer": str(a + b)} for a, b in picked]
    raise KeyError(f"unknown task {task!r}; tasks are {sorted(FLAN_TEMPLATES)}")


def item_key(task: str, item: dict) -> str:
    """The identity of a task's item (its fields without the answer), e.g. ``'opposite {"word": "hot"}'``:
    what "this item was trained on" means, whatever template phrased it."""
    import json

    return f"{task} " + json.dumps({k: v for k, v in item.items() if k != "answer"}, sort_keys=True)


def instruction_dataset(tasks, split: str = "train", templates: str = "train", *, per_task: int = 64,
                        seed: int = 0) -> list[dict]:
    """Chat-format rows ``{"messages": [user, assistant], "task", "template", "item"}``: each task row
    (:func:`task_rows`, at most ``per_task`` per task) phrased by each of the chosen templates ("train" or
    "heldout"), shuffled with ``seed``. ``item`` is :func:`item_key`: the same for every phrasing of an item."""
    import random

    rows = []
    if templates not in ("train", "heldout"):
        raise ValueError(f"templates must be 'train' or 'heldout' (which phrasings to use), got {templates!r}")
    for task in tasks:
        if task not in FLAN_TEMPLATES:
            raise ValueError(f"unknown task {task!r} in tasks; tasks are {sorted(FLAN_TEMPLATES)}")
        chosen = FLAN_TEMPLATES[task][templates]
        if not chosen:
            raise ValueError(f"task {task!r} has no {templates!r} templates (it is a held-out task)")
        for item in task_rows(task, split, n=per_task, seed=seed):
            for t, template in enumerate(chosen):
                rows.append({"messages": [{"role": "user", "content": render_template(template, item)},
                                          # a leading space: this byte-level BPE knows " happy" as one
                                          # token, "happy" only as letters (h·a·ppy)
                                          {"role": "assistant", "content": " " + item["answer"]}],
                             "task": task, "template": f"{templates}{t}", "item": item_key(task, item)})
    random.Random(seed).shuffle(rows)
    return rows


# ------------------------------------------------------------------------------------------------
# Chat data: the assistant-only loss
# ------------------------------------------------------------------------------------------------
def tokenize_messages(conversations: list[list[dict]], tokenizer, max_length: int | None = None,
                      assistant_only_loss: bool = True) -> dict[str, torch.Tensor]:
    """Render each conversation with the tokenizer's chat template and keep the loss on the assistant's
    tokens only (the template's ``{% generation %}`` spans; TRL's ``assistant_only_loss=True``), or, with
    ``assistant_only_loss=False``, on every token (full-sequence loss, TRL's default for chat data).
    Right-padded like :func:`tokenize_prompt_and_completion`. Errors name the row."""
    rows = []
    for i, messages in enumerate(conversations):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                      for m in messages):
            raise ValueError(f"row {i}: a conversation is a list of {{'role', 'content'}} dicts, got {messages!r:.120}")
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        except Exception as e:  # the template's own error (e.g. an unknown role), with the row named
            raise ValueError(f"row {i}: the chat template cannot render this conversation: {e}") from e
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if 1 not in mask:
            raise ValueError(f"row {i}: no assistant tokens to learn from (no assistant message, or a chat "
                             f"template without {{% generation %}} markers)")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"row {i}: {len(ids)} tokens, over max_length={max_length}")
        rows.append((ids, [t if m or not assistant_only_loss else -100 for t, m in zip(ids, mask)]))
    return pad_right(rows, tokenizer.pad_token_id)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the tokenizer's chat template — ``<|end|>`` for the
    embedded model, ``<|im_end|>`` for ChatML (Qwen), ``<|eot_id|>`` for Llama 3 — so generation can
    stop there. Read off the template itself: render a reply and take the first special token after
    its text; a template that closes turns with plain text falls back to the eos token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so it has no end-of-turn token; set "
                         "tokenizer.chat_template, or stop generation with stop_strings")
    reply = "\u2063reply\u2063"  # text no template adds by itself
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
                                         tokenize=False)
    if reply not in text:
        raise ValueError("the chat template does not render the assistant's reply verbatim; pass stop_tokens "
                         "to generation yourself")
    after = tokenizer(text[text.index(reply) + len(reply):], add_special_tokens=False)["input_ids"]
    special = {*tokenizer.all_special_ids, *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)}
    closing = next((i for i in after if i in special), tokenizer.eos_token_id)
    if closing is None:
        raise ValueError("the chat template closes a turn with no special token and the tokenizer has no eos "
                         "token; stop generation with stop_strings")
    return tokenizer.convert_ids_to_tokens(closing)


def pad_right(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) rows → right-padded ``input_ids`` (pad_id), ``labels`` (−100) and ``attention_mask``."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------
def unpad(batch: dict[str, torch.Tensor]) -> list[dict[str, list[int]]]:
    """The examples of a right-padded batch, without their padding."""
    return [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
            for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]


def pack_examples(examples: list[dict[str, list[int]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack examples into rows of ``max_length`` tokens (best fit, longest first, like TRL's "bfd").

    Returns ``input_ids``, ``labels`` and ``position_ids`` (B, max_length) and no attention mask: position
    ids that restart at 0 tell transformers where each example begins, and its attention then stays
    inside each example (block-diagonal causal). The first token of every example gets label −100:
    it would otherwise be "predicted" from the previous example's last token. Padding at the end of a
    row has label −100. An example longer than ``max_length`` is an error, not cut.
    """
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) > max_length:
            raise ValueError(f"example {i} has {len(ex['input_ids'])} tokens, over the packing length {max_length}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        need = len(examples[i]["input_ids"])
        fits = [b for b in range(len(bins)) if space[b] >= need]
        if fits:
            b = min(fits, key=lambda b: space[b])  # best fit: the fullest row it still fits in
            bins[b].append(i)
            space[b] -= need
        else:
            bins.append([i])
            space.append(max_length - need)
    input_ids = torch.full((len(bins), max_length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(bins), max_length), -100, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(bins), max_length), dtype=torch.long)  # (B, T)
    for row, members in enumerate(bins):
        start = 0
        for i in members:
            ids, lab = examples[i]["input_ids"], list(examples[i]["labels"])
            lab[0] = -100  # nothing predicts an example's first token
            n = len(ids)
            input_ids[row, start:start + n] = torch.tensor(ids)
            labels[row, start:start + n] = torch.tensor(lab)
            position_ids[row, start:start + n] = torch.arange(n)
            start += n
        # padding: each pad token is its own one-token "example" (position 0), attended by nothing else
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
