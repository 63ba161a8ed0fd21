"""Measurements on held-out text that must not depend on the tokenizer's settings, and generation's stops."""

import contextlib

import pytest
import torch

from course_lib import data
from course_lib.evaluate import completion_logprobs, generate, lm_loss


@contextlib.contextmanager
def padded_on(tokenizer, side: str):
    """Set the shared tokenizer's padding side for the block, and restore it after."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before


def _texts():
    return data.take(data.documents(7, "heldout"), 12)  # 17 to 68 tokens: much padding in a batch


def test_lm_loss_is_transformers_token_mean_on_either_padding_side(embedded):
    """The reference is transformers' own loss on each text alone (no padding at all), token-weighted;
    lm_loss equals it with right and with left padding (left once scored the first token from a pad)."""
    model, tokenizer = embedded
    total, count = 0.0, 0
    with torch.no_grad():
        for text in _texts():
            ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    for side in ("right", "left"):
        with padded_on(tokenizer, side):
            assert lm_loss(model, tokenizer, _texts(), batch_size=6) == pytest.approx(total / count, rel=1e-5), side
            assert tokenizer.padding_side == side  # restored after lm_loss
    assert tokenizer.padding_side == "right"


def test_left_padding_without_position_ids_changes_a_llama_only_by_rounding(embedded):
    """What transformers' Llama does with an attention mask and no position_ids: it numbers positions
    0…T−1 whatever the mask says (LlamaModel.forward), so a left-padded row starts at position = its
    padding. Rotary embeddings see only relative positions, so the real tokens' logits are unchanged up
    to rounding: left padding was wrong only through scoring the first token from a pad."""
    model, tokenizer = embedded
    texts = _texts()[:6]
    logits = {}
    with torch.no_grad():
        for side in ("right", "left"):
            with padded_on(tokenizer, side):
                enc = tokenizer(texts, return_tensors="pt", padding=True)
            out = model(**enc).logits  # (B, T, V)
            logits[side] = [row[m.bool()] for row, m in zip(out, enc["attention_mask"])]  # real tokens only
    assert any(not m.all() for m in enc["attention_mask"])  # there was padding
    for right, left in zip(logits["right"], logits["left"]):
        torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-4)


def test_completion_logprobs_do_not_depend_on_padding_side(embedded):
    model, tokenizer = embedded
    prompts = ["Q: What color is the sky?\nA:", "Q: Hi?\nA:", "Once upon a time, there was a cat."]
    completions = [" The sky is blue.", " Hello.", " The cat was happy."]
    with padded_on(tokenizer, "right"):
        right = completion_logprobs(model, tokenizer, prompts, completions)
    with padded_on(tokenizer, "left"):
        left = completion_logprobs(model, tokenizer, prompts, completions)
    torch.testing.assert_close(left, right, rtol=0, atol=0)
    with torch.no_grad():  # row 1 alone, through transformers' loss: sum of log p over the completion tokens
        ids = tokenizer(prompts[1] + completions[1], return_tensors="pt")["input_ids"]
        n_prompt = len(tokenizer(prompts[1])["input_ids"])
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        expected = -model(input_ids=ids, labels=labels).loss * (ids.shape[1] - n_prompt)
    torch.testing.assert_close(right[1], expected, rtol=1e-5, atol=1e-5)


def test_a_stop_token_the_vocabulary_lacks_is_a_clear_error(embedded):
    model, tokenizer = embedded
    with pytest.raises(ValueError, match=r"stop_tokens \['<\|im_end\|>'\] are not tokens.*'<\|end\|>'"):
        generate(model, tokenizer, ["Once upon a time"], max_new_tokens=2, stop_tokens=("<|im_end|>",))
    # a known one, also given as a bare string, works
    assert isinstance(generate(model, tokenizer, ["Once upon a time"], max_new_tokens=2, stop_tokens="<|end|>")[0], str)
    assert tokenizer.padding_side == "right"  # generate pads left inside and restores the side
