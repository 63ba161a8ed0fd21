"""Reward model: score at the last real token, the Bradley–Terry loss equal to TRL's RewardTrainer, a
transformers checkpoint with the same scores, and a held-out accuracy that training raises."""

import copy
import math

import pytest
import torch

from course_lib import data
from course_lib import reward_model as rm
from course_lib.models import load_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(None, device="cpu")[1]


@pytest.fixture(scope="module")
def scorer(tokenizer):
    """A fresh copy of the embedded model's body (tests must not train the shared fixture) with a head
    large enough (std 0.5) that scores, margins and the centering term all matter in the loss."""
    return rm.RewardModel.from_causal_lm(load_model(None, device="cpu")[0], tokenizer, init_std=0.5).eval()


def pad_is_eos(tokenizer):
    """The usual fix for a hub tokenizer without a pad token, and the trap it sets."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def test_last_token_index_reads_the_mask_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert rm.last_token_index(mask).tolist() == [2, 4, 4, 0]
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] have no real token"):
        rm.last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_score_is_read_at_the_last_real_token_whatever_the_padding(scorer, tokenizer):
    texts = ["Tom was sad.", "Once upon a time, there was a little fox named Lily. It was a happy day."]
    batched = scorer(**rm.encode_texts(texts, tokenizer))  # right-padded, eos appended
    alone = torch.stack([scorer(**rm.encode_texts([t], tokenizer))[0] for t in texts])
    torch.testing.assert_close(batched, alone)
    # the head applied by hand to the hidden state at the eos, computed without any padding
    for text, score in zip(texts, batched):
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == tokenizer.eos_token_id
        hidden = scorer.backbone(input_ids=ids).last_hidden_state[0, -1]
        torch.testing.assert_close(score, hidden @ scorer.score.weight[0], rtol=1e-5, atol=1e-5)


def test_pad_equal_to_eos_does_not_hide_the_eos(scorer, tokenizer):
    texts = ["Tom was sad.", "Once upon a time, there was a little fox named Lily. It was a happy day."]
    tok = pad_is_eos(tokenizer)
    batch = rm.encode_texts(texts, tok)
    assert (batch["input_ids"][0] == tok.eos_token_id).sum() > 1  # the real eos, then eos-valued padding
    ours = scorer(**batch)
    torch.testing.assert_close(ours, scorer(**rm.encode_texts(texts, tokenizer)))  # same as with a real pad
    # transformers' classifier finds "the last id that is not pad": with pad == eos it skips the real
    # eos and scores the token before it, i.e. the text without its eos — the trap
    hf = rm.to_transformers(scorer, tokenizer)
    hf.config.pad_token_id = tok.eos_token_id
    with torch.no_grad():
        trapped = hf(**batch).logits.squeeze(-1)
    torch.testing.assert_close(trapped, scorer(**rm.encode_texts(texts, tokenizer, add_eos=False)))
    assert (trapped - ours).abs().min() > 1e-3
    with pytest.raises(ValueError, match="pad_token is its eos_token"):
        rm.to_transformers(scorer, tok)


def expected_bt_loss(r_chosen, r_rejected, margin=None, center=None):
    """−log σ(r_c − r_r − m) averaged over pairs, + c·mean((r_c + r_r)²), with plain floats."""
    n = len(r_chosen)
    margin = margin if margin is not None else [0.0] * n
    loss = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(r_chosen, r_rejected, margin)) / n
    if center is not None:
        loss += center * sum((c + r) ** 2 for c, r in zip(r_chosen, r_rejected)) / n
    return loss


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    for margin in (None, [0.5, 0.0, 1.5]):
        for center in (None, 0.01):
            got = rm.bradley_terry_loss(r_c, r_r, None if margin is None else torch.tensor(margin), center)
            assert got.item() == pytest.approx(expected_bt_loss(r_c.tolist(), r_r.tolist(), margin, center), rel=1e-6)
    # a huge difference stays finite (logsigmoid, not log(sigmoid))
    assert torch.isfinite(rm.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])))
    with pytest.raises(ValueError, match="r_chosen .* and r_rejected .* must have one shape"):
        rm.bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin .* must be a number or one value per pair"):
        rm.bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_equals_trl_reward_trainer(scorer, tokenizer, tmp_path, with_margin, center):
    """TRL tokenizes the same rows (prompt + completion + eos), collates them, runs the transformers
    checkpoint of our model and computes its loss; ours must give the same number."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    rows = data.preference_rows("ending", "train", n=4, seed=3) + data.preference_rows("concise", "train", n=2, seed=0)
    if with_margin:
        rows = [dict(r, margin=0.75 * i) for i, r in enumerate(rows)]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                        center_rewards_coefficient=center, per_device_train_batch_size=len(rows))
    trainer = RewardTrainer(model=rm.to_transformers(scorer, tokenizer), args=args,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch))

    batch = rm.encode_pairs(rows, tokenizer)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch[key], trl_batch[key])  # same tokens, same layout (chosen first)
    assert ("margin" in batch) == with_margin
    with torch.no_grad():
        r_chosen, r_rejected = rm.pair_scores(scorer, batch)
        ours = rm.bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"), center)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    margins = [0.75 * i for i in range(len(rows))] if with_margin else None
    assert ours.item() == pytest.approx(expected_bt_loss(r_chosen.tolist(), r_rejected.tolist(), margins, center),
                                        rel=1e-5)


def test_saved_checkpoint_loads_in_transformers_with_the_same_scores(scorer, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm.save_reward_model(scorer, tokenizer, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.pad_token_id
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    rows = data.preference_rows("ending", "heldout", n=3, seed=0)
    texts = [r["prompt"] + r["chosen"] for r in rows] + ["Q: What is 2 + 3?\nA: 5"]
    batch = rm.encode_texts(texts, hf_tok)
    with torch.no_grad():
        theirs = hf(**batch).logits.squeeze(-1)
        ours = scorer(**rm.encode_texts(texts, tokenizer))
    assert torch.equal(batch["input_ids"], rm.encode_texts(texts, tokenizer)["input_ids"])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1  # scores that actually differ (a zero head would pass trivially)


def test_training_raises_heldout_pairwise_accuracy(tokenizer):
    model = rm.RewardModel.from_causal_lm(load_model(None, device="cpu")[0], tokenizer, seed=0)
    train_rows = data.preference_rows("ending", "train", n=96, seed=0)
    heldout = data.preference_rows("ending", "heldout", n=32, seed=0)
    before = rm.pairwise_accuracy(model, tokenizer, heldout)
    history = rm.train_reward_model(model, tokenizer, train_rows, steps=10, batch_size=8, lr=1e-3,
                                    eval_rows=heldout, eval_every=5, progress=False)
    after = history.extra["eval_accuracy"][-1]
    assert history.extra["eval_step"] == [5, 10]
    assert after == rm.pairwise_accuracy(model, tokenizer, heldout)
    assert after >= 0.9 and after > before + 0.3, (before, after)
    assert history.loss[-1] < history.loss[0]


def test_bad_input_is_named(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        rm.RewardModel.from_causal_lm(load_model(None, device="cpu")[0], no_pad)
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        rm.encode_texts(["a"], no_pad)
    with pytest.raises(ValueError, match="texts is empty"):
        rm.encode_texts([], tokenizer)
    with pytest.raises(ValueError, match="over max_length=4"):
        rm.encode_texts(["a long text with many tokens"], tokenizer, max_length=4)
    with pytest.raises(ValueError, match="row 0: missing field"):
        rm.encode_pairs([{"prompt": "p", "chosen": " a"}], tokenizer)
    with pytest.raises(ValueError, match="no preference rows"):
        rm.train_reward_model(None, tokenizer, [], steps=1)
