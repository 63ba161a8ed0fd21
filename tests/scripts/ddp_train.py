"""Run by tests/test_training.py under torchrun: two ranks train the same tiny model on the same batch."""
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from course_lib.training import TrainConfig, train
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
gen = torch.Generator().manual_seed(1)
fixed = torch.randint(0, 64, (4, 12), generator=gen)
history = train(model, lambda step: {"input_ids": fixed, "labels": fixed}, TrainConfig(steps=5, lr=1e-2, progress=False))

# One file per rank: two ranks printing to one shared pipe can interleave their lines.
rank = int(os.environ.get("RANK", 0))
with open(f"rank{rank}_world{os.environ.get('WORLD_SIZE', 1)}.json", "w") as f:
    json.dump({"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "loss": history.loss}, f)
