"""Hidden checks for lesson 03 (LoRA). References: course_lib.lora, itself tested against peft."""

from __future__ import annotations

import math

import torch

from . import CheckFailed, Exercise, expect
from .sandbox import in_sandbox, learner_object


def _tensors(seed: int, out_f: int = 6, in_f: int = 5, r: int = 3, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 7, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen),
            torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen))


# ---------------------------------------------------------------------------------------------
# 03.1 lora_forward(x, W, A, B, alpha, r) = x Wᵀ + (alpha / r) · x Aᵀ Bᵀ (the learner derives the scale)
# ---------------------------------------------------------------------------------------------
def check_lora_forward(lora_forward) -> str:
    for seed, alpha, r in [(0, 16.0, 3), (1, 3.0, 3)]:
        x, W, A, B = _tensors(seed, r=r)
        base, update = x @ W.T, x @ A.T @ B.T
        got = lora_forward(x, W, A, B, alpha, r)
        expect(got, base + alpha / r * update, what=f"output for alpha={alpha}, r={r}", mistakes={
            "the update is scaled by alpha; LoRA scales it by alpha / r": base + alpha * update,
            "the scaling is inverted: use alpha / r, not r / alpha": base + r / alpha * update,
            "the frozen path W x is missing: LoRA adds its update to the base layer's output": alpha / r * update,
            "the update is not scaled at all: multiply B A x by alpha / r": base + update,
        })
    return "h = W x + (α/r) · B A x"


# ---------------------------------------------------------------------------------------------
# 03.2 init_lora(in_features, out_features, r) -> (A, B)
# ---------------------------------------------------------------------------------------------
def check_init_lora(init_lora) -> str:
    torch.manual_seed(0)
    A, B = init_lora(64, 48, 8)
    if tuple(A.shape) == (64, 8) and tuple(B.shape) == (8, 48):
        raise CheckFailed("A and B are transposed: A is (r, in_features) = (8, 64), B is (out_features, r) = (48, 8)")
    if tuple(A.shape) != (8, 64) or tuple(B.shape) != (48, 8):
        raise CheckFailed(f"expected A (8, 64) and B (48, 8), got {tuple(A.shape)} and {tuple(B.shape)}")
    if torch.count_nonzero(B) != 0:
        raise CheckFailed("B must start at zero, so that the adapted model starts exactly equal to the base model")
    if torch.count_nonzero(A) == 0:
        raise CheckFailed("A must not start at zero: with A = 0 and B = 0 both gradients are zero and nothing trains")
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in = 64, as nn.Linear initialises
    if A.abs().max() > bound * 1.0001 or A.abs().max() < bound * 0.8:
        raise CheckFailed(f"A should be Kaiming-uniform with a=√5 (values in ±1/√in_features = ±{bound:.3f}); "
                          f"yours reach {A.abs().max():.3f}: use nn.init.kaiming_uniform_(A, a=math.sqrt(5))")
    if not (A.requires_grad and B.requires_grad):
        raise CheckFailed("A and B must be trainable (nn.Parameter or requires_grad=True)")
    return "A Kaiming-uniform, B zero: training starts from the base model"


# ---------------------------------------------------------------------------------------------
# 03.3 merge_weight(W, A, B, alpha, r) -> W + (alpha / r) · B A
# ---------------------------------------------------------------------------------------------
def check_merge_weight(merge_weight) -> str:
    _, W, A, B = _tensors(2, out_f=5, in_f=5, r=2)  # square, so a transposed merge still has the right shape
    W_copy = W.clone()
    got = merge_weight(W, A, B, 8.0, 2)
    if not torch.equal(W, W_copy):
        raise CheckFailed("merge_weight changed W in place: return a new tensor, the caller may still need W")
    delta = B @ A
    expect(got, W + 4.0 * delta, what="merged weight", mistakes={
        "you merged the transpose: the update of an (out, in) weight is B @ A, not (B @ A)ᵀ = Aᵀ Bᵀ": W + 4.0 * delta.T,
        "the merged update must carry the same alpha / r scaling as the forward pass": W + delta,
        "the scaling is alpha / r, not alpha": W + 8.0 * delta,
    })
    return "W' = W + (α/r) B A: the merged layer costs no extra inference time"


# ---------------------------------------------------------------------------------------------
# 03.4 mixed_lora_delta(x, A_stack, B_stack, scalings, adapter_index)
# ---------------------------------------------------------------------------------------------
def check_mixed_lora_delta(mixed_lora_delta) -> str:
    gen = torch.Generator().manual_seed(3)
    K, r, d_in, d_out, T = 3, 2, 4, 6, 5
    A_stack, B_stack = torch.randn(K, r, d_in, generator=gen), torch.randn(K, d_out, r, generator=gen)
    scalings = torch.tensor([1.0, 0.5, 2.0])
    index = torch.tensor([2, -1, 0, 2, 1])  # -1: this row uses no adapter
    x = torch.randn(len(index), T, d_in, generator=gen)
    expected = torch.zeros(len(index), T, d_out)
    for row, k in enumerate(index.tolist()):
        if k >= 0:
            expected[row] = scalings[k] * x[row] @ A_stack[k].T @ B_stack[k].T
    negative_wraps = torch.stack([scalings[k] * x[row] @ A_stack[k].T @ B_stack[k].T
                                  for row, k in enumerate(index.tolist())])
    same_adapter = torch.stack([scalings[index[0]] * x[row] @ A_stack[index[0]].T @ B_stack[index[0]].T
                                for row in range(len(index))])
    got = mixed_lora_delta(x, A_stack, B_stack, scalings, index)
    expect(got, expected, what="mixed-batch update", mistakes={
        "rows with index -1 must get a zero update; indexing a stack with -1 picks the *last* adapter": negative_wraps,
        "every row got the first row's adapter: gather A, B and the scaling per row": same_adapter,
    })
    return "each row used its own adapter, -1 rows none"


# ---------------------------------------------------------------------------------------------
# 03.5 matching_modules(module_names, targets) — injection by name
# ---------------------------------------------------------------------------------------------
MODULE_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.kv_proj", "model.layers.0.self_attn.v_proj",
                "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                "model.layers.1.mlp.down_proj", "v_proj", "lm_head"]


def check_matching_modules(matching_modules) -> str:
    cases = [(["v_proj"], ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "v_proj"]),
             (["q_proj", "down_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
             (["model.layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]),
             (["proj"], [])]
    for targets, expected in cases:
        got = matching_modules(list(MODULE_NAMES), targets)
        if not isinstance(got, list):
            raise CheckFailed(f"return a list of names, got {type(got).__name__}")
        if got == expected:
            continue
        if "model.layers.0.self_attn.kv_proj" in got:
            raise CheckFailed("'kv_proj' matched target 'v_proj': a target matches a whole name or a suffix "
                              "after a dot (name == t or name.endswith('.' + t)), not any ending of the string")
        if targets == ["proj"] and got:
            raise CheckFailed("target 'proj' matched modules: a target must match whole name parts, not a substring")
        if set(got) == set(expected):
            raise CheckFailed(f"keep the modules in the order of module_names; got {got}")
        if targets == ["v_proj"] and got == ["v_proj"]:
            raise CheckFailed("only exact names matched: 'v_proj' must also match 'model.layers.0.self_attn.v_proj'")
        raise CheckFailed(f"for targets {targets}: expected {expected}, got {got}")
    return "whole names or dotted suffixes, in model order"


# ---------------------------------------------------------------------------------------------
# 03.6 debug a LoRA layer: FixedLoRALinear(base, r, alpha, dropout) with .A, .B, forward, merged_weight()
# ---------------------------------------------------------------------------------------------
def check_fixed_lora_linear(cls) -> str:
    """Each behaviour a LoRA layer must have, checked on its own; every one that fails is reported (a
    debugging exercise: the learner learns of each bug still there, not only the first)."""
    r, alpha, p = 4, 12.0, 0.25  # scale α/r = 3: neither 1 nor α, so a wrong scale shows
    s = alpha / r
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(10, 12, generator=gen) * 0.3, torch.randn(10, generator=gen)  # a frozen layer with a bias
    A, B = torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen)
    x = torch.randn(3, 5, 12, generator=gen)  # (batch, T, in)

    def learner_side(W, b, A, B, x):
        """The learner's layer on a copy of (W, b): what the check judges, as data."""
        base = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            base.weight.copy_(W), base.bias.copy_(b)
        torch.manual_seed(0)
        layer = cls(base, r, alpha, p)
        shapes = {name: list(getattr(getattr(layer, name, None), "shape", ())) for name in ("A", "B")}
        if shapes != {"A": [r, W.shape[1]], "B": [W.shape[0], r]}:
            return {"layout": shapes}
        report = {"layout": True, "trainable": sorted(n for n, q in layer.named_parameters() if q.requires_grad)}
        with torch.no_grad():
            report["at init"] = layer.eval()(x)
            layer.A.copy_(A), layer.B.copy_(B)
            report["eval"] = layer.eval()(x)
            report["merged"] = layer.merged_weight().detach().clone()
            report["base after merge"] = [base.weight.detach().clone(), base.bias.detach().clone()]
            base.weight.copy_(W), base.bias.copy_(b)
            layer.train()
            torch.manual_seed(7)
            report["train"] = layer(x)
        return report

    # learner_side runs the learner's class itself (not course-grade's recording wrapper of it): the sandbox
    # records learner_side's result as one call
    cls = learner_object(cls)
    got = in_sandbox(learner_side)(W, b, A, B, x)
    if got["layout"] is not True:
        raise CheckFailed(f"keep the given layout: A (r, in_features) = ({r}, 12) and B (out_features, r) = (10, {r}); "
                          f"got {got['layout']}")
    if got["trainable"] != ["A", "B"]:
        raise CheckFailed(f"only A and B may train: the frozen layer's weight and bias must keep requires_grad=False "
                          f"(trainable now: {got['trainable']})")
    W0x = x @ W.T + b  # (3, 5, 10)
    update = x @ A.T @ B.T  # (3, 5, 10)
    torch.manual_seed(7)
    x_dropped = torch.nn.functional.dropout(x, p, training=True)  # the mask one nn.Dropout(p) call draws
    dropped_update = x_dropped @ A.T @ B.T

    def at_init():  # (1) the layer starts as the frozen layer
        if not torch.allclose(got["at init"], W0x, atol=1e-6):
            raise CheckFailed("at initialisation the layer must compute exactly what the frozen layer computes, so "
                              "training starts from the pretrained model: B must start at zero (A random)")

    def eval_output():  # (2) with A and B set: W₀x + b + (α/r)·B A x
        expect(got["eval"], W0x + s * update, what="eval-mode output with A, B set", mistakes={
            "the update is scaled by alpha; LoRA scales it by alpha / r": W0x + alpha * update,
            "the update is not scaled: multiply B A x by alpha / r": W0x + update,
            "the scaling is inverted: alpha / r, not r / alpha": W0x + r / alpha * update,
        })

    def merged():  # (3) the merged weight serves what the layer computes
        weight_after, bias_after = got["base after merge"]
        if not (torch.equal(weight_after, W) and torch.equal(bias_after, b)):
            raise CheckFailed("merged_weight changed the frozen layer in place: return a new tensor")
        delta = B @ A  # (out, in)
        expect(got["merged"], W + s * delta, what="merged weight", mistakes={
            "the merged update has no alpha / r scaling, so the merged model serves another function than the "
            "adapter: it must carry the forward pass's scale": W + delta,
            "the merged update is scaled by alpha, not alpha / r": W + alpha * delta,
        })

    def train_output():  # (4) train mode: dropout on the adapter's input only
        expect(got["train"], W0x + s * dropped_update, what="train-mode output (dropout active)", mistakes={
            "dropout reached the frozen path: the frozen layer must see the undropped x (W₀x + b); only the "
            "adapter's input is dropped (x → dropout → A → B)": x_dropped @ W.T + b + s * dropped_update,
            "dropout is missing in train mode: LoRA drops the adapter's input (x → dropout → A → B)": W0x + s * update,
        })

    problems = []
    for behaviour in (at_init, eval_output, merged, train_output):
        try:
            behaviour()
        except CheckFailed as e:
            problems.append(str(e))
    if problems:
        raise CheckFailed(" — and: ".join(problems))
    return "W₀x + (α/r)·B A dropout(x): dropout on the adapter's path only, and the merge carries α/r"

EXERCISES = [
    Exercise("03.1", "LoRA forward with scaling", ("lora_forward",), check_lora_forward),
    Exercise("03.2", "LoRA initialisation", ("init_lora",), check_init_lora),
    Exercise("03.3", "merge an adapter into W", ("merge_weight",), check_merge_weight),
    Exercise("03.4", "per-row adapters in one batch", ("mixed_lora_delta",), check_mixed_lora_delta),
    Exercise("03.5", "choose target modules by name", ("matching_modules",), check_matching_modules),
    Exercise("03.6", "debug a LoRA layer", ("FixedLoRALinear",), check_fixed_lora_linear),
]
