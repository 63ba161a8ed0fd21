"""NF4 dequantization as one Triton kernel: bytes in, ``c[q] · absmax`` out, in the output dtype.

Each program reads ``BLOCK`` packed bytes (``2·BLOCK`` weights), splits each byte into its high and low
nibble (the first weight is the high one), looks both up in the 16-entry code, multiplies by their
block's absmax in float32, and writes the interleaved pair with one contiguous store. It is a pure
streaming kernel: ~0.5 byte read + 2 bytes written per bf16 weight, so bandwidth decides its speed.
Used automatically for CUDA tensors by ``course_lib.nf4.dequantize_nf4``; the torch path is the
reference, and tests run this kernel on CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch

try:  # triton is optional: the `gpu` extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, code_ptr, absmax_ptr, out_ptr, n_bytes, n_out, BLOCKSIZE: tl.constexpr,
                            BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = pid * BLOCK + tl.arange(0, BLOCK)  # byte indices
        byte = tl.load(packed_ptr + i, mask=i < n_bytes, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))  # (BLOCK,) float32: the first weight of the pair
        lo = tl.load(code_ptr + (byte & 0xF))
        # both weights of a pair share a block when BLOCKSIZE is even (it is a power of two ≥ 2)
        scale = tl.load(absmax_ptr + (2 * i) // BLOCKSIZE, mask=i < n_bytes, other=0.0)
        pair = tl.interleave(hi * scale, lo * scale)  # (2·BLOCK,) in weight order
        j = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + j, pair.to(out_ptr.dtype.element_ty), mask=j < n_out)


def nf4_dequantize_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size | int,
                          blocksize: int, dtype: torch.dtype, block: int = 1024) -> torch.Tensor:
    """packed ceil(n/2) uint8, absmax (blocks,) float32, code (16,) float32 → ``shape`` (n values) in ``dtype``.

    Called on every forward and backward of a 4-bit layer, and for a 4096 × 4096 matrix the kernel
    runs ~10 µs — about what Python spends around a launch — so only what must happen per call does:
    one allocation and the launch (no reshapes, no copies of tensors that are already contiguous)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install -e '.[gpu]' (or use the torch path)")
    if blocksize % 2:
        raise ValueError("the kernel needs an even blocksize (both nibbles of a byte in one block)")
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if absmax.dtype != torch.float32 or not absmax.is_contiguous():
        absmax = absmax.float().contiguous()
    out = torch.empty(shape, dtype=dtype, device=packed.device)  # the kernel writes it as one flat array
    n_bytes = packed.numel()
    _nf4_dequant_kernel[((n_bytes + block - 1) // block,)](packed, code, absmax, out, n_bytes, out.numel(),
                                                           BLOCKSIZE=blocksize, BLOCK=block)
    return out
