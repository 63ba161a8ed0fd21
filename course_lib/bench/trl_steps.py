"""Timing a transformers/TRL trainer's steady-state step, as the alignment benchmarks (sft, dpo, grpo) do."""

from __future__ import annotations

import warnings


# The two ways the alignment benchmarks run TRL: as a learner gets it (how `course-bench sft` times TRL), and
# in float32 without gradient checkpointing — the same arithmetic as course_lib.
TRL_VARIANTS = {"defaults": {}, "float32": {"bf16": False, "gradient_checkpointing": False}}


def ready_for_steps(trainer, steps: int):
    """Prepare a transformers/TRL trainer for :func:`trainer_steps` as ``Trainer.train()`` would: its optimizer
    and scheduler for ``steps`` steps, no gradient accumulation, the model in train mode."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def trl_step_times(t_ours: float, t_trl: dict[str, float], steps: int) -> dict:
    """Seconds per step of course_lib and of each TRL variant, and course_lib ÷ TRL per variant."""
    return {"step_s": {"course_lib": t_ours / steps, **{f"trl_{k}": t / steps for k, t in t_trl.items()}},
            "step_ratio": {k: t_ours / t for k, t in t_trl.items()}}


def trl_settings(trainer) -> str:
    """What a trainer's timed steps really run with: its autocast precision, and whether gradient
    checkpointing is on in the model (transformers' ``Trainer.train()`` would switch it on; timing the
    steady-state ``training_step`` alone runs whatever the trainer's constructor left)."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    return f"{trainer.accelerator.mixed_precision} autocast, checkpointing {'on' if checkpointing else 'off'}"


def trainer_steps(trainer, batches: list[dict]) -> None:
    """A transformers/TRL trainer's steady-state steps: its own ``training_step`` (loss, backward) and its
    optimizer and scheduler, without ``trainer.train()``'s set-up and logging — what a step costs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)
