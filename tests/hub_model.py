"""A small model folder shaped like a hub checkpoint, built offline in about a second.

The embedded model (data/embedded) is one architecture with one set of conventions: a Llama with tied
embeddings, no biases, a right-padding tokenizer with a BOS token, its own chat roles and ``<|end|>``,
float32 weights. Code that quietly depends on any of these works on it and breaks on the models a
learner brings to the GPU lab (``course-lab --model …``). This folder differs in each of them, the way
Qwen2.5-Instruct does:

* architecture ``Qwen2ForCausalLM``: untied input and output embeddings, biased q/k/v projections,
  a model vocabulary padded past the tokenizer's (64-multiple, as Qwen pads 151 665 tokens to 151 936);
* tokenizer: a fresh byte-level BPE (digits split one by one) trained on the course's generated corpus,
  **no BOS**, special tokens at the *end* of the vocabulary, eos ``<|im_end|>`` (the end of a turn),
  pad ``<|endoftext|>`` (not eos), ``padding_side="left"``, no ``<|end|>`` token;
* chat template: ChatML, ``<|im_start|>role\\n…<|im_end|>\\n``, a default system message when none is
  given (as Qwen2.5's), ``{% generation %}`` markers around the assistant's content and ``<|im_end|>``
  so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works;
* weights: random (seeded), stored in **bfloat16**, with non-zero biases and norm weights so that code
  dropping a bias or a norm weight changes the numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML with generation markers: what TRL's assistant-only loss and course_lib.templates need.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception(\"unknown chat role '\" + message['role'] + \"'\") }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BPE_VOCAB = 512  # learned tokens (256 bytes + merges); the three special tokens follow them
MODEL_VOCAB_MULTIPLE = 64


def training_texts(n: int = 400, seed: int = 0) -> list[str]:
    """The corpus the BPE learns from: the course's generated documents plus chat-formatted instructions,
    so that ChatML's role names and the answers are short token sequences, as on a real chat model."""
    from course_lib import data
    from course_lib.templates import instruction_dataset

    texts = data.take(data.documents(seed), n)
    for row in instruction_dataset(["opposite", "colour", "sound", "addition"], per_task=8, seed=seed):
        texts.append("".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in row["messages"]))
    return texts


def build_tokenizer(seed: int = 0):
    """A left-padding ChatML ``Qwen2Tokenizer`` with no BOS and no unknown token, like Qwen2.5-Instruct's:
    its BPE merges are learned here with Qwen's own pre-tokenizer (so they fit the class that
    ``AutoTokenizer`` rebuilds on loading), special tokens after the learned vocabulary."""
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer  # Qwen's split regex + byte level
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=sorted(_byte_alphabet()),
                                  show_progress=False)
    # the chat markers are taken out of the training text: they become whole special tokens below
    texts = [t.replace(IM_START, "").replace(IM_END, "") for t in training_texts(seed=seed)]
    bpe.train_from_iterator(texts, trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for token in (END_OF_TEXT, IM_START, IM_END):  # appended after the learned vocabulary, as in Qwen
        vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=IM_END,
                               pad_token=END_OF_TEXT, extra_special_tokens=[IM_START, IM_END],
                               padding_side="left", model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def build_hub_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a bf16 ``Qwen2ForCausalLM`` checkpoint and its tokenizer to ``folder``; return the folder."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, END_OF_TEXT])
    vocab = -(-len(tokenizer) // MODEL_VOCAB_MULTIPLE) * MODEL_VOCAB_MULTIPLE
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=pad, eos_token_id=eos,
                         pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # what training would leave: biases and norm weights away from 0 and 1
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m tests.hub_model DIR: look at what the tests use
    import sys

    print(build_hub_model(sys.argv[1] if len(sys.argv) > 1 else "hub_model"))
