"""``course-bench qlora``: a QLoRA training step, course_lib vs bitsandbytes + peft, with and without
gradient checkpointing."""

from __future__ import annotations

import argparse

import torch

from .device import bench_device, device_name, synchronizer
from .shapes import base_model
from .timing import alternate_all


def _bnb_qlora(model: torch.nn.Module, r: int, compute_dtype: torch.dtype):
    """bitsandbytes + peft QLoRA: every Linear but the head → ``bnb.nn.Linear4bit`` (NF4, double quant),
    then peft LoRA on all linear layers (no ``prepare_model_for_kbit_training``: it would upcast the
    norms and embeddings to float32, which course_lib's QLoRA does not do either)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        model.set_submodule(name, layer.to(linear.weight.device))  # the move to the device quantizes
    from ..nf4 import bitsandbytes_reference_path

    bitsandbytes_reference_path(model)  # its NF4 path on every CPU, as course_lib's loader keeps it
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def bench_qlora(args: argparse.Namespace) -> dict:
    """QLoRA vs LoRA on the same model and batch: memory and time per training step, with and without
    gradient checkpointing (the common claim "QLoRA: 33% less memory for 33% more time"; Raschka, "Practical
    Tips for Finetuning LLMs Using LoRA", 2023, measured 33% less memory for 39% more time on Llama 2 7B).
    course_lib's QLoRA (NF4 + double quant + LoRA) and, where bitsandbytes runs, bitsandbytes + peft's.

    course_lib ÷ library compares the two QLoRAs at the same checkpointing setting (off, then on), on the
    same model, batch (random ids, no padding), dtype, rank and NF4 + double quant. One setting differs
    from what a learner gets from peft: ``prepare_model_for_kbit_training`` is not called (it would upcast
    norms and embeddings to float32, which course_lib does not do), so both keep the model's dtype."""
    import gc

    from ..lora import add_lora
    from ..nf4 import quantize_model

    device = bench_device(args)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = "tinyllama" if cuda else "embedded"
    batch, length = (8, 512) if cuda else (4, 128)
    r = 16
    sync = synchronizer(device)
    import importlib.util

    kinds = ["LoRA (course_lib)", "QLoRA (course_lib)"]
    kinds += ["QLoRA (bitsandbytes + peft)"] if importlib.util.find_spec("bitsandbytes") else []

    def build(kind: str):
        model = base_model(shape, device, dtype)
        if kind == "QLoRA (bitsandbytes + peft)":
            return _bnb_qlora(model, r, dtype)
        if kind.startswith("QLoRA"):
            quantize_model(model, double_quant=True)
        add_lora(model, "all-linear", r=r, alpha=2 * r)
        return model

    models, steps, rows = {}, {}, []
    for kind in kinds:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated() if cuda else 0
        model = models[kind] = build(kind)
        weights = (torch.cuda.memory_allocated() - start) if cuda else None
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer, ids=ids):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[kind] = step
        for checkpointing in (False, True):
            _set_checkpointing(model, checkpointing)
            step()  # warm-up: optimizer state, kernels compiled
            peak = None
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                step()
                sync()
                peak = torch.cuda.max_memory_allocated() - start
            rows.append({"kind": kind, "checkpointing": checkpointing, "weights_gib": weights and weights / 2 ** 30,
                         "peak_gib": peak and peak / 2 ** 30})
    for checkpointing in (False, True):
        for model in models.values():
            _set_checkpointing(model, checkpointing)
        times = alternate_all([steps[k] for k in kinds], repeats=args.repeats, sync=sync)
        for kind, seconds in zip(kinds, times):
            next(row for row in rows if row["kind"] == kind and row["checkpointing"] == checkpointing)["step_s"] = seconds
    print(f"qlora · {device_name(device)} · {shape} {dtype} batch {batch}×{length} · r={r} all-linear · NF4 + double quant")
    print(f"  {'':30s} {'checkpointing':>13s} {'weights':>9s} {'peak':>9s} {'s/step':>8s}   vs LoRA (memory, time)")
    for row in rows:
        ref = next(x for x in rows if x["kind"] == kinds[0] and x["checkpointing"] == row["checkpointing"])
        row["time_vs_lora"] = row["step_s"] / ref["step_s"]
        row["memory_vs_lora"] = row["peak_gib"] / ref["peak_gib"] if cuda else None
        memory = (f"{row['weights_gib']:7.2f} G {row['peak_gib']:7.2f} G" if cuda else f"{'n/a':>9s} {'n/a':>9s}")
        versus = (f"{row['memory_vs_lora'] - 1:+.0%}, " if cuda else "") + f"{row['time_vs_lora'] - 1:+.0%}"
        print(f"  {row['kind']:30s} {'on' if row['checkpointing'] else 'off':>13s} {memory} {row['step_s']:8.3f}   {versus}")
    same = (f"{shape} model in {dtype}, batch {batch}×{length} random ids (no padding), NF4 + double quant, "
            f"LoRA r={r} α={2 * r} all-linear, compute in {dtype}, AdamW; checkpointing off and on, on both sides")
    settings = {"course_lib": same, "bitsandbytes + peft": same + " (no prepare_model_for_kbit_training)"}
    return {"device": device_name(device), "shape": shape, "dtype": str(dtype), "batch": f"{batch}x{length}",
            "settings": settings, "rows": rows}


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing (non-reentrant: the frozen embeddings' output needs no gradient) on or off."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
