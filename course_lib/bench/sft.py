"""``course-bench sft``: SFT over the same chat rows, course_lib's loop vs TRL's ``SFTTrainer``."""

from __future__ import annotations

import argparse
import functools
import math
import warnings

import torch

from .device import bench_device, device_name, synchronizer
from .timing import alternate_all
from .trl_steps import ready_for_steps, trainer_steps, trl_settings

STEPS, BATCH_SIZE, PACKED_LENGTH = 10, 16, 128  # course_lib: 10 steps × 16 rows = one pass over 160 rows


def bench_sft(args: argparse.Namespace) -> dict:
    """One pass of SFT over the same 160 chat rows: course_lib's loop vs TRL's ``SFTTrainer``, same model,
    LoRA r=8 on all linear layers, assistant-only loss, AdamW, lr 1e-3.

    course_lib: its training loop end to end (collation, forward, backward, clipping, optimizer), 10 steps
    of 16 rows, each step's rows packed best-fit into rows of 128 tokens (block-diagonal attention from
    position ids, no padding inside a row), float32, no gradient checkpointing. TRL: the trainer's own
    ``training_step`` on batches from its own collator, plus its optimizer and scheduler step — its steady
    state, without ``trainer.train()``'s per-run set-up and logging (which would only add to its time) —
    over one pass of the same rows, timed two ways in the same alternation:

    - **packed** (the headline, like with like): ``packing=True`` with TRL's default ``"bfd"`` strategy
      (best-fit decreasing into rows of ``max_length`` = 128, which turns on ``padding_free``: the packed
      rows of a batch are flattened into one sequence with position ids restarting per example), float32
      (``bf16=False``), no gradient checkpointing; batches of ⌈packed rows ÷ 10⌉ so the pass takes about
      the 10 optimizer steps course_lib takes. Every row is trained once on both sides: the trained-token
      counts are in the result.
    - **defaults** (what a learner gets): TRL's own defaults — bf16 autocast, gradient checkpointing,
      rows padded to the longest in the batch, batches of 16 rows.

    What still differs in the packed comparison: TRL packs across the whole data set rather than within
    each batch, feeds a batch as one flattened sequence rather than rows of 128, and computes its per-step
    metrics (token accuracy, entropy). Ratios are course_lib's time ÷ TRL's for the whole pass."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..lora import add_lora
    from ..models import load_model
    from ..sft import sft_batches, sft_loss
    from ..templates import instruction_dataset
    from ..training import TrainConfig, train

    device = bench_device(args)
    cuda = device.type == "cuda"
    rows = [{"messages": r["messages"]} for r in
            instruction_dataset(["sentiment", "opposite", "colour", "sound", "addition"], per_task=16)][:STEPS * BATCH_SIZE]
    ours, tokenizer = load_model(None, device=device)
    add_lora(ours, "all-linear", r=8, alpha=16)
    batch_fn = sft_batches(rows, tokenizer, BATCH_SIZE, packing=True, max_length=PACKED_LENGTH)
    our_batches = [batch_fn(step) for step in range(STEPS)]  # one pass: every row once
    config = TrainConfig(steps=STEPS, lr=1e-3, progress=False)

    def trl_trainer(batch_size: int, **overrides) -> SFTTrainer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = SFTTrainer(model=load_model(None, device=device)[0], processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(rows),
                                 peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        task_type="CAUSAL_LM"),
                                 args=SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_steps=STEPS,
                                                learning_rate=1e-3, per_device_train_batch_size=batch_size,
                                                assistant_only_loss=True, save_strategy="no", use_cpu=not cuda,
                                                disable_tqdm=True, **overrides))
        return ready_for_steps(trainer, STEPS)

    def one_pass(trainer: SFTTrainer) -> list[dict]:
        return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in trainer.get_train_dataloader()]

    packed = dict(packing=True, max_length=PACKED_LENGTH, bf16=False, gradient_checkpointing=False)
    packed_rows = len(trl_trainer(1, **packed).train_dataset)  # how many rows TRL's packing makes of the data
    trainers = {"packed": trl_trainer(math.ceil(packed_rows / STEPS), **packed),
                "defaults": trl_trainer(BATCH_SIZE, max_length=None)}
    their_batches = {name: one_pass(trainer) for name, trainer in trainers.items()}

    def run_ours():
        train(ours, lambda step: our_batches[step], config, loss_fn=sft_loss, device=device)

    t_ours, *t_trl = alternate_all([run_ours, *[functools.partial(trainer_steps, trainers[k], their_batches[k])
                                                for k in trainers]], repeats=args.repeats, sync=synchronizer(device))
    t_theirs = dict(zip(trainers, t_trl))

    def trained(batches: list[dict]) -> int:
        return sum(int((b["labels"] != -100).sum()) for b in batches)

    ours_settings = (f"float32, checkpointing off, each step's 16 rows packed best-fit into rows of {PACKED_LENGTH} "
                     "(position ids, no attention mask)")
    trl_packed = trl_settings(trainers["packed"])
    result = {"device": device_name(device), "model": "embedded", "rows": len(rows),
              "run_s": {"course_lib": t_ours, **{f"trl_{k}": t for k, t in t_theirs.items()}},
              "ratio": {k: t_ours / t for k, t in t_theirs.items()},
              "optimizer_steps": {"course_lib": STEPS, **{f"trl_{k}": len(b) for k, b in their_batches.items()}},
              "trained_tokens": {"course_lib": trained(our_batches),
                                 **{f"trl_{k}": trained(b) for k, b in their_batches.items()}},
              "settings": {"course_lib": ours_settings,
                           "trl_packed": f"{trl_packed}, bfd packing into rows of {PACKED_LENGTH} (padding-free: a "
                                         f"batch of {trainers['packed'].args.per_device_train_batch_size} packed rows is one "
                                         "flattened sequence)",
                           "trl_defaults": f"{trl_settings(trainers['defaults'])}, batches of {BATCH_SIZE} rows "
                                           "padded to the longest"}}
    print(f"sft · {result['device']} · embedded model · LoRA r=8 all-linear · one pass over {len(rows)} chat rows")
    print(f"  course_lib ({ours_settings}): {t_ours * 1e3:8.1f} ms in {STEPS} steps")
    for name, seconds in t_theirs.items():
        print(f"  TRL SFTTrainer, {name} ({result['settings'][f'trl_{name}']}): {seconds * 1e3:8.1f} ms in "
              f"{len(their_batches[name])} steps   ratio {t_ours / seconds:.2f}×")
    print(f"  trained tokens: {result['trained_tokens']}")
    return result
