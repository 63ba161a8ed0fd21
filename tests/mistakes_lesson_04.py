"""Lesson 04 (NF4): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import torch

_N = torch.distributions.Normal(0.0, 1.0)


def code_ok(offset):
    v = torch.cat([_N.icdf(torch.linspace(offset, 0.5, 9)[:-1].double().float()), torch.zeros(1),
                   -_N.icdf(torch.linspace(offset, 0.5, 8)[:-1])]).sort().values
    return v / v.max()


def block_ok(block, code):
    absmax = block.abs().max()
    return torch.bucketize(block / absmax, (code[:-1] + code[1:]) / 2), absmax


def pack_ok(indices):
    if len(indices) % 2:
        indices = torch.cat([indices, indices.new_zeros(1)])
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def dq_ok(q8, absmax2, offset, code8, blocksize):
    return code8[q8.long()] * absmax2.repeat_interleave(blocksize)[:len(q8)] + offset


RIGHT = {"04.1": code_ok, "04.2": block_ok, "04.3": pack_ok, "04.4": dq_ok}


def code_symmetric(offset):
    s = _N.icdf(torch.linspace(offset, 0.5, 9)[:-1])
    v = torch.cat([-s, s]).sort().values
    return v / v.max()


def code_unnormalised(offset):
    return torch.cat([_N.icdf(torch.linspace(offset, 0.5, 9)[:-1]), torch.zeros(1),
                      -_N.icdf(torch.linspace(offset, 0.5, 8)[:-1])]).sort().values


def code_descending(offset):
    return code_ok(offset).flip(0)


def block_max_not_abs(block, code):
    absmax = block.max()
    return torch.bucketize((block / absmax).clamp(-1, 1), (code[:-1] + code[1:]) / 2), absmax


def block_ties_up(block, code):
    absmax = block.abs().max()
    return torch.bucketize(block / absmax, (code[:-1] + code[1:]) / 2, right=True), absmax


def block_floor(block, code):
    absmax = block.abs().max()
    return (torch.bucketize(block / absmax, code, right=True) - 1).clamp(0, 15), absmax


def block_values(block, code):
    idx, absmax = block_ok(block, code)
    return code[idx], absmax


def pack_low_first(indices):
    if len(indices) % 2:
        indices = torch.cat([indices, indices.new_zeros(1)])
    return ((indices[1::2] << 4) | indices[0::2]).to(torch.uint8)


def pack_added(indices):
    if len(indices) % 2:
        indices = torch.cat([indices, indices.new_zeros(1)])
    return (indices[0::2] + indices[1::2]).to(torch.uint8)


def pack_unpacked(indices):
    return indices.to(torch.uint8)


def dq_no_offset(q8, absmax2, offset, code8, blocksize):
    return code8[q8.long()] * absmax2.repeat_interleave(blocksize)[:len(q8)]


def dq_one_scale(q8, absmax2, offset, code8, blocksize):
    return code8[q8.long()] * absmax2[0] + offset


def dq_raw_bytes(q8, absmax2, offset, code8, blocksize):
    return q8.float() * absmax2.repeat_interleave(blocksize)[:len(q8)] + offset


CATALOGUE = [
    ("04.1", code_symmetric, "exact 0"), ("04.1", code_unnormalised, "normalised"), ("04.1", code_descending, "ascending"),
    ("04.2", block_max_not_abs, "magnitude"), ("04.2", block_ties_up, "lower"), ("04.2", block_floor, "nearest"),
    ("04.2", block_values, "index the code"),
    ("04.3", pack_low_first, "high nibble"), ("04.3", pack_added, "shifted"), ("04.3", pack_unpacked, "share each byte"),
    ("04.4", dq_no_offset, "offset"), ("04.4", dq_one_scale, "own scale"), ("04.4", dq_raw_bytes, "dynamic map"),
]


# 04.5: QLoRALinear(linear, r, alpha, blocksize) — frozen NF4 base (dequantized in forward) + LoRA
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from course_lib.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4  # noqa: E402


class QLoRAOk(nn.Module):
    def __init__(self, linear, r, alpha, blocksize=64):
        super().__init__()
        packed, self.state = quantize_nf4(linear.weight.detach(), blocksize=blocksize)
        self.register_buffer("packed", packed)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.lora_A = nn.Parameter(torch.randn(r, linear.in_features) / r)
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r))
        self.scaling = alpha / r

    def base_weight(self):
        return dequantize_nf4(self.packed, self.state)

    def forward(self, x):
        return F.linear(x, self.base_weight(), self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


RIGHT["04.5"] = QLoRAOk


class QLoRAScaledByAlpha(QLoRAOk):
    def __init__(self, linear, r, alpha, blocksize=64):
        super().__init__(linear, r, alpha, blocksize)
        self.scaling = alpha


class QLoRABlocksize64(QLoRAOk):
    def __init__(self, linear, r, alpha, blocksize=64):
        super().__init__(linear, r, alpha)  # the blocksize argument is dropped


class QLoRANoAbsmax(QLoRAOk):
    def base_weight(self):
        flat = self.packed.reshape(-1).long()
        indices = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:self.state.shape.numel()]
        return NF4_CODE[indices].view(self.state.shape)


class QLoRANoGradToInput(QLoRAOk):
    def forward(self, x):
        with torch.no_grad():
            base = F.linear(x, self.base_weight(), self.bias)
        return base + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class QLoRATrainableBase(QLoRAOk):
    def __init__(self, linear, r, alpha, blocksize=64):
        super().__init__(linear, r, alpha, blocksize)
        self.weight = nn.Parameter(self.base_weight())  # a dequantized weight that trains

    def base_weight(self):
        return self.weight if "weight" in self._parameters else super().base_weight()


class QLoRAKeepsFullWeight(QLoRAOk):
    def __init__(self, linear, r, alpha, blocksize=64):
        super().__init__(linear, r, alpha, blocksize)
        self.register_buffer("weight", linear.weight.detach().clone())

    def base_weight(self):
        return self.weight


class QLoRANoBias(QLoRAOk):
    def forward(self, x):
        return F.linear(x, self.base_weight()) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


CATALOGUE += [
    ("04.5", QLoRAScaledByAlpha, "alpha / r"), ("04.5", QLoRABlocksize64, "blocks of 64"),
    ("04.5", QLoRANoAbsmax, "block scales"), ("04.5", QLoRANoGradToInput, "torch.no_grad()"),
    ("04.5", QLoRATrainableBase, "frozen"), ("04.5", QLoRAKeepsFullWeight, "full-precision copy"),
    ("04.5", QLoRANoBias, "bias is missing"),
]
