"""Hidden checks for lesson 04 (NF4). References: course_lib.nf4, itself bit-exact with bitsandbytes."""

from __future__ import annotations

import torch

from . import CheckFailed, Exercise, expect
from .sandbox import in_sandbox, learner_object


# ---------------------------------------------------------------------------------------------
# 04.1 nf4_code(offset) -> 16 ascending float32 levels
# ---------------------------------------------------------------------------------------------
def check_nf4_code(nf4_code) -> str:
    from ..nf4 import NF4_OFFSET, build_nf4_code

    got = torch.as_tensor(nf4_code(NF4_OFFSET)).float()
    want = build_nf4_code(NF4_OFFSET)
    if got.numel() != 16:
        raise CheckFailed(f"NF4 has 16 levels (4 bits), got {got.numel()}")
    normal = torch.distributions.Normal(0.0, 1.0)
    sym = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1])
    symmetric = torch.cat([-sym, sym]).sort().values
    symmetric = symmetric / symmetric.max()
    if (got == 0).sum() == 0 and got.numel() == 16:
        raise CheckFailed("there is no exact 0: NF4 is asymmetric — 8 positive quantiles, 7 negative and 0 — "
                          "so that zero is representable (a symmetric code has no zero)")
    expect(got, want, what="the 16 levels", atol=1e-6, rtol=0, mistakes={
        "a symmetric code (8 + 8) has no exact zero: use 8 positive, 7 negative and 0": symmetric,
        "the levels are not normalised: divide by the largest so the ends are exactly ±1":
            torch.cat([normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]), torch.zeros(1),
                       -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1])]).sort().values,
        "the levels must be sorted ascending (index 0 is −1, index 15 is +1)": want.flip(0),
    })
    return "8 positive, 7 negative, an exact 0; ends at ±1"


# ---------------------------------------------------------------------------------------------
# 04.2 quantize_block(block, code) -> (indices (n,) int, absmax float)
# ---------------------------------------------------------------------------------------------
def check_quantize_block(quantize_block) -> str:
    from ..nf4 import NF4_BOUNDS, NF4_CODE

    gen = torch.Generator().manual_seed(4)
    for block in (torch.randn(64, generator=gen), torch.randn(64, generator=gen) * 0.01,
                  torch.tensor([0.5, -2.0, float(NF4_CODE[9] + NF4_CODE[10]) / 2 * 2.0, 0.0] * 16)):
        got = quantize_block(block.clone(), NF4_CODE.clone())
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed("return a tuple (indices, absmax)")
        if torch.as_tensor(got[0]).is_floating_point():
            raise CheckFailed("indices must index the code (integers 0…15), not be the code values themselves")
        indices, absmax = torch.as_tensor(got[0]).long().reshape(-1), float(got[1])
        want_absmax = block.abs().max().item()
        scaled = block / want_absmax
        want = torch.bucketize(scaled, NF4_BOUNDS)
        if abs(absmax - block.max().item()) < 1e-12 and block.max() != block.abs().max():
            raise CheckFailed("absmax is the largest *magnitude*, |w|.max(), not the largest value")
        expect(absmax, want_absmax, what="absmax", rtol=1e-6, atol=0)
        distance = (scaled[:, None] - NF4_CODE[None, :]).abs()
        ties_high = (distance.flip(1).argmin(1) * -1 + 15)
        expect(indices, want, what="indices", atol=0, rtol=0, mistakes={
            "a value exactly between two levels goes to the *lower* one (bitsandbytes' rule)": ties_high,
            "round the scaled value to the nearest level, not down to the level below it":
                (torch.bucketize(scaled, NF4_CODE, right=True) - 1).clamp(0, 15),
            "indices must index the code (0…15), not be the code values": NF4_CODE[want],
        })
    return "w / absmax → nearest of 16 levels, ties to the lower"


# ---------------------------------------------------------------------------------------------
# 04.3 pack_nibbles(indices) -> uint8 bytes ; two 4-bit indices per byte
# ---------------------------------------------------------------------------------------------
def check_pack_nibbles(pack_nibbles) -> str:
    gen = torch.Generator().manual_seed(5)
    for n in (8, 7):
        indices = torch.randint(0, 16, (n,), generator=gen)
        got = torch.as_tensor(pack_nibbles(indices.clone())).reshape(-1)
        padded = torch.cat([indices, torch.zeros(n % 2, dtype=indices.dtype)])
        want = (padded[0::2] << 4) | padded[1::2]
        if got.numel() == n:
            raise CheckFailed(f"{n} indices need {(n + 1) // 2} bytes: two 4-bit indices share each byte")
        if got.dtype != torch.uint8:
            raise CheckFailed(f"return uint8 bytes, got {got.dtype}")
        expect(got.long(), want.long(), what=f"bytes for {n} indices", atol=0, rtol=0, mistakes={
            "low nibble first: bitsandbytes puts the *first* index in the high nibble (byte = a << 4 | b)":
                ((padded[1::2] << 4) | padded[0::2]).long(),
            "the indices were added, not shifted: byte = (first << 4) | second": (padded[0::2] + padded[1::2]).long(),
        })
    return "first index in the high nibble, odd counts padded"


# ---------------------------------------------------------------------------------------------
# 04.4 dequantize_double(q8, absmax2, offset, code8, blocksize2) -> absmax (float32)
# ---------------------------------------------------------------------------------------------
def check_dequantize_double(dequantize_double) -> str:
    from ..nf4 import DYNAMIC_MAP, dequantize_blockwise_8bit, quantize_nf4

    w = torch.randn(600, 64, generator=torch.Generator().manual_seed(6))  # 600 blocks → 3 second-level blocks
    _, state = quantize_nf4(w, double_quant=True)
    without_offset = dequantize_blockwise_8bit(state.absmax, state.absmax_scale, 256)
    want = without_offset + state.offset
    got = torch.as_tensor(dequantize_double(state.absmax.clone(), state.absmax_scale.clone(), float(state.offset),
                                            DYNAMIC_MAP.clone(), 256)).float().reshape(-1)
    values = DYNAMIC_MAP[state.absmax.long()]
    expect(got, want, what="recovered absmax", rtol=1e-6, atol=1e-7, mistakes={
        "forgetting the offset: double quantization stored absmax − mean(absmax); add the mean back":
            without_offset,
        "one second-level scale for everything: each block of 256 absmax values has its own scale":
            values * state.absmax_scale[0] + state.offset,
        "the 8-bit values were used as numbers: look them up in the dynamic map first":
            state.absmax.float() * state.absmax_scale.repeat_interleave(256)[:600] + state.offset,
    })
    return "absmax = map[q] · scale(block of 256) + mean"


# ---------------------------------------------------------------------------------------------
# 04.5 QLoRALinear(linear, r, alpha, blocksize): frozen NF4 base + trainable LoRA, output and gradients
# ---------------------------------------------------------------------------------------------
def _qlora_reference(linear: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float, blocksize: int,
                     scaling: float | None = None, weight_fn=None):
    """course_lib's QLoRA layer (NF4Linear inside LoRALinear) with the given A, B; ``scaling`` and
    ``weight_fn`` (the base weight used instead of NF4's) produce the mistakes' values."""
    from ..lora import LoRALinear
    from ..nf4 import NF4Linear

    layer = LoRALinear(NF4Linear(linear, blocksize=blocksize))
    layer.add_adapter("default", r=A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].copy_(A), layer.lora_B["default"].copy_(B)
    if scaling is not None:
        layer.scaling["default"] = scaling
    if weight_fn is None:
        return layer
    weight = weight_fn(layer.base_layer)  # (out, in) plain tensor

    def forward(x):
        return torch.nn.functional.linear(x, weight, linear.bias) + layer.lora_output(x, "default")
    return forward


def _outputs_and_grads(forward, A, B, x, upstream):
    """(y, dL/dx, dL/dA, dL/dB) for L = Σ y ⊙ upstream; A, B are the parameters ``forward`` uses."""
    x = x.clone().requires_grad_(True)
    for p in (A, B):
        p.grad = None
    y = forward(x)
    (y * upstream).sum().backward()
    return (y.detach(), None if x.grad is None else x.grad.detach().clone(),
            None if A.grad is None else A.grad.detach().clone(), None if B.grad is None else B.grad.detach().clone())


def check_qlora_linear(QLoRALinear) -> str:
    from ..nf4 import NF4_CODE, NF4Linear

    def learner_side(weight, bias, r, alpha, blocksize, A, B, x, upstream):
        """Build the learner's layer on a copy of (weight, bias), inspect it, set A and B, and return (as data)
        what the check judges: its layout, its output and the gradients of x, A and B."""
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight), linear.bias.copy_(bias)
        layer = QLoRALinear(linear, r, alpha, blocksize)
        report = {"linear changed": not torch.equal(linear.weight, weight), "shapes": {}}
        for attr in ("lora_A", "lora_B"):
            p = getattr(layer, attr, None)
            report["shapes"][attr] = list(p.shape) if isinstance(p, torch.nn.Parameter) else None
        if None in report["shapes"].values():
            return report
        report["trainable ok"] = {id(p) for p in layer.parameters() if p.requires_grad} == {id(layer.lora_A), id(layer.lora_B)}
        report["full copy"] = next((n for n, t in [*layer.named_parameters(), *layer.named_buffers()]
                                    if t.is_floating_point() and t.numel() == weight.numel()), "")
        with torch.no_grad():
            layer.lora_A.copy_(A), layer.lora_B.copy_(B)
        report["y"], report["x grad"], report["A grad"], report["B grad"] = _outputs_and_grads(
            layer, layer.lora_A, layer.lora_B, x, upstream)
        return report

    # learner_side runs the learner's class itself (not course-grade's recording wrapper of it): the sandbox
    # records learner_side's result as one call
    QLoRALinear = learner_object(QLoRALinear)
    run = in_sandbox(learner_side)
    gen = torch.Generator().manual_seed(45)
    for out_f, in_f, r, alpha, blocksize in ((24, 32, 4, 8.0, 64), (16, 48, 2, 16.0, 128)):
        linear = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            linear.weight.copy_(0.3 * torch.randn(out_f, in_f, generator=gen))
            linear.bias.copy_(torch.randn(out_f, generator=gen))
        A, B = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)  # B ≠ 0: the adapter acts
        x, upstream = torch.randn(3, 5, in_f, generator=gen), torch.randn(3, 5, out_f, generator=gen)
        report = run(linear.weight.detach().clone(), linear.bias.detach().clone(), r, alpha, blocksize, A, B, x, upstream)
        if report["linear changed"]:
            raise CheckFailed("the layer changed the nn.Linear it was given: quantize a copy of its weight")
        for attr, shape in (("lora_A", [r, in_f]), ("lora_B", [out_f, r])):
            if report["shapes"][attr] != shape:
                raise CheckFailed(f"the layer needs a trainable nn.Parameter `{attr}` of shape {tuple(shape)} "
                                  f"(A: (r, in_features), B: (out_features, r))")
        if not report["trainable ok"]:
            raise CheckFailed("the base weight (or the bias) is trainable: in QLoRA the 4-bit base is frozen and only "
                              "lora_A and lora_B receive gradients — keep the base out of the parameters that require grad")
        if report["full copy"]:
            raise CheckFailed(f"the layer keeps a full-precision copy of the base weight ({report['full copy']}, "
                              f"{out_f}×{in_f} floats): QLoRA stores only the packed 4-bit codes and their block scales, "
                              f"and dequantizes in forward")
        got = (report["y"], report["x grad"], report["A grad"], report["B grad"])

        ref = _qlora_reference(linear, A, B, alpha, blocksize)
        want = _outputs_and_grads(ref, ref.lora_A["default"], ref.lora_B["default"], x, upstream)

        def output_of(**changes):  # the reference's output with one thing done wrong
            with torch.no_grad():
                return _qlora_reference(linear, A, B, alpha, **{"blocksize": blocksize, **changes})(x)

        case = f"(out={out_f}, in={in_f}, r={r}, alpha={alpha:g}, blocksize={blocksize})"
        output_mistakes = {
            "the LoRA update is scaled by alpha; LoRA scales it by alpha / r (so changing r does not change its size)":
                output_of(scaling=alpha),
            "the dequantized weight is missing its block scales: each level of the code is multiplied by its block's absmax":
                output_of(weight_fn=lambda nf4: NF4_CODE[_nf4_indices(nf4)]),
            "the bias is missing: the frozen layer computes W x + b": want[0] - linear.bias.detach(),
            "the base path uses the full-precision weight: QLoRA's forward uses the dequantized NF4 weight":
                output_of(weight_fn=lambda nf4: linear.weight.detach()),
        }
        if blocksize != 64:
            output_mistakes[f"the weight was quantized in blocks of 64, not in the blocks of {blocksize} the layer "
                            f"was asked for"] = output_of(blocksize=64)
        expect(got[0], want[0], what=f"the output {case}", rtol=1e-4, atol=1e-4, mistakes=output_mistakes)
        base_weight = NF4Linear(linear, blocksize=blocksize).dequantized_weight()  # (out, in)
        for label, g, w in (("input x", got[1], want[1]), ("lora_A", got[2], want[2]), ("lora_B", got[3], want[3])):
            if g is None:
                raise CheckFailed(f"no gradient reached {label}: keep the computation differentiable (no .detach(), "
                                  f"no torch.no_grad() around the path to {label})")
            grad_mistakes = {} if label != "input x" else {
                "the base matmul ran under torch.no_grad() (or on a detached input): the base weight is frozen, but "
                "the gradient must still flow *through* it to the input — earlier layers need it":
                    w - upstream @ base_weight}
            expect(g, w, what=f"the gradient of {label} {case}", rtol=1e-4, atol=1e-4, mistakes=grad_mistakes)
    return "NF4 base frozen and dequantized in forward, LoRA scaled by alpha/r; output and gradients match"


def _nf4_indices(nf4) -> torch.Tensor:
    """The (out, in) code indices of an NF4Linear (its packed bytes unpacked, high nibble first)."""
    flat = nf4.packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:nf4.out_features * nf4.in_features].view(
        nf4.out_features, nf4.in_features)


EXERCISES = [
    Exercise("04.1", "the NF4 code from normal quantiles", ("nf4_code",), check_nf4_code),
    Exercise("04.2", "quantize one block", ("quantize_block",), check_quantize_block),
    Exercise("04.3", "pack two indices per byte", ("pack_nibbles",), check_pack_nibbles),
    Exercise("04.4", "undo double quantization", ("dequantize_double",), check_dequantize_double),
    Exercise("04.5", "an NF4 linear layer with a LoRA adapter whose gradients match", ("QLoRALinear",),
             check_qlora_linear),
]
