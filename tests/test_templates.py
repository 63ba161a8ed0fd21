import pytest

from course_lib.templates import end_of_turn_token, tokenize_prompt_and_completion

from .chat_templates import CHATML, EOS_CLOSES, PLAIN_TEXT, chatml_tokenizer, tokenizer_with_template


def test_labels_mask_prompt_and_padding(embedded):
    _, tok = embedded
    batch = tokenize_prompt_and_completion(["Q: What color is the sky?\nA:", "Q: Hi?\nA:"],
                                           [" The sky is blue.", " Hello."], tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    for row, (prompt, completion) in enumerate([("Q: What color is the sky?\nA:", " The sky is blue."),
                                                ("Q: Hi?\nA:", " Hello.")]):
        n_prompt = len(tok(prompt)["input_ids"])
        n = int(mask[row].sum())
        assert (labels[row, :n_prompt] == -100).all() and (labels[row, n:] == -100).all()
        assert (ids[row, n:] == tok.pad_token_id).all()
        trained = labels[row, n_prompt:n].tolist()
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == completion


def test_bad_rows_are_named(embedded):
    _, tok = embedded
    with pytest.raises(ValueError, match="row 1: empty completion"):
        tokenize_prompt_and_completion(["a", "b"], [" x", ""], tok)
    with pytest.raises(ValueError, match=r"row 0: \d+ tokens .* over max_length=3"):
        tokenize_prompt_and_completion(["a long prompt here"], [" x"], tok, max_length=3)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tokenize_prompt_and_completion(["a", "b"], [" x"], tok)


def test_end_of_turn_token_is_read_off_the_chat_template(embedded):
    _, tok = embedded
    assert end_of_turn_token(tok) == "<|end|>"
    chatml = chatml_tokenizer()
    assert chatml.chat_template == CHATML and chatml.eos_token == "<|eos|>"
    assert end_of_turn_token(chatml) == "<|im_end|>"  # not the eos: ChatML closes turns with its own token
    assert end_of_turn_token(tokenizer_with_template(EOS_CLOSES)) == "<|eos|>"  # a template that closes with eos
    assert end_of_turn_token(tokenizer_with_template(PLAIN_TEXT)) == "<|eos|>"  # plain text: eos is all there is
    with pytest.raises(ValueError, match="no chat template"):
        end_of_turn_token(tokenizer_with_template(None))


def test_prompt_and_completion_rows_do_not_depend_on_padding_side(embedded):
    _, tok = embedded
    args = (["Q: What color is the sky?\nA:", "Q: Hi?\nA:"], [" The sky is blue.", " Hello."], tok)
    right = tokenize_prompt_and_completion(*args)
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        left = tokenize_prompt_and_completion(*args)
    finally:
        tok.padding_side = side
    for key in right:
        assert right[key].equal(left[key]), key
