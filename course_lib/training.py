"""The one training loop every lesson uses.

AdamW (or SGD), linear warm-up then cosine decay, gradient accumulation, gradient clipping, a tqdm
progress bar and a history for plots. It runs in a plain process, and under ``accelerate launch``
(DDP) when `accelerate` is asked for or detected, so the same notebook code scales to several GPUs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import torch
from torch import nn


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    use_accelerate: bool | None = None  # None: only when started by `accelerate launch`

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


@dataclass
class History:
    """What happened at each optimizer step: enough to plot a run and compare two runs."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, list] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.loss[-1]

    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.step), 1)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: ``step / warmup`` during warm-up, then ``½(1 + cos(π·progress))``.

    Same curve as ``transformers.get_cosine_schedule_with_warmup`` (with ``min_ratio=0``), which
    the tests check; ``progress = (step − warmup) / (total − warmup)``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return min_ratio + (1.0 - min_ratio) * cosine


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: unfreeze some, or add an adapter first")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")


def _launched_by_accelerate() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def train(
    model: nn.Module,
    batches: Iterable[dict] | Callable[[int], dict],
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
    callback: Callable[[int, nn.Module, History], None] | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> History:
    """Train ``model`` for ``config.steps`` optimizer steps and return the :class:`History`.

    ``batches`` is an iterable of dicts of tensors, or a function ``micro_step -> batch`` (handy for
    deterministic, endlessly generated data). Each optimizer step consumes ``grad_accum`` batches;
    the loss of each is divided by ``grad_accum`` so the gradient is their mean.
    ``callback(step, model, history)`` runs after every optimizer step (evaluation, early stop by
    raising ``StopIteration``).
    """
    torch.manual_seed(config.seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    optimizer = make_optimizer(model.parameters(), config)
    if config.schedule == "cosine":
        multiplier = lambda s: cosine_with_warmup(s, config.warmup_steps, config.steps, config.min_lr_ratio)  # noqa: E731
    else:  # constant after the same linear warm-up
        multiplier = lambda s: min(1.0, s / config.warmup_steps) if config.warmup_steps else 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    accelerator = None
    if config.use_accelerate or (config.use_accelerate is None and _launched_by_accelerate()):
        from accelerate import Accelerator

        accelerator = Accelerator(gradient_accumulation_steps=1)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        device = accelerator.device
    is_main = accelerator is None or accelerator.is_main_process

    source: Iterator[dict] | None = None if callable(batches) else iter(batches)
    micro_step = 0

    def next_batch() -> dict:
        nonlocal micro_step
        batch = batches(micro_step) if source is None else next(source)
        micro_step += 1
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    history = History()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if config.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=config.desc, leave=False, mininterval=0.5)
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            total = 0.0
            for _ in range(config.grad_accum):
                batch = next_batch()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_fn(model, batch) / config.grad_accum
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                total += loss.item()
            if config.max_grad_norm is not None:
                clip = accelerator.clip_grad_norm_ if accelerator is not None else nn.utils.clip_grad_norm_
                grad_norm = float(clip(trainable, config.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"loss became {total} at step {step}: lower the learning rate ({config.lr}) or check the data")
            history.lr.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.step.append(step)
            history.loss.append(total)
            history.grad_norm.append(grad_norm)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
            if callback is not None:
                try:
                    callback(step, model, history)
                except StopIteration:
                    break
    finally:
        if bar is not None:
            bar.close()
        history.seconds = time.perf_counter() - start
    model.eval()
    return history
