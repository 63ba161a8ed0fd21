"""The models a benchmark runs on: the embedded model, or a seeded random-init model of a named shape."""

from __future__ import annotations

import torch


def base_model(shape: str, device: torch.device, dtype: torch.dtype):
    """The embedded model, or a seeded random-init model of a named shape (``SHAPES``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..models import load_model

    if shape == "embedded":
        return load_model(None, device=device, dtype=dtype)[0]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1.1 B model is slow to build on a CPU
        return LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(dtype)


def lora_models(shape: str, device: torch.device, dtype: torch.dtype, r: int, targets):
    """The same base model twice: one with course_lib LoRA, one with peft LoRA (same adapters)."""
    from peft import LoraConfig, get_peft_model

    from ..lora import add_lora

    ours = base_model(shape, device, dtype)
    add_lora(ours, targets, r=r, alpha=2 * r)
    theirs = get_peft_model(base_model(shape, device, dtype),
                            LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    return ours, theirs


SHAPES = {  # random-init shapes for GPU benchmarks (TinyLlama-1.1B's architecture)
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
