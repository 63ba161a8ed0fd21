"""Run by tests/test_training.py, under torchrun with 2 processes (FSDP2, gloo on CPU) and alone with 1.

Under torchrun every decoder layer and the whole model are sharded with ``torch.distributed.fsdp.fully_shard``
(FSDP2, Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
arXiv:2304.11277): each process keeps half of every parameter, its gradient and its optimizer state; the
forward and backward all-gather a layer's weights just before using it, and the backward reduce-scatters
(averages) the gradients so each process receives its half. Process r trains on rows 2r, 2r+1 of each
4-row micro-batch, the single process on all 4 rows, with the same `train` loop.

accelerate's own FSDP path does not run on CPU (it falls back to DDP there), so the loop is given the
sharded model directly (``use_accelerate=False``): `train` then sees one process, divides by its own token
count, and FSDP averages the two processes' gradients. That equals the whole-batch token mean only when
both processes hold the same number of supervised tokens per accumulation window, which the data below
ensures (rows within a process still differ: 3 and 9 tokens, 5 and 7, ...).

Three runs: SGD without clipping (the update must come from averaged gradients); SGD with clipping active
on every step (the norm must be that of the whole gradient, not of one process's half: clipping each half
by its own norm scales the halves differently, and SGD's update is linear in the clipped gradient; AdamW
would hide that, being nearly invariant to a per-parameter scale); AdamW with weight decay, whose moment
estimates each process keeps for its half of every parameter only.
"""
import json
import os

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.training import TrainConfig, train

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
# Supervised tokens per row, per micro-batch: equal sums for rows (0, 1) and (2, 3), unequal rows.
SUPERVISED = [[3, 9, 5, 7], [2, 10, 8, 4]]
RUNS = {
    "sgd": TrainConfig(steps=3, lr=0.05, optimizer="sgd", grad_accum=2, max_grad_norm=None, progress=False,
                       use_accelerate=False),
    "sgd_clipped": TrainConfig(steps=3, lr=0.05, optimizer="sgd", grad_accum=2, max_grad_norm=0.5, progress=False,
                               use_accelerate=False),
    "adamw": TrainConfig(steps=3, lr=0.01, warmup_steps=1, weight_decay=0.1, grad_accum=2, max_grad_norm=None,
                         progress=False, use_accelerate=False),
}


def micro_batch(step: int) -> dict:
    """This process's rows of micro-batch ``step``: all 4 alone, rows 2r and 2r+1 on process r of 2."""
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(100 + step))  # (4, 12)
    labels = ids.clone()
    for row, n in enumerate(SUPERVISED[step % 2]):
        labels[row, :12 - n] = -100  # the last n tokens are the targets after the shift
    rows = slice(2 * RANK, 2 * RANK + 2) if WORLD == 2 else slice(None)
    return {"input_ids": ids[rows], "labels": labels[rows]}  # (2 or 4, 12)


if WORLD == 2:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
result = {"rank": RANK, "world": WORLD}
for name, config in RUNS.items():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if WORLD == 2:
        for layer in model.model.layers:  # one FSDP unit per decoder layer, as configs/fsdp.yaml asks accelerate
            fully_shard(layer)
        fully_shard(model)  # the root unit: embeddings, final norm, LM head
        weight = model.model.layers[0].mlp.up_proj.weight
        result[f"{name}_shard_rows"] = [weight.to_local().shape[0], weight.shape[0]]  # (48 / 2, 48)
    history = train(model, micro_batch, config)
    result[name] = {"loss": history.loss, "grad_norm": history.grad_norm}
    # The whole model, gathered from the shards the way the README says to save it: every process takes
    # part, rank 0 receives the full tensors on the CPU (the others get an empty dict) and writes them.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result[name]["gathered_tensors"] = len(state)
    if RANK == 0:
        state = {k: v.detach().contiguous() for k, v in state.items() if "rotary" not in k}
        result[name]["moved"] = max(float((v - initial[k]).abs().max()) for k, v in state.items())
        save_file(state, f"{name}_world{WORLD}.safetensors")

with open(f"fsdp_rank{RANK}_world{WORLD}.json", "w") as f:  # one file per rank: shared pipes interleave
    json.dump(result, f)
if WORLD == 2:
    dist.destroy_process_group()
