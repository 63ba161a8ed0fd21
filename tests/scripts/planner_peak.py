"""The memory planner's test models and measurements, and one measured training step:
``python tests/scripts/planner_peak.py TECHNIQUE [--checkpointing]`` prints, as JSON, the peak resident memory
a steady-state step of the embedded model adds (course_lib.memory.measure_peak_memory) next to the planner's
prediction (``MemoryPlan.step_peak``).

Run it in a fresh process (tests/test_planner.py does) with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then
serves every allocation above 64 KiB with its own mmap and returns it to the system when freed, so the
resident set follows the live tensors instead of what the allocator cached (by default glibc raises that
threshold after the first large free, and later tensors reuse heap pages already resident).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

TECHNIQUES = ("full", "lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")
LORA_R, VIRTUAL_TOKENS = 8, 20
BATCH, SEQ_LEN = 8, 224  # + 20 virtual tokens stays within the embedded model's 256 positions
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # course_lib.bench's


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


def nf4_buffer_bytes(model) -> int:
    from course_lib.nf4 import NF4Linear

    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
               for b in m.buffers())


def stored_weight_bytes(model) -> int:
    """Every parameter, plus the 4-bit codes and scales QLoRA keeps as buffers (not parameters)."""
    from course_lib.memory import parameter_bytes

    return parameter_bytes(model) + nf4_buffer_bytes(model)


def measured_step(technique: str, checkpointing: bool = False) -> dict:
    """This script in a fresh process (see the module docstring for the malloc setting)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), technique] + (["--checkpointing"] if checkpointing else [])
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def results_md_lora_peaks() -> dict[str, tuple[float, float]]:
    """{run time: (course_lib MB, peft MB)} from the GPU LoRA table of benchmarks/RESULTS.md."""
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    section = text.split("### LoRA — `course-bench lora` (TinyLlama-1.1B shape")[1].split("###")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 5 and re.fullmatch(r"\d\d:\d\d", cells[0]):
            ours, theirs = re.fullmatch(r"([\d ]+) / ([\d ]+) MB", cells[4]).groups()
            rows[cells[0]] = (float(ours.replace(" ", "")), float(theirs.replace(" ", "")))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(sys.argv[1], "--checkpointing" in sys.argv[2:])))
