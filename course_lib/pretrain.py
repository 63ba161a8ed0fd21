"""Regenerate the embedded model and tokenizer deterministically: ``python -m course_lib.pretrain``.

Steps: generate the corpus (`course_lib.data`), train a byte-level BPE tokenizer on it, pretrain a
small Llama on packed blocks with the shared training loop, evaluate (held-out loss, held-out
addition accuracy, sample continuations), save safetensors + tokenizer + a report with checksums.

The checkpoint shipped is the last evaluated one whose held-out 2-digit addition accuracy lies in
``target_addition_accuracy`` (GRPO needs a base model that is sometimes right and sometimes wrong),
or the final one if none does — the report says which, and the test suite checks the range.
Training stops early once accuracy has passed the range after a checkpoint in it was taken (the
cosine schedule still spans ``steps``, so the shipped weights do not depend on where it stops).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .evaluate import addition_accuracy, generate, lm_loss
from .training import TrainConfig, train

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "data" / "embedded"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

# Assistant turns are wrapped in {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens a model
# must learn to produce: the answer and its closing <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception(\"unknown chat role '\" + message['role'] + \"': this template knows system, user and assistant\") }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class PretrainConfig:
    seed: int = 0
    vocab_size: int = 2048
    tokenizer_docs: int = 20_000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, so the course meets GQA (prefix tuning)
    context: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 200
    eval_docs: int = 400
    eval_addition_pairs: int = 300
    target_addition_accuracy: tuple[float, float] = (0.15, 0.55)
    threads: int = 2  # fixed, so that reductions (and hence the bits) are reproducible
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls) -> "PretrainConfig":
        """A few-second configuration for the smoke test."""
        return cls(vocab_size=300, tokenizer_docs=300, hidden_size=32, intermediate_size=64,
                   num_layers=1, num_heads=2, num_kv_heads=1, context=64, batch_size=4, steps=3,
                   warmup_steps=1, eval_every=2, eval_docs=8, eval_addition_pairs=8,
                   progress=False)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with single-digit pre-tokenization (digits stay separate tokens, which makes
    addition learnable), bos added in front of every encoded text, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
                                   model_max_length=256, padding_side="right")
    return fast


def build_model(config: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.context, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    # Generation stops at the end of a document or at the end of a chat turn.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def packed_batches(config: PretrainConfig, tokenizer):
    """Endless batches of ``(batch_size, context)`` blocks cut from the concatenated stream
    ``bos doc eos bos doc eos …`` (the tokenizer adds bos)."""
    docs = data.documents(config.seed + 1, "train")
    buffer: list[int] = []
    block = config.context
    while True:
        while len(buffer) < config.batch_size * block:
            chunk = [next(docs) for _ in range(256)]
            for ids in tokenizer(chunk)["input_ids"]:
                buffer.extend(ids + [tokenizer.eos_token_id])
        ids = torch.tensor(buffer[:config.batch_size * block]).view(config.batch_size, block)
        del buffer[:config.batch_size * block]
        yield {"input_ids": ids, "labels": ids}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(out_dir: Path) -> dict[str, str]:
    return {name: sha256_of(out_dir / name) for name in ("model.safetensors", "tokenizer.json")}


STORY_PROMPTS = ["Once upon a time, there was a little cat named Lily.",
                 "Tom was a brave dog who lived near the farm."]
QA_PROMPTS = ["Q: What color is the sky?\nA:", "Q: What is the opposite of hot?\nA:"]


def run(config: PretrainConfig, out_dir: Path = EMBEDDED_DIR) -> dict:
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    start = time.perf_counter()
    tokenizer = train_tokenizer(data.take(data.documents(config.seed, "train"), config.tokenizer_docs),
                                config.vocab_size)
    model = build_model(config, tokenizer)
    eval_texts = data.take(data.documents(config.seed + 2, "heldout"), config.eval_docs)
    pairs = data.addition_pairs("heldout", two_digit_only=True)
    pairs = random.Random(config.seed).sample(pairs, min(config.eval_addition_pairs, len(pairs)))

    evaluations: list[dict] = []
    chosen: dict = {}

    def evaluate(step: int, model, history) -> None:
        if (step + 1) % config.eval_every and step + 1 != config.steps:
            return
        acc = addition_accuracy(model, tokenizer, pairs)
        row = {"step": step + 1, "train_loss": round(history.loss[-1], 4),
               "heldout_loss": round(lm_loss(model, tokenizer, eval_texts), 4),
               "heldout_addition_accuracy": round(acc, 4),
               "seconds": round(time.perf_counter() - start, 1)}
        evaluations.append(row)
        print(json.dumps(row), flush=True)
        lo, hi = config.target_addition_accuracy
        if lo <= acc <= hi:
            chosen.update(row=row, state=copy.deepcopy(model.state_dict()))
        elif acc > hi and chosen:
            raise StopIteration  # past the range, with a checkpoint in it: more steps cannot be shipped

    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
                               weight_decay=config.weight_decay, betas=(0.9, 0.95), seed=config.seed,
                               progress=config.progress, desc="pretrain", min_lr_ratio=0.1)
    history = train(model, packed_batches(config, tokenizer), train_config, callback=evaluate)
    if chosen:
        model.load_state_dict(chosen["state"])
        final = chosen["row"]
    else:
        final = evaluations[-1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_run": len(history.step),
        "tokens_seen": len(history.step) * config.batch_size * config.context,
        "train_seconds": round(history.seconds, 1),
        "torch": torch.__version__,
        "chosen_checkpoint": final,
        "in_target_range": bool(chosen),
        "evaluations": evaluations,
        "samples": dict(zip(STORY_PROMPTS + QA_PROMPTS,
                            generate(model, tokenizer, STORY_PROMPTS + QA_PROMPTS, max_new_tokens=60))),
        "checksums": checksums(out_dir),
    }
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="where to write the model (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a few-second smoke-test configuration")
    parser.add_argument("--steps", type=int, help="override the number of optimizer steps")
    args = parser.parse_args(argv)
    config = PretrainConfig.tiny() if args.tiny else PretrainConfig()
    if args.steps:
        config.steps = args.steps
    report = run(config, args.out)
    print(json.dumps({k: report[k] for k in ("parameters", "train_seconds", "chosen_checkpoint")}, indent=2))


if __name__ == "__main__":
    main()
