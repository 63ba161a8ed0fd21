"""The committed model: loads offline, matches its checksums, has a working chat template, and
is good enough for the lessons (coherent stories, addition between 10 % and 60 %)."""

import json
import random
import shutil

import pytest

from course_lib import data
from course_lib.evaluate import addition_accuracy, generate, lm_loss, name_consistency
from course_lib.models import count_parameters, verify_embedded
from course_lib.pretrain import EMBEDDED_DIR

REPORT = json.loads((EMBEDDED_DIR / "pretrain_report.json").read_text())


def test_committed_files_match_recorded_checksums():
    verify_embedded()


def test_a_corrupted_copy_is_detected(tmp_path):
    copy = tmp_path / "embedded"
    shutil.copytree(EMBEDDED_DIR, copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors .* checksum"):
        verify_embedded(copy)


def test_shape_and_size(embedded):
    model, tokenizer = embedded
    trainable, total = count_parameters(model)
    assert 0.5e6 < total < 4e6
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert len(tokenizer) == model.config.vocab_size <= 2100
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)


def test_chat_template_marks_exactly_the_assistant_tokens(embedded):
    _, tokenizer = embedded
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "The sky is blue."},
                {"role": "user", "content": "And the grass?"},
                {"role": "assistant", "content": "Green."}]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask) and ids[0] == tokenizer.bos_token_id
    selected = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert selected == "The sky is blue.<|end|>Green.<|end|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhat color is the sky?<|end|>\n<|assistant|>\n")


def test_chat_template_rejects_unknown_roles(embedded):
    _, tokenizer = embedded
    with pytest.raises(Exception, match="unknown chat role 'tool'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_digits_are_single_tokens(embedded):
    _, tokenizer = embedded
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if t.strip("Ġ")] == ["1", "2", "3", "4", "5"]


def test_report_records_quality_and_chosen_checkpoint():
    chosen = REPORT["chosen_checkpoint"]
    assert REPORT["in_target_range"], "no checkpoint landed in the target addition range"
    assert 0.10 <= chosen["heldout_addition_accuracy"] <= 0.60
    assert chosen["heldout_loss"] < 1.0
    assert REPORT["checksums"].keys() == {"model.safetensors", "tokenizer.json"}


def test_addition_accuracy_is_between_10_and_60_percent(embedded):
    model, tokenizer = embedded
    pairs = data.addition_pairs("heldout", two_digit_only=True)
    accuracy = addition_accuracy(model, tokenizer, pairs)
    assert 0.10 <= accuracy <= 0.60, accuracy


def test_story_continuations_are_coherent(embedded):
    """Unseen stories have low loss, and greedy continuations of story openings are well-formed
    stories: template sentences through to a recognisable happy or sad ending (greedy decoding picks
    the likelier kind; sampling reaches both)."""
    model, tokenizer = embedded
    stories = [s for s in data.take(data.documents(11, "heldout"), 400) if not s.startswith("Q:")][:50]
    assert lm_loss(model, tokenizer, stories) < 0.9  # nats/token on unseen stories
    openers = [data.make_story(random.Random(500 + i)).body.split(".")[0] + "." for i in range(24)]
    continuations = generate(model, tokenizer, openers, max_new_tokens=80)
    endings = [data.ending_sentiment(text) for text in continuations]
    assert sum(e is not None for e in endings) >= 20, list(zip(openers, continuations))
    sampled = generate(model, tokenizer, openers, max_new_tokens=80, do_sample=True, seed=1)
    assert {"happy", "sad"} <= {data.ending_sentiment(text) for text in sampled}  # both kinds when sampling


def test_name_tracking_is_a_measured_limitation(embedded):
    """The 0.9 M model learns the story grammar but not to carry the hero's name (an induction
    skill that needs more tokens than the pretraining budget gives). Measured, so that a better
    embedded model shows up here: update the README when this changes."""
    model, tokenizer = embedded
    openers = [data.make_story(random.Random(100 + i)).body.split(".")[0] + "." for i in range(64)]
    assert name_consistency(model, tokenizer, openers) < 0.5


def test_facts_are_known(embedded):
    model, tokenizer = embedded
    answers = generate(model, tokenizer, ["Q: What color is the sky?\nA:", "Q: What does a cow say?\nA:"],
                       max_new_tokens=12)
    assert "blue" in answers[0] and "moo" in answers[1], answers
