"""Lesson 01 (soft prompts): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import inspect
import warnings

import torch
from transformers import DynamicCache


def prepend_ok(embeds, mask, labels, prompts, task_ids):
    B, NV = embeds.shape[0], prompts.shape[1]
    return (torch.cat([prompts[task_ids], embeds], 1), torch.cat([torch.ones(B, NV, dtype=mask.dtype), mask], 1),
            torch.cat([torch.full((B, NV), -100, dtype=labels.dtype), labels], 1))


def split_ok(prefix, layers, kv_heads):
    B, NV, W = prefix.shape
    kv = prefix.reshape(B, NV, 2 * layers, kv_heads, W // (2 * layers * kv_heads)).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def text_ok(ids, nv):
    if len(ids) > nv:
        warnings.warn(f"{len(ids) - nv} tokens of the description are cut")
    return [ids[i % len(ids)] for i in range(nv)]


def _cache_kwarg(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_ok(model, input_ids, attention_mask, prefix, *, heads=None, swap=False, extend_mask=True,
              positions_from_zero=False):
    cfg = model.config
    B, L = input_ids.shape
    NV = prefix.shape[0]
    kv_heads = heads or cfg.num_key_value_heads
    kv = prefix.expand(B, -1, -1).reshape(B, NV, 2 * cfg.num_hidden_layers, kv_heads, -1).permute(2, 0, 3, 1, 4)
    pairs = [(kv[2 * i + 1], kv[2 * i]) if swap else (kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_hidden_layers)]
    mask = torch.cat([attention_mask.new_ones(B, NV), attention_mask], 1) if extend_mask else attention_mask
    extra = {"position_ids": torch.arange(L).expand(B, -1)} if positions_from_zero else {}
    return model(input_ids=input_ids, attention_mask=mask, **{_cache_kwarg(model): DynamicCache(pairs)}, **extra).logits


def lstm_ok(embedding, lstm, mlp_head):
    return mlp_head(lstm(embedding.unsqueeze(0))[0])[0]


RIGHT = {"01.1": prepend_ok, "01.2": split_ok, "01.3": text_ok, "01.4": prefix_ok, "01.5": lstm_ok}


# 01.1
def prepend_after(embeds, mask, labels, prompts, task_ids):
    e, m, lab = prepend_ok(embeds, mask, labels, prompts, task_ids)
    return torch.cat([embeds, prompts[task_ids]], 1), m, lab


def prepend_mask_short(embeds, mask, labels, prompts, task_ids):
    e, _, lab = prepend_ok(embeds, mask, labels, prompts, task_ids)
    return e, mask, lab


def prepend_mask_zeros(embeds, mask, labels, prompts, task_ids):
    e, m, lab = prepend_ok(embeds, mask, labels, prompts, task_ids)
    m[:, :prompts.shape[1]] = 0
    return e, m, lab


def prepend_labels_zero(embeds, mask, labels, prompts, task_ids):
    e, m, _ = prepend_ok(embeds, mask, labels, prompts, task_ids)
    return e, m, torch.cat([torch.zeros(embeds.shape[0], prompts.shape[1], dtype=labels.dtype), labels], 1)


def prepend_labels_short(embeds, mask, labels, prompts, task_ids):
    e, m, _ = prepend_ok(embeds, mask, labels, prompts, task_ids)
    return e, m, labels


def prepend_first_task(embeds, mask, labels, prompts, task_ids):
    return prepend_ok(embeds, mask, labels, prompts, torch.zeros_like(task_ids))


def prepend_by_position(embeds, mask, labels, prompts, task_ids):
    return prepend_ok(embeds, mask, labels, prompts, torch.arange(embeds.shape[0]))


# 01.2
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


# 01.3
def text_zero_pad(ids, nv):
    text_ok(ids, nv)
    return (ids + [0] * nv)[:nv]


def text_no_cut(ids, nv):
    return ids if len(ids) >= nv else text_ok(ids, nv)


def text_interleave(ids, nv):
    text_ok(ids, nv)
    reps = -(-nv // len(ids))
    return [t for t in ids for _ in range(reps)][:nv]


def text_silent_cut(ids, nv):
    return [ids[i % len(ids)] for i in range(nv)]


def text_always_warns(ids, nv):
    warnings.warn("initialising from text")
    return text_silent_cut(ids, nv)


# 01.4
def prefix_mask_not_extended(model, input_ids, attention_mask, prefix):
    return prefix_ok(model, input_ids, attention_mask, prefix, extend_mask=False)


def prefix_query_heads(model, input_ids, attention_mask, prefix):
    return prefix_ok(model, input_ids, attention_mask, prefix, heads=model.config.num_attention_heads)


def prefix_swapped(model, input_ids, attention_mask, prefix):
    return prefix_ok(model, input_ids, attention_mask, prefix, swap=True)


def prefix_positions_from_zero(model, input_ids, attention_mask, prefix):
    return prefix_ok(model, input_ids, attention_mask, prefix, positions_from_zero=True)


def prefix_mask_zeros(model, input_ids, attention_mask, prefix):
    B, NV = input_ids.shape[0], prefix.shape[0]
    cfg = model.config
    kv = prefix.expand(B, -1, -1).reshape(B, NV, 2 * cfg.num_hidden_layers, cfg.num_key_value_heads, -1).permute(2, 0, 3, 1, 4)
    cache = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_hidden_layers)])
    mask = torch.cat([attention_mask.new_zeros(B, NV), attention_mask], 1)
    return model(input_ids=input_ids, attention_mask=mask, **{_cache_kwarg(model): cache}).logits


def prefix_in_sequence(model, input_ids, attention_mask, prefix):
    """Treats the prefix like prompt tuning: it cannot even be fed as embeddings (wrong width), so the
    learner slices the first layer's keys as if they were embeddings — logits gain NV positions."""
    B, NV = input_ids.shape[0], prefix.shape[0]
    embeds = torch.cat([prefix[:, :model.config.hidden_size].expand(B, -1, -1), model.get_input_embeddings()(input_ids)], 1)
    return model(inputs_embeds=embeds, attention_mask=torch.cat([attention_mask.new_ones(B, NV), attention_mask], 1)).logits


# 01.5
def lstm_no_mlp(embedding, lstm, mlp_head):
    return lstm(embedding.unsqueeze(0))[0][0]


def lstm_each_alone(embedding, lstm, mlp_head):
    return mlp_head(lstm(embedding.unsqueeze(1))[0])[:, 0]


def lstm_kept_batch(embedding, lstm, mlp_head):
    return mlp_head(lstm(embedding.unsqueeze(0))[0])


CATALOGUE = [
    ("01.1", prepend_after, "prepended"), ("01.1", prepend_mask_short, "wrong mask length"),
    ("01.1", prepend_mask_zeros, "mask 1"), ("01.1", prepend_labels_zero, "−100"),
    ("01.1", prepend_labels_short, "prepend"), ("01.1", prepend_first_task, "its own task"),
    ("01.1", prepend_by_position, "the row's position"),
    ("01.2", split_query_heads, "num_key_value_heads"), ("01.2", split_no_permute, "transpose"),
    ("01.2", split_keys_first, "[K_0 | V_0"), ("01.2", split_swapped, "swapped"),
    ("01.3", text_zero_pad, "padded with 0"), ("01.3", text_no_cut, "cut"), ("01.3", text_interleave, "in place"),
    ("01.3", text_silent_cut, "without a warning"), ("01.3", text_always_warns, "warn only when it is cut"),
    ("01.4", prefix_mask_not_extended, "not extended"), ("01.4", prefix_query_heads, "heads and kv heads confused"),
    ("01.4", prefix_swapped, "swapped"), ("01.4", prefix_positions_from_zero, "positions from 0"),
    ("01.4", prefix_mask_zeros, "mask 0"), ("01.4", prefix_in_sequence, "lives in the cache"),
    ("01.5", lstm_no_mlp, "mlp_head"), ("01.5", lstm_each_alone, "ONE sequence"), ("01.5", lstm_kept_batch, "batch axis"),
]
