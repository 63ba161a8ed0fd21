"""Lesson 00: right answers in several styles, and plausible wrong answers with the phrase the
grader's feedback must contain (written independently of the checks' own diagnoses)."""

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- right answers (several styles)
def count_ok(model):
    trainable, total = 0, 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def memory_ok(n, bits):
    return n * (bits / 8) * 1.2 / 1e9


def loss_ok(logits, labels):
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def lr_ok(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def _token_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _n_tokens(micro_batches):
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)


def step_ok(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n = _n_tokens(micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total / n


def _llama_shapes(config):
    """(module name, numel) of every parameter tensor of a Llama, the head separately even when tied."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = [("q_proj", q * h), ("k_proj", kv * h), ("v_proj", kv * h), ("o_proj", h * q), ("gate_proj", i * h),
             ("up_proj", i * h), ("down_proj", h * i), ("input_layernorm", h), ("post_attention_layernorm", h)]
    return [("embed_tokens", v * h), *layer * config.num_hidden_layers, ("norm", h), ("lm_head", v * h)]


def training_memory_ok(config, trainable, dtype):
    size = torch.empty((), dtype=dtype).element_size()
    shapes = _llama_shapes(config)
    if config.tie_word_embeddings:  # one matrix: drop the head, and it trains if either name is trainable
        shapes = shapes[:-1]
        if "lm_head" in trainable:
            trainable = (*trainable, "embed_tokens")
    weights = sum(n for _, n in shapes) * size
    trained = [n for name, n in shapes if name in trainable]
    grads = sum(trained) * size
    return weights, grads, 2 * grads + 4 * len(trained)


RIGHT = {"00.1": count_ok, "00.2": memory_ok, "00.3": loss_ok, "00.4": lr_ok, "00.5": step_ok,
         "00.6": training_memory_ok}


# ---------------------------------------------------------------- the catalogue of mistakes
def count_state_dict(model):  # tied weights twice
    sd = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    total = sum(v.numel() for v in sd.values())
    return total - sum(sd[n].numel() for n in frozen), total


def count_ignores_requires_grad(model):
    n = sum(p.numel() for p in model.parameters())
    return n, n


def count_swapped(model):
    t, n = count_ok(model)
    return n, t


def count_named_params_no_dedup(model):
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def memory_no_overhead(n, bits):
    return n * 4 / (32 / bits) / 1e9


def memory_inverted(n, bits):
    return n * 4 / (bits / 32) * 1.2 / 1e9


def memory_gib(n, bits):
    return n * 4 / (32 / bits) * 1.2 / 2**30


def memory_bytes(n, bits):
    return n * 4 / (32 / bits) * 1.2


def loss_no_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def loss_counts_masked(logits, labels):
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none")
    return per.mean()


def loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def loss_per_sequence(logits, labels):
    return torch.stack([F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100)
                        for i in range(len(logits))]).mean()


def loss_detached(logits, labels):
    return loss_ok(logits.detach(), labels)


def lr_no_warmup(step, peak, warmup, total):
    return peak * (1 + math.cos(math.pi * step / total)) / 2


def lr_warmup_off_by_one(step, peak, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    return lr_ok(step, peak, warmup, total)


def lr_progress_over_total(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * step / total)) / 2


def lr_linear_decay(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 - (step - warmup) / (total - warmup))


def lr_full_cosine(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(2 * math.pi * (step - warmup) / (total - warmup))) / 2


def step_mean_of_means(model, micro_batches, optimizer, scheduler, max_grad_norm):
    total = 0.0
    for b in micro_batches:  # transformers' own loss: the mean over this micro-batch's tokens
        loss = model(**b).loss / len(micro_batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total


def step_sum_not_divided(model, micro_batches, optimizer, scheduler, max_grad_norm):
    total = 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total / _n_tokens(micro_batches)


def step_zero_grad_in_loop(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, total = _n_tokens(micro_batches), 0.0
    for b in micro_batches:
        optimizer.zero_grad()
        loss = _token_sum(model, b)
        (loss / n).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / n


def step_clip_in_loop(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, total = _n_tokens(micro_batches), 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        total += loss.item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total / n


def step_schedule_per_micro_batch(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, total = _n_tokens(micro_batches), 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        total += loss.item()
        scheduler.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return total / n


def step_never_zeroes(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, total = _n_tokens(micro_batches), 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / n


def step_clips_after_the_step(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, total = _n_tokens(micro_batches), 0.0
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        total += loss.item()
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scheduler.step()
    optimizer.zero_grad()
    return total / n


def step_reports_mean_of_means(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n, means = _n_tokens(micro_batches), []
    for b in micro_batches:
        loss = _token_sum(model, b)
        (loss / n).backward()
        means.append(loss.item() / int((b["labels"][:, 1:] != -100).sum()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return sum(means) / len(means)


def step_reports_last_loss(model, micro_batches, optimizer, scheduler, max_grad_norm):
    n = _n_tokens(micro_batches)
    for b in micro_batches:
        loss = _token_sum(model, b) / n
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def memory_untied_head(config, trainable, dtype):
    size = torch.empty((), dtype=dtype).element_size()
    shapes = _llama_shapes(config)  # the head counted as its own matrix even when tied
    trained = [n for name, n in shapes if name in trainable]
    grads = sum(trained) * size
    return sum(n for _, n in shapes) * size, grads, 2 * grads + 4 * len(trained)


def memory_one_moment(config, trainable, dtype):
    weights, grads, _ = training_memory_ok(config, trainable, dtype)
    n = (_ - 2 * grads) // 4
    return weights, grads, grads + 4 * n


def memory_two_bytes(config, trainable, dtype):
    weights, grads, state = training_memory_ok(config, trainable, torch.float32)
    n = (state - 2 * grads) // 4
    return weights // 2, grads // 2, grads + 4 * n  # "2 bytes per parameter", whatever the dtype


def memory_frozen_grads(config, trainable, dtype):
    weights, _, state = training_memory_ok(config, trainable, dtype)
    return weights, weights, state


def memory_no_gqa(config, trainable, dtype):
    import copy

    mha = copy.deepcopy(config)
    mha.num_key_value_heads = config.num_attention_heads
    return training_memory_ok(mha, trainable, dtype)


def memory_no_step_counter(config, trainable, dtype):
    weights, grads, _ = training_memory_ok(config, trainable, dtype)
    return weights, grads, 2 * grads


def not_implemented(*args):
    raise NotImplementedError("Exercise: replace this line with your code")


def crashes(*args):
    return 1 / 0


CATALOGUE = [
    ("00.1", count_state_dict, "counted twice"),
    ("00.1", count_ignores_requires_grad, "requires_grad"),
    ("00.1", count_swapped, "order is (trainable, total)"),
    ("00.1", count_named_params_no_dedup, "counted twice"),
    ("00.2", memory_no_overhead, "1.2"),
    ("00.2", memory_inverted, "32 / bits"),
    ("00.2", memory_gib, "GiB"),
    ("00.2", memory_bytes, "not bytes"),
    ("00.3", loss_no_shift, "shift"),
    ("00.3", loss_counts_masked, "-100"),
    ("00.3", loss_sum, "not the sum"),
    ("00.3", loss_per_sequence, "per sequence"),
    ("00.3", loss_detached, "no gradient"),
    ("00.4", lr_no_warmup, "no warm-up"),
    ("00.4", lr_warmup_off_by_one, "off by one"),
    ("00.4", lr_progress_over_total, "(step − warmup) / (total − warmup)"),
    ("00.4", lr_linear_decay, "half cosine"),
    ("00.4", lr_full_cosine, "expected"),  # no named diagnosis: still caught, with the values
    ("00.5", step_mean_of_means, "mean loss over the k micro-batches"),
    ("00.5", step_sum_not_divided, "divide by the number of trained tokens"),
    ("00.5", step_zero_grad_in_loop, "zeroed inside the micro-batch loop"),
    ("00.5", step_clip_in_loop, "before accumulation finished"),
    ("00.5", step_schedule_per_micro_batch, "once per micro-batch"),
    ("00.5", step_never_zeroes, "not cleared after the step"),
    ("00.5", step_clips_after_the_step, "not clipped"),
    ("00.5", step_reports_mean_of_means, "mean of the micro-batch means"),
    ("00.5", step_reports_last_loss, "last micro-batch's share"),
    ("00.6", memory_untied_head, "tied"),
    ("00.6", memory_one_moment, "two moments"),
    ("00.6", memory_two_bytes, "not 2"),
    ("00.6", memory_frozen_grads, "frozen parameters have no gradient"),
    ("00.6", memory_no_gqa, "grouped-query attention"),
    ("00.6", memory_no_step_counter, "step counter"),
]
