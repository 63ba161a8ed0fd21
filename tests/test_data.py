import json

import pytest

from course_lib import data


def test_documents_are_deterministic_per_seed():
    assert data.take(data.documents(3), 50) == data.take(data.documents(3), 50)
    assert data.take(data.documents(3), 50) != data.take(data.documents(4), 50)


def test_heldout_additions_and_stories_never_appear_in_pretraining():
    heldout_pairs = set(data.addition_pairs("heldout"))
    assert 500 < len(heldout_pairs) < 1500  # about 10 % of the 10 000 pairs
    train_docs = data.take(data.documents(1, "train"), 20_000)
    seen_pairs, stories = set(), 0
    for doc in train_docs:
        if doc.startswith("Q: What is ") and "+" in doc:
            a, b = doc.split("What is ")[1].split("?")[0].split(" + ")
            seen_pairs.add((int(a), int(b)))
        elif not doc.startswith("Q:"):
            stories += 1
            assert data.split_of("story:" + doc) == "train"
    assert len(seen_pairs) > 3000
    assert not seen_pairs & heldout_pairs
    assert stories > 5000


def test_every_document_kind_is_in_the_mix():
    docs = data.take(data.documents(0), 500)
    assert any(d.startswith("Once upon a time") or " named " in d for d in docs)
    assert any(d.startswith("Q: What color") for d in docs)
    assert any(d.startswith("Q: What is ") and "+" in d for d in docs)


def test_sentiment_examples_are_balanced_and_split():
    rows = data.sentiment_examples(40, seed=0, split="heldout")
    assert [r["label"] for r in rows].count("happy") == 20
    assert all(data.split_of("story:" + r["story"]) == "heldout" for r in rows)
    # the answer words never occur in the stories (so zero-shot cannot copy them)
    assert not any(w in r["story"].lower().split() for r in rows for w in ("yes", "no"))


def test_facts_have_short_and_long_answers():
    facts = data.all_facts()
    assert len(facts) > 60
    assert all(len(f.long) > 2 * len(f.short) and f.long.startswith(f.short) for f in facts)


def test_load_jsonl_roundtrip_and_clear_errors(tmp_path):
    path = data.write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "ok.jsonl")
    ds = data.load_jsonl(path, required=("prompt", "completion"))
    assert ds[0] == {"prompt": "a", "completion": "b"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row is missing field\(s\) \['completion'\]"):
        data.load_jsonl(bad, required=("prompt", "completion"))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        data.load_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_jsonl(tmp_path / "missing.jsonl")
