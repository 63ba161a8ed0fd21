"""The course's own text world: a deterministic generator of everything the embedded model reads.

Every lesson needs a real task on a model small enough for a laptop CPU, so the corpus is built
for them (DESIGN.md, "The embedded model"):

* **stories** with a happy or a sad ending — sentiment classification and style (PEFT lessons),
  a preference for happy endings (reward model, PPO, DPO);
* **factual Q&A** about colours, opposites, animal sounds, baby animals and legs, each with a short
  and a long answer — instruction following (SFT) and a preference for concise answers;
* **1–2 digit additions** — a verifiable reward for GRPO.

Everything is a pure function of a seed. Held-out splits are decided by a hash of the item's
identity (the story's text, the addition's operands), so a held-out item never appears in the
pretraining stream, whatever the seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

Split = Literal["train", "heldout"]

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Max", "Zoe",
         "Leo", "Emma", "Jack", "Lucy", "Finn", "Ruby", "Noah", "Ella"]
ANIMALS = ["cat", "dog", "rabbit", "bird", "fox", "bear", "duck", "frog",
           "mouse", "pig", "cow", "horse", "owl", "sheep", "lion", "goat"]
PLACES = ["park", "forest", "garden", "beach", "farm", "river", "hill", "town", "lake", "meadow"]
THINGS = ["ball", "kite", "hat", "box", "toy car", "balloon", "book", "cake", "drum", "boat"]
HAZARDS = ["a deep hole", "the water", "a tall tree", "a big bush", "the mud", "a dark cave"]
ADJECTIVES = ["little", "small", "kind", "brave", "shy", "happy", "curious", "tiny"]

COLOURS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "banana": "yellow",
           "apple": "red", "night": "black", "carrot": "orange", "strawberry": "red",
           "leaf": "green", "cloud": "white", "coal": "black", "tomato": "red",
           "lemon": "yellow", "sea": "blue", "milk": "white", "frog": "green", "pumpkin": "orange"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
             "day": "night", "old": "new", "wet": "dry", "tall": "short", "light": "dark",
             "open": "closed", "loud": "quiet", "full": "empty", "hard": "soft", "early": "late",
             "in": "out", "left": "right", "good": "bad", "thick": "thin", "high": "low"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
          "pig": "oink", "lion": "roar", "owl": "hoot", "horse": "neigh", "frog": "ribbit",
          "mouse": "squeak", "bird": "tweet", "goat": "bleat", "bee": "buzz"}
BABIES = {"dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "duck": "duckling",
          "horse": "foal", "pig": "piglet", "frog": "tadpole", "bear": "cub", "lion": "cub",
          "goat": "kid", "owl": "owlet", "kangaroo": "joey", "swan": "cygnet"}
LEGS = {"dog": 4, "cat": 4, "bird": 2, "fish": 0, "spider": 8, "ant": 6, "duck": 2, "horse": 4,
        "snake": 0, "bee": 6, "cow": 4, "chicken": 2, "crab": 10, "frog": 4, "owl": 2, "beetle": 6}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]


def _stable_hash(text: str) -> int:
    """A hash that does not change between Python processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(key: str, heldout_percent: int = 10) -> Split:
    """Assign an item to ``train`` or ``heldout`` from its identity alone: ``heldout`` when a stable hash of
    ``key`` falls in the first ``heldout_percent`` of 100 buckets. ``heldout_percent`` runs from 0 (every
    item is ``train``) to 100 (every item is ``heldout``); anything outside is an error."""
    if not isinstance(key, str):
        raise TypeError(f"split_of: key must be a string naming the item (e.g. 'story:' + text), "
                        f"got {type(key).__name__}")
    if isinstance(heldout_percent, bool) or not isinstance(heldout_percent, (int, float)):
        raise TypeError(f"split_of: heldout_percent must be a number from 0 to 100, got "
                        f"{type(heldout_percent).__name__} {heldout_percent!r:.40}")
    if not 0 <= heldout_percent <= 100:
        raise ValueError(f"split_of: heldout_percent={heldout_percent!r} is a percentage of the items: give a "
                         f"number from 0 (none held out) to 100 (all held out), e.g. 10")
    return "heldout" if _stable_hash(key) % 100 < heldout_percent else "train"


# --------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Story:
    body: str  # everything up to the ending
    ending: str
    label: Literal["happy", "sad"]

    @property
    def text(self) -> str:
        return f"{self.body} {self.ending}"


_HAPPY = [
    "{friend} came to help, and together they got the {thing} back. {name} smiled and said thank you. It was a happy day.",
    "Then the wind blew the {thing} back to {name}. {name} laughed and danced. {name} was very happy.",
    "A kind {helper} found the {thing} and gave it to {name}. They became good friends and played all day.",
    "{name} tried again and again, and at last {name} got the {thing} back. Mom gave {name} a big hug. {name} felt proud and happy.",
]
_SAD = [
    "{name} looked and looked, but the {thing} was gone. {name} went home alone and cried. It was a sad day.",
    "{friend} did not come to help. The {thing} was lost forever, and {name} felt very sad.",
    "The {thing} was broken and could not be fixed. {name} sat down and cried all night.",
    "It started to rain, and {name} could not find the {thing}. {name} walked home cold and sad.",
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in ("name", "friend", "thing", "helper"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), r"[A-Za-z]+(?: [a-z]+)?")
    return re.compile(pattern)


_ENDING_PATTERNS = [(label, _template_regex(t)) for label, group in (("happy", _HAPPY), ("sad", _SAD)) for t in group]


def ending_sentiment(text: str) -> Literal["happy", "sad"] | None:
    """Which kind of ending a (generated) story reaches, judged by its ending sentences; None if none.

    Used to check that continuations are well-formed stories, and later as a programmatic judge
    of the "happy ending" preference."""
    for label, pattern in _ENDING_PATTERNS:
        if pattern.search(text):
            return label
    return None


STORY_LABELS = ("happy", "sad")


def make_story(rng: random.Random, label: Literal["happy", "sad"] | None = None) -> Story:
    """One short story; the ending (and only the ending) carries the sentiment. ``label``: one of
    :data:`STORY_LABELS`, or None for a random one (drawn from ``rng``, a ``random.Random``)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"make_story: rng must be a random.Random (e.g. random.Random(0)), "
                        f"got {type(rng).__name__} {rng!r:.40}")
    if label is not None and label not in STORY_LABELS:
        raise ValueError(f"make_story: label={label!r} is not a story label: give one of "
                         f"{', '.join(map(repr, STORY_LABELS))}, or None for a random one")
    name, friend = rng.sample(NAMES, 2)
    animal, helper = rng.sample(ANIMALS, 2)
    place, thing, hazard, adj = (rng.choice(PLACES), rng.choice(THINGS), rng.choice(HAZARDS),
                                 rng.choice(ADJECTIVES))
    opener = rng.choice([
        f"Once upon a time, there was a {adj} {animal} named {name}.",
        f"There was a {adj} {animal} called {name}.",
        f"{name} was a {adj} {animal} who lived near the {place}.",
    ])
    middle = rng.choice([
        f"One day, {name} went to the {place} with a {thing}. {name} played with the {thing} for a long time.",
        f"{name} loved to play with a {thing} at the {place}. One day, {name} took the {thing} outside.",
    ])
    trouble = rng.choice([
        f"But the {thing} fell into {hazard}.",
        f"Suddenly, the {thing} rolled away into {hazard}.",
    ])
    label = label or rng.choice(list(STORY_LABELS))
    ending = rng.choice(_HAPPY if label == "happy" else _SAD).format(
        name=name, friend=friend, thing=thing, helper=helper)
    return Story(body=f"{opener} {middle} {trouble}", ending=ending, label=label)


# --------------------------------------------------------------------------------------------
# Factual Q&A: (question, short answer, long answer, topic)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    topic: str
    question: str
    short: str
    long: str
    answer_word: str  # the single word a grader looks for


def all_facts() -> list[Fact]:
    facts = []
    for thing, colour in COLOURS.items():
        facts.append(Fact("colour", f"What color is the {thing}?", f"The {thing} is {colour}.",
                          f"The {thing} is {colour}. You can see its {colour} color every day, and "
                          f"many people like the {colour} {thing} very much.", colour))
    for word, opposite in OPPOSITES.items():
        facts.append(Fact("opposite", f"What is the opposite of {word}?",
                          f"The opposite of {word} is {opposite}.",
                          f"The opposite of {word} is {opposite}. When something is not {word}, "
                          f"we can often say that it is {opposite}.", opposite))
    for animal, sound in SOUNDS.items():
        facts.append(Fact("sound", f"What does a {animal} say?", f"A {animal} says {sound}.",
                          f"A {animal} says {sound}. If you go near a {animal}, you may hear it "
                          f"say {sound} again and again.", sound))
    for animal, baby in BABIES.items():
        facts.append(Fact("baby", f"What is a baby {animal} called?", f"A baby {animal} is called a {baby}.",
                          f"A baby {animal} is called a {baby}. The {baby} stays close to its mother "
                          f"until it is big and strong.", baby))
    for animal, legs in LEGS.items():
        n = NUMBER_WORDS[legs]
        facts.append(Fact("legs", f"How many legs does a {animal} have?", f"A {animal} has {n} legs.",
                          f"A {animal} has {n} legs. If you count them one by one, you will find "
                          f"{n} legs on every {animal}.", n))
    return facts


def format_qa(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------
def addition_split(a: int, b: int) -> Split:
    """Held-out addition pairs never appear in pretraining (about 10% of the 100 × 100 pairs)."""
    return split_of(f"add:{a}+{b}")


def addition_prompt(a: int, b: int) -> str:
    return f"Q: What is {a} + {b}?\nA:"


def addition_pairs(split: Split, *, two_digit_only: bool = False) -> list[tuple[int, int]]:
    lo = 10 if two_digit_only else 0
    return [(a, b) for a in range(lo, 100) for b in range(lo, 100) if addition_split(a, b) == split]


# --------------------------------------------------------------------------------------------
# The pretraining stream
# --------------------------------------------------------------------------------------------
MIX = {"story": 0.4, "qa": 0.3, "add": 0.3}


def _sample_document(rng: random.Random, facts: list[Fact], split: Split) -> str | None:
    """One document of the mix, or None when it belongs to the other split."""
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind == "story":
        text = make_story(rng).text
        return text if split_of("story:" + text) == split else None
    if kind == "qa":
        fact = rng.choice(facts)
        answer = fact.short if rng.random() < 0.5 else fact.long
        # Facts are knowledge the model must have, so every fact is in both streams (a finite set
        # of ~170 documents): held-out Q&A measures validation loss, not generalisation.
        in_heldout = rng.random() < 0.1
        return format_qa(fact.question, answer) if in_heldout == (split == "heldout") else None
    a, b = rng.randrange(100), rng.randrange(100)
    if addition_split(a, b) != split:
        return None
    return f"{addition_prompt(a, b)} {a + b}"


def documents(seed: int, split: Split = "train") -> Iterator[str]:
    """An endless, deterministic stream of documents of one split."""
    rng, facts = random.Random(seed), all_facts()
    while True:
        doc = _sample_document(rng, facts, split)
        if doc is not None:
            yield doc


def take(stream: Iterator[str], n: int) -> list[str]:
    return [next(stream) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Task datasets used by the lessons (written to data/*.jsonl, loaded through `datasets`)
# --------------------------------------------------------------------------------------------
def sentiment_examples(n: int, seed: int, split: Split = "train") -> list[dict]:
    """Story sentiment classification rows: {"story", "label"} with balanced labels."""
    if split not in ("train", "heldout"):  # any other split matches no story: the loop below would never end
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n (the number of rows) must be a non-negative int, got {n!r}")
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        story = make_story(rng, label="happy" if len(rows) % 2 == 0 else "sad")
        if split_of("story:" + story.text) == split:
            rows.append({"story": story.text, "label": story.label})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_jsonl(path: str | Path, required: tuple[str, ...] = ()):
    """Load a local JSONL file as a ``datasets.Dataset`` (no network), checking required fields.

    A row missing a field is an error that names the file, the row and the field, rather than a
    silently dropped example.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{i + 1}: row is missing field(s) {missing}; it has {sorted(row)}")
    return datasets.load_dataset("json", data_files=str(path), split="train")


# The sentiment task as lessons pose it. The answer words ("yes"/"no") never occur in the stories,
# so a model cannot score by copying "happy"/"sad" from the ending: zero-shot sits near chance.
SENTIMENT_ANSWERS = {"happy": "yes", "sad": "no"}


def sentiment_prompt(story: str) -> str:
    return f"{story}\nQ: Does the story end well?\nA:"


def ending_prompt(story: str) -> str:
    """The sentiment task with single-token answers ("happy" / "sad"): quick for adapters to learn,
    which lets the LoRA lesson afford a dozen training runs on a CPU."""
    return f"{story}\nQ: How does the story end?\nA:"


# --------------------------------------------------------------------------------------------
# Preference pairs (RLHF lesson 06, DPO lesson 07): TRL's explicit-prompt format
# --------------------------------------------------------------------------------------------
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PREFERENCE_TASKS = ("ending", "concise")
# Only 82 facts exist, so the concise task holds out a quarter of the questions (≈ 20 pairs) to
# measure accuracy on; the story task has millions of openers and keeps the corpus's 10 %.
CONCISE_HELDOUT_PERCENT = 25


def _ending_rows(split: Split, n: int, seed: int) -> list[dict]:
    """A row is in ``split`` when BOTH of its stories are under the pretraining rule (``split_of`` of
    the story text), so a held-out pair never appeared in pretraining, and never in a train row
    (whose two stories are train). Held-out pairs are rare (≈ 1 % of draws), so the sad twin is
    only drawn once the happy story has passed."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        state = rng.getstate()
        happy = make_story(rng, label="happy")
        if split_of("story:" + happy.text) != split or happy.body in seen:
            continue
        # The sad twin replays the same random state: same opener, characters and template slot.
        after = rng.getstate()
        rng.setstate(state)
        sad = make_story(rng, label="sad")
        rng.setstate(after)
        if split_of("story:" + sad.text) != split:
            continue
        seen.add(happy.body)
        # The prompt is the story without its ending; the completions start with the space that
        # joins them (Story.text), so prompt + completion is exactly the corpus's story.
        rows.append({"prompt": happy.body, "chosen": " " + happy.ending, "rejected": " " + sad.ending})
    return rows


def qa_prompt(question: str) -> str:
    """The corpus's Q&A format up to the answer (``format_qa`` without it)."""
    return format_qa(question, "").rstrip()


def _concise_rows(split: Split, n: int, seed: int) -> list[dict]:
    facts = [f for f in all_facts() if split_of("fact:" + f.question, CONCISE_HELDOUT_PERCENT) == split]
    if n > len(facts):
        raise ValueError(f"n={n} but the 'concise' task has only {len(facts)} {split} questions (one pair each); "
                         f"ask for at most {len(facts)} and train several epochs over them")
    random.Random(seed).shuffle(facts)
    return [{"prompt": qa_prompt(f.question), "chosen": " " + f.short, "rejected": " " + f.long} for f in facts[:n]]


def preference_rows(task: str, split: Split, *, n: int, seed: int) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}`` (TRL's explicit-prompt format: the
    text a model sees is ``prompt + chosen`` or ``prompt + rejected``; both share the prompt exactly).

    * ``"ending"``: the prompt is a story opener (the story without its ending); chosen continues it
      to a happy ending, rejected to a sad one. Judge of any continuation: :func:`ending_sentiment`.
      Held-out rows: both stories held out of pretraining (:func:`split_of`), openers all distinct.
    * ``"concise"``: the prompt is ``"Q: …?\\nA:"``; chosen is the short answer, rejected the long one
      (which starts with the short one: the preference is about length, not about the fact). Every
      fact is in pretraining by design (facts are knowledge); the held-out *questions*
      (``CONCISE_HELDOUT_PERCENT``) never appear in train rows. At most one row per question.

    Deterministic in ``seed``; write with :func:`write_jsonl`, read back with :func:`load_preferences`.
    """
    if task not in PREFERENCE_TASKS:
        raise ValueError(f"unknown preference task {task!r}; choose one of {list(PREFERENCE_TASKS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n (the number of rows) must be a positive int, got {n!r}")
    return [dict(row) for row in _preference_rows_cached(task, split, n, seed)]  # fresh dicts: callers may edit


@functools.lru_cache(maxsize=16)
def _preference_rows_cached(task: str, split: Split, n: int, seed: int) -> tuple[dict, ...]:
    # Held-out story pairs take ≈ 100 draws each (~10 ms); lessons ask for the same rows repeatedly.
    return tuple(_ending_rows(split, n, seed) if task == "ending" else _concise_rows(split, n, seed))


def check_preference_rows(rows) -> None:
    """Every row must be TRL's explicit-prompt preference format with plain-text fields, two non-empty,
    different completions. Errors name the row and the fix."""
    if len(rows) == 0:
        raise ValueError("no preference rows: a preference dataset needs rows {'prompt', 'chosen', 'rejected'}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: a preference row is a dict {{'prompt', 'chosen', 'rejected'}}, got "
                             f"{type(row).__name__}")
        missing = [f for f in PREFERENCE_FIELDS if row.get(f) is None]
        if missing:
            hint = (" (implicit-prompt rows: move the text chosen and rejected share into 'prompt')"
                    if "prompt" in missing else "")
            raise ValueError(f"row {i}: missing field(s) {missing}; preference rows need {list(PREFERENCE_FIELDS)}, "
                             f"this one has {sorted(row)}{hint}")
        for f in PREFERENCE_FIELDS:
            if not isinstance(row[f], str):
                raise ValueError(f"row {i}: {f!r} must be a string, got {type(row[f]).__name__} (conversational "
                                 f"rows: render them to text with tokenizer.apply_chat_template first)")
        for f in ("chosen", "rejected"):
            if not row[f].strip():
                raise ValueError(f"row {i}: empty {f!r} completion: a pair needs two completions to compare; "
                                 f"drop or fill the row")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"row {i}: chosen and rejected are identical, so the pair expresses no preference "
                             f"(its margin is 0 under every model); drop the row")


def load_preferences(path: str | Path) -> list[dict]:
    """Preference rows from a JSONL file, read through ``datasets`` (:func:`load_jsonl`) and checked
    (:func:`check_preference_rows`); extra columns (e.g. TRL's ``margin``) are kept."""
    rows = load_jsonl(path, required=PREFERENCE_FIELDS).to_list()
    check_preference_rows(rows)
    return rows
