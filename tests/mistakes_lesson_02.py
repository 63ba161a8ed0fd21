"""Lesson 02 (IA3): right answers, and plausible wrong answers with the phrase the feedback must contain."""


def forward_ok(x, W, b, l, is_ff):
    return (x * l) @ W.T + b if is_ff else (x @ W.T + b) * l


def merge_ok(W, b, l, is_ff):
    return (W * l[None, :], b.clone()) if is_ff else (W * l[:, None], b * l)


def count_ok(cfg):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * (2 * cfg.num_key_value_heads * head_dim + cfg.intermediate_size)


RIGHT = {"02.1": forward_ok, "02.2": merge_ok, "02.3": count_ok}


def forward_wrong_side(x, W, b, l, is_ff):
    return forward_ok(x, W, b, l, not is_ff)


def forward_bias_unscaled(x, W, b, l, is_ff):
    return (x * l) @ W.T + b if is_ff else (x @ W.T) * l + b


def forward_always_output(x, W, b, l, is_ff):
    return (x @ W.T + b) * l


def merge_no_bias(W, b, l, is_ff):
    return merge_ok(W, b, l, is_ff)[0], b


def merge_rows_columns(W, b, l, is_ff):
    return (W * l[:, None], b.clone()) if is_ff else (W * l[None, :], b * l)


def merge_bias_always(W, b, l, is_ff):
    return merge_ok(W, b, l, is_ff)[0], b * l


def merge_in_place(W, b, l, is_ff):
    W.mul_(l[None, :] if is_ff else l[:, None])
    if not is_ff:
        b.mul_(l)
    return W, b


def count_hidden_for_kv(cfg):
    return cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.intermediate_size)


def count_down_output(cfg):
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * (2 * cfg.num_key_value_heads * head_dim + cfg.hidden_size)


def count_one_layer(cfg):
    return count_ok(cfg) // cfg.num_hidden_layers


CATALOGUE = [
    ("02.1", forward_wrong_side, "scaled the"), ("02.1", forward_bias_unscaled, "bias was left out"),
    ("02.1", forward_always_output, "input-scaled"),
    ("02.2", merge_no_bias, "forgetting the bias"), ("02.2", merge_rows_columns, "rows and columns"),
    ("02.2", merge_bias_always, "never touches the bias"), ("02.2", merge_in_place, "in place"),
    ("02.3", count_hidden_for_kv, "GQA"), ("02.3", count_down_output, "intermediate_size"),
    ("02.3", count_one_layer, "every layer"),
]
