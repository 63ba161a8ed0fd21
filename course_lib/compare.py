"""Putting techniques side by side (lesson 09): what an adapter costs to store, to serve and to keep
near its reference, measured the same way for every technique.

* :func:`saved_bytes` — the bytes a technique's saver writes (peft's ``adapter_model.safetensors``, or a
  whole ``model.safetensors`` for full fine-tuning): the storage each task costs;
* :func:`dequantize_model` — every :class:`~course_lib.nf4.NF4Linear` (bare, or the frozen base of a
  LoRA layer) replaced by an ``nn.Linear`` holding its dequantized weight: the only way a QLoRA adapter
  can be merged (the sum ``W₀ + s·BA`` is not a 4-bit matrix; Dettmers et al. 2023 serve the adapter
  separately or merge into the 16-bit model);
* :func:`merge_and_unload_lora` — LoRA folded into the weights (Hu et al. 2021, §4.1: ``W = W₀ + s·BA``,
  "no additional inference latency") and each wrapper replaced by its plain ``nn.Linear`` (peft's
  ``merge_and_unload``): the base architecture with other weights;
* :func:`forward_ms` — forward-pass times of several models on one batch, alternated so that machine
  noise hits all of them alike, as medians with their spread;
* :func:`sequence_kl` — KL(π‖π_ref) per sequence, estimated on continuations sampled from π: the mean
  over rows of Σ_t log π(y_t) − log π_ref(y_t), with π_ref = the same model with its LoRA adapter off.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .nf4 import NF4Linear


def saved_bytes(save: Callable[[Path], object]) -> int:
    """Call ``save(directory)`` on a fresh temporary folder and return the bytes of every file it wrote
    (weights and config). ``save`` is e.g. ``lambda d: lora.save_adapter(model, d)`` or
    ``lambda d: model.save_pretrained(d)``."""
    if not callable(save):
        raise TypeError(f"save must be a function of a folder, e.g. lambda d: save_adapter(model, d); got {save!r}")
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        if not files:
            raise ValueError("save(directory) wrote no file: pass a function that saves into the folder it is given")
        return sum(p.stat().st_size for p in files)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every :class:`NF4Linear` in ``model`` (also the base layer inside a LoRA wrapper) by a frozen
    ``nn.Linear`` holding the dequantized weight, in ``dtype`` (default: the dtype it was quantized from).
    In place; returns the replaced module names. The outputs do not change: the NF4 layer computes with
    exactly this dequantized weight."""
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    if not names:
        raise ValueError("the model has no NF4Linear layers to dequantize (quantize with course_lib.nf4.quantize_model)")
    for name in names:
        layer = model.get_submodule(name)
        weight = layer.dequantized_weight(dtype)  # (out, in)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        model.set_submodule(name, linear)
    return names


def merge_and_unload_lora(model: nn.Module) -> nn.Module:
    """Merge each LoRA layer's active adapter into its base weight and put the plain base ``nn.Linear`` back
    in place of the wrapper (peft's ``merge_and_unload``). A 4-bit base cannot take the sum: call
    :func:`dequantize_model` first. Returns ``model`` (changed in place)."""
    from .lora import LoRALinear

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA layers to merge (add them with course_lib.lora.add_lora)")
    for name, layer in layers:
        if isinstance(layer.base_layer, NF4Linear):
            raise RuntimeError(f"{name}: cannot merge LoRA into a 4-bit weight: call compare.dequantize_model(model) "
                               f"first (the merged weight is then 16/32-bit)")
    for name, layer in layers:
        if layer.active_adapter is not None and layer.active_adapter not in layer.merged_adapters:
            layer.merge(layer.active_adapter)
        model.set_submodule(name, layer.base_layer)
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


def forward_ms(models: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor], *, rounds: int = 7,
               repeats: int = 5) -> dict[str, dict[str, float]]:
    """Time ``model(**batch)`` (no gradient) for every model: ``rounds`` rounds, each running every model
    ``repeats`` times in turn, so that a slow moment of the machine slows all of them alike. Returns per
    model the median milliseconds per forward and the half-range of the rounds (``{"ms", "half_range"}``)."""
    if not models:
        raise ValueError("models is empty: pass {name: model}")
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be ≥ 1, got rounds={rounds}, repeats={repeats}")
    from .bench.timing import alternate_rounds

    for m in models.values():
        m.eval()

    def forwards(m: nn.Module) -> Callable[[], None]:
        return lambda: [m(**batch) for _ in range(repeats)]

    gpus = {d for d in (next(m.parameters()).device for m in models.values()) if d.type == "cuda"}

    def sync() -> None:  # a CUDA forward returns before it has run
        for device in gpus:
            torch.cuda.synchronize(device)

    with torch.no_grad():  # one warm-up round (first-call allocations, lazy init), then the timed rounds
        rounds_s = alternate_rounds([forwards(m) for m in models.values()], repeats=rounds, warmup=1, sync=sync)
    times = {name: [1e3 * s / repeats for s in spent] for name, spent in zip(models, rounds_s)}
    return {name: {"ms": statistics.median(t), "half_range": (max(t) - min(t)) / 2} for name, t in times.items()}


def sequence_kl(model: nn.Module, tokenizer, prompts: list[str], continuations: list[str]) -> float:
    """KL(π‖π_ref) per sequence, in nats: the mean over rows of log π(y|x) − log π_ref(y|x), where the y
    were sampled from π (so the mean estimates the KL) and π_ref is ``model`` with its LoRA adapter switched
    off. Empty continuations are left out (they have no token to score)."""
    from .evaluate import completion_logprobs
    from .lora import disable_adapters

    if len(prompts) != len(continuations):
        raise ValueError(f"prompts ({len(prompts)}) and continuations ({len(continuations)}) must pair up")
    kept = [(p, c) for p, c in zip(prompts, continuations) if c]
    if not kept:
        raise ValueError("every continuation is empty: there is nothing to score")
    ps, cs = [p for p, _ in kept], [c for _, c in kept]
    logp = completion_logprobs(model, tokenizer, ps, cs)  # (N,)
    with disable_adapters(model):
        ref_logp = completion_logprobs(model, tokenizer, ps, cs)  # (N,)
    return (logp - ref_logp).mean().item()
