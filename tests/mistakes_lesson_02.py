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


# 02.4: debug an IA3 layer (the notebook's BuggyIA3Linear: merge forgets the bias, unmerge multiplies)
import torch  # noqa: E402
from torch import nn  # noqa: E402


class IA3Ok(nn.Module):
    def __init__(self, base, is_feedforward):
        super().__init__()
        self.base, self.is_feedforward = base.requires_grad_(False), is_feedforward
        self.l = nn.Parameter(torch.ones(base.in_features if is_feedforward else base.out_features))
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x * self.l) if self.is_feedforward else self.base(x) * self.l

    def _apply_vector(self, op, bias):
        with torch.no_grad():
            if self.is_feedforward:
                self.base.weight.copy_(op(self.base.weight, self.l[None, :]))
            else:
                self.base.weight.copy_(op(self.base.weight, self.l[:, None]))
                if bias and self.base.bias is not None:
                    self.base.bias.copy_(op(self.base.bias, self.l))

    def merge(self):
        self._apply_vector(torch.mul, bias=True)
        self.merged = True

    def unmerge(self):
        self._apply_vector(torch.div, bias=True)
        self.merged = False


RIGHT["02.4"] = IA3Ok


class IA3AsGiven(IA3Ok):  # both planted bugs
    def merge(self):
        self._apply_vector(torch.mul, bias=False)
        self.merged = True

    def unmerge(self):
        self._apply_vector(torch.mul, bias=False)
        self.merged = False


class IA3OnlyBiasFixed(IA3Ok):  # unmerge still multiplies
    def unmerge(self):
        self._apply_vector(torch.mul, bias=True)
        self.merged = False


class IA3OnlyUnmergeFixed(IA3Ok):  # merge and unmerge divide correctly, but both still ignore the bias
    def merge(self):
        self._apply_vector(torch.mul, bias=False)
        self.merged = True

    def unmerge(self):
        self._apply_vector(torch.div, bias=False)
        self.merged = False


class IA3BiasFixedInMergeOnly(IA3Ok):
    def unmerge(self):
        self._apply_vector(torch.div, bias=False)
        self.merged = False


class IA3BiasUnscaledInForward(IA3Ok):
    def forward(self, x):
        if self.merged or self.is_feedforward:
            return super().forward(x)
        return nn.functional.linear(x, self.base.weight) * self.l + self.base.bias


CATALOGUE += [
    ("02.4", IA3AsGiven, "merge forgot the bias"), ("02.4", IA3AsGiven, "divides"),
    ("02.4", IA3OnlyBiasFixed, "divides"), ("02.4", IA3OnlyUnmergeFixed, "merge forgot the bias"),
    ("02.4", IA3BiasFixedInMergeOnly, "left the bias scaled"), ("02.4", IA3BiasUnscaledInForward, "bias was left out"),
]
