"""Lesson 05 (instruction tuning): right answers, and plausible wrong answers with the phrase the feedback must contain."""


def chat_ok(template, row):
    return [{"role": "user", "content": template.format(**row)}, {"role": "assistant", "content": " " + row["answer"]}]


def labels_ok(prompt, completion, eos, pad, width):
    ids = prompt + completion + [eos]
    n = len(ids)
    return (ids + [pad] * (width - n), [-100] * len(prompt) + completion + [eos] + [-100] * (width - n),
            [1] * n + [0] * (width - n))


def mask_ok(tokens):
    mask, inside = [], False
    for i, t in enumerate(tokens):
        if i >= 2 and tokens[i - 2] == "<|assistant|>":
            inside = True
        mask.append(int(inside))
        if t == "<|end|>":
            inside = False
    return mask


def pack_ok(a, b, max_length, pad):
    ids = a["input_ids"] + b["input_ids"]
    labels = [-100] + a["labels"][1:] + [-100] + b["labels"][1:]
    positions = list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"])))
    n = max_length - len(ids)
    return {"input_ids": ids + [pad] * n, "labels": labels + [-100] * n, "position_ids": positions + [0] * n}


def pack_rows_given(examples, max_length, pad_id, restart=False, mask_first=False, one_per_row=False, pad_label=-100):
    """The notebook's given packing (best fit, longest first) with its two planted bugs; the switches fix them."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows, space = [], []
    for i in order:
        need = len(examples[i]["input_ids"])
        fits = [] if one_per_row else [r for r in range(len(rows)) if space[r] >= need]
        if fits:
            r = min(fits, key=lambda r: space[r])
            rows[r].append(i)
            space[r] -= need
        else:
            rows.append([i])
            space.append(max_length - need)
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += ([-100] + examples[i]["labels"][1:]) if mask_first else examples[i]["labels"]
            positions += list(range(len(examples[i]["input_ids"]))) if restart else list(range(len(positions), len(ids)))
        padding = max_length - len(ids)
        packed["input_ids"].append(ids + [pad_id] * padding)
        packed["labels"].append(labels + [pad_label] * padding)
        packed["position_ids"].append(positions + [0] * padding)
    return packed


def pack_rows_ok(examples, max_length, pad_id):
    return pack_rows_given(examples, max_length, pad_id, restart=True, mask_first=True)


def pack_rows_positions_unfixed(examples, max_length, pad_id):
    return pack_rows_given(examples, max_length, pad_id, mask_first=True)


def pack_rows_labels_unfixed(examples, max_length, pad_id):
    return pack_rows_given(examples, max_length, pad_id, restart=True)


def pack_rows_one_per_row(examples, max_length, pad_id):
    return pack_rows_given(examples, max_length, pad_id, restart=True, mask_first=True, one_per_row=True)


def pack_rows_pad_labels(examples, max_length, pad_id):
    return pack_rows_given(examples, max_length, pad_id, restart=True, mask_first=True, pad_label=pad_id)


RIGHT = {"05.1": chat_ok, "05.2": labels_ok, "05.3": mask_ok, "05.4": pack_ok, "05.5": pack_rows_ok}


def chat_no_space(template, row):
    return [{"role": "user", "content": template.format(**row)}, {"role": "assistant", "content": row["answer"]}]


def chat_unfilled(template, row):
    return [{"role": "user", "content": template}, {"role": "assistant", "content": " " + row["answer"]}]


def chat_silent_missing(template, row):
    import collections

    return [{"role": "user", "content": template.format_map(collections.defaultdict(str, row))},
            {"role": "assistant", "content": " " + row["answer"]}]


def chat_answer_in_prompt(template, row):
    return [{"role": "user", "content": template.format(**row) + " " + row["answer"]},
            {"role": "assistant", "content": " " + row["answer"]}]


def labels_off_by_one(prompt, completion, eos, pad, width):
    ids, labels, mask = labels_ok(prompt, completion, eos, pad, width)
    labels[len(prompt)] = -100
    return ids, labels, mask


def labels_pad_not_masked(prompt, completion, eos, pad, width):
    ids, labels, mask = labels_ok(prompt, completion, eos, pad, width)
    return ids, [pad if m == 0 else lab for lab, m in zip(labels, mask)], mask


def labels_no_eos(prompt, completion, eos, pad, width):
    ids = prompt + completion
    n = len(ids)
    return ids + [pad] * (width - n), [-100] * len(prompt) + completion + [-100] * (width - n), [1] * n + [0] * (width - n)


def labels_eos_untrained(prompt, completion, eos, pad, width):
    ids, labels, mask = labels_ok(prompt, completion, eos, pad, width)
    labels[len(prompt) + len(completion)] = -100
    return ids, labels, mask


def labels_prompt_unmasked(prompt, completion, eos, pad, width):
    ids, labels, mask = labels_ok(prompt, completion, eos, pad, width)
    return ids, prompt + labels[len(prompt):], mask


def mask_with_header(tokens):
    mask = mask_ok(tokens)
    for i, t in enumerate(tokens):
        if t == "<|assistant|>":
            mask[i] = mask[i + 1] = 1
    return mask


def mask_without_end(tokens):
    return [0 if t == "<|end|>" else m for t, m in zip(tokens, mask_ok(tokens))]


def mask_first_turn_only(tokens):
    mask, done = mask_ok(tokens), False
    for i, t in enumerate(tokens):
        if done:
            mask[i] = 0
        if mask[i] and t == "<|end|>":
            done = True
    return mask


def mask_everything(tokens):
    return [0] + [1] * (len(tokens) - 1)


def pack_positions_continue(a, b, max_length, pad):
    out = pack_ok(a, b, max_length, pad)
    n = len(a["input_ids"]) + len(b["input_ids"])
    out["position_ids"] = list(range(n)) + [0] * (max_length - n)
    return out


def pack_seam_unmasked(a, b, max_length, pad):
    out = pack_ok(a, b, max_length, pad)
    out["labels"][len(a["input_ids"])] = b["labels"][0]
    return out


def pack_pad_labels(a, b, max_length, pad):
    out = pack_ok(a, b, max_length, pad)
    n = len(a["input_ids"]) + len(b["input_ids"])
    out["labels"] = out["labels"][:n] + [pad] * (max_length - n)
    return out


CATALOGUE = [
    ("05.1", chat_no_space, "leading space"), ("05.1", chat_unfilled, "unfilled"),
    ("05.1", chat_silent_missing, "must raise"), ("05.1", chat_answer_in_prompt, "leaked"),
    ("05.2", labels_off_by_one, "off-by-one"), ("05.2", labels_pad_not_masked, "padding not masked"),
    ("05.2", labels_no_eos, "EOS"), ("05.2", labels_eos_untrained, "EOS not trained"),
    ("05.2", labels_prompt_unmasked, "prompt is not masked"),
    ("05.3", mask_with_header, "header"), ("05.3", mask_without_end, "<|end|>"),
    ("05.3", mask_first_turn_only, "every assistant turn"), ("05.3", mask_everything, "must be 0"),
    ("05.4", pack_positions_continue, "not restarted"), ("05.4", pack_seam_unmasked, "second example"),
    ("05.4", pack_pad_labels, "padding"),
    ("05.5", pack_rows_given, "both planted bugs"),
    ("05.5", pack_rows_positions_unfixed, "do not restart"), ("05.5", pack_rows_labels_unfixed, "keeps its label"),
    ("05.5", pack_rows_one_per_row, "rows where"), ("05.5", pack_rows_pad_labels, "padding must have label"),
]
