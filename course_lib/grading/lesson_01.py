"""Hidden checks for lesson 01 (soft prompts). References: course_lib.soft_prompts, itself tested
bit for bit against peft's prompt tuning, P-tuning (MLP and LSTM) and prefix tuning."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import CheckFailed, Exercise, expect
from .sandbox import in_sandbox, learner_object


# ---------------------------------------------------------------------------------------------
# 01.1 prepend_virtual_tokens(inputs_embeds, attention_mask, labels, prompts, task_ids)
#      -> (embeds, mask, labels): one batch whose rows belong to different tasks
# ---------------------------------------------------------------------------------------------
def check_prepend_virtual_tokens(prepend_virtual_tokens) -> str:
    from ..soft_prompts import prepend_virtual_tokens as reference

    gen = torch.Generator().manual_seed(0)
    B, L, NV, d, T = 3, 5, 4, 6, 3
    embeds = torch.randn(B, L, d, generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0  # a right-padded row
    labels = torch.randint(0, 50, (B, L), generator=gen).masked_fill(mask == 0, -100)
    prompts = torch.randn(T, NV, d, generator=gen)  # one learned prompt per task
    task_ids = torch.tensor([2, 0, 2])  # row i belongs to task task_ids[i]
    got = prepend_virtual_tokens(embeds.clone(), mask.clone(), labels.clone(), prompts.clone(), task_ids.clone())
    if not (isinstance(got, tuple) and len(got) == 3):
        raise CheckFailed("return a tuple (inputs_embeds, attention_mask, labels)")
    got_embeds, got_mask, got_labels = got
    per_row = prompts[task_ids]  # (B, NV, d)
    want_embeds, want_mask, want_labels = reference(embeds, mask, labels, per_row)
    if tuple(got_mask.shape) == (B, L):
        raise CheckFailed(f"the attention mask still has length {L}: it needs {NV} more entries, one per "
                          f"virtual token, or the model cannot attend to the prompt (wrong mask length)")
    if tuple(got_labels.shape) == (B, L):
        raise CheckFailed(f"the labels still have length {L}: prepend {NV} labels so they line up with the "
                          f"{NV + L} positions of inputs_embeds")
    expect(got_embeds, want_embeds, what="inputs_embeds", mistakes={
        "the virtual tokens went after the text: a soft prompt is prepended, [P ; E(x)]":
            torch.cat([embeds, per_row], 1),
        "every row got the first row's prompt: each row reads the prompt of its own task, prompts[task_ids[i]]":
            torch.cat([prompts[task_ids[0]].expand(B, -1, -1), embeds], 1),
        "every row got task 0's prompt: each row reads the prompt of its own task, prompts[task_ids[i]]":
            torch.cat([prompts[0].expand(B, -1, -1), embeds], 1),
        "row i got prompt i (the row's position), not the prompt of its task task_ids[i]":
            torch.cat([prompts[:B], embeds], 1),
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
    return "each row reads its task's prompt, attends to it, and is never scored on it"


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
# 01.3 text_init_ids(token_ids, num_virtual_tokens) -> list[int], warning when the text is cut
# ---------------------------------------------------------------------------------------------
def check_text_init_ids(text_init_ids) -> str:
    from ..soft_prompts import text_init_ids as reference

    for ids, nv in [([5, 6, 7], 8), ([5, 6, 7, 8, 9], 3), ([4], 3), ([1, 2], 2), ([3, 1, 4, 1], 4)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = text_init_ids(list(ids), nv)
        learner_warned = any(issubclass(w.category, UserWarning) for w in caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = reference(list(ids), nv)
        if not isinstance(got, list):
            got = list(got.tolist() if hasattr(got, "tolist") else got)
        if got != want:
            if len(got) > nv:
                raise CheckFailed(f"{len(ids)} text tokens for {nv} virtual tokens: cut the ids to num_virtual_tokens")
            if got == (ids + [0] * nv)[:nv]:
                raise CheckFailed("the ids were padded with 0: token 0 is not a word of the description; "
                                  "fill the remaining slots with the description again, from its start")
            if got == [t for t in ids for _ in range(-(-nv // len(ids)))][:nv]:
                raise CheckFailed("each id was repeated in place (5 5 5 6 6 6 …): the description must read in "
                                  "order, so start it again from its first token (5 6 7 5 6 7 5 6)")
            raise CheckFailed(f"for ids {ids} and {nv} virtual tokens: expected {want}, got {got}")
        if len(ids) > nv and not learner_warned:
            raise CheckFailed(f"{len(ids)} tokens were cut to {nv} without a warning: warn (warnings.warn, a "
                              f"UserWarning) that the last {len(ids) - nv} tokens never reach the prompt")
        if len(ids) <= nv and learner_warned:
            raise CheckFailed(f"a warning for {len(ids)} tokens and {nv} virtual tokens: nothing is lost when the "
                              f"description fits (or is repeated), so warn only when it is cut")
    return "the description read in order, repeated to NV, and a warning when it is cut"


# ---------------------------------------------------------------------------------------------
# 01.4 prefix_forward(model, input_ids, attention_mask, prefix) -> logits (B, L, V)
# ---------------------------------------------------------------------------------------------
def _gqa_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (keys, values) per layer a cache object holds, whatever transformers version made it."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in layers
                if getattr(layer, "keys", None) is not None]
    if hasattr(cache, "key_cache"):
        return [(k.detach().clone(), v.detach().clone()) for k, v in zip(cache.key_cache, cache.value_cache)]
    return None


def _detached(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else None


def _record_calls(model: nn.Module) -> tuple[list[dict], list]:
    """Record what reaches the model (or its inner decoder): mask, positions and the cache as it arrives."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kind = "none" if cache is None else "tuple" if isinstance(cache, (tuple, list)) else "cache"
        tensors = _cache_tensors(cache) if cache is not None else None
        calls.append({"attention_mask": _detached(kwargs.get("attention_mask")),
                      "position_ids": _detached(kwargs.get("position_ids")), "cache": kind,
                      "cache_tensors": None if tensors is None else [[_detached(k), _detached(v)] for k, v in tensors]})

    handles = [model.register_forward_pre_hook(hook, with_kwargs=True),
               model.model.register_forward_pre_hook(hook, with_kwargs=True)]
    return calls, handles


def check_prefix_forward(prefix_forward) -> str:
    from ..soft_prompts import add_soft_prompt, split_prefix

    model = _gqa_llama(0)
    cfg = model.config
    B, L, NV = 2, 6, 3
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, cfg.vocab_size, (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 4:] = 0  # a right-padded row
    prefix = torch.randn(NV, cfg.num_hidden_layers * 2 * kv_dim, generator=gen)  # (NV, layers·2·kv_dim)

    reference = add_soft_prompt(copy.deepcopy(model), "prefix", NV)
    with torch.no_grad():
        reference.prompts["default"].embedding.weight.copy_(prefix)
        want = reference(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    want_kv = split_prefix(prefix.expand(B, -1, -1), cfg.num_hidden_layers, cfg.num_key_value_heads)

    def learner_side(input_ids, attention_mask, prefix):
        """Runs where the learner's code runs: what reached the model (as data) and the logits."""
        learner_model = copy.deepcopy(model)
        calls, handles = _record_calls(learner_model)
        try:
            with torch.no_grad():
                got = prefix_forward(learner_model, input_ids, attention_mask, prefix)
            error = None
        except Exception as e:  # diagnose from what reached the model before it failed
            if not calls:
                raise  # nothing reached the model: the error itself is the feedback
            got, error = None, f"{type(e).__name__}: {e}"
        finally:
            for h in handles:
                h.remove()
        logits = getattr(got, "logits", got)
        return {"call": calls[0] if calls else None, "error": error, "got_type": type(got).__name__,
                "logits": logits if isinstance(logits, torch.Tensor) else None}

    prefix_forward = learner_object(prefix_forward)
    seen = in_sandbox(learner_side)(input_ids.clone(), attention_mask.clone(), prefix.clone())
    error = seen["error"]
    diagnosis = _diagnose_prefix_call(seen["call"], want_kv, B, L, NV, cfg)
    if diagnosis:
        raise CheckFailed(diagnosis + (f" (your code then raised {error})" if error else ""))
    if error is not None:
        raise CheckFailed(f"your code raised {error}")
    logits = seen["logits"]
    if not isinstance(logits, torch.Tensor):
        raise CheckFailed(f"return the logits (a tensor of shape (B, L, V)), got {seen['got_type']}")
    if tuple(logits.shape) == (B, NV + L, cfg.vocab_size):
        raise CheckFailed("the logits have NV + L positions: the prefix lives in the cache, not in the sequence, "
                          "so the model returns logits for the L real tokens only")
    expect(logits, want, what="logits", atol=1e-5, rtol=1e-4)
    return "per-layer (B, H_kv, NV, head_dim) keys and values in the cache, the mask covering NV + L"


def _diagnose_prefix_call(call, want_kv, B, L, NV, cfg) -> str | None:
    if call is None:
        return None
    mask = call["attention_mask"]
    if mask is not None and mask.shape[-1] == L:
        return (f"the attention mask was not extended: it has {L} entries while the model attends to NV + L = "
                f"{NV + L} positions (the {NV} cached prefix positions first). transformers does not complain — it "
                f"silently misaligns the mask — so prepend {NV} ones")
    if mask is not None and mask.shape[-1] == NV + L:
        if bool((mask[:, :NV] == 0).all()):
            return "the prefix positions got mask 0: the model must attend to the prefix (mask 1)"
        if bool((mask[:, -NV:] == 1).all()) and not bool((mask[:, :NV] == 1).all()):
            return "the mask's ones were appended: the cached prefix comes before the tokens, so prepend them"
    kv = call["cache_tensors"]
    if call["cache"] == "none":
        return ("no cache reached the model: prefix tuning's prefix lives in the cache, not in the sequence — pass "
                "its per-layer keys and values as the model's cache")
    if call["cache"] == "tuple":
        return ("the cache was a tuple of tensors: transformers ≥ 5 takes a Cache object, "
                "DynamicCache([(keys, values), …]) with one pair per layer")
    if kv is not None and kv:
        keys = kv[0][0]
        if keys.shape[1] == cfg.num_attention_heads and cfg.num_attention_heads != cfg.num_key_value_heads:
            return (f"the cached keys have {keys.shape[1]} heads, the number of query heads: a GQA model caches "
                    f"num_key_value_heads = {cfg.num_key_value_heads} heads of head_dim {cfg.head_dim} "
                    f"(heads and kv heads confused)")
        if tuple(keys.shape) != tuple(want_kv[0][0].shape):
            return (f"one layer's cached keys should be (B, H_kv, NV, head_dim) = {tuple(want_kv[0][0].shape)}, "
                    f"got {tuple(keys.shape)}")
        same = all(torch.allclose(k, wk) and torch.allclose(v, wv) for (k, v), (wk, wv) in zip(kv, want_kv))
        swapped = all(torch.allclose(k, wv) and torch.allclose(v, wk) for (k, v), (wk, wv) in zip(kv, want_kv))
        if swapped:
            return "keys and values were swapped: per layer the flat prefix holds the key first, then the value"
        if not same:
            return ("the cached keys/values are not the prefix's: per token the flat prefix is "
                    "[K_0 | V_0 | K_1 | V_1 | …], each kv_dim = num_key_value_heads × head_dim wide")
    positions = call["position_ids"]
    if positions is not None and int(positions.min()) == 0:
        return (f"the real tokens were given positions from 0: they come after {NV} cached positions, so they take "
                f"positions {NV} … {NV + L - 1} (leave position_ids out: the cache's length sets them)")
    return None


# ---------------------------------------------------------------------------------------------
# 01.5 ptuning_lstm_tokens(embedding, lstm, mlp_head) -> (NV, d)
# ---------------------------------------------------------------------------------------------
def check_ptuning_lstm_tokens(ptuning_lstm_tokens) -> str:
    from ..soft_prompts import PromptEncoderLSTM

    NV, d, hidden = 5, 6, 4  # 2·hidden ≠ d, so a skipped MLP head shows in the shape
    torch.manual_seed(0)
    encoder = PromptEncoderLSTM(NV, d, hidden, num_layers=2).eval()
    with torch.no_grad():
        want = encoder()  # (NV, d)
        got = ptuning_lstm_tokens(encoder.embedding.weight.detach().clone(), encoder.lstm_head, encoder.mlp_head)
        alone = encoder.mlp_head(encoder.lstm_head(encoder.embedding.weight.unsqueeze(1))[0])  # (NV, 1, d)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"return the virtual tokens as a tensor (NV, d), got {type(got).__name__}")
    if tuple(got.shape) == (NV, 2 * hidden):
        raise CheckFailed(f"the tokens are (NV, 2·hidden) = {(NV, 2 * hidden)}: the LSTM's two directions still "
                          f"have to go through mlp_head, which maps them to the model's width d = {d}")
    if tuple(got.shape) == (1, NV, d):
        raise CheckFailed("the tokens are (1, NV, d): drop the batch axis you added for the LSTM, return (NV, d)")
    if tuple(got.shape) == (NV, 1, d):
        got = got[:, 0]  # diagnose below
    expect(got, want, what="virtual tokens", mistakes={
        "each virtual token went through the LSTM alone (a batch of NV sequences of length 1): read the NV "
        "tokens as ONE sequence, (1, NV, d) with batch_first, so each token depends on the others":
            alone[:, 0],
    })
    return "one bidirectional pass over the NV tokens, then the MLP head"


EXERCISES = [
    Exercise("01.1", "one batch, several tasks: prepend each row's prompt", ("prepend_virtual_tokens",),
             check_prepend_virtual_tokens),
    Exercise("01.2", "prefix keys/values for a GQA model", ("split_prefix",), check_split_prefix),
    Exercise("01.3", "initialise a prompt from text, and say what is cut", ("text_init_ids",), check_text_init_ids),
    Exercise("01.4", "a prefix-tuning forward through the cache", ("prefix_forward",), check_prefix_forward),
    Exercise("01.5", "P-tuning's LSTM prompt encoder", ("ptuning_lstm_tokens",), check_ptuning_lstm_tokens),
]
