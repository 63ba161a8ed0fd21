"""Which BLOCK (bytes per program) and num_warps the NF4 dequant kernel streams fastest with (GPU only)."""
import torch
import triton

from course_lib.kernels.nf4_dequant import _nf4_dequant_kernel
from course_lib.nf4 import NF4_CODE, quantize_nf4

w = (torch.randn(4096, 14336, device="cuda") * 0.02).to(torch.bfloat16)
packed, state = quantize_nf4(w)
packed, absmax, code = packed.reshape(-1), state.absmax.cuda(), NF4_CODE.cuda()
out = torch.empty(w.numel(), dtype=torch.bfloat16, device="cuda")
moved = w.numel() // 2 + absmax.numel() * 4 + w.numel() * 2
for block in (512, 1024, 2048, 4096):
    for warps in (4, 8):
        grid = (triton.cdiv(packed.numel(), block),)
        fn = lambda: _nf4_dequant_kernel[grid](packed, code, absmax, out, packed.numel(), w.numel(),  # noqa: E731
                                                BLOCKSIZE=64, BLOCK=block, num_warps=warps)
        ms = triton.testing.do_bench(fn, warmup=50, rep=200)
        print(f"BLOCK {block:5d} warps {warps}: {moved / ms / 1e6:7.1f} GB/s")
