"""Timing a transformers/TRL trainer's steady-state step, as the alignment benchmarks (sft, dpo, grpo) do."""

from __future__ import annotations

import functools
import statistics
import warnings
from typing import Callable

import torch

from .timing import alternate_rounds


# The two ways the DPO and GRPO benchmarks run TRL: as a learner gets it (its defaults: bf16 autocast and
# gradient checkpointing, as `Trainer.train()` would switch them on), and in float32 without gradient
# checkpointing — course_lib's arithmetic, the like-with-like headline.
TRL_VARIANTS = {"defaults": {}, "float32": {"bf16": False, "gradient_checkpointing": False}}


def ready_for_steps(trainer, steps: int):
    """Prepare a transformers/TRL trainer for :func:`trainer_steps` as ``Trainer.train()`` would: activation
    (gradient) checkpointing switched on when its arguments ask for it, its model's forward under autocast
    when they ask for bf16/fp16, its optimizer and scheduler for ``steps`` steps, no gradient accumulation,
    the model in train mode.

    ``train()`` gets the last two from ``accelerator.prepare(model)``; that is not called here because
    accelerate's precision lives in one ``AcceleratorState`` per process, shared by every trainer in it —
    the last trainer built sets it for all (a float32 trainer built after a bf16 one switches the bf16
    one's autocast off). The benchmarks hold several trainers in one process, so each trainer's own
    ``args`` decide here, the way ``accelerator.prepare_model`` applies them to a single trainer."""
    args, model = trainer.args, trainer.model
    if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False):
        options = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
        every_n_layers, offload = options.pop("every_n_layers", 1), options.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options or None,
                                              every_n_layers=every_n_layers, offload=offload)
    precision = autocast_dtype(trainer)
    if precision is not None and not hasattr(model, "_forward_before_autocast"):
        from accelerate.utils import convert_outputs_to_fp32

        model._forward_before_autocast = model.forward
        model.forward = convert_outputs_to_fp32(torch.autocast(args.device.type, dtype=precision)(model.forward))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def autocast_dtype(trainer) -> torch.dtype | None:
    """The autocast precision a trainer's arguments ask for (``bf16`` / ``fp16``), or None for float32."""
    return torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None


def trl_step_times(t_ours: float, t_concatenated: float, t_trl: dict[str, float], round_ratios: dict[str, list[float]],
                   steps: int) -> dict:
    """What :func:`time_with_and_without_sharing_and_trl` measured, per step: seconds of course_lib (prompt
    shared and concatenated) and of each TRL variant, course_lib ÷ TRL per variant for both, and the sorted
    per-round ratios of the shared run."""
    return {"step_s": {"course_lib": t_ours / steps, "course_lib_concatenated": t_concatenated / steps,
                       **{f"trl_{k}": t / steps for k, t in t_trl.items()}},
            "step_ratio": {k: t_ours / t for k, t in t_trl.items()},
            "step_ratio_concatenated": {k: t_concatenated / t for k, t in t_trl.items()},
            "step_ratio_rounds": round_ratios}


def trl_settings(trainer) -> str:
    """What a trainer's timed steps run with after :func:`ready_for_steps`: its autocast precision and
    whether gradient checkpointing is on in its model."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    precision = autocast_dtype(trainer)
    autocast = "no autocast (float32)" if precision is None else f"{str(precision).removeprefix('torch.')} autocast"
    return f"{autocast}, checkpointing {'on' if checkpointing else 'off'}"


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


def time_with_and_without_sharing_and_trl(run_ours: Callable[..., None], variants: dict, *, repeats: int,
                                          sync: Callable[[], None]) -> tuple[float, float, dict[str, float], dict[str, str],
                                                                              dict[str, list[float]]]:
    """What the dpo and grpo benchmarks time, alternately: course_lib's run with each prompt shared by its
    completions (``run_ours()``), the same run with every completion re-running its prompt
    (``run_ours(False)``, TRL's arithmetic), and each TRL variant's steps (``variants``: name → (trainer,
    batches)). Returns the median seconds of the first two, those of each variant, and the settings each
    variant's steps really ran with (:func:`trl_settings`), and per variant the ratio course_lib ÷ TRL of
    each round (the two ran back to back), sorted: the spread a rerun on a shared machine can show."""
    settings = {name: trl_settings(trainer) for name, (trainer, _) in variants.items()}
    ours, concatenated, *trl = alternate_rounds(
        [run_ours, functools.partial(run_ours, False), *[functools.partial(trainer_steps, t, b) for t, b in variants.values()]],
        repeats=repeats, sync=sync)
    round_ratios = {name: sorted(a / b for a, b in zip(ours, theirs)) for name, theirs in zip(variants, trl)}
    t_trl = {name: statistics.median(theirs) for name, theirs in zip(variants, trl)}
    return statistics.median(ours), statistics.median(concatenated), t_trl, settings, round_ratios
