"""Run by tests/test_training.py, under torchrun with 2 processes and alone with 1.

Both train the same tiny model on the same micro-batches of 4 rows whose supervised-token counts differ
(1 to 11 per row). Under DDP `train` gives each process half of every batch's rows, so the processes
see different data, with unequal token counts; their update must still equal the single process's on
the whole batch — which needs the gradients all-reduced and the token count summed across processes.
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.training import TrainConfig, default_loss, train

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
gen = torch.Generator().manual_seed(1)
SUPERVISED = [[1, 2, 11, 9], [3, 10, 4, 6]]  # per micro-batch, per row: tokens trained on


def micro_batch(step: int) -> dict:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(100 + step))  # (4, 12)
    labels = ids.clone()
    for row, n in enumerate(SUPERVISED[step % 2]):
        labels[row, :12 - n] = -100  # the last n tokens are the targets after the shift
    return {"input_ids": ids, "labels": labels}


seen = []  # what this process trained on: (rows, supervised tokens, first token) per micro-batch


def recording_loss(model, batch):
    seen.append([batch["input_ids"].shape[0], int((batch["labels"][:, 1:] != -100).sum()),
                 batch["input_ids"][:, 0].tolist()])
    return default_loss(model, batch)


initial = {k: v.clone() for k, v in model.state_dict().items()}
history = train(model, micro_batch, TrainConfig(steps=3, lr=0.05, optimizer="sgd", grad_accum=2, max_grad_norm=None,
                                                progress=False), loss_fn=recording_loss)

# One file per rank: two ranks printing to one shared pipe can interleave their lines.
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
with open(f"rank{rank}_world{world}.json", "w") as f:
    moved = max(float((v - initial[k]).abs().max()) for k, v in model.state_dict().items())
    json.dump({"rank": rank, "world": world, "loss": history.loss, "seen": seen, "moved": moved}, f)
save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if "rotary" not in k},
          f"rank{rank}_world{world}.safetensors")
