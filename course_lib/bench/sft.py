"""``course-bench sft``: an SFT step, course_lib's loop vs TRL's ``SFTTrainer``."""

from __future__ import annotations

import argparse
import warnings

import torch

from .timing import alternate
from .trl_steps import ready_for_steps, trainer_steps


def bench_sft(args: argparse.Namespace) -> dict:
    """An SFT step: course_lib's loop vs TRL's ``SFTTrainer`` on the same model, rows and batches.

    Chat rows, assistant-only loss, LoRA r=8 on all linear layers, AdamW, batch 16. course_lib: its
    training loop, end to end (collation, forward, backward, clipping, optimizer). TRL: the trainer's
    own ``training_step`` on batches from its own collator, plus its optimizer and scheduler step —
    its steady state, without ``trainer.train()``'s per-run set-up and logging (which would only add to
    TRL's time). TRL's defaults stay on: gradient checkpointing, padding to the longest row, and its
    per-step metrics (token accuracy, entropy); course_lib packs the same examples without padding."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..lora import add_lora
    from ..models import load_model
    from ..sft import sft_batches, sft_loss
    from ..templates import instruction_dataset
    from ..training import TrainConfig, train

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps, batch_size = 10, 16
    rows = [{"messages": r["messages"]} for r in
            instruction_dataset(["sentiment", "opposite", "colour", "sound", "addition"], per_task=16)][:steps * batch_size]
    ours, tokenizer = load_model(None, device=device)
    add_lora(ours, "all-linear", r=8, alpha=16)
    batches = sft_batches(rows, tokenizer, batch_size, packing=True, max_length=128)  # rows of 128: little attention waste
    config = TrainConfig(steps=steps, lr=1e-3, progress=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=load_model(None, device=device)[0], processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows),
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                             args=SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_steps=steps,
                                            learning_rate=1e-3, per_device_train_batch_size=batch_size,
                                            assistant_only_loss=True, max_length=None, save_strategy="no",
                                            use_cpu=not cuda, disable_tqdm=True))
    ready_for_steps(trainer, steps)
    their_batches = [{k: v.to(device) for k, v in b.items()} for b in trainer.get_train_dataloader()][:steps]

    def run_ours():
        train(ours, batches, config, loss_fn=sft_loss, device=device)

    def run_theirs():
        trainer_steps(trainer, their_batches)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_ours, t_theirs = alternate(run_ours, run_theirs, repeats=args.repeats, sync=sync)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": "embedded", "steps": steps,
              "batch": batch_size, "step_s": [t_ours / steps, t_theirs / steps], "step_ratio": t_ours / t_theirs}
    print(f"sft · {result['device']} · embedded model · LoRA r=8 all-linear · batch {batch_size} chat rows · {steps} steps per run")
    print(f"  step  course_lib {t_ours / steps * 1e3:8.1f} ms   TRL SFTTrainer {t_theirs / steps * 1e3:8.1f} ms   "
          f"ratio {t_ours / t_theirs:.2f}×")
    return result
