"""``course-bench lora``: a LoRA training step and mixed-adapter serving, course_lib vs peft."""

from __future__ import annotations

import argparse

import torch

from .device import bench_device, device_name, synchronizer
from .shapes import lora_models
from .timing import alternate, alternate_all


def bench_lora(args: argparse.Namespace) -> dict:
    """LoRA train step and mixed-adapter serving: course_lib vs peft on the same model and batch.

    Like with like on both sides: the same base model and adapters (r = 16, α = 32, all linear layers,
    adapters in float32 as peft keeps them), the same batch of random token ids (no padding, no packing),
    no gradient checkpointing, AdamW on the adapters. Here the defaults are the same settings, so there is
    one row per measurement, no separate defaults row."""
    from peft import LoraConfig

    from ..lora import BASE, add_lora, autograd_backward, mixed_batch
    from ..memory import measure_peak_memory, saved_activation_bytes

    device = bench_device(args)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda or getattr(args, "bf16", False) else torch.float32
    shape = "tinyllama" if cuda else "embedded"
    batch, length = (8, 512) if cuda else (8, 256)
    targets = "all-linear"
    ours, theirs = lora_models(shape, device, dtype, r=16, targets=targets)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    sync = synchronizer(device)
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
    same = (f"{shape} model in {dtype}, batch {batch}×{length} random ids (no padding), LoRA r=16 α=32 all-linear "
            "with float32 adapters, no gradient checkpointing, AdamW")
    result = {"device": device_name(device), "shape": shape, "dtype": str(dtype),
              "settings": {"course_lib": same, "peft": same},
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
