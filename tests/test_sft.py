"""SFT data against TRL's SFTTrainer (labels, masks, loss), packing, and bad input."""

import tempfile
import warnings

import pytest
import torch

from course_lib.sft import data_format, sft_batches, sft_loss, tokenize_rows
from course_lib.templates import (instruction_dataset, pack_examples, render_template, tokenize_messages,
                                  tokenize_prompt_and_completion, unpad)


def _rows():
    return instruction_dataset(["opposite", "colour", "sentiment", "addition"], per_task=3)[:12]


def _trl_batch(model, tokenizer, rows, **config):
    """TRL's collated batch and loss. The trainer gets a copy: it changes the model it is given (it
    turns on gradient checkpointing), and the session's embedded model is shared by other tests."""
    import copy

    from datasets import Dataset

    model = copy.deepcopy(model)
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             args=SFTConfig(output_dir=out, report_to=[], max_length=None, use_cpu=True,
                                            per_device_train_batch_size=len(rows), **config))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
    return batch, loss


def test_messages_labels_and_loss_equal_trl_assistant_only(embedded):
    model, tokenizer = embedded
    rows = [{"messages": r["messages"]} for r in _rows()]
    theirs, their_loss = _trl_batch(model, tokenizer, rows, assistant_only_loss=True)
    ours = tokenize_rows(rows, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        # same tokens and labels; TRL sums and divides by the token count itself: the last bit may differ
        torch.testing.assert_close(sft_loss(model, ours).mean(), their_loss, rtol=1e-6, atol=0)
    # the loss is on the assistant's answer and its end-of-turn token only
    first = ours["labels"][0][ours["labels"][0] != -100]
    assert tokenizer.decode(first) == rows[0]["messages"][1]["content"] + "<|end|>"


def test_full_sequence_labels_equal_trl_without_the_answer_only_masks(embedded):
    """answer_only_loss=False: TRL's assistant_only_loss=False (chat rows) and completion_only_loss=False
    (prompt/completion rows) — every real token is a label, padding is not."""
    model, tokenizer = embedded
    chats = [{"messages": r["messages"]} for r in _rows()[:6]]
    pairs = [{"prompt": r["messages"][0]["content"] + "\nAnswer:", "completion": r["messages"][1]["content"]}
             for r in _rows()[:6]]
    for rows, config in ((chats, {"assistant_only_loss": False}), (pairs, {"completion_only_loss": False})):
        theirs, their_loss = _trl_batch(model, tokenizer, rows, **config)
        ours = tokenize_rows(rows, tokenizer, answer_only_loss=False)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(ours[key], theirs[key]), key
        real = ours["attention_mask"].bool()
        assert torch.equal(ours["labels"][real], ours["input_ids"][real]) and (ours["labels"][~real] == -100).all()
        with torch.no_grad():
            torch.testing.assert_close(sft_loss(model, ours).mean(), their_loss, rtol=1e-6, atol=0)
    # the answer-only labels are the full-sequence labels with everything but the answers masked
    answer_only, full = tokenize_rows(chats, tokenizer), tokenize_rows(chats, tokenizer, answer_only_loss=False)
    kept = answer_only["labels"] != -100
    assert torch.equal(answer_only["labels"][kept], full["labels"][kept]) and kept.sum() < (full["labels"] != -100).sum()


def test_prompt_completion_labels_and_loss_equal_trl_completion_only(embedded):
    model, tokenizer = embedded
    rows = [{"prompt": r["messages"][0]["content"] + "\nAnswer:", "completion": r["messages"][1]["content"]}
            for r in _rows()]
    theirs, their_loss = _trl_batch(model, tokenizer, rows)
    ours = tokenize_rows(rows, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        # same tokens and labels; TRL sums and divides by the token count itself: the last bit may differ
        torch.testing.assert_close(sft_loss(model, ours).mean(), their_loss, rtol=1e-6, atol=0)


def test_packed_and_unpacked_losses_are_equal(embedded):
    model, tokenizer = embedded
    batch = tokenize_rows(_rows(), tokenizer)
    packed = pack_examples(unpad(batch), 256, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < batch["input_ids"].shape[0]  # it did pack
    assert int((packed["labels"] != -100).sum()) == int((batch["labels"] != -100).sum())
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(model, packed).mean(), sft_loss(model, batch).mean(), rtol=1e-5, atol=0)
        # without restarting positions the examples would see each other: a different loss
        leaky = {k: v for k, v in packed.items() if k != "position_ids"}
        assert abs(sft_loss(model, leaky).item() - sft_loss(model, batch).item()) > 1e-3


def test_packing_restarts_positions_and_masks_each_examples_first_token():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
                {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}]
    out = pack_examples(examples, 6, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 0, 0, 0]]  # best fit, longest first
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]
    with pytest.raises(ValueError, match="example 0 has 3 tokens, over the packing length 2"):
        pack_examples(examples, 2, pad_id=0)


def test_batches_cycle_through_shuffled_epochs(embedded):
    _, tokenizer = embedded
    rows = _rows()
    batches = sft_batches(rows, tokenizer, 5, seed=1)
    seen = [tuple(r[r != tokenizer.pad_token_id].tolist()) for s in range(6) for r in batches(s)["input_ids"]]
    epoch1, epoch2 = seen[:12], seen[12:24]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 12 and epoch1 != epoch2


def test_flan_templates_cover_tasks_and_hold_out_templates_and_a_task():
    train = instruction_dataset(["opposite", "colour"], "train", "train")
    held = instruction_dataset(["opposite", "colour"], "train", "heldout")
    assert {r["messages"][0]["content"] for r in train}.isdisjoint({r["messages"][0]["content"] for r in held})
    assert {r["template"] for r in train} == {"train0", "train1", "train2"}
    with pytest.raises(ValueError, match="held-out task"):
        instruction_dataset(["baby"], "train", "train")
    from course_lib.templates import task_rows

    for task, field in (("opposite", "word"), ("colour", "thing"), ("sound", "animal")):
        seen, unseen = ({r[field] for r in task_rows(task, split)} for split in ("train", "heldout"))
        assert unseen and seen and seen.isdisjoint(unseen)  # held-out items are never trained on
    with pytest.raises(KeyError, match=r"needs field\(s\) \['word'\]"):
        render_template("Opposite of {word}:", {"thing": "sky"})


def test_per_task_caps_every_task_so_a_smaller_set_keeps_the_task_mix():
    """per_task is honoured by every task (it once was ignored by opposite, colour and sound, so a
    smaller set was mostly short-answer tasks)."""
    from collections import Counter

    from course_lib.templates import FLAN_TEMPLATES, HELDOUT_TASKS, task_rows

    tasks = [t for t in FLAN_TEMPLATES if t not in HELDOUT_TASKS]
    for task in [*tasks, "baby"]:
        for n in (1, 5, 9):
            rows = task_rows(task, "train", n=n, seed=3)
            assert len(rows) == n, (task, n)  # every task has at least 9 training items
            assert rows == task_rows(task, "train", n=n, seed=3)  # deterministic in the seed
            if task in ("opposite", "colour", "sound", "baby"):  # a sample of the task's fixed items, split kept
                assert all(r in task_rows(task, "train") for r in rows)
    assert len(task_rows("opposite", "train", n=10_000)) == len(task_rows("opposite", "train"))  # all it has
    small = Counter(r["task"] for r in instruction_dataset(tasks, per_task=5, seed=1))
    assert set(small.values()) == {5 * 3}, small  # 5 items × 3 templates, every task alike
    with pytest.raises(ValueError, match="n \\(rows per task\\) must be a positive int"):
        task_rows("opposite", "train", n=0)


def test_rows_name_their_item_the_same_under_every_template():
    train = instruction_dataset(["opposite", "addition"], "train", "train", per_task=4, seed=2)
    held = instruction_dataset(["opposite", "addition"], "train", "heldout", per_task=4, seed=2)
    items = {r["item"] for r in train}
    assert len(items) == 8 and all(sum(r["item"] == i for r in train) == 3 for i in items)  # 3 phrasings each
    assert {r["item"] for r in held} == items  # same per_task and seed: the same items, new phrasings
    assert any('"word": ' in i for i in items) and all("answer" not in i for i in items)


def test_bad_rows_get_errors_that_name_the_row(embedded):
    _, tokenizer = embedded
    with pytest.raises(ValueError, match=r"row 1: missing field\(s\) \['completion'\]"):
        data_format([{"prompt": "a", "completion": " b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="row 0: empty completion"):
        tokenize_rows([{"prompt": "a", "completion": "  "}], tokenizer)
    with pytest.raises(ValueError, match="row 0: 9 tokens.*over max_length=4"):
        tokenize_prompt_and_completion(["Q: What is up?"], [" down"], tokenizer, max_length=4)
    with pytest.raises(ValueError, match="row 1: the chat template cannot render.*unknown chat role 'robot'"):
        tokenize_messages([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo"}],
                           [{"role": "robot", "content": "beep"}]], tokenizer)
    with pytest.raises(ValueError, match="row 0: no assistant tokens"):
        tokenize_messages([[{"role": "user", "content": "hi"}]], tokenizer)
    with pytest.raises(ValueError, match="packing needs max_length"):
        sft_batches(_rows(), tokenizer, 4, packing=True)


def test_run_sft_trains_lora_by_default_and_every_weight_on_request(embedded):
    import copy

    from course_lib.lora import lora_layers
    from course_lib.sft import run_sft
    from course_lib.training import TrainConfig

    model, tokenizer = embedded
    rows = _rows()
    config = TrainConfig(steps=2, lr=1e-3, progress=False)
    lora_model = copy.deepcopy(model)
    run_sft(lora_model, rows, tokenizer, config, batch_size=4, packing=True, max_length=256)
    assert len(list(lora_layers(lora_model))) == 4 * 7  # all-linear: 4 layers × 7 projections
    embedding = model.get_input_embeddings().weight
    assert torch.equal(lora_model.get_input_embeddings().weight, embedding)  # base frozen
    full = copy.deepcopy(model)
    run_sft(full, rows, tokenizer, config, batch_size=4, full_finetune=True)
    assert not list(lora_layers(full)) and not torch.equal(full.get_input_embeddings().weight, embedding)


def test_accumulated_sft_update_is_the_token_mean_of_the_whole_batch(embedded):
    """A 3-token answer and an 11-token answer (with their <|end|>), one per micro-batch (grad_accum=2): the update of one
    batch of both under transformers' (= TRL's) token-mean loss, not the mean of the two answers' means."""
    import copy

    from course_lib.training import TrainConfig, train

    model, tokenizer = embedded
    rows = [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": " hi"}]},
            {"messages": [{"role": "user", "content": "What color is the sky?"},
                          {"role": "assistant", "content": " The sky is blue and the grass is green."}]}]
    whole = tokenize_rows(rows, tokenizer)
    assert sorted(int((r[1:] != -100).sum()) for r in whole["labels"]) == [3, 11]
    reference = copy.deepcopy(model)
    reference(**whole).loss.backward()  # transformers' token mean over both rows
    with torch.no_grad():
        expected = [p - 1e-2 * p.grad for p in reference.parameters()]
    ours = copy.deepcopy(model)
    train(ours, iter([tokenize_rows(rows[:1], tokenizer), tokenize_rows(rows[1:], tokenizer)]),
          TrainConfig(steps=1, lr=1e-2, optimizer="sgd", max_grad_norm=None, grad_accum=2, progress=False),
          loss_fn=sft_loss)
    for a, b in zip(ours.parameters(), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_instruction_accuracy_stops_at_the_chat_templates_own_end_of_turn(embedded, monkeypatch):
    """With a ChatML tokenizer (eos <|eos|>, turns closed by <|im_end|>) generation is told to stop at
    <|im_end|>; the hard-coded <|end|> of the embedded model was a crash here."""
    import copy

    from course_lib import evaluate
    from course_lib.sft import instruction_accuracy

    from .chat_templates import chatml_tokenizer

    model, _ = embedded
    tokenizer = chatml_tokenizer()
    model = copy.deepcopy(model)
    model.resize_token_embeddings(len(tokenizer))
    rows = _rows()[:4]
    accuracy = instruction_accuracy(model, tokenizer, rows, max_new_tokens=3)
    assert 0.0 <= accuracy <= 1.0
    asked = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **kw: asked.append(kw["stop_tokens"]) or [""] * len(rows))
    instruction_accuracy(model, tokenizer, rows)
    assert asked == [("<|im_end|>",)]
