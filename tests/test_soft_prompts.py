"""Prompt tuning, P-tuning and prefix tuning against peft: same seed → same parameters, same logits and
loss (bit for bit), peft's files both ways, per-row prompts in one batch, clear errors."""

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from course_lib.soft_prompts import SoftPromptModel, add_soft_prompt, load_adapter, save_adapter

from .conftest import tiny_llama

NV = 5
CASES = {  # id: (our method, our kwargs, peft config)
    "prompt": ("prompt", {}, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)),
    "p-tuning": ("p-tuning", {"encoder_hidden_size": 16},
                 PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, encoder_hidden_size=16)),
    "p-tuning-lstm": ("p-tuning", {"encoder_hidden_size": 12, "encoder_type": "LSTM"},
                      PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, encoder_hidden_size=12,
                                          encoder_reparameterization_type="LSTM")),
    "prefix": ("prefix", {}, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)),
    "prefix-projection": ("prefix", {"prefix_projection": True, "encoder_hidden_size": 24},
                          PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, prefix_projection=True,
                                             encoder_hidden_size=24)),
}


def _batch():
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))  # (B, L)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded row
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _pair(case):
    method, kwargs, config = CASES[case]
    torch.manual_seed(1)
    theirs = get_peft_model(tiny_llama(), config)
    torch.manual_seed(1)
    ours = add_soft_prompt(tiny_llama(), method, NV, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_parameters_logits_loss_and_gradients_as_peft(case):
    ours, theirs = _pair(case)
    mine, peft_params = ours.prompts["default"].state_dict(), theirs.prompt_encoder["default"].state_dict()
    assert sorted(mine) == sorted(peft_params)
    for key in mine:
        torch.testing.assert_close(mine[key], peft_params[key], rtol=0, atol=0)
    ids, mask, labels = _batch()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    expected_length = 7 if case.startswith("prefix") else NV + 7  # prompt-tuned logits keep the virtual positions
    assert a.logits.shape == b.logits.shape == (3, expected_length, 64)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    their_grads = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, param in ours.prompts["default"].named_parameters():
        torch.testing.assert_close(param.grad, their_grads[name].grad, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in ours.base_model.parameters()), "the base model must stay frozen"


def test_virtual_positions_get_mask_ones_and_no_loss():
    """Labels on the virtual tokens are −100: a prompt-tuned loss equals the base loss computed on the
    same embeddings with those positions masked out by hand."""
    ours = add_soft_prompt(tiny_llama(), "prompt", NV)
    ids, mask, labels = _batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    embeds = torch.cat([ours.virtual_tokens().expand(3, -1, -1), ours.base_model.get_input_embeddings()(ids)], 1)
    logits = ours.base_model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, NV, dtype=mask.dtype), mask], 1)).logits
    targets = torch.cat([torch.full((3, NV), -100), labels], 1)[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_text_init_equals_peft(embedded, tmp_path):
    model, tokenizer = embedded
    text = "Is the ending of this story happy or sad?"
    for nv in (4, 30):  # shorter than the text (cut) and longer (repeated cyclically)
        torch.manual_seed(0)
        theirs = get_peft_model(_copy(model), PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=nv, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(model.config._name_or_path)))
        ours = add_soft_prompt(_copy(model), "prompt", nv, init_text=text, tokenizer=tokenizer)
        torch.testing.assert_close(ours.virtual_tokens(), theirs.prompt_encoder["default"].embedding.weight,
                                   rtol=0, atol=0)


def test_init_text_longer_than_the_prompt_warns_and_is_cut_as_peft_cuts_it(embedded):
    """peft cuts a text longer than num_virtual_tokens without a word; course_lib cuts it the same way
    (equal embeddings) and warns, naming the lost words and the fix."""
    model, tokenizer = embedded
    text = "How does the story end? happy or sad"  # 13 tokens with the BOS: the task words come last
    assert len(tokenizer(text)["input_ids"]) == 13
    with pytest.warns(UserWarning, match=r"13 tokens but num_virtual_tokens is 10.*happy or sad.*num_virtual_tokens=13"):
        ours = add_soft_prompt(_copy(model), "prompt", 10, init_text=text, tokenizer=tokenizer)
    theirs = get_peft_model(_copy(model), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=10, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(model.config._name_or_path)))
    torch.testing.assert_close(ours.virtual_tokens(), theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text that fits (or is repeated) says nothing
        add_soft_prompt(_copy(model), "prompt", 13, init_text=text, tokenizer=tokenizer)
        add_soft_prompt(_copy(model), "prompt", 20, init_text=text, tokenizer=tokenizer)


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_given_position_ids_are_handled_as_peft_handles_them(case):
    """A prefix shifts given position_ids by NV (the real tokens follow NV cached positions); prompt tuning
    ignores them with a warning. Both as peft does, so packed or offset positions give peft's logits."""
    ours, theirs = _pair(case)
    ids, mask, _ = _batch()
    positions = torch.arange(7).expand(3, -1) + 2  # (B, L), not starting at 0
    with torch.no_grad(), pytest.warns(UserWarning) if case == "prompt" else _nothing():
        a = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    with torch.no_grad(), pytest.warns(UserWarning) if case == "prompt" else _nothing():
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if case == "prefix":  # and the shift matters: unshifted positions give other logits
        with torch.no_grad():
            plain = ours(input_ids=ids, attention_mask=mask).logits
        assert (a - plain).abs().max() > 1e-3


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_move_both_ways(case, tmp_path):
    ours, theirs = _pair(case)
    with torch.no_grad():  # move away from the initial values so a lost tensor would show
        for p in [*ours.prompts.parameters(), *theirs.prompt_encoder.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids, mask, _ = _batch()
    # course_lib → peft
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    # peft → course_lib
    theirs.save_pretrained(tmp_path / "peft")
    back = load_adapter(tiny_llama(), tmp_path / "peft")
    # A projected prefix is saved as the MLP's output for one row; live, the MLP runs on B rows, and
    # the matmul blocking differs in the last bit — in peft as well as here. The LSTM's saved output
    # (computed with autograd on) and its live output (under no_grad) take different LSTM kernels.
    tol = 1e-6 if case in ("prefix-projection", "p-tuning-lstm") else 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=tol)
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_rows_with_different_prompts_equal_each_prompt_alone(method):
    torch.manual_seed(0)
    model = add_soft_prompt(tiny_llama(), method, NV, name="sentiment")
    add_soft_prompt(model, method, NV, name="qa")
    ids, mask, labels = _batch()
    rows = ["qa", "sentiment", "qa"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, prompt_names=rows).logits
        for i, name in enumerate(rows):
            model.set_prompt(name)
            alone = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-6)


def test_training_moves_only_the_prompt():
    from course_lib.training import TrainConfig, train

    model = add_soft_prompt(tiny_llama(), "prompt", NV)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    start = model.virtual_tokens().detach().clone()
    ids, mask, labels = _batch()
    history = train(model, lambda step: {"input_ids": ids, "attention_mask": mask, "labels": labels},
                    TrainConfig(steps=30, lr=0.5, warmup_steps=0, progress=False))
    # a random 2-layer model leaves five virtual tokens little to work with; the drop is small but real
    assert history.loss[-1] < history.loss[0] - 0.05
    assert not torch.equal(model.virtual_tokens(), start)
    for key, value in model.base_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        add_soft_prompt(tiny_llama(), "prompt", 0)
    with pytest.raises(ValueError, match="unknown soft-prompt method"):
        add_soft_prompt(tiny_llama(), "lora", 4)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        add_soft_prompt(tiny_llama(), "prompt", 4, init_text="hello")
    with pytest.raises(ValueError, match="'MLP' or 'LSTM'"):
        add_soft_prompt(tiny_llama(), "p-tuning", 4, encoder_type="GRU")
    model = add_soft_prompt(tiny_llama(), "prompt", NV)
    ids, mask, _ = _batch()
    with pytest.raises(KeyError, match="no soft prompt named 'nope'"):
        model(input_ids=ids, prompt_names=["default", "nope", "default"])
    with pytest.raises(ValueError, match="3 rows"):
        model(input_ids=ids, prompt_names=["default"])
    add_soft_prompt(model, "prefix", NV, name="prefix")
    with pytest.raises(ValueError, match="one method"):
        model(input_ids=ids, prompt_names=["default", "prefix", "default"])
    with pytest.raises(TypeError, match="already is a SoftPromptModel"):
        SoftPromptModel(model)
    # an adapter saved for another model (hidden size 32 here, 48 there)
    save_adapter(model, tmp_path / "small", "default")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="saved for another model"):
        load_adapter(other, tmp_path / "small")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path)


def test_course_measurements_score_the_text_not_the_virtual_positions(embedded):
    """completion_logprobs on a prompt-tuned model (logits (B, NV+T, V)) equals the log-probability
    read off the text's own positions by hand."""
    from course_lib.evaluate import completion_logprobs
    from course_lib.templates import tokenize_prompt_and_completion

    model, tokenizer = embedded
    import copy

    torch.manual_seed(0)
    wrapped = add_soft_prompt(copy.deepcopy(model), "prompt", NV)
    prompts, completions = ["Q: What colour is the sky?\nA:", "Once upon a time"], [" blue", " there was"]
    got = completion_logprobs(wrapped, tokenizer, prompts, completions)
    batch = tokenize_prompt_and_completion(prompts, completions, tokenizer, add_eos=False)
    with torch.no_grad():
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, NV:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (logp * (batch["labels"][:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_base_equals_peft(case):
    """On a bf16 model the virtual tokens and the prefix cache must reach the layers in the model's dtype,
    as peft sends them: logits equal bit for bit."""
    method, kwargs, config = CASES[case]
    torch.manual_seed(1)
    theirs = get_peft_model(tiny_llama().to(torch.bfloat16), config)
    torch.manual_seed(1)
    ours = add_soft_prompt(tiny_llama().to(torch.bfloat16), method, NV, **kwargs)
    ours.prompts["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ids, mask, labels = _batch()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.dtype == b.logits.dtype
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
