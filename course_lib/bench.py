"""``course-bench [NAME]``: the same work through course_lib and through peft / trl / bitsandbytes,
timed alternately (A/B/A/B…) in one process and printed as ratios.

Benchmarks register here as the lessons that own them land (LoRA, NF4, SFT). Timings are medians
of alternating runs, because this kind of machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {}
PLANNED: dict[str, str] = {}


def alternate(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately so drift in machine load hits both alike."""
    t_a, t_b = alternate_all([a, b], repeats=repeats, warmup=warmup, sync=sync)
    return t_a, t_b


def alternate_all(fns: list[Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                  sync: Callable[[], None] = lambda: None) -> list[float]:
    """Median seconds of each function, run in turn (A/B/C/A/B/C…)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _base_model(shape: str, device: torch.device, dtype: torch.dtype):
    """The embedded model, or a seeded random-init model of a named shape (``SHAPES``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import load_model

    if shape == "embedded":
        return load_model(None, device=device, dtype=dtype)[0]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1.1 B model is slow to build on a CPU
        return LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(dtype)


def _lora_models(shape: str, device: torch.device, dtype: torch.dtype, r: int, targets):
    """The same base model twice: one with course_lib LoRA, one with peft LoRA (same adapters)."""
    from peft import LoraConfig, get_peft_model

    from .lora import add_lora

    ours = _base_model(shape, device, dtype)
    add_lora(ours, targets, r=r, alpha=2 * r)
    theirs = get_peft_model(_base_model(shape, device, dtype),
                            LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    return ours, theirs


SHAPES = {  # random-init shapes for GPU benchmarks (TinyLlama-1.1B's architecture)
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}


def bench_lora(args: argparse.Namespace) -> dict:
    """LoRA train step and mixed-adapter serving: course_lib vs peft on the same model and batch."""
    from peft import LoraConfig

    from .lora import BASE, add_lora, autograd_backward, mixed_batch
    from .memory import measure_peak_memory, saved_activation_bytes

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda or args.bf16 else torch.float32
    shape = "tinyllama" if cuda else "embedded"
    batch, length = (8, 512) if cuda else (8, 256)
    targets = "all-linear"
    ours, theirs = _lora_models(shape, device, dtype, r=16, targets=targets)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    optimizers = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for m in (ours, theirs)}

    def step(model):
        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[id(model)].step()
            optimizers[id(model)].zero_grad(set_to_none=True)
        return run

    def autograd_path(run):  # course_lib with autograd's backward, to attribute the difference
        def wrapped():
            with autograd_backward():
                run()
        return wrapped

    t_ours, t_theirs, t_autograd = alternate_all([step(ours), step(theirs), autograd_path(step(ours))],
                                                 repeats=args.repeats, sync=sync)
    # CUDA's allocator statistics isolate one step exactly; on a CPU the process' resident memory
    # mostly reflects what the allocator cached in the warm-up steps, so it is not compared there.
    mem_ours = measure_peak_memory(step(ours), device)[1] if cuda else None
    mem_theirs = measure_peak_memory(step(theirs), device)[1] if cuda else None
    # What autograd keeps for the backward pass, counted tensor by tensor: exact on any device.
    saved = [saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss.item(), exclude=model.parameters())[1]
             for model in (ours, theirs)]

    # Serving: 4 adapters + base rows mixed in one batch.
    names = ["a", "b", "c"]
    for name in names:
        add_lora(ours, targets, r=16, alpha=32, adapter_name=name)
        theirs.add_adapter(name, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    rows = [(names + [BASE, "default"])[i % 5] for i in range(batch)]
    ours.eval(), theirs.eval()

    def serve_ours():
        with torch.no_grad(), mixed_batch(ours, rows):
            ours(input_ids=ids)

    def serve_theirs():
        with torch.no_grad():
            theirs(input_ids=ids, adapter_names=rows)

    s_ours, s_theirs = alternate(serve_ours, serve_theirs, repeats=args.repeats, sync=sync)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape, "dtype": str(dtype),
              "batch": f"{batch}x{length}", "train_step_s": [t_ours, t_theirs], "train_step_ratio": t_ours / t_theirs,
              "train_step_autograd_backward_s": t_autograd,
              "peak_mb": [mem_ours.mb, mem_theirs.mb] if cuda else None,
              "peak_ratio": mem_ours.mb / mem_theirs.mb if cuda else None,
              "saved_activation_mb": [b / 1e6 for b in saved], "saved_activation_ratio": saved[0] / saved[1],
              "mixed_serve_s": [s_ours, s_theirs], "mixed_serve_ratio": s_ours / s_theirs}
    print(f"lora · {result['device']} · {shape} {dtype} batch {batch}×{length} · r=16 all-linear")
    print(f"  train step      course_lib {t_ours * 1e3:8.1f} ms   peft {t_theirs * 1e3:8.1f} ms   ratio {t_ours / t_theirs:.2f}×"
          f"   (course_lib with autograd's backward: {t_autograd * 1e3:.1f} ms)")
    if cuda:
        print(f"  peak step memory course_lib {mem_ours.mb:7.1f} MB   peft {mem_theirs.mb:8.1f} MB   ratio {result['peak_ratio']:.2f}×")
    print(f"  kept for backward course_lib {saved[0] / 1e6:7.1f} MB   peft {saved[1] / 1e6:8.1f} MB   ratio {saved[0] / saved[1]:.2f}×")
    print(f"  mixed serving   course_lib {s_ours * 1e3:8.1f} ms   peft {s_theirs * 1e3:8.1f} ms   ratio {s_ours / s_theirs:.2f}×  (4 adapters + base rows)")
    return result


BENCHMARKS["lora"] = bench_lora


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

    from .lora import add_lora
    from .models import load_model
    from .sft import sft_batches, sft_loss
    from .templates import instruction_dataset
    from .training import TrainConfig, train

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


BENCHMARKS["sft"] = bench_sft


def bench_nf4(args: argparse.Namespace) -> dict:
    """NF4 dequantization throughput: course_lib (Triton on CUDA, torch on CPU) vs bitsandbytes, and a
    plain bf16 copy of the same tensor as the bandwidth ceiling. Outputs are compared bit for bit."""
    import bitsandbytes.functional as bnbf

    from .nf4 import dequantize_nf4, quantize_nf4

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    rows = []
    print(f"nf4 dequant · {torch.cuda.get_device_name() if cuda else 'cpu'} · bf16 output, blocksize 64")
    for shape in shapes:
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).to(device)
        their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4")
        packed, state = quantize_nf4(w)
        same_quantization = torch.equal(packed, their_packed) and torch.equal(state.absmax, their_state.absmax)
        packed, state.absmax = their_packed, their_state.absmax  # dequantize the very same bytes
        exact = torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(their_packed, their_state))
        n = w.numel()
        moved = n // 2 + state.absmax.numel() * 4 + n * 2  # bytes read + written by a dequantization
        inner = 20 if cuda else 1  # GPU calls take tens of µs: time 20 back to back, not one plus a sync

        def many(fn):
            def run():
                for _ in range(inner):
                    fn()
            return run
        t_ours, t_bnb = alternate(many(lambda: dequantize_nf4(packed, state)),
                                  many(lambda: bnbf.dequantize_4bit(their_packed, their_state)),
                                  repeats=args.repeats, sync=sync)
        t_copy, _ = alternate(many(lambda: w.clone()), lambda: None, repeats=args.repeats, sync=sync)
        t_ours, t_bnb, t_copy = t_ours / inner, t_bnb / inner, t_copy / inner
        row = {"shape": list(shape), "ours_GBps": moved / t_ours / 1e9, "bnb_GBps": moved / t_bnb / 1e9,
               "copy_GBps": 2 * n * 2 / t_copy / 1e9, "ratio_to_bnb": t_bnb / t_ours, "bit_exact": exact,
               "same_quantization": same_quantization}
        row["share_of_copy"] = row["ours_GBps"] / row["copy_GBps"]
        print(f"  {shape[0]:5d}×{shape[1]:<5d} course_lib {row['ours_GBps']:7.1f} GB/s   bitsandbytes {row['bnb_GBps']:7.1f} GB/s"
              f"   ({row['ratio_to_bnb']:.2f}× bnb's throughput)   bf16 copy {row['copy_GBps']:7.1f} GB/s"
              f" ({row['share_of_copy']:.0%} of it)   dequant bit-exact {exact} · quantize bit-exact {same_quantization}")

        # Double quantization: the absmax values themselves in 8 bits (bnb's compress_statistics).
        dq_packed, dq_state = quantize_nf4(w, double_quant=True)
        their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        agree = (dq_state.absmax == their_state.absmax).float().mean().item()  # 8-bit absmax indices
        dq_same = (torch.equal(dq_packed, their_packed) and torch.equal(dq_state.offset, their_state.offset)
                   and torch.equal(dq_state.absmax_scale, their_state.state2.absmax))
        dq_state.absmax = their_state.absmax  # dequantize the very same bytes
        dq_exact = torch.equal(dequantize_nf4(dq_packed, dq_state), bnbf.dequantize_4bit(their_packed, their_state))
        t_ours, t_bnb = alternate(many(lambda: dequantize_nf4(dq_packed, dq_state)),
                                  many(lambda: bnbf.dequantize_4bit(their_packed, their_state)),
                                  repeats=args.repeats, sync=sync)
        row.update(dq_ratio_to_bnb=t_bnb / t_ours, dq_us=[t_ours / inner * 1e6, t_bnb / inner * 1e6],
                   dq_bit_exact=dq_exact, dq_same_except_absmax=dq_same, dq_absmax_index_agreement=agree)
        print(f"              double quant: course_lib {row['dq_us'][0]:7.1f} µs   bitsandbytes {row['dq_us'][1]:7.1f} µs"
              f"   ({row['dq_ratio_to_bnb']:.2f}× bnb's throughput)   dequant bit-exact {dq_exact} · 4-bit data, offset"
              f" and scales equal {dq_same} · 8-bit absmax indices equal {agree:.2%}")
        rows.append(row)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows}


BENCHMARKS["nf4"] = bench_nf4


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
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def bench_qlora(args: argparse.Namespace) -> dict:
    """QLoRA vs LoRA on the same model and batch: memory and time per training step, with and without
    gradient checkpointing (the common claim "QLoRA: 33% less memory for 33% more time"; Raschka, "Practical
    Tips for Finetuning LLMs Using LoRA", 2023, measured 33% less memory for 39% more time on Llama 2 7B).
    course_lib's QLoRA (NF4 + double quant + LoRA) and, where bitsandbytes runs, bitsandbytes + peft's."""
    import gc

    from .lora import add_lora
    from .nf4 import quantize_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = "tinyllama" if cuda else "embedded"
    batch, length = (8, 512) if cuda else (4, 128)
    r = 16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import importlib.util

    kinds = ["LoRA (course_lib)", "QLoRA (course_lib)"]
    kinds += ["QLoRA (bitsandbytes + peft)"] if importlib.util.find_spec("bitsandbytes") else []

    def build(kind: str):
        model = _base_model(shape, device, dtype)
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
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"qlora · {device_name} · {shape} {dtype} batch {batch}×{length} · r={r} all-linear · NF4 + double quant")
    print(f"  {'':30s} {'checkpointing':>13s} {'weights':>9s} {'peak':>9s} {'s/step':>8s}   vs LoRA (memory, time)")
    for row in rows:
        ref = next(x for x in rows if x["kind"] == kinds[0] and x["checkpointing"] == row["checkpointing"])
        row["time_vs_lora"] = row["step_s"] / ref["step_s"]
        row["memory_vs_lora"] = row["peak_gib"] / ref["peak_gib"] if cuda else None
        memory = (f"{row['weights_gib']:7.2f} G {row['peak_gib']:7.2f} G" if cuda else f"{'n/a':>9s} {'n/a':>9s}")
        versus = (f"{row['memory_vs_lora'] - 1:+.0%}, " if cuda else "") + f"{row['time_vs_lora'] - 1:+.0%}"
        print(f"  {row['kind']:30s} {'on' if row['checkpointing'] else 'off':>13s} {memory} {row['step_s']:8.3f}   {versus}")
    return {"device": device_name, "shape": shape, "dtype": str(dtype), "batch": f"{batch}x{length}", "rows": rows}


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing (non-reentrant: the frozen embeddings' output needs no gradient) on or off."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()


BENCHMARKS["qlora"] = bench_qlora


def bench_dpo(args: argparse.Namespace) -> dict:
    """course_lib's DPO step vs TRL's DPOTrainer (course_lib/bench_dpo.py, imported on use: it needs TRL)."""
    from .bench_dpo import bench_dpo as run

    return run(args)


BENCHMARKS["dpo"] = bench_dpo


def bench_grpo(args: argparse.Namespace) -> dict:
    """course_lib's GRPO step vs TRL's GRPOTrainer (course_lib/bench_grpo.py, imported on use: it needs TRL)."""
    from .bench_grpo import bench_grpo as run

    return run(args)


BENCHMARKS["grpo"] = bench_grpo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS) or 'none yet'}")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B rounds (median reported)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--bf16", action="store_true", help="lora: a bf16 model on the CPU too (the GPU always uses bf16)")
    parser.add_argument("--steps", type=int, default=None, help="dpo, grpo: optimizer steps per timed run")
    args = parser.parse_args(argv)
    if args.name is None:
        coming = "; coming: " + ", ".join(f"{k} arrives with {v}" for k, v in PLANNED.items()) if PLANNED else ""
        print(f"benchmarks: {', '.join(BENCHMARKS) or 'none yet'}{coming}")
        return 0
    if args.name not in BENCHMARKS:
        when = f" ({args.name} arrives with {PLANNED[args.name]})" if args.name in PLANNED else ""
        print(f"course-bench: error: no benchmark {args.name!r}{when}; available: {', '.join(BENCHMARKS) or 'none yet'}",
              file=sys.stderr)
        return 2
    result = BENCHMARKS[args.name](args)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
