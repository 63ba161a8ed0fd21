"""Hidden checks for lesson 01 (soft prompts). References: course_lib.soft_prompts, itself tested
bit for bit against peft's prompt tuning and prefix tuning."""

from __future__ import annotations

import torch

from . import CheckFailed, Exercise, expect


# ---------------------------------------------------------------------------------------------
# 01.1 prepend_virtual_tokens(inputs_embeds, attention_mask, labels, prompt) -> (embeds, mask, labels)
# ---------------------------------------------------------------------------------------------
def check_prepend_virtual_tokens(prepend_virtual_tokens) -> str:
    from ..soft_prompts import prepend_virtual_tokens as reference

    gen = torch.Generator().manual_seed(0)
    B, L, NV, d = 3, 5, 4, 6
    embeds = torch.randn(B, L, d, generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0  # a right-padded row
    labels = torch.randint(0, 50, (B, L), generator=gen).masked_fill(mask == 0, -100)
    prompt = torch.randn(NV, d, generator=gen)
    got = prepend_virtual_tokens(embeds.clone(), mask.clone(), labels.clone(), prompt.clone())
    if not (isinstance(got, tuple) and len(got) == 3):
        raise CheckFailed("return a tuple (inputs_embeds, attention_mask, labels)")
    got_embeds, got_mask, got_labels = got
    want_embeds, want_mask, want_labels = reference(embeds, mask, labels, prompt)
    if tuple(got_mask.shape) == (B, L):
        raise CheckFailed(f"the attention mask still has length {L}: it needs {NV} more entries, one per "
                          f"virtual token, or the model cannot attend to the prompt (wrong mask length)")
    if tuple(got_labels.shape) == (B, L):
        raise CheckFailed(f"the labels still have length {L}: prepend {NV} labels so they line up with the "
                          f"{NV + L} positions of inputs_embeds")
    expect(got_embeds, want_embeds, what="inputs_embeds", mistakes={
        "the virtual tokens went after the text: a soft prompt is prepended, [P ; E(x)]":
            torch.cat([embeds, prompt.expand(B, -1, -1)], 1),
    })
    expect(got_mask, want_mask, what="attention_mask", mistakes={
        "the virtual positions got mask 0: the model must attend to them (mask 1)":
            torch.cat([torch.zeros(B, NV, dtype=mask.dtype), mask], 1),
        "the mask was appended instead of prepended: the prompt comes first":
            torch.cat([mask, torch.ones(B, NV, dtype=mask.dtype)], 1),
    })
    expect(got_labels, want_labels, what="labels", mistakes={
        "labels on the virtual positions are not −100: nothing is predicted there, so pad them with −100 "
        "(not 0) and the loss ignores them": torch.cat([torch.zeros(B, NV, dtype=labels.dtype), labels], 1),
        "the labels were appended instead of prepended: they must line up with [P ; E(x)]":
            torch.cat([labels, torch.full((B, NV), -100)], 1),
    })
    return "[P ; E(x)], mask 1 and label −100 on the prompt"


# ---------------------------------------------------------------------------------------------
# 01.2 split_prefix(prefix, num_layers, num_key_value_heads) -> [(keys, values)] per layer
# ---------------------------------------------------------------------------------------------
def check_split_prefix(split_prefix) -> str:
    from ..soft_prompts import split_prefix as reference

    B, NV, layers, kv_heads, head_dim = 2, 3, 2, 2, 4  # a GQA model: 4 query heads share 2 kv heads
    width = layers * 2 * kv_heads * head_dim
    prefix = torch.arange(B * NV * width, dtype=torch.float32).view(B, NV, width)
    got = split_prefix(prefix.clone(), layers, kv_heads)
    want = reference(prefix, layers, kv_heads)
    if not (isinstance(got, (list, tuple)) and len(got) == layers):
        raise CheckFailed(f"return one (keys, values) pair per layer: a list of {layers}")
    keys, values = got[0]
    if tuple(keys.shape) == (B, 2 * kv_heads, NV, head_dim // 2):
        raise CheckFailed("the heads are those of the queries: a GQA model caches num_key_value_heads heads, "
                          "so split the prefix into kv heads (num_attention_heads would halve the head size)")
    if tuple(keys.shape) != (B, kv_heads, NV, head_dim):
        if tuple(keys.shape) == (B, NV, kv_heads, head_dim):
            raise CheckFailed(f"keys are (B, NV, heads, head_dim) {tuple(keys.shape)}: attention expects "
                              f"(B, heads, NV, head_dim), so transpose the token and head axes")
        raise CheckFailed(f"keys of one layer should be (B, H_kv, NV, head_dim) = {(B, kv_heads, NV, head_dim)}, "
                          f"got {tuple(keys.shape)}")
    def stacked(pairs):  # (layers, 2, B, H_kv, NV, head_dim)
        return torch.stack([torch.stack([k, v]) for k, v in pairs])

    keys_first = prefix.view(B, NV, 2, layers, kv_heads, head_dim).permute(3, 2, 0, 4, 1, 5)  # all K, then all V
    dims_mixed = prefix.view(B, NV, layers, 2, head_dim, kv_heads).permute(2, 3, 0, 5, 1, 4)
    want_stack = stacked(want)
    expect(stacked(got), want_stack, what="per-layer keys and values", mistakes={
        "the flat prefix is [K_0 | V_0 | K_1 | V_1 | …] per token (peft's layout), not all keys then all values":
            keys_first,
        "heads and head_dim were mixed up: view the kv_dim as (heads, head_dim), then move heads before tokens":
            dims_mixed,
        "keys and values were swapped: per layer the key comes first": want_stack.flip(1),
    })
    return "(B, H_kv, NV, head_dim) per layer, keys then values"


# ---------------------------------------------------------------------------------------------
# 01.3 text_init_ids(token_ids, num_virtual_tokens) -> list[int]
# ---------------------------------------------------------------------------------------------
def check_text_init_ids(text_init_ids) -> str:
    from ..soft_prompts import text_init_ids as reference

    for ids, nv in [([5, 6, 7], 8), ([5, 6, 7, 8, 9], 3), ([4], 3), ([1, 2], 2)]:
        got = text_init_ids(list(ids), nv)
        if not isinstance(got, list):
            got = list(got.tolist() if hasattr(got, "tolist") else got)
        want = reference(ids, nv)
        if got == want:
            continue
        if len(got) > nv:
            raise CheckFailed(f"{len(ids)} text tokens for {nv} virtual tokens: cut the ids to num_virtual_tokens")
        if got == (ids + [0] * nv)[:nv]:
            raise CheckFailed("the ids were padded with 0: peft repeats the text cyclically (5 6 7 5 6 7 5 6)")
        if got == [t for t in ids for _ in range(-(-nv // len(ids)))][:nv]:
            raise CheckFailed("each id was repeated in place (5 5 5 6 6 6 …): repeat the whole text cyclically")
        raise CheckFailed(f"for ids {ids} and {nv} virtual tokens: expected {want}, got {got}")
    return "the text repeated cyclically, cut to NV"


EXERCISES = [
    Exercise("01.1", "prepend virtual tokens with mask and labels", ("prepend_virtual_tokens",),
             check_prepend_virtual_tokens),
    Exercise("01.2", "prefix keys/values for a GQA model", ("split_prefix",), check_split_prefix),
    Exercise("01.3", "initialise a prompt from text", ("text_init_ids",), check_text_init_ids),
]
