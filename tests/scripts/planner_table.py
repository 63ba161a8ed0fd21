"""The memory planner's error table: ``python tests/scripts/planner_table.py`` prints, per technique, the
relative error (planned − real) / real of each term on the embedded model (fp32, batch 8 × 224):

* weights, gradients, optimizer state: against `training_state_bytes` (+ the NF4 buffers for QLoRA);
* activations: against `saved_activation_bytes` (every tensor autograd keeps);
* peak: against the peak resident memory of a steady-state step, measured in a fresh process
  (`planner_peak.py`; this part takes a minute or two);
then the CUDA peaks of benchmarks/RESULTS.md at the TinyLlama-1.1B shape against the planner.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from planner_peak import (BATCH, SEQ_LEN, TECHNIQUES, TINYLLAMA, adapt, measured_step,  # noqa: E402
                          planner_kwargs, results_md_lora_peaks, stored_weight_bytes)


def error(planned: int, real: int) -> str:
    return f"{(planned - real) / real:+.2%}" if real else ("0 = 0" if planned == 0 else f"{planned} vs 0")


def main() -> None:
    from course_lib.memory import plan_for_config, saved_activation_bytes, training_state_bytes
    from course_lib.models import load_model

    torch.set_num_threads(1)
    base, _ = load_model(None, device="cpu")
    print(f"embedded model, fp32, batch {BATCH} × {SEQ_LEN}, AdamW (planned − real) / real\n")
    print("| technique | checkpointing | weights | gradients | optimizer | activations | step peak (CPU RSS) |")
    print("|---|---|---|---|---|---|---|")
    for technique in TECHNIQUES:
        for checkpointing in (False, True):
            if technique == "prefix_tuning" and checkpointing:
                continue  # transformers drops the prefix cache under checkpointing (the planner refuses it)
            torch.manual_seed(0)
            model = adapt(load_model(None, device="cpu")[0], technique, checkpointing)
            p = plan_for_config(model.config, technique, **planner_kwargs(technique, 32, BATCH, SEQ_LEN, checkpointing))
            state = training_state_bytes(model)
            ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
            _, saved = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss, exclude=model.parameters())
            step = measured_step(technique, checkpointing)
            print(f"| {technique} | {'on' if checkpointing else 'off'} | {error(p.weights, stored_weight_bytes(model))} "
                  f"| {error(p.gradients, state.gradients)} | {error(p.optimizer, state.optimizer)} "
                  f"| {error(p.activations, saved)} | {error(step['predicted'], step['measured'])} "
                  f"({step['predicted'] / 1e6:.1f} planned / {step['measured'] / 1e6:.1f} MB measured) |")
    del base

    from transformers import LlamaConfig

    rows = results_md_lora_peaks()
    config = LlamaConfig(**TINYLLAMA)
    common = dict(bits=16, batch=8, seq_len=512, lora_r=16, lora_targets="all-linear")
    peft = plan_for_config(config, "lora", lora_backward="peft", **common).step_peak / 1e6
    bf16 = plan_for_config(config, "lora", adapter_bits=16, **common).step_peak / 1e6
    now = plan_for_config(config, "lora", **common).step_peak / 1e6
    print("\nCUDA peak step memory, TinyLlama-1.1B shape, bf16, batch 8 × 512, LoRA r = 16 all-linear "
          "(benchmarks/RESULTS.md, H200)\n")
    print("| run | measured | planned | error |")
    print("|---|---|---|---|")
    for label, (measured, planned) in {"peft (fp32 adapters), 11:36": (rows["11:36"][1], peft),
                                       "course_lib bf16 adapters, 10:44": (rows["10:44"][0], bf16)}.items():
        print(f"| {label} | {measured:.0f} MB | {planned:.1f} MB | {(planned - measured) / measured:+.3%} |")
    print(f"| course_lib LoRAFunction (not yet measured on a GPU) | — | {now:.1f} MB | — |")


if __name__ == "__main__":
    main()
