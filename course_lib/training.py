"""The one training loop every lesson uses.

AdamW (or SGD), linear warm-up then cosine decay, gradient accumulation, gradient clipping, a tqdm
progress bar and a history for plots. It runs in a plain process, and under ``accelerate launch``
(DDP) when `accelerate` is asked for or detected, so the same notebook code scales to several GPUs.

A loss says what it averages over by returning a :class:`LossSum` (sum of per-item losses, number of
items: tokens, preference pairs, sequences). An optimizer step then minimises

    L = Σ_{micro-batches m, processes r} total_{m,r}  /  Σ_{m,r} count_{m,r}

— the loss of one process on the whole batch, however the batch was split into micro-batches and
processes. That is what transformers' Trainer does with ``num_items_in_batch`` (and TRL's SFT inherits):
the token mean over the accumulation window and over all devices, not a mean of per-micro-batch means.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import torch
from torch import nn


@dataclass
class TrainConfig:
    """The settings of one :func:`train` run.

    ``seed`` seeds torch's random number generator when ``train()`` starts: what the run itself draws
    (dropout masks, a loss that samples) is then the same in every run. It does **not** seed the
    adapter's initial weights: ``add_lora`` (like every adapter that starts from random weights, and
    like ``peft.get_peft_model``) draws them from torch's generator when it is called, before ``train()``
    and its seed. For two runs that start from the same adapter, seed torch before adding it::

        torch.manual_seed(0)
        add_lora(model, ["q_proj", "v_proj"], r=8)
        train(model, batches, TrainConfig(steps=100, seed=0))

    The order of batches is the data's own: pass the same ``batches`` for the same run
    (``ShuffledEpochs`` takes a seed of its own). tests/test_train_seed.py checks the rest.
    """

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
    seed: int = 0  # torch's generator at train()'s start: dropout, sampling. Not the adapter's init (see above)
    progress: bool = True
    desc: str = "train"
    use_accelerate: bool | None = None  # None: only when started by `accelerate launch`
    # Under DDP, each process trains on its share of every batch's rows (accelerate's `split_batches`),
    # so N processes on a batch equal one process on it. False: each process's `batches` already differ.
    split_batches: bool = True

    def __post_init__(self):
        for name in ("steps", "grad_accum", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int (a count of optimizer steps / micro-batches), got {value!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int (torch.manual_seed's, at the start of train()), got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number (e.g. 1e-3 for LoRA), got {self.lr!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (the cosine decays to lr · min_lr_ratio), "
                             f"got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, or None for no clipping, got {self.max_grad_norm}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's decay rates, e.g. (0.9, 0.999)), "
                             f"got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
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


class ShuffledEpochs:
    """An endless stream of the indices 0…n−1, reshuffled every epoch (epoch e with ``seed + e``), read by
    position: batch k of size b is ``take(k·b, b)``. Deterministic, so batch k is the same in every run."""

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError(f"cannot draw batches from {n} rows: give at least one row")
        self.n, self.seed, self.order = n, seed, []

    def take(self, start: int, count: int) -> list[int]:
        while len(self.order) < start + count:  # extend the stream one shuffled epoch at a time
            epoch = list(range(self.n))
            random.Random(self.seed + len(self.order) // self.n).shuffle(epoch)
            self.order.extend(epoch)
        return self.order[start:start + count]


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
    # One kernel per operation over all parameters instead of a Python loop over them: the same numbers
    # (torch's for-each and per-tensor updates round alike; tests/test_training_loop.py checks it) and,
    # for the ~60 small tensors of a LoRA adapter on CPU, a third of the optimizer's time. torch picks
    # for-each by itself only on accelerators.
    foreach = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                 foreach=foreach)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, foreach=foreach)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")


def _launched_by_accelerate() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ


@dataclass(frozen=True)
class LossSum:
    """A loss that says what it averages over: ``total``, the sum of the per-item losses (a scalar
    tensor with gradient), and ``count``, how many items it sums (tokens, pairs, sequences).

    :func:`train` divides the totals of a whole accumulation window, summed over processes, by the
    window's summed count. A ``loss_fn`` may also return the plain pair ``(total, count)``.
    """

    total: torch.Tensor  # ()
    count: torch.Tensor | int  # () or int

    def mean(self) -> torch.Tensor:
        """The loss of this batch alone: total / count."""
        return self.total / self.count

    def item(self) -> float:
        """``mean()`` as a float, so a LossSum prints and logs like a scalar loss."""
        return float(self.mean())


def text_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """The logits of the last ``length`` positions: the text's. A prompt-tuned model also returns
    logits for its virtual tokens, which come first: (B, NV+T, V) → (B, T, V)."""
    if logits.shape[1] < length:
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions, fewer than the "
                         f"{length} input tokens")
    return logits[:, logits.shape[1] - length:]


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """Next-token cross-entropy, summed:  Σ_t −log p(labels[t+1] | ≤ t)  over the positions whose
    shifted label is not −100, and their count (transformers' ``ForCausalLMLoss`` with
    ``num_items_in_batch``: the same shift, the same −100 convention, computed in float32).

    ``logits`` (B, T, V), or (B, NV+T, V) from a prompt-tuned model; ``labels`` (B, T).
    """
    shift_logits = text_logits(logits, labels.shape[1])[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    total = nn.functional.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(),
                                        ignore_index=-100, reduction="sum")
    return LossSum(total, (shift_labels != -100).sum())


def default_loss(model: nn.Module, batch: dict) -> LossSum:
    """Causal-LM loss on ``batch["labels"]`` (−100 = not trained on), token-weighted across the
    accumulation window. The model gets every other key (input_ids, attention_mask, position_ids…)."""
    if "labels" not in batch:
        raise KeyError(f"the default loss needs batch['labels'] (token ids, −100 where not trained on); the "
                       f"batch has {sorted(batch)}. Add labels, or pass loss_fn=…")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return causal_lm_loss_sum(model(**inputs).logits, batch["labels"])


def _as_loss_sum(out) -> LossSum | None:
    """A loss_fn's return value as a LossSum, or None for a plain scalar loss."""
    if isinstance(out, LossSum):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return LossSum(*out)
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return None
    raise TypeError(f"loss_fn returned {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
                    f"; return a scalar tensor (a mean), or a LossSum / (total, count) pair")


def _split_rows(batch: dict, rank: int, world: int) -> dict:
    """This process's share of the batch's rows: the ``rank``-th of ``world`` near-equal chunks.

    A batch whose rows are ``k`` stacked blocks that belong together row by row — DPO's B chosen then
    B rejected sequences — says so with ``batch["row_blocks"] = k``: a tensor of k·b rows is split
    within each block (pair i stays on one process), a tensor of b rows (per-pair values) as usual."""
    blocks = batch.get("row_blocks", 1)
    rows = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0}
    n = max(rows) // blocks if rows else 0
    if not rows or max(rows) % blocks or not rows <= {n, n * blocks}:
        raise ValueError(f"split_batches needs every tensor of a batch to have the same number of rows (or, with "
                         f"row_blocks={blocks}, {blocks}× a common number); got "
                         f"{ {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)} }")
    if n < world:
        raise ValueError(f"a batch of {n} rows cannot be split across {world} processes: use batches of at least "
                         f"{world} rows, or TrainConfig(split_batches=False) and give each process its own data")
    other = {k: type(v).__name__ for k, v in batch.items()
             if not isinstance(v, (torch.Tensor, int, float, str, bool, type(None)))}
    if other:
        raise ValueError(f"split_batches can split a batch's tensors, not {other}: use TrainConfig(split_batches=False) "
                         f"and give each process its own data")

    def share(v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] == n:
            return v.tensor_split(world)[rank]
        stacked = v.reshape(blocks, n, *v.shape[1:]).tensor_split(world, dim=1)[rank]  # (k, b_rank, ...)
        return stacked.reshape(-1, *v.shape[1:])

    return {k: (share(v) if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}


def train(
    model: nn.Module,
    batches: Iterable[dict] | Callable[[int], dict],
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor | LossSum | tuple] = default_loss,
    callback: Callable[[int, nn.Module, History], None] | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> History:
    """Train ``model`` for ``config.steps`` optimizer steps and return the :class:`History`.

    ``batches`` is an iterable of dicts of tensors, or a function ``micro_step -> batch`` (handy for
    deterministic, endlessly generated data). Each optimizer step consumes ``grad_accum`` batches.

    ``loss_fn(model, batch)`` returns either

    * a :class:`LossSum` or a ``(total, count)`` pair (the default loss and ``sft.sft_loss`` do, per
      token): the step minimises Σ total / Σ count over the window's micro-batches and, under DDP,
      over all processes — the same update as one process on the whole window (transformers' Trainer
      with ``num_items_in_batch``); ``history.loss`` is that window mean, equal on every process;
    * a scalar tensor, read as the mean over its micro-batch: each is divided by ``grad_accum`` so the
      step follows the mean of the micro-batch means (equal to the whole-window mean only when every
      micro-batch holds the same number of items); under DDP the processes' gradients are averaged.

    Under DDP each process takes its share of every batch's rows (``config.split_batches``).
    ``callback(step, model, history)`` runs after every optimizer step (evaluation, early stop by
    raising ``StopIteration``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (e.g. TrainConfig(steps=100, lr=1e-3)), "
                        f"got {type(config).__name__}")
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

        # cpu=True where the model trains on the CPU: without it accelerate finds no GPU under torchrun and
        # quietly runs every process alone (DistributedType.NO), each on its own, never all-reducing
        accelerator = Accelerator(gradient_accumulation_steps=1, cpu=device.type == "cpu")
        # the scheduler stays ours, stepped once per optimizer step: accelerate's wrapper would step it once
        # per process (it assumes every process draws its own batches), decaying the lr N times too fast
        model, optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device
    is_main = accelerator is None or accelerator.is_main_process
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0

    source: Iterator[dict] | None = None if callable(batches) else iter(batches)
    micro_step = 0

    def next_batch() -> dict:
        nonlocal micro_step
        try:
            batch = batches(micro_step) if source is None else next(source)
        except StopIteration:
            raise ValueError(f"batches ran out after {micro_step} micro-batch(es), but {config.steps} steps × "
                             f"grad_accum={config.grad_accum} need {config.steps * config.grad_accum}: pass more "
                             f"batches, fewer steps, or a function micro_step -> batch") from None
        if not isinstance(batch, dict):
            raise TypeError(f"batch {micro_step} is a {type(batch).__name__}; a batch is a dict of tensors "
                            f"(input_ids, attention_mask, labels, …)")
        micro_step += 1
        if world > 1 and config.split_batches:
            batch = _split_rows(batch, rank, world)
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def backward(loss: torch.Tensor) -> None:
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()

    # window sums of LossSum losses (total, count), in float64 where the device has it
    stats_dtype = torch.float32 if device.type == "mps" else torch.float64

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
            window = torch.zeros(2, dtype=stats_dtype, device=device)  # (Σ total, Σ count) of LossSum losses
            scalar_losses: bool | None = None  # what this window's loss_fn returns: means, or LossSums
            for _ in range(config.grad_accum):
                batch = next_batch()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    out = loss_fn(model, batch)
                summed = _as_loss_sum(out)
                if scalar_losses is None:
                    scalar_losses = summed is None
                elif scalar_losses != (summed is None):
                    raise TypeError("loss_fn returned a scalar for some micro-batches and a LossSum / (total, count) "
                                    "for others: return one kind")
                if summed is None:  # a mean over its micro-batch: the step follows the mean of the means
                    loss = out / config.grad_accum
                    backward(loss)
                    total += loss.item()
                else:  # the plain sum now; divided by the window's count (all processes) below
                    backward(summed.total)
                    window += torch.stack([summed.total.detach().to(stats_dtype),
                                           torch.as_tensor(summed.count, device=device).to(stats_dtype)])
            if not scalar_losses:
                if world > 1:
                    window = accelerator.reduce(window, reduction="sum")
                total_items = float(window[1])
                if total_items == 0:
                    raise ValueError(f"step {step}: the loss counted no items (tokens, pairs, …) in its "
                                     f"{config.grad_accum} micro-batch(es){' on any process' if world > 1 else ''}: "
                                     f"are all labels -100? Check the loss mask of your data")
                # DDP averaged the processes' gradients of Σ total; × world / N gives ∇ (Σ total / N)
                scale = world / total_items
                for p in trainable:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                total = float(window[0]) / total_items
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
