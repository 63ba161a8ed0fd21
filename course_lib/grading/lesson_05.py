"""Hidden checks for lesson 05 (instruction tuning). References: course_lib.templates (tested against
TRL's SFTTrainer) and the embedded tokenizer's own chat template."""

from __future__ import annotations

from . import CheckFailed, Exercise, expect


# ---------------------------------------------------------------------------------------------
# 05.1 to_chat(template, row) -> [user message, assistant message]
# ---------------------------------------------------------------------------------------------
def check_to_chat(to_chat) -> str:
    cases = [("Opposite of {word}:", {"word": "hot", "answer": "cold"}),
             ("Add {a} and {b}.", {"a": 3, "b": 4, "answer": "7"}),
             ("{story}\n\nIs the ending happy or sad?", {"story": "Tom lost his kite.", "answer": "sad"})]
    for template, row in cases:
        got = to_chat(template, dict(row))
        want = [{"role": "user", "content": template.format(**row)},
                {"role": "assistant", "content": " " + row["answer"]}]
        if not (isinstance(got, list) and len(got) == 2 and all(isinstance(m, dict) for m in got)):
            raise CheckFailed("return a list of two messages: [{'role': 'user', ...}, {'role': 'assistant', ...}]")
        if [m.get("role") for m in got] != ["user", "assistant"]:
            raise CheckFailed(f"the roles must be user then assistant, got {[m.get('role') for m in got]}")
        if "{" in got[0]["content"] and "{" not in want[0]["content"]:
            raise CheckFailed("the template's {fields} were left unfilled: use template.format(**row)")
        if row["answer"] in got[0]["content"] and row["answer"] not in want[0]["content"]:
            raise CheckFailed("the answer leaked into the user's message: the instruction must not contain it")
        if got[1]["content"] == row["answer"]:
            raise CheckFailed("the answer needs a leading space (' cold'), as the pretraining corpus wrote answers "
                              "after 'A:': this BPE knows ' cold' as one token, 'cold' only as pieces")
        expect(got[0]["content"], want[0]["content"], what="user message")
        expect(got[1]["content"], want[1]["content"], what="assistant message")
    try:
        to_chat("Opposite of {word}:", {"thing": "sky", "answer": "blue"})
    except (KeyError, ValueError) as e:
        if "word" not in str(e):
            raise CheckFailed(f"a missing field must be named in the error; yours says {e!r}") from None
    else:
        raise CheckFailed("a row without the template's field ('word') must raise an error naming it, not render "
                          "a broken instruction")
    return "user instruction from the template, assistant answer with its leading space"


# ---------------------------------------------------------------------------------------------
# 05.2 completion_labels(prompt_ids, completion_ids, eos_id, pad_id, width) -> (input_ids, labels, mask)
# ---------------------------------------------------------------------------------------------
def check_completion_labels(completion_labels) -> str:
    for prompt, completion, width in [([1, 10, 11, 12], [20, 21], 9), ([1, 30], [40], 4)]:
        eos, pad = 2, 0
        got = completion_labels(list(prompt), list(completion), eos, pad, width)
        if not (isinstance(got, tuple) and len(got) == 3):
            raise CheckFailed("return a tuple (input_ids, labels, attention_mask) of lists")
        ids, labels, mask = (list(x.tolist() if hasattr(x, "tolist") else x) for x in got)
        n = len(prompt) + len(completion) + 1
        want_ids = prompt + completion + [eos] + [pad] * (width - n)
        want_labels = [-100] * len(prompt) + completion + [eos] + [-100] * (width - n)
        want_mask = [1] * n + [0] * (width - n)
        expect(ids, want_ids, what="input_ids", mistakes={
            "the completion must end with EOS, so the model learns to stop": prompt + completion + [pad] * (width - n + 1),
        })
        expect(labels, want_labels, what="labels", mistakes={
            "masking off-by-one: the last prompt token is masked too (−100) but the first completion token "
            "must keep its label": [-100] * len(prompt) + [-100] + completion[1:] + [eos] + [-100] * (width - n),
            "masking off-by-one: only the prompt's tokens are −100, not one more":
                [-100] * (len(prompt) - 1) + [prompt[-1]] + completion + [eos] + [-100] * (width - n),
            "padding not masked: padding positions must be −100, not the pad id":
                [-100] * len(prompt) + completion + [eos] + [pad] * (width - n),
            "EOS not trained: its label must be the eos id, so the model learns to stop":
                [-100] * len(prompt) + completion + [-100] + [-100] * (width - n),
            "the prompt is not masked: its labels must be −100 (loss on the completion only)":
                prompt + completion + [eos] + [-100] * (width - n),
        })
        expect(mask, want_mask, what="attention_mask", mistakes={
            "the attention mask must be 0 on padding": [1] * width,
        })
    return "prompt and padding −100, completion and EOS trained"


# ---------------------------------------------------------------------------------------------
# 05.3 assistant_mask(tokens) -> list[int]
# ---------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Opposite of hot:"}, {"role": "assistant", "content": " cold"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky:"},
     {"role": "assistant", "content": " blue"}, {"role": "user", "content": "And the grass?"},
     {"role": "assistant", "content": " green"}],
]


def check_assistant_mask(assistant_mask) -> str:
    from ..models import load_model

    _, tokenizer = load_model(None, device="cpu")
    for conversation in CONVERSATIONS:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
        want = list(out["assistant_masks"])
        got = [int(x) for x in assistant_mask(list(tokens))]
        if len(got) != len(tokens):
            raise CheckFailed(f"return one 0/1 per token: {len(tokens)} tokens, got {len(got)} values")
        header = [1 if t in ("<|assistant|>",) or (i > 0 and tokens[i - 1] == "<|assistant|>") else 0
                  for i, t in enumerate(tokens)]
        with_header = [max(a, b) for a, b in zip(want, header)]
        without_end = [0 if t == "<|end|>" else m for t, m in zip(tokens, want)]
        first_only = list(want)
        seen_end = False
        for i, t in enumerate(tokens):
            if seen_end:
                first_only[i] = 0
            if want[i] and t == "<|end|>":
                seen_end = True
        expect(got, want, what=f"mask for {len(conversation)} messages", atol=0, rtol=0, mistakes={
            "the '<|assistant|>' header and its newline are the template's, not the reply: start after them":
                with_header,
            "the end-of-turn token '<|end|>' is part of the reply: train on it, or the model never learns to stop":
                without_end,
            "only the first assistant turn is masked in: every assistant turn is trained": first_only,
            "the user's and system's turns must be 0: only the assistant's reply is trained":
                [1 if i >= 1 else 0 for i in range(len(tokens))],
        })
    return "the assistant's replies and their <|end|>, nothing else"


# ---------------------------------------------------------------------------------------------
# 05.4 pack_two(a, b, max_length, pad_id) -> {"input_ids", "labels", "position_ids"} (lists)
# ---------------------------------------------------------------------------------------------
def check_pack_two(pack_two) -> str:
    from ..templates import pack_examples

    a = {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]}  # plain text: every token is a label
    b = {"input_ids": [3, 8, 9], "labels": [3, 8, 9]}
    for max_length in (7, 10):
        got = pack_two(dict(a), dict(b), max_length, 0)
        want = {k: v[0].tolist() for k, v in pack_examples([a, b], max_length, 0).items()}
        got = {k: list(v.tolist() if hasattr(v, "tolist") else v) for k, v in got.items()}
        missing = {"input_ids", "labels", "position_ids"} - set(got)
        if missing:
            raise CheckFailed(f"return a dict with input_ids, labels and position_ids; missing {sorted(missing)}")
        expect(got["input_ids"], want["input_ids"], what=f"input_ids (max_length {max_length})")
        pad = max_length - 7
        expect(got["position_ids"], want["position_ids"], what="position_ids", mistakes={
            "position ids not restarted: the second example must start again at 0, or it attends to (and is "
            "positioned after) the first": list(range(7)) + [0] * pad,
            "position ids not restarted: the second example must start again at 0":
                list(range(max_length)),
        })
        expect(got["labels"], want["labels"], what="labels", mistakes={
            "the first token of the second example must get −100: in a packed row it would be 'predicted' "
            "from the first example's last token": [-100] + a["labels"][1:] + b["labels"] + [-100] * pad,
            "the first token of each example must get −100 (nothing in the row predicts it)":
                a["labels"] + b["labels"] + [-100] * pad,
            "padding must have label −100, not the pad id": want["labels"][:7] + [0] * pad,
        })
    return "one row: positions restart, the seam and the padding are −100"


# ---------------------------------------------------------------------------------------------
# 05.5 pack_rows(examples, max_length, pad_id) -> {"input_ids", "labels", "position_ids"}: lists of rows
# (debug: the notebook gives a version with two planted bugs; graded by behaviour)
# ---------------------------------------------------------------------------------------------
def check_pack_rows(pack_rows) -> str:
    import torch

    from ..models import load_model
    from ..sft import sft_loss
    from ..templates import pack_examples, pad_right

    model, tokenizer = load_model(None, device="cpu")
    pad = tokenizer.pad_token_id
    texts = ["Once upon a time, there was a cat named Tom.", "The sky is blue.", "Opposite of hot: cold",
             "Lily was a happy dog.", "3 + 4 = 7"]
    full = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]
    for e in full:  # full-sequence labels: every token is trained, the first one too
        e["labels"] = list(e["input_ids"])
    answer_only = [{"input_ids": e["input_ids"], "labels": [-100] * (len(e["input_ids"]) - 2) + e["input_ids"][-2:]}
                   for e in full]
    width = max(len(e["input_ids"]) for e in full)
    for examples, max_length, kind in ((full, 2 * width, "full-sequence labels"), (answer_only, width + 4, "answer-only labels"),
                                       (full[:1], width, "one example")):
        got = pack_rows([{k: list(v) for k, v in e.items()} for e in examples], max_length, pad)
        if not isinstance(got, dict) or not {"input_ids", "labels", "position_ids"} <= set(got):
            raise CheckFailed("return a dict with input_ids, labels and position_ids (each a list of rows)")
        got = {k: [list(r.tolist() if hasattr(r, "tolist") else r) for r in got[k]] for k in ("input_ids", "labels", "position_ids")}
        right = {k: v.tolist() for k, v in pack_examples(examples, max_length, pad).items()}
        if got == right:
            continue
        wrong = {
            "both planted bugs are still there: compare the packed loss with the padded one": (False, False),
            "position ids do not restart at 0 for each example, so each example attends to the examples packed "
            "before it in the row (transformers reads a restart as 'a new sequence begins')": (False, True),
            "the first token of each example keeps its label: in a packed row it would be predicted from the "
            "previous example's last token, which is not its context": (True, False),
        }
        for explanation, (restart, mask_first) in wrong.items():
            if got == _planted(examples, max_length, pad, restart, mask_first):
                raise CheckFailed(f"{kind}: {explanation}")
        rows = got["input_ids"]
        if any(len(r) != max_length for k in got for r in got[k]):
            raise CheckFailed(f"{kind}: every row must have exactly max_length={max_length} tokens (pad the end)")
        if len(rows) > len(right["input_ids"]):
            raise CheckFailed(f"{kind}: {len(rows)} rows where {len(right['input_ids'])} suffice: put each example "
                              f"into a row where it still fits before opening a new one (longest first)")
        segments = []
        for ids, labels, positions in zip(got["input_ids"], got["labels"], got["position_ids"]):
            t = 0
            while t < len(ids):
                end = t + 1
                while end < len(ids) and positions[end] == positions[end - 1] + 1 and positions[end] != 0:
                    end += 1
                if positions[t] != 0:
                    raise CheckFailed(f"{kind}: each example's position ids must start at 0")
                segments.append((ids[t:end], labels[t:end]))
                t = end
        found = [s for s in segments if not all(i == pad for i in s[0])]
        want = sorted(e["input_ids"] for e in examples)
        if sorted(s[0] for s in found) != want:
            raise CheckFailed(f"{kind}: every example must sit whole in one row, its position ids counting 0, 1, 2, … "
                              f"from its first token and restarting at the next example")
        if any(lab != -100 for s in segments if all(i == pad for i in s[0]) for lab in s[1]):
            raise CheckFailed(f"{kind}: padding must have label −100, not the pad id")
        for ids, labels in found:
            e = next(e for e in examples if e["input_ids"] == ids)
            if labels != [-100] + e["labels"][1:]:
                raise CheckFailed(f"{kind}: inside a row an example keeps its own labels, except its first token (−100)")
        with torch.no_grad():
            padded = sft_loss(model, pad_right([(e["input_ids"], e["labels"]) for e in examples], pad)).item()
            packed = sft_loss(model, {k: torch.tensor(v) for k, v in got.items()}).item()
        if abs(packed - padded) > 1e-4:
            raise CheckFailed(f"{kind}: the packed loss {packed:.5f} differs from the padded loss {padded:.5f}")
    return "positions restart and each example's first label is −100: the packed loss equals the padded one"


def _planted(examples, max_length, pad_id, restart_positions: bool, mask_first_label: bool) -> dict:
    """The notebook's given packing (best fit, longest first, as pack_examples) with either of its two bugs."""
    from ..templates import pack_examples

    right = {k: v.tolist() for k, v in pack_examples(examples, max_length, pad_id).items()}
    if restart_positions and mask_first_label:
        return right
    # rebuild each row from its examples: pack_examples keeps them in order, each starts where a position is 0
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    out = {"input_ids": right["input_ids"], "labels": [], "position_ids": []}
    for ids, positions in zip(right["input_ids"], right["position_ids"]):
        labels, new_positions, t = [], [], 0
        while t < len(ids):
            match = next((e for k, e in by_ids.items() if list(k) == ids[t:t + len(k)] and positions[t] == 0
                          and positions[t:t + len(k)] == list(range(len(k)))), None)
            if match is None:
                break
            n = len(match["input_ids"])
            labels += (([-100] + match["labels"][1:]) if mask_first_label else list(match["labels"]))
            new_positions += list(range(t, t + n)) if not restart_positions else list(range(n))
            t += n
        padding = len(ids) - t
        out["labels"].append(labels + [-100] * padding)
        out["position_ids"].append(new_positions + [0] * padding)
    return out


EXERCISES = [
    Exercise("05.1", "render a FLAN template as a chat", ("to_chat",), check_to_chat),
    Exercise("05.2", "labels with the prompt masked", ("completion_labels",), check_completion_labels),
    Exercise("05.3", "assistant-only mask from a chat template", ("assistant_mask",), check_assistant_mask),
    Exercise("05.4", "pack two examples", ("pack_two",), check_pack_two),
    Exercise("05.5", "debug a packing collator", ("pack_rows",), check_pack_rows),
]
