"""Hidden checks for lesson 02 (IA3). References: course_lib.ia3, itself tested bit for bit against peft."""

from __future__ import annotations

import torch
from torch import nn

from . import CheckFailed, Exercise, expect
from .sandbox import in_sandbox, learner_object


def _layer(seed: int, out_f: int, in_f: int, is_feedforward: bool):
    """A course_lib IA3Linear with random weight, bias and vector: the reference for one case."""
    from ..ia3 import IA3Linear

    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=gen))
        base.bias.copy_(torch.randn(out_f, generator=gen))
    layer = IA3Linear(base, is_feedforward)
    layer.add_adapter("default")
    scale = 1 + 0.5 * torch.randn(in_f if is_feedforward else out_f, generator=gen)
    with torch.no_grad():
        layer.ia3_l["default"].copy_(scale.view(layer.ia3_l["default"].shape))
    return layer, base.weight.detach().clone(), base.bias.detach().clone(), scale, gen


# ---------------------------------------------------------------------------------------------
# 02.1 ia3_forward(x, W, b, scale, is_feedforward)
# ---------------------------------------------------------------------------------------------
def check_ia3_forward(ia3_forward) -> str:
    for is_ff in (False, True):
        layer, W, b, l, gen = _layer(0, 5, 5, is_ff)  # square: a vector on the wrong side still fits
        x = torch.randn(2, 3, 5, generator=gen)  # (B, T, in)
        with torch.no_grad():
            want = layer(x)
        got = ia3_forward(x, W, b, l, is_ff)
        side = "input (feed-forward layer)" if is_ff else "output (attention k/v)"
        expect(got, want, what=f"IA3 forward, scaling the {side}", mistakes={
            "the vector scaled the input, but attention keys/values are output-scaled: (W x + b) ⊙ l":
                (x * l) @ W.T + b,
            "the vector scaled the output, but the feed-forward down projection is input-scaled: W (x ⊙ l) + b":
                (x @ W.T + b) * l,
            "the bias was left out of the output scaling: IA3 rescales the whole output, (W x + b) ⊙ l":
                (x @ W.T) * l + b,
            "the bias is missing": x @ W.T * l if not is_ff else (x * l) @ W.T,
        })
    return "output scaling for k/v, input scaling for the down projection"


# ---------------------------------------------------------------------------------------------
# 02.2 merge_ia3_weight(W, b, scale, is_feedforward) -> (W', b')
# ---------------------------------------------------------------------------------------------
def check_merge_ia3_weight(merge_ia3_weight) -> str:
    for is_ff in (False, True):
        layer, W, b, l, gen = _layer(1, 4, 4, is_ff)
        W_copy, b_copy = W.clone(), b.clone()
        got = merge_ia3_weight(W, b, l, is_ff)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed("return a tuple (merged weight, merged bias)")
        if not (torch.equal(W, W_copy) and torch.equal(b, b_copy)):
            raise CheckFailed("merge_ia3_weight changed W or b in place: return new tensors")
        layer.merge()
        want_W, want_b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
        got_W, got_b = got
        expect(got_W, want_W, what=f"merged weight ({'input' if is_ff else 'output'} scaling)", mistakes={
            "rows and columns are mixed up: input scaling multiplies the columns of W (W · diag(l)), output "
            "scaling its rows (diag(l) · W)": W * l[None, :] if not is_ff else W * l[:, None],
        })
        expect(got_b, want_b, what=f"merged bias ({'input' if is_ff else 'output'} scaling)", mistakes={
            "forgetting the bias on merge: with output scaling, (W x + b) ⊙ l needs b ⊙ l too": b,
            "the bias was scaled, but input scaling happens before the weight and never touches the bias": b * l
            if l.shape == b.shape else b,
        })
    return "W' = diag(l) W, b' = l ⊙ b for outputs; W' = W diag(l) for inputs"


# ---------------------------------------------------------------------------------------------
# 02.3 ia3_parameter_count(config) -> int
# ---------------------------------------------------------------------------------------------
def _config(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def check_ia3_parameter_count(ia3_parameter_count) -> str:
    from transformers import LlamaForCausalLM

    from ..ia3 import add_ia3

    for cfg in (_config(32, 48, 2, 4, 2), _config(64, 160, 3, 8, 8), _config(2048, 5632, 22, 32, 4)):
        hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        kv_dim = cfg.num_key_value_heads * (cfg.head_dim or hidden // cfg.num_attention_heads)
        if hidden <= 64:  # count the real thing on small models
            model = LlamaForCausalLM(cfg)
            add_ia3(model)
            want = sum(p.numel() for n, p in model.named_parameters() if "ia3_l" in n)
        else:
            want = layers * (2 * kv_dim + inter)
        got = ia3_parameter_count(cfg)
        expect(got, want, what=f"IA3 parameters for hidden={hidden}, {cfg.num_key_value_heads} kv heads", mistakes={
            "k_proj and v_proj output num_key_value_heads × head_dim values, not hidden_size (GQA)":
                layers * (2 * hidden + inter),
            "down_proj is input-scaled: its vector has intermediate_size entries, not hidden_size":
                layers * (2 * kv_dim + hidden),
            "count every layer: the vectors are per layer": 2 * kv_dim + inter,
        }, rtol=0, atol=0)
    return "layers × (2·kv_dim + intermediate): about 0.01 % of a 1.1 B model"


# ---------------------------------------------------------------------------------------------
# 02.4 debug an IA3 layer: FixedIA3Linear(base, is_feedforward) with .base, .l, forward, merge(), unmerge()
# ---------------------------------------------------------------------------------------------
def check_fixed_ia3_linear(cls) -> str:
    """Forward, merge and the merge–unmerge round trip, each checked on its own against course_lib's IA3Linear,
    on both sides; every behaviour that fails is reported (a debugging exercise: the learner learns of each
    bug still there, not only the first)."""

    def learner_side(W, b, l, is_ff, x):
        """The learner's layer on a copy of (W, b) with vector l: what the check judges, as data."""
        base = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            base.weight.copy_(W), base.bias.copy_(b)
        layer = cls(base, is_ff)
        vector = getattr(layer, "l", None)
        if not isinstance(vector, nn.Parameter) or vector.numel() != l.numel():
            return {"layout": False}
        report = {"layout": True}
        with torch.no_grad():
            vector.copy_(l.view_as(vector))
            report["forward"] = layer(x)
            layer.merge()
            report["merged weight"], report["merged bias"] = layer.base.weight.clone(), layer.base.bias.clone()
            report["merged output"] = layer(x)
        fresh = cls(nn.Linear(W.shape[1], W.shape[0]), is_ff)
        with torch.no_grad():
            fresh.base.weight.copy_(W), fresh.base.bias.copy_(b), fresh.l.copy_(l.view_as(fresh.l))
            fresh.merge()
            fresh.unmerge()
        report["round-trip weight"], report["round-trip bias"] = fresh.base.weight.detach().clone(), fresh.base.bias.detach().clone()
        return report

    # learner_side runs the learner's class itself (not course-grade's recording wrapper of it): the sandbox
    # records learner_side's result as one call
    cls = learner_object(cls)
    run = in_sandbox(learner_side)
    problems: list[str] = []
    for is_ff in (False, True):
        side = "input-scaled (down projection)" if is_ff else "output-scaled (k/v)"
        reference, W, b, l, gen = _layer(7 + is_ff, 5, 7, is_ff)  # out ≠ in: a vector on the wrong side fails
        x = torch.randn(2, 3, 7, generator=gen)
        got = run(W, b, l, is_ff, x)
        if not got["layout"]:
            raise CheckFailed(f"keep the given layout: a trainable nn.Parameter `l` with {l.numel()} entries "
                              f"for an {side} layer of shape (5, 7)")
        with torch.no_grad():
            want_out = reference(x)
            reference.merge()

        def forward():
            expect(got["forward"], want_out, what=f"forward, {side}", mistakes={} if is_ff else {
                "the bias was left out of the output scaling: IA3 rescales the whole output": (x @ W.T) * l + b,
            })

        def merge():
            expect(got["merged weight"], reference.base_layer.weight, what=f"merged weight, {side}")
            expect(got["merged bias"], reference.base_layer.bias, what=f"merged bias, {side}", mistakes={
                "merge forgot the bias: with output scaling the bias is rescaled too, or the merged layer "
                "serves another function": b,
            })
            expect(got["merged output"], want_out, what=f"output after merge, {side}")

        def round_trip():
            expect(got["round-trip weight"], W, what=f"weight after merge then unmerge, {side}", rtol=1e-5, atol=1e-5,
                   mistakes={"unmerge multiplied by the vector again: undoing a multiplication divides by it":
                             W * l.view(1, -1) ** 2 if is_ff else W * l.view(-1, 1) ** 2})
            expect(got["round-trip bias"], b, what=f"bias after merge then unmerge, {side}", rtol=1e-5, atol=1e-5,
                   mistakes={} if is_ff else {
                       "unmerge left the bias scaled: divide it back as merge multiplied it": b * l,
                       "unmerge multiplied the bias by the vector again: divide it": b * l * l})

        for behaviour in (forward, merge, round_trip):
            try:
                behaviour()
            except CheckFailed as failure:
                problems.append(str(failure))
    if problems:
        raise CheckFailed(" · ".join(dict.fromkeys(problems)))
    return "forward on both sides, merge with the bias, unmerge that divides: the round trip restores the layer"


EXERCISES = [
    Exercise("02.1", "IA3 forward: input vs output scaling", ("ia3_forward",), check_ia3_forward),
    Exercise("02.2", "merge an IA3 vector into a Linear", ("merge_ia3_weight",), check_merge_ia3_weight),
    Exercise("02.3", "IA3 parameters per task", ("ia3_parameter_count",), check_ia3_parameter_count),
    Exercise("02.4", "debug an IA3 layer", ("FixedIA3Linear",), check_fixed_ia3_linear),
]
