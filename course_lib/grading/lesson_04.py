"""Hidden checks for lesson 04 (NF4). References: course_lib.nf4, itself bit-exact with bitsandbytes."""

from __future__ import annotations

import torch

from . import CheckFailed, Exercise, expect


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


EXERCISES = [
    Exercise("04.1", "the NF4 code from normal quantiles", ("nf4_code",), check_nf4_code),
    Exercise("04.2", "quantize one block", ("quantize_block",), check_quantize_block),
    Exercise("04.3", "pack two indices per byte", ("pack_nibbles",), check_pack_nibbles),
    Exercise("04.4", "undo double quantization", ("dequantize_double",), check_dequantize_double),
]
