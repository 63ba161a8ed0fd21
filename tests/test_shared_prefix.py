"""Prefix sharing (course_lib.shared_prefix: each prompt run once for all its completions) against the
concatenated forward over prompt ++ completion: the same log-probs and the same LoRA gradients, for DPO
pairs and GRPO groups, on the embedded model, the seeded tiny Llama (sdpa and eager attention) and the
hub-shaped Qwen2 (biased q/k/v); prompts of different lengths (left padding), completions of different
lengths, a batch of one; GRPO's shared-prefill sampling draws the same completions; and bad inputs.

Tolerance: float32 throughout. The two paths multiply the same numbers in different groupings (other
row counts per matmul, other key counts per attention row), so they differ by float rounding only:
~1e-6 on log-probs summed over ~25 tokens (≈ −50), hence rtol = atol = 1e-5; gradients to 1e-5 of the
largest entry of each LoRA matrix (the same bound tests/test_dpo.py uses against TRL). A real error
(a completion seeing the other completion, a position off by one, the prompt's padding attended) moves
the log-probs by O(0.1–1): the packing test below shows one such error is caught."""

import copy
import random

import pytest
import torch

from course_lib import dpo, grpo
from course_lib.lora import add_lora, lora_layers
from course_lib.shared_prefix import (completion_logits_shared_prompt, completion_logps_shared_prompt,
                                      pack_shared_prompts, split_prompt_and_completion)

from .conftest import tiny_llama

RTOL = ATOL = 1e-5


def _adapted(model, seed=0):
    """A copy with a LoRA on every linear layer whose B is random, so the adapter changes the logits and
    every LoRA matrix gets a gradient."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)  # lora_A's initialisation draws from the global generator
    add_lora(model, "all-linear", r=4, alpha=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def _grads(model, value):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(value, [p for _, p in named])))


def _assert_same_grads(got, expected):
    assert got.keys() == expected.keys() and got
    for name, grad in got.items():
        scale = float(expected[name].abs().max())
        assert scale > 0, name  # every LoRA matrix is reached
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _tiny_pairs(lengths, vocab=64, seed=0, pad_id=0):
    """DPO pairs of random token ids: lengths = [(prompt, chosen, rejected), …] → collated batch."""
    rng = random.Random(seed)
    pairs = []
    for n_prompt, n_chosen, n_rejected in lengths:
        prompt = [rng.randrange(3, vocab) for _ in range(n_prompt)]
        examples = []
        for n in (n_chosen, n_rejected):
            completion = [rng.randrange(3, vocab) for _ in range(n)]
            examples.append({"input_ids": prompt + completion, "labels": [-100] * n_prompt + completion})
        pairs.append(tuple(examples))
    return dpo.collate_pairs(pairs, pad_id)


def _check_dpo(model, batch):
    full = dpo.sequence_logprobs(model, batch, share_prompt=False)  # (2B,)
    shared = dpo.sequence_logprobs(model, batch, share_prompt=True)
    assert shared.shape == full.shape == (batch["input_ids"].shape[0],)
    torch.testing.assert_close(shared, full, rtol=RTOL, atol=ATOL)
    _assert_same_grads(_grads(model, shared.sum()), _grads(model, full.sum()))
    return full


# --------------------------------------------------------------------------------------------
# DPO: chosen and rejected share the prompt
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["embedded", "hub"])
def test_dpo_pairs_sharing_their_prompt_give_the_concatenated_logprobs_and_gradients(which, embedded, hub):
    from course_lib import data

    base, tokenizer = embedded if which == "embedded" else hub
    model = _adapted(base)
    rows = data.preference_rows("ending", "train", n=5, seed=3)
    batch = dpo.tokenize_preference_rows(rows, tokenizer)
    prompt_lengths = (batch["attention_mask"] - batch["completion_mask"]).sum(1)
    assert len(set(prompt_lengths.tolist())) > 1  # prompts of different lengths: left padding exercised
    assert len(set(batch["completion_mask"].sum(1).tolist())) > 1  # completions of different lengths
    _check_dpo(model, batch)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[(5, 3, 7), (2, 6, 1), (9, 4, 4)], [(4, 2, 5)]], ids=["three_pairs", "one_pair"])
def test_dpo_on_the_tiny_llama_with_both_attention_implementations(lengths, attention):
    base = tiny_llama(seed=1)
    base.config._attn_implementation = attention
    _check_dpo(_adapted(base, seed=2), _tiny_pairs(lengths))


def test_dpo_loss_and_adapter_gradient_are_the_same_with_and_without_sharing(embedded):
    """The training loss (policy and reference both shared) against the concatenated one; the loss
    against TRL's DPOTrainer is tests/test_dpo.py (DPOLoss shares the prompt by default)."""
    from course_lib import data

    base, tokenizer = embedded
    model = _adapted(base, seed=4)
    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=6, seed=5), tokenizer)
    losses = {share: dpo.DPOLoss(beta=0.2, share_prompt=share)(model, batch) for share in (True, False)}
    torch.testing.assert_close(losses[True], losses[False], rtol=RTOL, atol=ATOL)
    _assert_same_grads(_grads(model, losses[True]), _grads(model, losses[False]))


def test_dpo_rows_with_different_prompts_fall_back_to_the_concatenated_forward(embedded):
    model, tokenizer = _adapted(embedded[0]), embedded[1]
    from course_lib import data

    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=4, seed=3), tokenizer)
    swapped = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the rejected rows of pairs 0 and 1 exchanged
        swapped[key][[4, 5]] = batch[key][[5, 4]]
    with torch.no_grad():
        assert dpo._shared_prompt_logprobs(model, swapped) is None
        assert torch.equal(dpo.sequence_logprobs(model, swapped, share_prompt=True),
                           dpo.sequence_logprobs(model, swapped, share_prompt=False))


def _rows_seen(model, batch):
    """Rows each decoder layer's MLP and attention output projection receive in one shared DPO forward."""
    seen, handles = {}, []
    for i, layer in enumerate(model.get_decoder().layers):
        for name, module in (("mlp", layer.mlp), ("o_proj", layer.self_attn.o_proj)):
            handles.append(module.register_forward_hook(  # a forward hook sees the input the module ran on
                lambda m, args, out, key=(i, name): seen.setdefault(key, args[0].reshape(-1, args[0].shape[-1]).shape[0])
                and None))  # None: the hook leaves the output as it is
    try:
        with torch.no_grad():
            dpo.sequence_logprobs(model, batch, share_prompt=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_the_last_layer_runs_its_mlp_only_on_the_positions_the_loss_reads(embedded):
    """Prompt positions need the last layer's keys and values, not its MLP or output projection: those
    run on the positions that predict a completion token (one per completion token, the prompt's last
    token among them), the earlier layers on every packed position. The log-probs and gradients with
    the skip are the concatenated forward's: the tests above run with it."""
    from course_lib import data
    from course_lib.shared_prefix import pack_shared_prompts

    model, tokenizer = _adapted(embedded[0]), embedded[1]
    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=4, seed=3), tokenizer)
    seen = _rows_seen(model, batch)
    prompt_ids, prompt_mask, completion_ids, completion_mask = split_prompt_and_completion(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # chosen and rejected of each pair, adjacent
    packed = pack_shared_prompts(prompt_ids[:4], prompt_mask[:4], completion_ids[order], completion_mask[order], 2)
    all_positions = packed.input_ids.numel()
    read = {(int(r), int(p)) for r, row in zip(packed.row_of, packed.predictor) for p in row}
    last = len(model.get_decoder().layers) - 1
    assert seen[(last, "mlp")] == seen[(last, "o_proj")] == len(read) < 0.7 * all_positions
    assert all(n == all_positions for (i, _), n in seen.items() if i < last)


def test_under_gradient_checkpointing_the_last_layer_runs_on_every_position_with_the_same_results(embedded):
    """Checkpointing recomputes each layer in the backward pass, outside the forward's row selection, so
    the selection is off there; log-probs and gradients are the same as without checkpointing."""
    from course_lib import data

    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=3, seed=1), embedded[1])
    results = {}
    for checkpointing in (False, True):
        model = _adapted(embedded[0], seed=6)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        logps = dpo.sequence_logprobs(model, batch, share_prompt=True)
        results[checkpointing] = (logps.detach(), _grads(model, logps.sum()))
        seen = _rows_seen(model, batch)
        last = len(model.get_decoder().layers) - 1
        assert (seen[(last, "mlp")] == seen[(0, "mlp")]) == checkpointing  # every position only when checkpointing
    torch.testing.assert_close(results[True][0], results[False][0], rtol=RTOL, atol=ATOL)
    _assert_same_grads(results[True][1], results[False][1])


def test_the_additive_mask_made_once_gives_sdpas_own_boolean_mask_numbers_bit_for_bit(embedded, monkeypatch):
    """The packed rows' mask goes to SDPA as 0 / −inf, made once per forward, instead of as booleans SDPA
    converts in every layer: log-probs and gradients are bit-identical. Under autocast the booleans stay
    (the queries' dtype is autocast's) and the forward runs."""
    from course_lib import data, shared_prefix

    model, tokenizer = _adapted(embedded[0], seed=7), embedded[1]
    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=4, seed=2), tokenizer)
    made = shared_prefix._dense_mask_for(model, torch.tensor([[[[True, False], [True, True]]]]))
    assert made.dtype == torch.float32 and made.tolist() == [[[[0.0, float("-inf")], [0.0, 0.0]]]]
    results = []
    for boolean in (False, True):
        if boolean:
            monkeypatch.setattr(shared_prefix, "_dense_mask_for", lambda model, allowed: allowed)
        logps = dpo.sequence_logprobs(model, batch, share_prompt=True)
        results.append((logps.detach(), _grads(model, logps.sum())))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared_prefix._dense_mask_for(model, torch.ones(1, 1, 2, 2, dtype=torch.bool)).dtype == torch.bool
        under_autocast = dpo.sequence_logprobs(model, batch, share_prompt=True)
    torch.testing.assert_close(under_autocast.float(), results[0][0], rtol=0.05, atol=0.5)


# --------------------------------------------------------------------------------------------
# GRPO: G completions share the prompt, in scoring and in sampling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["embedded", "hub"])
def test_grpo_groups_sharing_their_prompt_give_the_concatenated_logprobs_entropy_and_gradients(which, embedded, hub):
    base, tokenizer = embedded if which == "embedded" else hub
    model = _adapted(base, seed=1)
    torch.manual_seed(0)
    rollout = grpo.sample_completions(model, tokenizer, grpo.addition_rows([(12, 7), (3, 45), (60, 21)]), 4,
                                      max_new_tokens=5)
    assert len(set(rollout.prompt_mask.sum(1).tolist())) > 1  # left padding exercised
    mask = rollout.completion_mask.float()
    full, full_entropy = grpo.completion_logprobs(model, rollout, temperature=0.7, with_entropy=True)
    shared, shared_entropy = grpo.completion_logprobs(model, rollout, temperature=0.7, with_entropy=True,
                                                      share_prompt=True)
    torch.testing.assert_close(shared, full * mask, rtol=RTOL, atol=ATOL)  # padding after the end: 0
    torch.testing.assert_close(shared_entropy, full_entropy * mask, rtol=RTOL, atol=ATOL)
    _assert_same_grads(_grads(model, shared.sum()), _grads(model, (full * mask).sum()))


def test_grpo_on_the_tiny_llama_with_a_group_of_one_prompt():
    model = _adapted(tiny_llama(seed=3), seed=5)
    prompt_ids, prompt_mask = torch.tensor([[7, 8, 9, 10]]), torch.ones(1, 4, dtype=torch.long)
    completion_ids = torch.tensor([[11, 12, 13], [14, 0, 0], [15, 16, 0]])
    completion_mask = (completion_ids != 0).long()
    full_ids = torch.cat([prompt_ids.expand(3, -1), completion_ids], dim=1)
    logits = model(input_ids=full_ids, attention_mask=torch.cat([prompt_mask.expand(3, -1), completion_mask], 1)).logits
    expected = torch.log_softmax(logits[:, 3:-1], dim=-1).gather(2, completion_ids[..., None])[..., 0] * completion_mask
    got = completion_logps_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 3)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    _assert_same_grads(_grads(model, got.sum()), _grads(model, expected.sum()))


def test_a_rollout_whose_group_rows_differ_is_scored_in_full(embedded):
    model, tokenizer = _adapted(embedded[0]), embedded[1]
    torch.manual_seed(0)
    rollout = grpo.sample_completions(model, tokenizer, grpo.addition_rows([(12, 7), (3, 45)]), 2, max_new_tokens=4)
    order = torch.tensor([0, 2, 1, 3])  # rows of different prompts now share a "group"
    mixed = grpo.Rollout(rollout.prompt_ids[order], rollout.prompt_mask[order], rollout.completion_ids[order],
                         rollout.completion_mask[order], [rollout.completions[i] for i in order],
                         [rollout.rows[i] for i in order], 2)
    with torch.no_grad():
        assert torch.equal(grpo.completion_logprobs(model, mixed, share_prompt=True)[0],
                           grpo.completion_logprobs(model, mixed)[0])


@pytest.mark.parametrize("which", ["embedded", "hub"])
def test_sampling_with_each_prompt_prefilled_once_draws_the_same_completions(which, embedded, hub):
    """generate() with the prompts' cache computed once and repeated G times, against generate() on the
    G-times repeated prompts: same seed, same logits up to rounding, so the same samples."""
    base, tokenizer = embedded if which == "embedded" else hub
    model = _adapted(base, seed=6)
    rows = grpo.addition_rows([(12, 7), (3, 45), (60, 21), (8, 9)])
    rollouts = {}
    for share in (False, True):
        torch.manual_seed(0)
        rollouts[share] = grpo.sample_completions(model, tokenizer, rows, 4, max_new_tokens=6, share_prompt=share)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(rollouts[True], field), getattr(rollouts[False], field)), field
    assert rollouts[True].completions == rollouts[False].completions
    assert len(set(rollouts[True].completions)) > 1  # really sampled


def test_grpo_training_steps_are_the_same_with_and_without_sharing(embedded):
    """Two steps of grpo_train (sampling, reference, policy, optimiser) reach the same adapter."""
    rows = grpo.addition_rows([(12, 7), (3, 45), (60, 21), (8, 9)])
    adapters = {}
    for share in (True, False):
        model = _adapted(embedded[0], seed=7)
        config = grpo.GRPOConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=4, beta=0.1,
                                 progress=False, share_prompt=share)
        torch.manual_seed(0)
        history = grpo.grpo_train(model, embedded[1], rows, [grpo.correctness_reward], config)
        adapters[share] = ({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, history)
    (ours, h_ours), (theirs, h_theirs) = adapters[True], adapters[False]
    assert h_ours.extra["completion_length"] == h_theirs.extra["completion_length"]
    assert h_ours.extra.keys() == h_theirs.extra.keys()
    for key, values in h_ours.extra.items():
        assert values == pytest.approx(h_theirs.extra[key], rel=1e-4, abs=1e-6), key
    for name, value in ours.items():  # Adam divides by √v: entries with a ~0 gradient amplify rounding
        torch.testing.assert_close(value, theirs[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_model_that_cannot_run_packed_rows_falls_back_to_the_full_sequences(embedded):
    """share_prompt is on by default in DPOLoss and GRPOConfig: a plain nn.Module wrapper (no
    get_decoder / get_output_embeddings) is scored with the concatenated forward, not refused."""
    from course_lib import data
    from course_lib.shared_prefix import supports_shared_prompt

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model, tokenizer = _adapted(embedded[0]), embedded[1]
    wrapped = Wrapper(model)
    assert supports_shared_prompt(model) and not supports_shared_prompt(wrapped)
    batch = dpo.tokenize_preference_rows(data.preference_rows("ending", "train", n=3, seed=3), tokenizer)
    with torch.no_grad():
        assert torch.equal(dpo.sequence_logprobs(wrapped, batch, share_prompt=True),
                           dpo.sequence_logprobs(model, batch, share_prompt=False))


# --------------------------------------------------------------------------------------------
# The packing itself, by hand, and bad inputs
# --------------------------------------------------------------------------------------------
def test_packing_by_hand():
    """Prompt [5, 6] (left-padded to 3 columns) with completions [7, 8, 4] and [9, 3]: one row 5 6 7 8 9 at
    positions 0 1 2 3 2 (each completion's last token, which predicts nothing, is left out); 9 sees the
    prompt and itself, not 7 or 8; 7 is predicted from 6 (column 1), 8 from 7, 4 from 8, 9 from 6, 3 from 9."""
    packed = pack_shared_prompts(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]),
                                 torch.tensor([[7, 8, 4], [9, 3, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), 2,
                                 pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = [[1, 0, 0, 0, 0],
               [1, 1, 0, 0, 0],
               [1, 1, 1, 0, 0],
               [1, 1, 1, 1, 0],
               [1, 1, 0, 0, 1]]
    assert packed.attention[0, 0].long().tolist() == allowed
    assert packed.predictor[0].tolist() == [1, 2, 3] and packed.predictor[1, :2].tolist() == [1, 4]


def test_a_completion_that_sees_its_sibling_is_caught():
    """The tests can fail: letting the second completion attend to the first changes its log-probs by far
    more than the tolerance."""
    model = _adapted(tiny_llama(seed=3), seed=5)
    args = (torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[11, 12, 13], [14, 15, 16]]),
            torch.ones(2, 3, dtype=torch.long), 2)
    with torch.no_grad():
        right = completion_logps_shared_prompt(model, *args)
        packed = pack_shared_prompts(*args)
        leaky = torch.ones_like(packed.attention).tril()  # plain causal: completion 2 sees completion 1
        hidden = model.get_decoder()(input_ids=packed.input_ids, attention_mask=leaky,
                                     position_ids=packed.position_ids).last_hidden_state
        logits = model.get_output_embeddings()(hidden[packed.row_of[:, None], packed.predictor])
        wrong = torch.log_softmax(logits, -1).gather(2, args[2][..., None])[..., 0]
    assert torch.allclose(right[0], wrong[0], rtol=RTOL, atol=ATOL)  # the first completion is unaffected
    assert (right[1] - wrong[1]).abs().max() > 100 * ATOL


def test_split_prompt_and_completion_by_hand():
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 7, 8, 4, 3]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    prompt_ids, prompt_mask, completion_ids, completion_mask = split_prompt_and_completion(input_ids, attention,
                                                                                           completion)
    assert prompt_ids.tolist() == [[0, 5, 6], [9, 7, 8]] and prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert completion_ids.tolist() == [[7, 8], [4, 3]] and completion_mask.tolist() == [[1, 1], [1, 1]]


def test_bad_inputs_are_named():
    model = tiny_llama(seed=0)
    ones = torch.ones(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="left-padded"):
        completion_logits_shared_prompt(model, torch.tensor([[5, 6, 7], [8, 9, 0]]),
                                        torch.tensor([[1, 1, 1], [1, 1, 0]]), ones, ones, 1)
    with pytest.raises(ValueError, match="right-padded"):
        completion_logits_shared_prompt(model, ones, ones, ones, torch.tensor([[0, 1], [1, 1]]), 1)
    with pytest.raises(ValueError, match=r"n_per_prompt=2.*N = P · n"):
        completion_logits_shared_prompt(model, ones, ones, ones, ones, 2)
    with pytest.raises(ValueError, match="n_per_prompt must be a positive integer"):
        completion_logits_shared_prompt(model, ones, ones, ones, ones, 0)
    flash = tiny_llama(seed=0)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"custom mask.*attn_implementation='sdpa'.*share_prompt=False"):
        completion_logits_shared_prompt(flash, ones, ones, ones, ones, 1)
