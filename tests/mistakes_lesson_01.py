"""Lesson 01 (soft prompts): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import torch


def prepend_ok(embeds, mask, labels, prompt):
    B, NV = embeds.shape[0], prompt.shape[0]
    return (torch.cat([prompt.expand(B, -1, -1), embeds], 1), torch.cat([torch.ones(B, NV, dtype=mask.dtype), mask], 1),
            torch.cat([torch.full((B, NV), -100, dtype=labels.dtype), labels], 1))


def split_ok(prefix, layers, kv_heads):
    B, NV, W = prefix.shape
    kv = prefix.reshape(B, NV, 2 * layers, kv_heads, W // (2 * layers * kv_heads)).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def text_ok(ids, nv):
    return [ids[i % len(ids)] for i in range(nv)]


RIGHT = {"01.1": prepend_ok, "01.2": split_ok, "01.3": text_ok}


def prepend_after(embeds, mask, labels, prompt):
    e, m, lab = prepend_ok(embeds, mask, labels, prompt)
    return torch.cat([embeds, prompt.expand(embeds.shape[0], -1, -1)], 1), m, lab


def prepend_mask_short(embeds, mask, labels, prompt):
    e, _, lab = prepend_ok(embeds, mask, labels, prompt)
    return e, mask, lab


def prepend_mask_zeros(embeds, mask, labels, prompt):
    e, m, lab = prepend_ok(embeds, mask, labels, prompt)
    m[:, :prompt.shape[0]] = 0
    return e, m, lab


def prepend_labels_zero(embeds, mask, labels, prompt):
    e, m, _ = prepend_ok(embeds, mask, labels, prompt)
    return e, m, torch.cat([torch.zeros(embeds.shape[0], prompt.shape[0], dtype=labels.dtype), labels], 1)


def prepend_labels_short(embeds, mask, labels, prompt):
    e, m, _ = prepend_ok(embeds, mask, labels, prompt)
    return e, m, labels


def split_query_heads(prefix, layers, kv_heads):
    return split_ok(prefix, layers, 2 * kv_heads)  # num_attention_heads (= 2 × kv heads here)


def split_no_permute(prefix, layers, kv_heads):
    B, NV, W = prefix.shape
    kv = prefix.reshape(B, NV, 2 * layers, kv_heads, -1)
    return [(kv[:, :, 2 * i], kv[:, :, 2 * i + 1]) for i in range(layers)]


def split_keys_first(prefix, layers, kv_heads):
    B, NV, W = prefix.shape
    kv = prefix.reshape(B, NV, 2, layers, kv_heads, -1).permute(2, 3, 0, 4, 1, 5)
    return [(kv[0, i], kv[1, i]) for i in range(layers)]


def split_swapped(prefix, layers, kv_heads):
    return [(v, k) for k, v in split_ok(prefix, layers, kv_heads)]


def text_zero_pad(ids, nv):
    return (ids + [0] * nv)[:nv]


def text_no_cut(ids, nv):
    return ids if len(ids) >= nv else text_ok(ids, nv)


def text_interleave(ids, nv):
    reps = -(-nv // len(ids))
    return [t for t in ids for _ in range(reps)][:nv]


CATALOGUE = [
    ("01.1", prepend_after, "prepended"), ("01.1", prepend_mask_short, "wrong mask length"),
    ("01.1", prepend_mask_zeros, "mask 1"), ("01.1", prepend_labels_zero, "−100"),
    ("01.1", prepend_labels_short, "prepend"),
    ("01.2", split_query_heads, "num_key_value_heads"), ("01.2", split_no_permute, "transpose"),
    ("01.2", split_keys_first, "[K_0 | V_0"), ("01.2", split_swapped, "swapped"),
    ("01.3", text_zero_pad, "padded with 0"), ("01.3", text_no_cut, "cut"), ("01.3", text_interleave, "in place"),
]
