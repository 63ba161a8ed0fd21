"""Preference pairs for lessons 06–07: TRL's explicit-prompt format, held out of training and pretraining."""

import json

import pytest

from course_lib import data


@pytest.fixture(scope="module")
def ending_heldout():
    return data.preference_rows("ending", "heldout", n=48, seed=0)


@pytest.fixture(scope="module")
def ending_train():
    return data.preference_rows("ending", "train", n=1500, seed=0)


def test_ending_rows_are_one_story_with_a_happy_and_a_sad_ending(ending_heldout):
    for row in ending_heldout:
        assert sorted(row) == sorted(data.PREFERENCE_FIELDS)
        assert data.ending_sentiment(row["prompt"]) is None  # the opener carries no ending
        assert data.ending_sentiment(row["chosen"]) == "happy"
        assert data.ending_sentiment(row["rejected"]) == "sad"
        # prompt + completion is the corpus's own story text: "body ending", joined by one space
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert not row["chosen"].startswith("  ") and not row["prompt"].endswith(" ")
        assert row["prompt"].endswith(".")
    # the characters agree: the hero named in the opener is the one of both endings
    for row in ending_heldout:
        hero = next(name for name in data.NAMES if f"named {name}" in row["prompt"] or f"called {name}" in row["prompt"]
                    or row["prompt"].startswith(name + " "))
        assert hero in row["chosen"] + row["rejected"]
    assert len({r["prompt"] for r in ending_heldout}) == len(ending_heldout)  # distinct openers


def test_heldout_rows_never_appear_in_training_rows_or_pretraining(ending_heldout, ending_train):
    for row in ending_heldout:
        for completion in ("chosen", "rejected"):
            assert data.split_of("story:" + row["prompt"] + row[completion]) == "heldout"
    for row in ending_train:
        for completion in ("chosen", "rejected"):
            assert data.split_of("story:" + row["prompt"] + row[completion]) == "train"
    assert not {r["prompt"] for r in ending_heldout} & {r["prompt"] for r in ending_train}
    # the pretraining stream (pretrain.py reads documents(seed + 1) with seed 0) holds none of the held-out stories
    heldout_texts = {r["prompt"] + r[c] for r in ending_heldout for c in ("chosen", "rejected")}
    pretraining = set(data.take(data.documents(1, "train"), 20_000))
    assert not heldout_texts & pretraining
    # ...while train rows' stories are ordinary pretraining stories: both sides of the rule were exercised
    train_texts = {r["prompt"] + r[c] for r in ending_train for c in ("chosen", "rejected")}
    assert all(data.split_of("story:" + t) == "train" for t in list(pretraining)[:2000] if not t.startswith("Q:"))
    assert len(train_texts) == 2 * len(ending_train)


def test_rows_are_deterministic_per_seed_and_callers_cannot_corrupt_the_cache(ending_heldout):
    again = data.preference_rows("ending", "heldout", n=48, seed=0)
    assert again == ending_heldout
    again[0]["chosen"] = "edited"
    assert data.preference_rows("ending", "heldout", n=48, seed=0)[0] == ending_heldout[0]
    other = data.preference_rows("ending", "heldout", n=48, seed=1)
    assert not {r["prompt"] for r in other} & {r["prompt"] for r in ending_heldout}
    assert data.preference_rows("ending", "heldout", n=10, seed=0) == ending_heldout[:10]


def test_concise_rows_prefer_the_short_answer_and_hold_out_questions():
    train = data.preference_rows("concise", "train", n=40, seed=0)
    heldout = data.preference_rows("concise", "heldout", n=15, seed=0)
    facts = {f.question: f for f in data.all_facts()}
    for row in train + heldout:
        assert row["prompt"].startswith("Q: ") and row["prompt"].endswith("\nA:")
        question = row["prompt"][3:-3]
        fact = facts[question]
        assert row["prompt"] + row["chosen"] == data.format_qa(question, fact.short)
        assert row["prompt"] + row["rejected"] == data.format_qa(question, fact.long)
        assert len(row["chosen"]) * 2 < len(row["rejected"]) and row["rejected"].startswith(row["chosen"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    every = data.preference_rows("concise", "heldout", n=len(heldout), seed=0)
    n_heldout = sum(data.split_of("fact:" + q, data.CONCISE_HELDOUT_PERCENT) == "heldout" for q in facts)
    assert 15 <= n_heldout <= 30
    with pytest.raises(ValueError, match=f"only {n_heldout} heldout questions"):
        data.preference_rows("concise", "heldout", n=n_heldout + 1, seed=0)
    assert len(data.preference_rows("concise", "heldout", n=n_heldout, seed=0)) == n_heldout
    assert every == heldout


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown preference task 'happy'"):
        data.preference_rows("happy", "train", n=2, seed=0)
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        data.preference_rows("ending", "test", n=2, seed=0)
    with pytest.raises(ValueError, match="n \\(the number of rows\\) must be a positive int"):
        data.preference_rows("ending", "train", n=0, seed=0)


def test_rows_round_trip_through_jsonl_and_datasets(tmp_path, ending_heldout):
    path = data.write_jsonl(ending_heldout[:5], tmp_path / "pref.jsonl")
    loaded = data.load_preferences(path)
    assert loaded == ending_heldout[:5]
    ds = data.load_jsonl(path, required=data.PREFERENCE_FIELDS)  # the datasets view TRL trainers take
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 5
    # a row without its rejected completion, and a pair without a preference, are named errors
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": " a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row is missing field\(s\) \['rejected'\]"):
        data.load_preferences(bad)
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}) + "\n")
    with pytest.raises(ValueError, match="row 0: chosen and rejected are identical"):
        data.load_preferences(bad)
    with pytest.raises(ValueError, match="no preference rows"):
        data.check_preference_rows([])
    with pytest.raises(ValueError, match="row 0: 'chosen' must be a string"):
        data.check_preference_rows([{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": " b"}])
