import math

import pytest
import torch

from course_lib.training import LossSum, TrainConfig, cosine_with_warmup, default_loss, train

from .conftest import tiny_llama


def _batches(seed: int = 0, batch: int = 4, length: int = 12):
    gen = torch.Generator().manual_seed(seed)

    def get(step: int) -> dict:
        ids = torch.randint(0, 64, (batch, length), generator=gen)
        return {"input_ids": ids, "labels": ids}
    return get


def test_same_seed_gives_identical_losses():
    runs = []
    for _ in range(2):
        model = tiny_llama(seed=1)
        config = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, seed=5, progress=False)
        fixed = _batches(seed=2)(0)  # one batch, seen every step: the loss must fall
        runs.append(train(model, lambda step: fixed, config).loss)
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0] - 0.5


def test_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, 7, 40)
    for step in range(40):
        assert math.isclose(cosine_with_warmup(step, 7, 40), sched.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15)
        opt.step()
        sched.step()


def test_lr_history_follows_warmup_then_cosine():
    history = train(tiny_llama(), _batches(), TrainConfig(steps=10, lr=1e-3, warmup_steps=4, progress=False))
    assert history.lr[0] == 0.0 and math.isclose(history.lr[4], 1e-3)
    assert history.lr[4] > history.lr[7] > history.lr[9]
    constant = train(tiny_llama(), _batches(), TrainConfig(steps=6, lr=1e-3, schedule="constant", progress=False))
    assert constant.lr == [1e-3] * 6


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 (equal lengths, so mean-of-means = mean) give the update of one batch of 8."""
    big = _batches(seed=3, batch=8)(0)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    a, b = tiny_llama(seed=4), tiny_llama(seed=4)
    cfg = dict(steps=1, lr=1e-2, max_grad_norm=None, progress=False, optimizer="sgd")
    train(a, [big], TrainConfig(**cfg))
    train(b, iter(halves), TrainConfig(grad_accum=2, **cfg))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def _unequal_rows():
    """Two rows of 17 tokens whose labels keep 2 and 16 targets after the shift: a mean of the two
    micro-batch means weighs each of row 0's tokens 8× more than a token mean does."""
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(7))  # (2, 17)
    labels = ids.clone()
    labels[0, :15] = -100  # targets: tokens 15, 16
    return ids, labels


def _one_sgd_step(model, loss):
    """The parameters after one plain SGD step (lr 1e-2) on ``loss`` — what our SGD's first step does."""
    loss.backward()
    with torch.no_grad():
        return [p - 1e-2 * p.grad for p in model.parameters()]


_SGD = dict(steps=1, lr=1e-2, max_grad_norm=None, progress=False, optimizer="sgd")


def test_accumulated_update_is_token_weighted_like_one_batch_on_unequal_rows():
    """grad_accum=2 on one row each gives the update of one batch of both rows: the gradient of
    transformers' token-mean loss on the whole batch (not the mean of the two rows' means)."""
    ids, labels = _unequal_rows()
    reference = tiny_llama(seed=4)
    expected = _one_sgd_step(reference, reference(input_ids=ids, labels=labels).loss)
    whole, accumulated = tiny_llama(seed=4), tiny_llama(seed=4)
    history = train(whole, [{"input_ids": ids, "labels": labels}], TrainConfig(**_SGD))
    rows = [{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1]} for i in range(2)]
    accumulated_history = train(accumulated, iter(rows), TrainConfig(grad_accum=2, **_SGD))
    for want, a, b in zip(expected, whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert accumulated_history.loss[0] == pytest.approx(tiny_llama(seed=4)(input_ids=ids, labels=labels).loss.item(),
                                                            rel=1e-5)
    assert history.loss[0] == pytest.approx(accumulated_history.loss[0], rel=1e-6)


def test_gradient_accumulation_matches_transformers_trainer(tmp_path):
    """The same two unequal rows through transformers' Trainer (batch 1, gradient_accumulation_steps=2,
    SGD): its num_items_in_batch weighting and ours give the same weights."""
    import warnings

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids, labels = _unequal_rows()
    rows = [{"input_ids": ids[i].tolist(), "labels": labels[i].tolist()} for i in range(2)]
    theirs, ours = tiny_llama(seed=4), tiny_llama(seed=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=theirs, args=args, train_dataset=Dataset.from_list(rows)).train()
    train(ours, iter([{"input_ids": ids[i:i + 1], "labels": labels[i:i + 1]} for i in range(2)]),
          TrainConfig(grad_accum=2, **_SGD))
    for a, b in zip(theirs.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_custom_loss_says_what_it_averages_over():
    """A per-sequence loss returns (Σ over sequences, number of sequences): micro-batches of 1 and 3
    rows then give the update of the mean over all 4 sequences. A scalar loss keeps its meaning: the
    mean of the micro-batch means, here (row 0 + mean of rows 1–3) / 2."""
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))  # (4, 10)

    def per_sequence(model, batch):  # (B,) mean token loss of each sequence
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return token.mean(-1)

    reference = tiny_llama(seed=2)
    sequence_mean = _one_sgd_step(reference, per_sequence(reference, {"input_ids": ids}).mean())
    reference = tiny_llama(seed=2)
    mean_of_means = _one_sgd_step(reference, (per_sequence(reference, {"input_ids": ids[:1]}).mean()
                                              + per_sequence(reference, {"input_ids": ids[1:]}).mean()) / 2)
    micro = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    for loss_fn, want in ((lambda m, b: (per_sequence(m, b).sum(), b["input_ids"].shape[0]), sequence_mean),
                          (lambda m, b: LossSum(per_sequence(m, b).sum(), len(b["input_ids"])), sequence_mean),
                          (lambda m, b: per_sequence(m, b).mean(), mean_of_means)):
        model = tiny_llama(seed=2)
        train(model, iter(micro), TrainConfig(grad_accum=2, **_SGD), loss_fn=loss_fn)
        for a, b in zip(model.parameters(), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(sequence_mean, mean_of_means)) > 1e-4  # they do differ


def test_default_loss_is_transformers_loss_as_a_token_sum():
    ids, labels = _unequal_rows()
    model = tiny_llama(seed=1)
    with torch.no_grad():
        summed = default_loss(model, {"input_ids": ids, "labels": labels})
        assert int(summed.count) == 18
        torch.testing.assert_close(summed.mean(), model(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=0)
        assert summed.item() == pytest.approx(float(summed.total) / 18)


def test_bad_losses_are_clear_errors():
    ids, labels = _unequal_rows()
    batch = {"input_ids": ids, "labels": labels}
    with pytest.raises(KeyError, match=r"default loss needs batch\['labels'\]"):
        train(tiny_llama(), [{"input_ids": ids}], TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="counted no items.*all labels -100"):
        train(tiny_llama(), [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], TrainConfig(steps=1, progress=False))
    with pytest.raises(TypeError, match=r"loss_fn returned Tensor\(2,\)"):
        train(tiny_llama(), [batch], TrainConfig(steps=1, progress=False), loss_fn=lambda m, b: torch.ones(2))
    kinds = iter([default_loss, lambda m, b: m(**b).loss])
    with pytest.raises(TypeError, match="scalar for some micro-batches"):
        train(tiny_llama(), [batch, batch], TrainConfig(steps=1, grad_accum=2, progress=False),
              loss_fn=lambda m, b: next(kinds)(m, b))


def test_data_parallel_processes_take_their_share_of_each_batch():
    from course_lib.training import _split_rows

    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2), "note": "kept"}
    shares = [_split_rows(batch, rank, 2) for rank in (0, 1)]
    assert [s["input_ids"][:, 0].tolist() for s in shares] == [[0, 2, 4], [6, 8]] and shares[1]["note"] == "kept"
    with pytest.raises(ValueError, match="a batch of 1 rows cannot be split across 2 processes"):
        _split_rows({"input_ids": torch.zeros(1, 3)}, 0, 2)
    with pytest.raises(ValueError, match=r"not \{'rollout': 'object'\}.*split_batches=False"):
        _split_rows({"input_ids": torch.zeros(2, 3), "rollout": object()}, 0, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        _split_rows({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(3, 3)}, 0, 2)


def test_callback_can_stop_early():
    def stop(step, model, history):
        if step == 2:
            raise StopIteration
    history = train(tiny_llama(), _batches(), TrainConfig(steps=10, progress=False), callback=stop)
    assert history.step == [0, 1, 2]


def test_bad_configs_and_models_are_clear_errors():
    with pytest.raises(ValueError, match="steps must be positive"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(steps=3, warmup_steps=5)
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, _batches(), TrainConfig(steps=1, progress=False))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(tiny_llama(), _batches(), TrainConfig(steps=1, progress=False),
              loss_fn=lambda m, b: m(**b).loss * float("nan"))


def _two_processes_then_one(script, folder) -> None:
    """Run ``script`` under torchrun with 2 processes (gloo on CPU), then alone, both in ``folder``, where each
    run writes the results the test compares."""
    import shutil
    import subprocess
    import sys

    torchrun = [shutil.which("torchrun") or sys.executable, *([] if shutil.which("torchrun") else ["-m", "torch.distributed.run"])]
    for command in ([*torchrun, "--nproc_per_node", "2", str(script)], [sys.executable, str(script)]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=folder)
        assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_two_process_data_parallel_training_equals_one_process_on_the_whole_batch(tmp_path):
    """Under torchrun (accelerate's DDP, gloo on CPU) each process trains on its half of every batch,
    rows with unequal token counts: the weights and losses equal one process's on the whole batch. It
    fails if gradients are not all-reduced (the ranks drift apart) or if each process divides by its own
    token count instead of the total (a different weighting of the rows)."""
    import json

    from safetensors.torch import load_file

    from .conftest import ROOT

    _two_processes_then_one(ROOT / "tests" / "scripts" / "ddp_train.py", tmp_path)
    runs = [json.loads((tmp_path / f"rank{r}_world2.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "rank0_world1.json").read_text())
    # the processes trained on different halves of each batch; together, on what the single process saw
    for a, b, whole in zip(runs[0]["seen"], runs[1]["seen"], alone["seen"]):
        assert a[0] == b[0] == 2 and whole[0] == 4
        assert a[2] + b[2] == whole[2] and a[1] + b[1] == whole[1] and a[1] != b[1]
    weights = [load_file(tmp_path / f"rank{r}_world2.safetensors") for r in (0, 1)]
    expected = load_file(tmp_path / "rank0_world1.safetensors")
    assert alone["moved"] > 1e-3  # it trained
    for name, value in expected.items():
        for run in weights:
            torch.testing.assert_close(run[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for run in runs:
        assert run["loss"] == pytest.approx(alone["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_process_fsdp_training_equals_one_process_on_the_whole_batch(tmp_path):
    """Under torchrun with FSDP2 (``fully_shard`` per decoder layer, gloo on CPU) each process holds half of
    every parameter, gradient and optimizer state and trains on half of every batch: the gathered weights
    and the losses equal one process's on the whole batch, for SGD, SGD with clipping and AdamW.

    Tolerance: float32 sums taken in another order (two half-batch backwards, a reduce-scatter) differ by
    ~1e-7 relative; atol 1e-6 is 1e-4 of the largest weight change (~1e-2), so an update off by more than
    0.01 % fails — gradients summed instead of averaged (2×), or clipped by one half's norm (~1.4×), are
    far outside it. accelerate's FSDP needs a GPU; this exercises torch's FSDP2 under the same `train` loop
    (tests/scripts/fsdp_train.py says why and what it needs)."""
    import json

    from safetensors.torch import load_file

    from .conftest import ROOT

    _two_processes_then_one(ROOT / "tests" / "scripts" / "fsdp_train.py", tmp_path)
    ranks = [json.loads((tmp_path / f"fsdp_rank{r}_world2.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "fsdp_rank0_world1.json").read_text())
    for name in ("sgd", "sgd_clipped", "adamw"):
        assert all(rank[f"{name}_shard_rows"] == [24, 48] for rank in ranks)  # each process held half
        assert alone[name]["moved"] > 1e-3  # it trained
        if name == "sgd_clipped":  # the clipping was active on every step, so a wrong norm changes the update
            assert min(alone[name]["grad_norm"]) > 0.5
        expected = load_file(tmp_path / f"{name}_world1.safetensors")
        weights = load_file(tmp_path / f"{name}_world2.safetensors")  # gathered from both processes' shards
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        for rank in ranks:  # the norm of the whole gradient, on every process
            assert rank[name]["grad_norm"] == pytest.approx(alone[name]["grad_norm"], rel=1e-5)
        # gathering for saving: rank 0 receives every tensor, the other process none (the README says so)
        assert [rank[name]["gathered_tensors"] for rank in ranks] == [alone[name]["gathered_tensors"], 0]
        # each process's loss is its half's token mean, and both halves hold the same number of tokens
        halves = [sum(pair) / 2 for pair in zip(ranks[0][name]["loss"], ranks[1][name]["loss"])]
        assert halves == pytest.approx(alone[name]["loss"], rel=1e-5)


def test_fsdp_config_is_read_by_accelerate_into_a_decoder_layer_wrapping_plugin(monkeypatch):
    """configs/fsdp.yaml, read the way `accelerate launch --config_file` reads it (its parser, its
    environment), gives an FSDP2 plugin whose wrapping policy makes one unit of each Llama decoder layer."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from .conftest import ROOT

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs" / "fsdp.yaml"), "train.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.fsdp_version == 2
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    model = tiny_llama()
    plugin.set_auto_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [f"model.layers.{i}" for i in range(len(model.model.layers))]
    assert all(isinstance(model.get_submodule(name), LlamaDecoderLayer) for name in wrapped)


def test_split_rows_keeps_stacked_pairs_together():
    """DPO stacks B chosen rows then B rejected rows; under DDP pair i must stay on one process."""
    from course_lib.training import _split_rows

    ids = torch.arange(8).unsqueeze(1)  # rows 0-3 chosen, 4-7 rejected: pair i = rows (i, 4 + i)
    ref = torch.tensor([10.0, 11.0, 12.0, 13.0])  # one value per pair
    batch = {"input_ids": ids, "ref_chosen_logps": ref, "row_blocks": 2}
    shares = [_split_rows(batch, rank, 2) for rank in (0, 1)]
    assert shares[0]["input_ids"].flatten().tolist() == [0, 1, 4, 5]
    assert shares[1]["input_ids"].flatten().tolist() == [2, 3, 6, 7]
    assert shares[1]["ref_chosen_logps"].tolist() == [12.0, 13.0]
    plain = _split_rows({"input_ids": ids}, 0, 2)  # without the marker: plain halves
    assert plain["input_ids"].flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="row_blocks=2"):
        _split_rows({"input_ids": ids, "x": torch.zeros(3), "row_blocks": 2}, 0, 2)


def test_shuffled_epochs_cover_every_row_once_per_epoch_and_repeat_per_seed():
    from course_lib.training import ShuffledEpochs

    stream = ShuffledEpochs(5, seed=3)
    first, second = stream.take(0, 5), stream.take(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second  # reshuffled each epoch
    assert ShuffledEpochs(5, seed=3).take(3, 4) == (first + second)[3:7]  # read by position, deterministic
    with pytest.raises(ValueError, match="at least one row"):
        ShuffledEpochs(0)
