"""The memory planner's models, and one measured training step: ``python tests/scripts/planner_peak.py TECHNIQUE
[--checkpointing]`` prints, as JSON, the peak resident memory a steady-state step of the embedded model adds
(course_lib.memory.measure_peak_memory) next to the planner's prediction (``MemoryPlan.step_peak``).

Run it in a fresh process (tests/test_planner.py does) with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then
serves every allocation above 64 KiB with its own mmap and returns it to the system when freed, so the
resident set follows the live tensors instead of what the allocator cached (by default glibc raises that
threshold after the first large free, and later tensors reuse heap pages already resident).
"""

from __future__ import annotations

import gc
import json
import sys

import torch

TECHNIQUES = ("full", "lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")
LORA_R, VIRTUAL_TOKENS = 8, 20
BATCH, SEQ_LEN = 8, 224  # + 20 virtual tokens stays within the embedded model's 256 positions


def adapt(model, technique: str, checkpointing: bool = False):
    """``model`` prepared for ``technique`` with course_lib (all-linear LoRA r = 8, NF4 + double quant, peft's
    IA3 targets, 20 virtual tokens); returns the model to train (a SoftPromptModel for soft prompts)."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if technique in ("lora", "qlora"):
        from course_lib.lora import add_lora

        if technique == "qlora":
            from course_lib.nf4 import quantize_model

            quantize_model(model, double_quant=True)
        add_lora(model, "all-linear", r=LORA_R, alpha=2 * LORA_R)
    elif technique == "ia3":
        from course_lib.ia3 import add_ia3

        add_ia3(model)
    elif technique in ("prompt_tuning", "prefix_tuning"):
        from course_lib.soft_prompts import add_soft_prompt

        model = add_soft_prompt(model, technique.split("_")[0], VIRTUAL_TOKENS)
    elif technique != "full":
        raise ValueError(f"technique {technique!r}: use one of {TECHNIQUES}")
    return model


def planner_kwargs(technique: str, bits: int, batch: int, seq_len: int, checkpointing: bool = False) -> dict:
    """The `plan` arguments that describe what `adapt` builds."""
    return dict(bits=bits, batch=batch, seq_len=seq_len, lora_r=LORA_R, lora_targets="all-linear",
                num_virtual_tokens=VIRTUAL_TOKENS, grad_checkpointing=checkpointing, double_quant=True)


def measure(technique: str, checkpointing: bool = False) -> dict:
    """One warm-up step (creates the optimizer state), then the peak of the next step above where it started."""
    from course_lib.memory import measure_peak_memory, plan_for_config
    from course_lib.models import load_model

    torch.manual_seed(0)
    model = adapt(load_model(None, device="cpu")[0], technique, checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()  # the output (and its logits) freed before backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    _, peak = measure_peak_memory(step)
    planned = plan_for_config(model.config, technique, **planner_kwargs(technique, 32, BATCH, SEQ_LEN, checkpointing))
    return {"technique": technique, "checkpointing": checkpointing, "measured": peak.peak_bytes,
            "predicted": planned.step_peak, "method": peak.method,
            "activations": planned.activations, "transient": planned.transient, "gradients": planned.gradients}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(sys.argv[1], "--checkpointing" in sys.argv[2:])))
