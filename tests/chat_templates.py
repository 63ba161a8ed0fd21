"""Tokenizers whose chat templates close a turn differently from the embedded one's ``<|end|>``.

Built from the embedded tokenizer (offline, instant): same BPE, another chat template, and for ChatML
two more special tokens. Its eos stays ``<|eos|>``, so the end of a turn cannot be guessed from eos.
"""

from __future__ import annotations

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
EOS_CLOSES = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
PLAIN_TEXT = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def embedded_tokenizer():
    """A fresh copy of the embedded tokenizer (the session's shared one must not be changed)."""
    from transformers import AutoTokenizer

    from course_lib.pretrain import EMBEDDED_DIR

    return AutoTokenizer.from_pretrained(EMBEDDED_DIR)


def chatml_tokenizer():
    """The embedded tokenizer with ``<|im_start|>`` / ``<|im_end|>`` and a ChatML template (Qwen's)."""
    tokenizer = embedded_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


def tokenizer_with_template(template: str | None):
    tokenizer = embedded_tokenizer()
    tokenizer.chat_template = template
    return tokenizer
