"""Every course_lib entry point a lesson uses, on a hub-shaped model (tests/hub_model.py): Qwen2 with
untied embeddings and biased q/k/v, a left-padding ChatML tokenizer with no BOS and no ``<|end|>``,
a bf16 checkpoint. The same equivalence checks as on the embedded model, against transformers, peft,
TRL and bitsandbytes. This is what the GPU lab's ``--model`` promise rests on.

The session's ``hub`` model and tokenizer are shared: each test changes a copy.
"""

import copy

import pytest
import torch

from .hub_model import END_OF_TEXT, IM_END, IM_START

TEXTS = ["Once upon a time, Lily found a red ball in the park.", "Q: What is 12 + 7?\nA: 19", "The sky is"]


def _copy(hub):
    """A private copy of the session's model, free to change."""
    return copy.deepcopy(hub[0])


def _batch(tokenizer):
    """The tokenizer's own (left-padded) batch of TEXTS: (B, T) ids and mask."""
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, 0] == 0).any(), "the batch should hold left padding"
    return enc["input_ids"], enc["attention_mask"]


def _real(logits, mask):
    """The logits of the real tokens, (N, V): the last T positions (a prompt-tuned model returns its
    virtual positions first), where the mask is 1. Pad positions are nobody's output."""
    return logits[:, logits.shape[1] - mask.shape[1]:][mask.bool()]


def _real_logits(model, ids, mask):
    """``model``'s logits of the real tokens of a batch, (N, V)."""
    with torch.no_grad():
        return _real(model(input_ids=ids, attention_mask=mask).logits, mask)



def _right_padded(tokenizer):
    right = copy.deepcopy(tokenizer)
    right.padding_side = "right"
    return right


def _chat_rows():
    from course_lib.templates import instruction_dataset

    rows = instruction_dataset(["opposite", "colour", "addition"], per_task=2)[:6]
    return [{"messages": r["messages"]} for r in rows]


def _randomize(model, key, seed, scale=0.1):
    """Adapters start as the identity (LoRA B = 0); give the named parameters values the logits show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if key == "ia3_l" else 0.0))



# ------------------------------------------------------------------------------------------------
# The folder itself, and load_model
# ------------------------------------------------------------------------------------------------
def test_the_folder_differs_from_the_embedded_model_where_hub_models_do(hub_model_dir, tmp_path):
    import json

    from safetensors import safe_open

    from .hub_model import build_hub_model

    config = json.loads((hub_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is False
    with safe_open(hub_model_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().min() > 0  # biased, not zero
        assert "lm_head.weight" in f.keys()  # untied: the head is its own tensor
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub_model_dir)
    assert tokenizer.padding_side == "left" and tokenizer.bos_token is None and tokenizer.unk_token is None
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == END_OF_TEXT
    assert "<|end|>" not in tokenizer.get_vocab() and config["vocab_size"] > len(tokenizer)
    out = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo"}],
                                        return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == " yo" + IM_END
    # seeded: the same files again
    again = build_hub_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (hub_model_dir / name).read_bytes(), name


def test_load_model_gives_float32_by_default_and_bf16_on_request(hub_model_dir, hub):
    from safetensors.torch import load_file

    from course_lib.models import count_parameters, load_model

    model, tokenizer = hub
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == END_OF_TEXT  # left as the hub saved them
    saved = load_file(hub_model_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name].float()), name  # bf16 → float32 is exact
    assert count_parameters(model)[1] == sum(t.numel() for t in saved.values())  # untied: the head counts
    bf16, _ = load_model(hub_model_dir, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(torch.equal(t, saved[n]) for n, t in bf16.state_dict().items())


# ------------------------------------------------------------------------------------------------
# evaluate: lm_loss, generate, completion_logprobs
# ------------------------------------------------------------------------------------------------
def _loss_one_text_at_a_time(model, tokenizer, texts):
    """Token-weighted next-token cross-entropy, each text alone (no padding anywhere)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
            logits = model(input_ids=ids).logits  # (1, T, V)
            total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_lm_loss_does_not_depend_on_the_padding_side(hub):
    """Issue 10, bug 1: with left padding the first real token was scored as predicted from a pad."""
    from course_lib.evaluate import lm_loss

    model, tokenizer = hub
    expected = _loss_one_text_at_a_time(model, tokenizer, TEXTS)
    left = lm_loss(model, tokenizer, TEXTS)
    right = lm_loss(model, _right_padded(tokenizer), TEXTS)
    assert right == pytest.approx(expected, rel=1e-5)
    assert left == pytest.approx(expected, rel=1e-5)


def _greedy_alone(model, tokenizer, prompt, max_new_tokens, stop_id):
    """transformers' own greedy generation of one unpadded prompt: the new ids up to the stop token."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[stop_id],
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return new[:new.index(stop_id)] if stop_id in new else new


def test_generate_equals_transformers_and_stops_at_the_chat_templates_end_of_turn(hub):
    from course_lib.evaluate import generate

    model, tokenizer = hub
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in TEXTS]
    alone = [_greedy_alone(model, tokenizer, p, 8, im_end) for p in prompts]
    got = generate(model, tokenizer, prompts, max_new_tokens=8, stop_tokens=(IM_END,))
    assert got == [tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    assert tokenizer.padding_side == "left"

    # Make a special token the greedy choice exactly where a token first appears in the first prompt's
    # answer: swap the two rows of the (untied) output head. Generation must stop right there: at
    # <|im_end|> (the eos), and at <|im_start|> only because it is one of the stop_tokens.
    first = alone[0]
    k = next(k for k in range(2, len(first)) if first[k] not in first[:k])  # a token new at position k
    for stop in (IM_END, IM_START):
        swapped, stop_id = _copy(hub), tokenizer.convert_tokens_to_ids(stop)
        with torch.no_grad():
            head = swapped.lm_head.weight  # (V, d)
            head[[first[k], stop_id]] = head[[stop_id, first[k]]]
        stopped = generate(swapped, tokenizer, prompts[:1], max_new_tokens=8, stop_tokens=(stop,))
        assert stopped == [tokenizer.decode(first[:k], skip_special_tokens=True)], stop
    unstopped = generate(swapped, tokenizer, prompts[:1], max_new_tokens=8)
    assert len(unstopped[0]) > len(stopped[0])  # without the stop token it goes on past <|im_start|>


def test_a_stop_token_the_vocabulary_lacks_is_a_clear_error(hub):
    """Issue 10, bug 2: `<|end|>` (the embedded model's end of turn) is not in a ChatML vocabulary;
    the crash was `TypeError: 'NoneType' object cannot be interpreted as an integer`."""
    from course_lib.evaluate import generate

    model, tokenizer = hub
    with pytest.raises(ValueError, match=r"<\|end\|>"):
        generate(model, tokenizer, TEXTS[:1], max_new_tokens=2, stop_tokens=("<|end|>",))


def test_the_end_of_turn_token_is_read_off_the_chat_template(hub):
    from course_lib.templates import end_of_turn_token

    assert end_of_turn_token(hub[1]) == IM_END  # not the embedded model's <|end|>, and here also the eos


def test_instruction_accuracy_runs_on_a_chatml_model(hub):
    """sft.instruction_accuracy stops answers at the end of a turn; it passed the embedded model's
    `<|end|>` whatever the tokenizer (issue 10, bug 2). The chat prompt is the template's own."""
    from course_lib.sft import chat_prompt, instruction_accuracy

    model, tokenizer = hub
    rows = _chat_rows()[:3]
    prompt = chat_prompt(rows[0]["messages"][:-1], tokenizer)
    assert prompt == tokenizer.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(IM_START + "assistant\n")
    assert instruction_accuracy(model, tokenizer, rows, max_new_tokens=4) == 0.0  # a random model; it must run


def test_completion_logprobs_equal_each_row_scored_alone(hub):
    from course_lib.evaluate import completion_logprobs

    model, tokenizer = hub
    prompts, completions = ["Q: What is 12 + 7?\nA:", "Once upon a time"], [" 19", " there was a small fox"]
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)  # (T, V)
            expected.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
    got = completion_logprobs(model, tokenizer, prompts, completions)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# templates and SFT tokenization against TRL's SFTTrainer
# ------------------------------------------------------------------------------------------------
def _mean(loss):
    """A loss as one number: a tensor, or a loss that says what it sums (``training.LossSum``)."""
    return loss if isinstance(loss, torch.Tensor) else loss.mean()


def test_messages_labels_and_loss_equal_trl_assistant_only(hub):
    from course_lib.sft import sft_loss, tokenize_rows

    from .test_sft import _trl_batch

    model, tokenizer = hub
    rows = _chat_rows()
    theirs, their_loss = _trl_batch(model, tokenizer, rows, assistant_only_loss=True)
    ours = tokenize_rows(rows, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(_mean(sft_loss(model, ours)), their_loss, rtol=1e-6, atol=0)
    first = ours["labels"][0][ours["labels"][0] != -100]
    assert tokenizer.decode(first) == rows[0]["messages"][1]["content"] + IM_END  # the answer and its end of turn


def test_prompt_completion_labels_and_loss_equal_trl_completion_only(hub):
    from course_lib.sft import sft_loss, tokenize_rows

    from .test_sft import _trl_batch

    model, tokenizer = hub
    rows = [{"prompt": r["messages"][0]["content"] + "\nAnswer:", "completion": r["messages"][1]["content"]}
            for r in _chat_rows()]
    theirs, their_loss = _trl_batch(model, tokenizer, rows)
    ours = tokenize_rows(rows, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(_mean(sft_loss(model, ours)), their_loss, rtol=1e-6, atol=0)



def test_packed_and_unpacked_losses_are_equal(hub):
    from course_lib.sft import sft_loss, tokenize_rows
    from course_lib.templates import pack_examples, unpad

    model, tokenizer = hub
    batch = tokenize_rows(_chat_rows(), tokenizer)
    packed = pack_examples(unpad(batch), 128, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        torch.testing.assert_close(_mean(sft_loss(model, packed)), _mean(sft_loss(model, batch)), rtol=1e-5, atol=0)



# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def _peft_lora(model, adapter_name="default", **kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs), adapter_name=adapter_name)


def _lora_params(model):
    """LoRA parameters by peft's module path and adapter: {'…q_proj.lora_A.default': p}."""
    return {n.removeprefix("base_model.model.").replace(".weight", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


def _copy_lora(source, target):
    """Give ``target`` the LoRA weights of ``source`` (same module paths and adapter names)."""
    with torch.no_grad():
        theirs = _lora_params(source)
        for name, p in _lora_params(target).items():
            p.copy_(theirs[name])



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(), dict(r=4, lora_alpha=16, target_modules="all-linear")])
def test_lora_same_seed_same_init_and_logits_as_peft(hub_model_dir, hub, dtype, kwargs):
    """peft's defaults for Qwen2 (q_proj, v_proj: both biased) and all-linear; float32 and a bf16 load."""
    from course_lib.lora import add_lora
    from course_lib.models import load_model

    def fresh():
        return _copy(hub) if dtype == torch.float32 else load_model(hub_model_dir, device="cpu", dtype=dtype)[0]

    ours, theirs = fresh(), fresh()
    torch.manual_seed(123)
    add_lora(ours, kwargs.get("target_modules", ("q_proj", "v_proj")), r=kwargs.get("r", 8),
             alpha=kwargs.get("lora_alpha", 8))
    torch.manual_seed(123)
    theirs = _peft_lora(theirs, **kwargs)
    mine, peft_params = _lora_params(ours), _lora_params(theirs)
    assert mine.keys() == peft_params.keys()
    for name in mine:
        assert mine[name].dtype == peft_params[name].dtype and torch.equal(mine[name], peft_params[name]), name
    _randomize(ours, "lora_B", 1)
    _randomize(theirs, "lora_B", 1)
    ids, mask = _batch(hub[1])
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(_real(a, mask), _real(b, mask), rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_lora_merge_equals_peft_and_unmerge_restores(hub):
    from course_lib.lora import add_lora, lora_layers, merge_lora, unmerge_lora

    ours, theirs = _copy(hub), _peft_lora(_copy(hub), r=4, lora_alpha=8, target_modules="all-linear")
    torch.manual_seed(0)
    add_lora(ours, "all-linear", r=4, alpha=8)
    _randomize(theirs, "lora_B", 2)
    with torch.no_grad():
        for name, p in _lora_params(ours).items():
            p.copy_(_lora_params(theirs)[name])
    ids, mask = _batch(hub[1])
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = ours(input_ids=ids, attention_mask=mask).logits
    merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged_theirs.get_submodule(name).weight, rtol=0, atol=1e-7)
        if layer.base_layer.bias is not None:  # LoRA leaves the bias alone
            assert torch.equal(layer.base_layer.bias, merged_theirs.get_submodule(name).bias)
    torch.testing.assert_close(_real_logits(ours, ids, mask), _real(unmerged, mask), rtol=1e-5, atol=1e-5)
    unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_lora_adapters_move_both_ways_between_course_lib_and_peft(hub, tmp_path):
    from peft import PeftModel

    from course_lib.lora import add_lora, load_adapter, save_adapter

    ids, mask = _batch(hub[1])
    ours = _copy(hub)
    add_lora(ours, ["q_proj", "o_proj", "up_proj"], r=4, alpha=8)
    _randomize(ours, "lora_B", 3)
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(_copy(hub), tmp_path / "ours")
    theirs = _peft_lora(_copy(hub), r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"])
    _randomize(theirs, "lora_B", 4)
    theirs.save_pretrained(tmp_path / "theirs")
    back = _copy(hub)
    load_adapter(back, tmp_path / "theirs")
    torch.testing.assert_close(_real_logits(loaded, ids, mask), _real_logits(ours, ids, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(_real_logits(back, ids, mask), _real_logits(theirs, ids, mask), rtol=0, atol=1e-6)


def _one_step(model, batch, **config):
    from course_lib.training import TrainConfig, train

    return train(model, [batch], TrainConfig(steps=1, progress=False, **config))


def test_lora_set_adapter_then_train_trains_that_adapter_like_peft(hub):
    """Issue 10, bug 4: after set_adapter(model, "a") only "b" stayed trainable, and training "a"
    raised `element 0 of tensors does not require grad`."""
    from course_lib.lora import add_lora, set_adapter
    from course_lib.sft import tokenize_rows

    ours = _copy(hub)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="a")
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="b")
    set_adapter(ours, "a")
    theirs = _peft_lora(_copy(hub), adapter_name="a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    from peft import LoraConfig

    theirs.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.set_adapter("a")
    assert ({n for n, p in _lora_params(ours).items() if p.requires_grad}
            == {n for n, p in _lora_params(theirs).items() if p.requires_grad})
    before = {n: p.detach().clone() for n, p in _lora_params(ours).items()}
    _one_step(ours, tokenize_rows(_chat_rows(), hub[1]), lr=1e-2)
    for name, p in _lora_params(ours).items():
        if name.endswith(".lora_B.a"):
            assert not torch.equal(p, before[name]), name
        elif name.endswith(".b"):
            assert torch.equal(p, before[name]), name


def test_lora_mixed_batch_and_disabled_adapters_equal_peft(hub):
    """Per-row adapters (lesson 03's serving) and the adapter switched off (the alignment lessons'
    reference model) on a left-padded batch, against peft's `adapter_names=` and `disable_adapter()`."""
    from peft import LoraConfig

    from course_lib.lora import BASE, add_lora, disable_adapters, mixed_batch

    ours = _copy(hub)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="a")
    add_lora(ours, ["q_proj", "v_proj", "down_proj"], r=2, alpha=2, adapter_name="b")
    _randomize(ours, "lora_", 8)
    theirs = _peft_lora(_copy(hub), adapter_name="a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    _copy_lora(ours, theirs)
    theirs.eval()
    ids, mask = _batch(hub[1])
    rows = ["b", BASE, "a"]
    with torch.no_grad():
        with mixed_batch(ours, rows):
            mixed = ours(input_ids=ids, attention_mask=mask).logits
        expected = theirs(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        torch.testing.assert_close(_real(mixed, mask), _real(expected, mask), rtol=1e-5, atol=1e-5)
        with disable_adapters(ours):
            off = ours(input_ids=ids, attention_mask=mask).logits
        with theirs.disable_adapter():
            their_off = theirs(input_ids=ids, attention_mask=mask).logits
        base = hub[0](input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_real(off, mask), _real(their_off, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(_real(off, mask), _real(base, mask), rtol=0, atol=1e-6)


def test_run_sft_with_packing_trains_lora_on_chatml_rows(hub):
    from course_lib.lora import lora_layers
    from course_lib.sft import run_sft
    from course_lib.training import TrainConfig

    model = _copy(hub)
    history = run_sft(model, _chat_rows(), hub[1], TrainConfig(steps=2, lr=1e-3, progress=False), batch_size=3,
                      packing=True, max_length=128)
    assert len(list(lora_layers(model))) == 2 * 7 and len(history.loss) == 2
    assert torch.equal(model.lm_head.weight, hub[0].lm_head.weight)  # the base stays frozen


# ------------------------------------------------------------------------------------------------
# IA3
# ------------------------------------------------------------------------------------------------
def test_ia3_default_targets_are_peft_defaults_for_this_architecture(hub):
    """peft's IA3 defaults are per architecture; for Qwen2 they are q_proj, v_proj and down_proj
    (Llama's are k_proj, v_proj, down_proj). A learner comparing `add_ia3(model)` with
    `IA3Config()` on a Qwen model should compare the same thing."""
    from peft import IA3Config, get_peft_model

    from course_lib.ia3 import add_ia3

    ours = _copy(hub)
    names = add_ia3(ours)
    theirs = get_peft_model(_copy(hub), IA3Config(task_type="CAUSAL_LM"))
    their_names = [n.removeprefix("base_model.model.").removesuffix(".ia3_l.default")
                   for n, _ in theirs.named_parameters() if "ia3_l" in n]
    assert names == their_names
    assert ([ours.get_submodule(n).is_feedforward for n in names]
            == [theirs.base_model.model.get_submodule(n).is_feedforward for n in their_names])


def _peft_ia3(model, adapter_name="default"):
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM", target_modules=IA3_TARGETS,
                                           feedforward_modules=["down_proj"]), adapter_name=adapter_name)


IA3_TARGETS = ["q_proj", "v_proj", "down_proj"]  # output scaling on biased layers; input scaling on down_proj


def _copy_ia3(theirs, ours, adapter="default"):
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                module = name.removeprefix("base_model.model.").rsplit(".ia3_l", 1)[0]
                ours.get_submodule(module).ia3_l[adapter].copy_(p)



def test_ia3_same_vectors_same_logits_and_merged_weights_as_peft(hub):
    from course_lib.ia3 import add_ia3, merge_ia3, unmerge_ia3

    theirs = _peft_ia3(_copy(hub))
    ours = _copy(hub)
    add_ia3(ours, IA3_TARGETS, ["down_proj"])
    _randomize(theirs, "ia3_l", 3, scale=0.3)
    _copy_ia3(theirs, ours)
    ids, mask = _batch(hub[1])
    with torch.no_grad():
        unmerged = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(_real(unmerged, mask), _real_logits(theirs, ids, mask), rtol=0, atol=0)
        theirs.merge_adapter()
        merge_ia3(ours)
        their_weights = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
        for key, value in ours.state_dict().items():  # q_proj and v_proj biases are scaled too
            if "ia3_l" not in key:
                torch.testing.assert_close(value, their_weights[key], rtol=0, atol=0)
        torch.testing.assert_close(_real_logits(ours, ids, mask), _real(unmerged, mask), rtol=0, atol=1e-5)
        unmerge_ia3(ours)
        torch.testing.assert_close(_real_logits(ours, ids, mask), _real(unmerged, mask), rtol=0, atol=1e-5)



def test_ia3_files_move_both_ways(hub, tmp_path):
    from peft import PeftModel

    from course_lib.ia3 import load_adapter, save_adapter

    theirs = _peft_ia3(_copy(hub))
    _randomize(theirs, "ia3_l", 5, scale=0.3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _copy(hub)
    load_adapter(ours, tmp_path / "peft")
    ids, mask = _batch(hub[1])
    with torch.no_grad():
        expected = _real_logits(theirs, ids, mask)
        torch.testing.assert_close(_real_logits(ours, ids, mask), expected, rtol=0, atol=0)
        save_adapter(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(_copy(hub), tmp_path / "ours")
        torch.testing.assert_close(_real_logits(back, ids, mask), expected, rtol=0, atol=0)



def test_ia3_set_adapter_then_train_trains_that_adapter_like_peft(hub):
    from course_lib.ia3 import add_ia3, set_adapter
    from course_lib.sft import tokenize_rows

    ours = _copy(hub)
    add_ia3(ours, IA3_TARGETS, ["down_proj"], adapter_name="a")
    add_ia3(ours, IA3_TARGETS, ["down_proj"], adapter_name="b")
    set_adapter(ours, "a")
    from peft import IA3Config

    theirs = _peft_ia3(_copy(hub), adapter_name="a")
    theirs.add_adapter("b", IA3Config(task_type="CAUSAL_LM", target_modules=IA3_TARGETS,
                                      feedforward_modules=["down_proj"]))
    theirs.set_adapter("a")
    mine = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert mine == {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "ia3_l" in n}
    _one_step(ours, tokenize_rows(_chat_rows(), hub[1]), lr=1e-2)
    for name, p in ours.named_parameters():
        if "ia3_l" in name:
            assert torch.equal(p, before[name]) == name.endswith(".b"), name


# ------------------------------------------------------------------------------------------------
# Soft prompts
# ------------------------------------------------------------------------------------------------
NV = 4


def _soft_prompt_pair(hub, case):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    from course_lib.soft_prompts import add_soft_prompt

    method, kwargs, config = {
        "prompt": ("prompt", {}, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)),
        "p-tuning": ("p-tuning", {"encoder_hidden_size": 16},
                     PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, encoder_hidden_size=16)),
        "prefix": ("prefix", {}, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)),
    }[case]
    torch.manual_seed(1)
    theirs = get_peft_model(_copy(hub), config)
    torch.manual_seed(1)
    ours = add_soft_prompt(_copy(hub), method, NV, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("case", ["prompt", "p-tuning", "prefix"])
def test_soft_prompts_same_seed_same_logits_and_loss_as_peft_and_files_both_ways(hub, case, tmp_path):
    from peft import PeftModel

    from course_lib.soft_prompts import load_adapter, save_adapter

    ours, theirs = _soft_prompt_pair(hub, case)
    for key, value in ours.prompts["default"].state_dict().items():
        assert torch.equal(value, theirs.prompt_encoder["default"].state_dict()[key]), key
    ids, mask = _batch(hub[1])
    labels = ids.masked_fill(mask == 0, -100)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape
    torch.testing.assert_close(_real(a.logits, mask), _real(b.logits, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    loaded, back = PeftModel.from_pretrained(_copy(hub), tmp_path / "ours"), load_adapter(_copy(hub), tmp_path / "peft")
    torch.testing.assert_close(_real_logits(loaded, ids, mask), _real(a.logits, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(_real_logits(back, ids, mask), _real(b.logits, mask), rtol=0, atol=1e-6)


def test_prompt_tuning_text_init_equals_peft_with_a_tokenizer_without_bos(hub_model_dir, hub):
    from peft import PromptTuningConfig, get_peft_model

    from course_lib.soft_prompts import add_soft_prompt

    text = "Is the ending of this story happy or sad?"
    torch.manual_seed(0)
    theirs = get_peft_model(_copy(hub), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(hub_model_dir)))
    ours = add_soft_prompt(_copy(hub), "prompt", 6, init_text=text, tokenizer=hub[1])
    assert torch.equal(ours.virtual_tokens(), theirs.prompt_encoder["default"].embedding.weight)


# ------------------------------------------------------------------------------------------------
# NF4 and QLoRA, against bitsandbytes (transformers' bnb-nf4 loading) and peft's bnb LoRA
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb_hub(hub_model_dir):
    """The checkpoint loaded as QLoRA does: linear layers in bitsandbytes NF4, float32 compute."""
    from course_lib.models import load_model

    return load_model(hub_model_dir, device="cpu", quantization="bnb-nf4")[0]


def test_a_bitsandbytes_model_evaluated_first_stays_on_its_nf4_path_and_then_trains(hub_model_dir, hub):
    """On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight at its first eval-mode forward without
    gradient, computes through bf16 from then on (logits off by ~1e-2) and cannot train any more (its
    in-place bias add fails). The loader keeps every layer on the NF4 path: after an evaluation the
    weights are unpacked, the logits are the NF4 definition's (our quantize_model's) and a LoRA trains."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    from course_lib.lora import add_lora
    from course_lib.models import load_model
    from course_lib.nf4 import quantize_model

    model = load_model(hub_model_dir, device="cpu", quantization="bnb-nf4")[0]
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    ids, mask = _batch(hub[1])
    assert not model.training
    with torch.no_grad():  # where bitsandbytes would repack
        evaluated = _real_logits(model, ids, mask)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers), \
        f"repacked on a CPU with AVX512-BF16={has_avx512bf16()}"
    ours = _copy(hub)
    quantize_model(ours)
    torch.testing.assert_close(evaluated, _real_logits(ours, ids, mask), rtol=0, atol=1e-6)
    add_lora(model, "all-linear", r=4, alpha=8)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # failed inside bitsandbytes
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_quantize_model_equals_bitsandbytes_loading(hub, bnb_hub):
    from course_lib.nf4 import NF4Linear, quantize_model

    ours = _copy(hub)
    names = quantize_model(ours)
    assert len(names) == 2 * 7 and "lm_head" not in names  # the untied head stays dense, as in bnb loading
    q = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, NF4Linear)
    assert torch.equal(q.bias, hub[0].get_submodule("model.layers.0.self_attn.q_proj").bias)  # kept dense
    ids, mask = _batch(hub[1])
    torch.testing.assert_close(_real_logits(ours, ids, mask), _real_logits(bnb_hub, ids, mask), rtol=0, atol=1e-6)


def test_nf4_layers_keep_their_weights_and_biases_in_bf16(hub):
    """Issue 10, bug 8, on a model with biased layers: `model.to(bfloat16)` after quantizing must not
    change the 4-bit weight (the absmax scales stay float32), a bf16 input meets a float32 bias, and a
    bias unfrozen for training gets a gradient."""
    from course_lib.nf4 import quantize_model

    model = _copy(hub)
    quantize_model(model)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    weight = q.dequantized_weight(torch.bfloat16)
    x = torch.randn(2, 3, q.in_features, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), weight.float(), q.bias.float())
    torch.testing.assert_close(q(x).float(), expected, rtol=0.02, atol=0.02)  # bf16 input, float32 bias
    q.bias.requires_grad_(True)
    q(torch.randn(2, 3, q.in_features)).sum().backward()
    assert q.bias.grad is not None and torch.equal(q.bias.grad, torch.full_like(q.bias, 6.0))
    model.to(torch.bfloat16)
    assert torch.equal(q.dequantized_weight(torch.bfloat16), weight)


def test_qlora_on_course_nf4_equals_peft_on_bitsandbytes_and_trains(hub, bnb_hub):
    from course_lib.lora import add_lora
    from course_lib.nf4 import quantize_model
    from course_lib.sft import tokenize_rows

    ours = _copy(hub)
    quantize_model(ours)
    torch.manual_seed(0)
    add_lora(ours, "all-linear", r=4, alpha=8)
    _randomize(ours, "lora_B", 6)
    theirs = _peft_lora(copy.deepcopy(bnb_hub), r=4, lora_alpha=8, target_modules="all-linear")
    _copy_lora(ours, theirs)
    ids, mask = _batch(hub[1])
    torch.testing.assert_close(_real_logits(ours, ids, mask), _real_logits(theirs, ids, mask), rtol=0, atol=1e-5)
    frozen = {n: b.clone() for n, b in ours.named_buffers()}
    before = {n: p.detach().clone() for n, p in _lora_params(ours).items()}
    history = _one_step(ours, tokenize_rows(_chat_rows(), hub[1]), lr=1e-2)
    assert all(not torch.equal(p, before[n]) for n, p in _lora_params(ours).items())
    assert all(torch.equal(b, frozen[n]) for n, b in ours.named_buffers())  # the 4-bit weights never move
    assert torch.isfinite(torch.tensor(history.loss)).all()


def test_course_lora_on_a_bitsandbytes_model_equals_peft_and_trains(hub, bnb_hub):
    """Issue 10, bug 7: `load_model(..., quantization="bnb-nf4")` then `add_lora` made uint8 adapters
    (`Only Tensors of floating point … can require gradients`)."""
    from course_lib.lora import add_lora
    from course_lib.sft import tokenize_rows

    ours = copy.deepcopy(bnb_hub)
    torch.manual_seed(0)
    add_lora(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in _lora_params(ours).values())
    _randomize(ours, "lora_B", 7)
    theirs = _peft_lora(copy.deepcopy(bnb_hub), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _copy_lora(ours, theirs)
    ids, mask = _batch(hub[1])
    torch.testing.assert_close(_real_logits(ours, ids, mask), _real_logits(theirs, ids, mask), rtol=0, atol=1e-6)
    before = {n: p.detach().clone() for n, p in _lora_params(ours).items()}
    _one_step(ours, tokenize_rows(_chat_rows(), hub[1]), lr=1e-2)
    assert all(not torch.equal(p, before[n]) for n, p in _lora_params(ours).items())


# ------------------------------------------------------------------------------------------------
# The training loop: gradient accumulation over micro-batches of unequal length
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["default", "sft_loss"])
def test_grad_accum_over_unequal_micro_batches_equals_one_batch(hub, loss):
    """Issue 10, bug 5: TRL and transformers average over every supervised token of the accumulation
    window, so 2 micro-batches give the update of their union. Here one row supervises 2 tokens and
    the other many more; the mean of the two per-micro-batch means weighs the short row far too much."""
    from course_lib.sft import sft_loss, tokenize_rows
    from course_lib.training import TrainConfig, default_loss, train

    tokenizer = hub[1]
    rows = [{"messages": [{"role": "user", "content": "Opposite of hot:"}, {"role": "assistant", "content": " cold"}]},
            {"messages": [{"role": "user", "content": "Tell me a story."},
                          {"role": "assistant", "content": " Once upon a time, Lily found a red ball in the park."}]}]
    both = tokenize_rows(rows, tokenizer)
    short, long = tokenize_rows(rows[:1], tokenizer), tokenize_rows(rows[1:], tokenizer)
    counts = [int((b["labels"] != -100).sum()) for b in (short, long)]
    assert counts[1] >= 4 * counts[0], counts
    loss_fn = sft_loss if loss == "sft_loss" else default_loss
    config = dict(lr=1e-2, optimizer="sgd", max_grad_norm=None, progress=False)
    one, accumulated = _copy(hub), _copy(hub)
    train(one, [both], TrainConfig(steps=1, **config), loss_fn=loss_fn)
    train(accumulated, [short, long], TrainConfig(steps=1, grad_accum=2, **config), loss_fn=loss_fn)
    for (name, a), b in zip(one.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
