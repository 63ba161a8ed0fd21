import math

import pytest
import torch

from course_lib.training import TrainConfig, cosine_with_warmup, train

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


@pytest.mark.slow
def test_two_process_data_parallel_training_on_cpu(tmp_path):
    """The loop switches to accelerate (DDP, gloo on CPU) when launched with several processes;
    with the same batch on both ranks the averaged gradient equals the single-process one."""
    import json
    import shutil
    import subprocess
    import sys

    from .conftest import ROOT

    script = ROOT / "tests" / "scripts" / "ddp_train.py"
    torchrun = [shutil.which("torchrun") or sys.executable, *([] if shutil.which("torchrun") else ["-m", "torch.distributed.run"])]
    out = subprocess.run([*torchrun, "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*_world2.json"))]
    assert sorted(r["rank"] for r in runs) == [0, 1] and all(r["world"] == 2 for r in runs)
    single = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = json.loads((tmp_path / "rank0_world1.json").read_text())["loss"]
    for run in runs:
        assert run["loss"] == pytest.approx(expected, rel=1e-5)
