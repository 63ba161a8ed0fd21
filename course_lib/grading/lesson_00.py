"""Hidden checks for lesson 00 (foundations). References are course_lib's and transformers' own code."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import CheckFailed, Exercise, _close, expect


# ---------------------------------------------------------------------------------------------
# 00.1 count_parameters(model) -> (trainable, total)
# ---------------------------------------------------------------------------------------------
def _tied_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def check_count_parameters(count_parameters) -> str:
    from ..models import count_parameters as reference

    model = _tied_llama(0)
    for name, p in model.named_parameters():  # freeze the embedding (tied to the head) and layer 0
        if "embed_tokens" in name or ".layers.0." in name:
            p.requires_grad_(False)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # untied, all trainable
    for model_ in (model, mlp):
        got = count_parameters(model_)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(f"return a tuple (trainable, total), got {type(got).__name__} {got!r}")
        trainable, total = reference(model_)
        tied = model_.lm_head.weight.numel() if model_ is model else 0
        twice = ("the tied embedding / output-head weight was counted twice: model.parameters() yields a "
                 "shared tensor once, state_dict() and named_parameters(remove_duplicate=False) list it twice")
        expect(got, (trainable, total), what="(trainable, total)", atol=0, rtol=0, mistakes={
            "the order is (trainable, total), you returned (total, trainable)": (total, trainable),
            "frozen parameters were counted as trainable: count only tensors with p.requires_grad": (total, total),
            twice: (trainable, total + tied),
            twice + " (and the frozen copy as trainable)": (trainable + tied, total + tied),
            twice + ", and frozen parameters were counted as trainable": (total + tied, total + tied),
        })
    return "tied weights counted once, frozen ones left out"


# ---------------------------------------------------------------------------------------------
# 00.2 estimate_memory_gb(n_params, bits) — the serving rule of thumb (Stoelinga, Substratus blog)
# ---------------------------------------------------------------------------------------------
def check_estimate_memory_gb(estimate_memory_gb) -> str:
    for n, bits in [(7e9, 32), (7e9, 16), (7e9, 4), (1.1e9, 8), (123_456, 16)]:
        expected = n * 4 / (32 / bits) * 1.2 / 1e9
        expect(estimate_memory_gb(n, bits), expected, what=f"estimate_memory_gb({n:g}, {bits})", rtol=1e-9, atol=0,
               mistakes={
                   "the 1.2 (20 % overhead) factor is missing": expected / 1.2,
                   "divide by (32 / bits), not by bits / 32": n * 4 / (bits / 32) * 1.2 / 1e9,
                   "GB here means 1e9 bytes (7B × 16-bit = 16.8 GB, quoted as ≈ 17 GB), not GiB (2**30)": expected * 1e9 / 2**30,
                   "the result must be in GB, not bytes": expected * 1e9,
                   "4 bytes is the size of a 32-bit parameter; at `bits` bits a parameter takes 4 / (32 / bits) "
                   "bytes — you used bits bytes": n * bits * 1.2 / 1e9,
               })
    return "7B at 16-bit = 16.8 GB, as the rule of thumb gives"


# ---------------------------------------------------------------------------------------------
# 00.3 causal_lm_loss(logits, labels)
# ---------------------------------------------------------------------------------------------
def _loss_variants(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = nn.functional.cross_entropy
    V = logits.shape[-1]
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    mask = shifted_labels != -100
    per_token = ce(shifted_logits.reshape(-1, V), shifted_labels.reshape(-1), reduction="none",
                   ignore_index=-100).view_as(shifted_labels)
    per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return {
        "logits at position t predict the token at t+1: shift (logits[:, :-1] against labels[:, 1:])":
            ce(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100),
        "the mean must be over real tokens only; positions labelled -100 count in your denominator":
            per_token.sum() / per_token.numel(),
        "return the mean over tokens, not the sum": per_token.sum(),
        "average over all tokens of the batch, not per sequence then over sequences (sequences have "
        "different numbers of real tokens)": per_sequence.mean(),
    }


def check_causal_lm_loss(causal_lm_loss) -> str:
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[1, 6:] = -100  # right padding
    labels[2, :1] = -100
    got = causal_lm_loss(logits.clone(), labels.clone())
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise CheckFailed(f"return a scalar tensor, got {got!r}"[:200])
    expected = ForCausalLMLoss(logits, labels, vocab_size=V)
    expect(got, expected, what="loss", mistakes=_loss_variants(logits, labels), rtol=1e-5, atol=1e-6)
    logits.requires_grad_(True)
    loss = causal_lm_loss(logits, labels)
    if not loss.requires_grad:
        raise CheckFailed("the loss carries no gradient: compute it with torch operations on the logits "
                          "(no .item(), .detach() or numpy)")
    return "equals transformers' ForCausalLMLoss"


# ---------------------------------------------------------------------------------------------
# 00.4 lr_at_step(step, peak_lr, warmup_steps, total_steps)
# ---------------------------------------------------------------------------------------------
def _transformers_lrs(peak: float, warmup: int, total: int) -> list[float]:
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def check_lr_at_step(lr_at_step) -> str:
    for peak, warmup, total in [(1e-3, 10, 50), (3e-4, 0, 20), (2e-3, 5, 6)]:
        expected = _transformers_lrs(peak, warmup, total)
        got = [float(lr_at_step(s, peak, warmup, total)) for s in range(total)]

        def cosine(progress: float) -> float:
            return peak * 0.5 * (1 + math.cos(math.pi * progress))

        expect(got, expected, what=f"learning rates for peak={peak}, warmup={warmup}, total={total}", rtol=1e-6,
               atol=1e-12, mistakes={
                   "there is no warm-up: the rate must rise linearly from 0 over the first warmup_steps steps":
                       [cosine(s / total) for s in range(total)],
                   "warm-up is off by one: at step 0 the rate is 0, at step s it is peak · s / warmup_steps":
                       [peak * min(1, (s + 1) / warmup) if s < warmup else e for s, e in
                        zip(range(total), expected)] if warmup else expected,
                   "the cosine must run over the steps after warm-up: progress = (step − warmup) / (total − warmup)":
                       [peak * s / warmup if s < warmup else cosine(s / total) for s in range(total)],
                   "the decay is a half cosine, not a straight line":
                       [peak * s / warmup if s < warmup else peak * (1 - (s - warmup) / (total - warmup))
                        for s in range(total)],
               })
    return "matches transformers.get_cosine_schedule_with_warmup"


# ---------------------------------------------------------------------------------------------
# 00.5 training_step(model, micro_batches, optimizer, scheduler, max_grad_norm) -> loss
#      one optimizer step over k micro-batches, graded against course_lib.training.train
# ---------------------------------------------------------------------------------------------
_STEP_LR, _STEP_SCHEDULE_STEPS, _CALLS = 0.5, 4, 2  # SGD(momentum 0.9): a step's size follows the gradient's scale


def _window_batches(seed: int, k: int = 3, calls: int = _CALLS) -> list[dict]:
    """calls × k micro-batches (B=2, T=8) holding different numbers of trained tokens (a masked prompt of
    random length, one right-padded row), so a mean of micro-batch means differs from the token mean."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(calls * k):
        ids = torch.randint(3, 97, (2, 8), generator=gen)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for row in range(2):
            labels[row, :int(torch.randint(1, 7, (), generator=gen))] = -100  # the prompt
        if m % k == 1:  # right padding: not attended, not trained on
            mask[1, 6:], labels[1, 6:], ids[1, 6:] = 0, -100, 2
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _cosine_multiplier(step: int) -> float:
    """train()'s schedule without warm-up (written here: the learner's scheduler.step() calls it, and
    course-grade notes every course_lib function the learner's code reaches)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step / _STEP_SCHEDULE_STEPS, 1.0)))


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_multiplier)


def _reference_trace(seed: int, batches: list[dict], max_grad_norm: float) -> tuple[list, list]:
    """What course_lib.training.train does over two optimizer steps: (lr after each step + parameters
    after each step), (the loss it reports for each step)."""
    from ..training import TrainConfig, cosine_with_warmup, train

    k = len(batches) // _CALLS
    model = _tied_llama(seed)
    params_after = []
    config = TrainConfig(steps=_STEP_SCHEDULE_STEPS, lr=_STEP_LR, optimizer="sgd", grad_accum=k,
                         max_grad_norm=max_grad_norm, progress=False)

    def stop_after_two(step, model_, history):
        params_after.append(_flat(model_))
        if step + 1 == _CALLS:
            raise StopIteration

    history = train(model, lambda i: batches[i], config, callback=stop_after_two)
    lrs = [_STEP_LR * cosine_with_warmup(c + 1, 0, _STEP_SCHEDULE_STEPS) for c in range(_CALLS)]
    return [torch.tensor(lrs), *params_after], history.loss


def _run_learner(step_fn, seed: int, batches: list[dict], max_grad_norm: float) -> tuple[list, list]:
    from ..training import TrainConfig, make_optimizer

    k = len(batches) // _CALLS
    model = _tied_llama(seed)
    optimizer = make_optimizer(model.parameters(), TrainConfig(steps=_STEP_SCHEDULE_STEPS, lr=_STEP_LR, optimizer="sgd"))
    scheduler = _schedule(optimizer)
    model.train()
    lrs, params_after, losses = [], [], []
    for call in range(_CALLS):
        window = [{key: v.clone() for key, v in b.items()} for b in batches[call * k:(call + 1) * k]]
        loss = step_fn(model, window, optimizer, scheduler, max_grad_norm)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise CheckFailed(f"return the step's loss as one number, got a tensor of shape {tuple(loss.shape)}")
            loss = loss.item()
        if not isinstance(loss, (float, int)):
            raise CheckFailed(f"return the step's loss as a float, got {type(loss).__name__}")
        losses.append(float(loss))
        lrs.append(optimizer.param_groups[0]["lr"])
        params_after.append(_flat(model))
    return [torch.tensor(lrs), *params_after], losses


def _mistaken_step(mistake: str | None):
    """A training step with one known mistake (None: the right one), written the plain way: each
    micro-batch's summed loss over the window's token count, backward, then clip, step, schedule."""
    from ..training import causal_lm_loss_sum

    def step(model, micro_batches, optimizer, scheduler, max_grad_norm):
        params = [p for p in model.parameters() if p.requires_grad]
        k = len(micro_batches)
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        window_loss = 0.0
        for b in micro_batches:
            if mistake == "zero inside":
                optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
            summed = causal_lm_loss_sum(logits, b["labels"])
            loss = {"no division": summed.total, "mean over k": summed.mean() / k,
                    "means summed": summed.mean()}.get(mistake, summed.total / n_tokens)
            loss.backward()
            window_loss += float(summed.total.detach())
            if mistake == "clip each":
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            if mistake == "schedule each":
                scheduler.step()
        if mistake not in ("no clip", "clip each"):
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        if mistake != "no optimizer step":
            optimizer.step()
        if mistake not in ("schedule each", "no schedule"):
            scheduler.step()
        if mistake != "no zero after":
            optimizer.zero_grad(set_to_none=True)
        return window_loss / n_tokens

    return step


_STEP_MISTAKES = {
    "no division": "the gradient is of the window's summed loss: divide by the number of trained tokens "
                   "in the whole window (train() follows the token mean over all k micro-batches)",
    "mean over k": "you averaged each micro-batch's mean loss over the k micro-batches; train() weighs every "
                   "token equally — divide the window's summed loss by its total number of trained tokens "
                   "(micro-batches hold different numbers of tokens)",
    "means summed": "each micro-batch's mean loss was added up without any division: the step follows k times "
                    "the loss, and micro-batches are weighed equally instead of tokens",
    "zero inside": "only the last micro-batch's gradient was left: gradients were zeroed inside the "
                   "micro-batch loop (zero them once per optimizer step, after optimizer.step())",
    "clip each": "the gradient was clipped before accumulation finished: clip once, after the last "
                 "micro-batch's backward, the whole window's gradient",
    "no clip": "the gradient was not clipped to max_grad_norm (clip after the last backward, before "
               "optimizer.step())",
    "schedule each": "the learning-rate schedule was stepped once per micro-batch: it counts optimizer "
                     "steps, so step it once per call, after optimizer.step()",
    "no schedule": "the learning-rate schedule was never stepped: call scheduler.step() after optimizer.step()",
    "no zero after": "the gradients were not cleared after the step, so the next step added onto them: "
                     "call optimizer.zero_grad() after optimizer.step()",
    "no optimizer step": "the parameters did not move: call optimizer.step()",
}


def _loss_mistakes(batches: list[dict], seed: int, max_grad_norm: float) -> dict[str, list[float]]:
    """The losses a learner reports by known mistakes, given the right parameters' trajectory."""
    from ..training import TrainConfig, causal_lm_loss_sum, make_optimizer

    k = len(batches) // _CALLS
    model = _tied_llama(seed)
    means, sums, lasts, last_shares = [], [], [], []
    right = _mistaken_step(None)
    optimizer = make_optimizer(model.parameters(), TrainConfig(steps=_STEP_SCHEDULE_STEPS, lr=_STEP_LR, optimizer="sgd"))
    scheduler = _schedule(optimizer)
    for call in range(_CALLS):
        window = batches[call * k:(call + 1) * k]
        with torch.no_grad():
            parts = [causal_lm_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                        b["labels"]) for b in window]
        totals = [float(p.total) for p in parts]
        counts = [int(p.count) for p in parts]
        means.append(sum(t / c for t, c in zip(totals, counts)) / k)
        sums.append(sum(totals))
        lasts.append(totals[-1] / counts[-1])
        last_shares.append(totals[-1] / sum(counts))
        right(model, window, optimizer, scheduler, max_grad_norm)
    return {"the reported loss is the mean of the micro-batch means; report the window's loss: every trained "
            "token's loss summed over all k micro-batches, over their number": means,
            "the reported loss is the window's summed loss, not divided by its number of trained tokens": sums,
            "the reported loss is the last micro-batch's alone: report the whole window's": lasts,
            "the reported loss is the last micro-batch's share only: add up every micro-batch's part": last_shares}


def check_training_step(training_step) -> str:
    seed = 3
    batches = _window_batches(seed)
    for max_grad_norm, regime in ((1e3, "clipping inactive"), (0.05, "clipping active")):
        expected, expected_losses = _reference_trace(seed, batches, max_grad_norm)
        got, got_losses = _run_learner(training_step, seed, batches, max_grad_norm)
        got, expected = torch.cat(got), torch.cat(expected)
        if not _close(got, expected, 1e-4, 1e-6):  # wrong: find which known mistake it is (costs a run each)
            mistakes = {}
            for mistake, explanation in _STEP_MISTAKES.items():
                with warnings.catch_warnings():  # torch warns of a schedule stepped without an optimizer step
                    warnings.simplefilter("ignore")
                    wrong, _ = _run_learner(_mistaken_step(mistake), seed, batches, max_grad_norm)
                mistakes.setdefault(explanation, torch.cat(wrong))
            expect(got, expected, mistakes=mistakes, rtol=1e-4, atol=1e-6,
                   what=f"learning rate and parameters after two steps ({regime}, max_grad_norm={max_grad_norm:g})")
        if not _close(got_losses, expected_losses, 1e-5, 1e-6):
            expect(got_losses, expected_losses, mistakes=_loss_mistakes(batches, seed, max_grad_norm), rtol=1e-5,
                   atol=1e-6, what="the loss each step returns")
    return "same parameters, learning rate and loss as course_lib.training.train with grad_accum"


# ---------------------------------------------------------------------------------------------
# 00.6 training_memory(config, trainable, dtype) -> (weights, gradients, optimizer state) in bytes
# ---------------------------------------------------------------------------------------------
LLAMA_PARAMETER_NAMES = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj", "input_layernorm", "post_attention_layernorm", "norm")


def meta_llama(config, trainable, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The real model of ``config`` on the meta device (no memory), trainable where the parameter's module
    is named in ``trainable`` ("norm" is the final norm) — a tied matrix is trainable if either name is."""
    from transformers import LlamaForCausalLM

    unknown = set(trainable) - set(LLAMA_PARAMETER_NAMES)
    if unknown:
        raise ValueError(f"trainable names {sorted(unknown)} are not Llama parameter names {LLAMA_PARAMETER_NAMES}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.split(".")[-2] in trainable:
            p.requires_grad_(True)
    return model


def _memory_cases():
    from transformers import LlamaConfig

    embedded = LlamaConfig(vocab_size=906, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tinyllama = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    return [(embedded, LLAMA_PARAMETER_NAMES, torch.float32),
            (embedded, ("q_proj", "v_proj"), torch.float32),
            (embedded, ("embed_tokens", "norm"), torch.float32),
            (embedded, ("lm_head",), torch.float32),
            (tinyllama, LLAMA_PARAMETER_NAMES, torch.bfloat16),
            (tinyllama, ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"), torch.float32)]


def _state(model: nn.Module) -> tuple[int, int, int]:
    from ..memory import training_state_bytes

    s = training_state_bytes(model, "adamw")
    return s.weights, s.gradients, s.optimizer


def check_training_memory(training_memory) -> str:
    import copy

    for config, trainable, dtype in _memory_cases():
        model = meta_llama(config, trainable, dtype)
        expected = _state(model)
        got = training_memory(copy.deepcopy(config), tuple(trainable), dtype)
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            raise CheckFailed(f"return a tuple (weights, gradients, optimizer_state) in bytes, got {got!r}"[:200])
        weights, grads, state = expected
        size = torch.empty((), dtype=dtype).element_size()
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        n_all = sum(1 for _ in model.parameters())
        head = config.vocab_size * config.hidden_size * size
        head_trainable = any(t in trainable for t in ("embed_tokens", "lm_head"))
        mistakes = {
            "AdamW keeps two moments per trainable parameter (m and v), you counted one":
                (weights, grads, grads + 4 * n_trainable),
            "AdamW keeps two moments per trainable parameter (m and v), you counted one (and no step counters)":
                (weights, grads, grads),
            "torch's AdamW also keeps a step counter per trainable tensor (a float32 scalar tensor, 4 bytes)":
                (weights, grads, 2 * grads),
            "frozen parameters have no gradient (p.grad stays None): count gradients of trainable ones only":
                (weights, weights, state),
            "frozen parameters have no gradient and no optimizer state: count both for trainable ones only":
                (weights, weights, 2 * weights + 4 * n_all),
        }
        for bytes_used in (2, 4):
            if bytes_used != size:
                r = bytes_used / size
                mistakes[f"each value takes dtype's size ({size} bytes for {dtype}), not {bytes_used}"] = (
                    int(weights * r), int(grads * r), int(2 * grads * r) + 4 * n_trainable)
        if config.tie_word_embeddings:
            twice = "the embedding and the output head are tied (one matrix): count it once"
            mistakes[twice] = (weights + head, grads, state)
            if head_trainable:
                mistakes[twice + ", with its gradient and optimizer state"] = (
                    weights + head, grads + head, state + 2 * head + 4)
                if "embed_tokens" not in trainable:
                    mistakes["tied: training lm_head trains the embedding matrix, which is the same tensor"] = (
                        weights, grads - head, state - 2 * head - 4)
        if config.num_key_value_heads != config.num_attention_heads:
            mha = copy.deepcopy(config)
            mha.num_key_value_heads = config.num_attention_heads
            mistakes["grouped-query attention: k_proj and v_proj have num_key_value_heads × head_dim outputs, "
                     "not num_attention_heads × head_dim"] = _state(meta_llama(mha, trainable, dtype))
        norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
        norm_bytes = sum(p.numel() for p in norms) * size
        trainable_norms = [p for p in norms if p.requires_grad]
        t_norm_bytes = sum(p.numel() for p in trainable_norms) * size
        mistakes["the RMSNorm weights are parameters too (two per layer and a final one, hidden_size each)"] = (
            weights - norm_bytes, grads - t_norm_bytes, state - 2 * t_norm_bytes - 4 * len(trainable_norms))
        expect(tuple(int(x) for x in got), expected, rtol=0, atol=0, mistakes=mistakes,
               what=f"(weights, gradients, optimizer state) bytes for {config.num_hidden_layers} layers, "
                    f"hidden {config.hidden_size}, tied={config.tie_word_embeddings}, {dtype}, trainable {trainable}")
    return "exact bytes of weights, gradients and AdamW state, tied embeddings and frozen parameters included"


EXERCISES = [
    Exercise("00.1", "count trainable and total parameters", ("count_parameters",), check_count_parameters),
    Exercise("00.2", "a serving-memory rule of thumb", ("estimate_memory_gb",), check_estimate_memory_gb),
    Exercise("00.3", "causal language-model loss", ("causal_lm_loss",), check_causal_lm_loss),
    Exercise("00.4", "cosine schedule with warm-up", ("lr_at_step",), check_lr_at_step),
    Exercise("00.5", "a training step with gradient accumulation", ("training_step",), check_training_step),
    Exercise("00.6", "predict training memory from a config", ("training_memory",), check_training_memory),
]
