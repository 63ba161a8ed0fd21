"""The training step, written out, is course_lib.training.train: a hand loop (forward, shifted token-sum
loss, backward per micro-batch, division by the window's token count, clipping, AdamW, cosine schedule)
gives train()'s losses and parameters; and the grader of exercise 00.5 is calibrated against train()."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from course_lib.grading import lesson_00
from course_lib.training import TrainConfig, train

from .conftest import tiny_llama


def _micro_batches(n: int, seed: int = 0) -> list[dict]:
    """Micro-batches with different rows, lengths and numbers of trained tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows, length = 2 + i % 3, 6 + (i * 5) % 7
        ids = torch.randint(0, 64, (rows, length), generator=gen)
        labels = ids.clone()
        labels[:, : 1 + i % 4] = -100  # a prompt of varying length
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _hand_loop(model, batches, steps, grad_accum, lr, warmup, max_norm):
    """Written from the definitions, not from train()'s code."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def multiplier(s):
        if s < warmup:
            return s / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    losses, lrs = [], []
    for step in range(steps):
        window = batches[step * grad_accum:(step + 1) * grad_accum]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        total = 0.0
        for b in window:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            s = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100,
                                reduction="sum")
            (s / n).backward()
            total += s.item()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / n)
    return losses, lrs


@pytest.mark.parametrize("grad_accum, max_norm", [(1, 1.0), (3, 1.0), (3, 0.01)])
def test_hand_written_loop_equals_train(grad_accum, max_norm):
    steps = 4
    batches = _micro_batches(steps * grad_accum)
    hand_model, lib_model = tiny_llama(seed=5), tiny_llama(seed=5)
    hand_losses, hand_lrs = _hand_loop(hand_model, batches, steps, grad_accum, 3e-3, 1, max_norm)
    history = train(lib_model, batches, TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, grad_accum=grad_accum,
                                                    max_grad_norm=max_norm, progress=False))
    torch.testing.assert_close(torch.tensor(hand_losses), torch.tensor(history.loss), rtol=1e-6, atol=1e-7)
    assert hand_lrs == pytest.approx(history.lr)
    for a, b in zip(hand_model.parameters(), lib_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulated_window_equals_one_batch_of_the_same_rows():
    """Token-weighted accumulation over micro-batches of different sizes = one step on their union."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (6, 9), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, :7] = -100  # rows with different numbers of trained tokens
    whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    parts = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]
    one, split = tiny_llama(seed=1), tiny_llama(seed=1)
    config = dict(steps=1, lr=1e-2, optimizer="sgd", max_grad_norm=None, progress=False)
    h1 = train(one, [whole], TrainConfig(grad_accum=1, **config))
    h2 = train(split, parts, TrainConfig(grad_accum=2, **config))
    assert h1.loss == pytest.approx(h2.loss, rel=1e-6)
    for a, b in zip(one.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_exercise_00_5_grader_baseline_is_train_and_each_mistake_differs_from_it():
    """The grader names mistakes by simulating them; its mistake-free simulation must pass as a right answer,
    and each simulated mistake must change the outcome in at least one of the two regimes."""
    lesson_00.check_training_step(lesson_00._mistaken_step(None))
    seed, batches = 3, lesson_00._window_batches(3)
    for mistake in lesson_00._STEP_MISTAKES:
        differs = False
        for max_norm in (1e3, 0.05):
            expected, _ = lesson_00._reference_trace(seed, batches, max_norm)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrong, _ = lesson_00._run_learner(lesson_00._mistaken_step(mistake), seed, batches, max_norm)
            differs |= not torch.allclose(torch.cat(wrong), torch.cat(expected), rtol=1e-4, atol=1e-6)
        assert differs, mistake


def test_exercise_00_6_reference_is_the_exact_count_of_a_real_model():
    """meta_llama builds the model the grader counts; on a real (CPU) model of the same config the same
    trainable set gives the same bytes, and a real AdamW step creates exactly the predicted state."""
    from course_lib.memory import optimizer_state_bytes, training_state_bytes

    real = tiny_llama(tied=True)
    trainable = ("lm_head", "q_proj", "norm")
    meta = lesson_00.meta_llama(real.config, trainable)
    real.requires_grad_(False)
    for name, p in real.named_parameters(remove_duplicate=False):
        if name.split(".")[-2] in trainable:
            p.requires_grad_(True)
    assert real.model.embed_tokens.weight.requires_grad  # tied: training the head trains the embedding
    assert training_state_bytes(meta) == training_state_bytes(real)
    optimizer = torch.optim.AdamW([p for p in real.parameters() if p.requires_grad])
    ids = torch.randint(0, 64, (2, 5))
    real(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == training_state_bytes(meta).optimizer
    with pytest.raises(ValueError, match="not Llama parameter names"):
        lesson_00.meta_llama(real.config, ("attention",))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_optimizer_updates_all_tensors_at_once_with_the_per_tensor_numbers(optimizer):
    """make_optimizer's for-each update (one kernel per operation across the parameters) gives the
    per-tensor loop's parameters bit for bit, over steps with weight decay and many small tensors."""
    from course_lib.training import make_optimizer

    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (24, 8), (5,), (8, 16), (3, 7, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    loop = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    config = TrainConfig(steps=5, lr=3e-2, weight_decay=0.1, optimizer=optimizer, progress=False)
    fast = make_optimizer(ours, config)
    assert fast.defaults["foreach"] is True
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    extra = {"betas": config.betas} if optimizer == "adamw" else {"momentum": 0.9}
    slow = cls(loop, lr=config.lr, weight_decay=config.weight_decay, foreach=False, **extra)
    for _ in range(6):
        for a, b in zip(ours, loop):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fast.step()
        slow.step()
    for a, b in zip(ours, loop):
        assert torch.equal(a, b)
