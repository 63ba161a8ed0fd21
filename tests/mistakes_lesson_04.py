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
