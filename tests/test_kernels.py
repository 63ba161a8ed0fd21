"""Triton kernels against their torch fallbacks, on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so each check runs in a fresh process."""

import os
import subprocess
import sys
import textwrap




MULTI_LORA = textwrap.dedent('''
    import torch
    from course_lib.kernels.multi_lora import lora_mixed_delta_torch, lora_mixed_delta_triton
    gen = torch.Generator().manual_seed(0)
    for (bt, t, d_in, d_out, r, k) in [(5, 7, 40, 72, 3, 3), (2, 33, 64, 16, 16, 1), (3, 1, 8, 8, 1, 2)]:
        x = torch.randn(bt, t, d_in, generator=gen)
        A = torch.randn(k + 1, r, d_in, generator=gen); A[k] = 0
        B = torch.randn(k + 1, d_out, r, generator=gen); B[k] = 0
        index = torch.randint(0, k + 1, (bt,), generator=gen); index[0] = k; index[-1] = 0
        ref = lora_mixed_delta_torch(x, A, B, index)
        out = lora_mixed_delta_triton(x, A, B, index, base_slot=k)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[0]) == 0  # the base row: exact zeros
    print("ok")
''')


def run_interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_multi_lora_kernel_matches_torch_under_the_interpreter():
    assert run_interpreted(MULTI_LORA).strip().endswith("ok")


NF4_DEQUANT = textwrap.dedent('''
    import torch
    from course_lib.kernels.nf4_dequant import nf4_dequantize_triton
    from course_lib.nf4 import NF4_CODE, dequantize_nf4_torch, quantize_nf4
    gen = torch.Generator().manual_seed(0)
    # block multiples, a tail block, an odd count (half a byte), other block sizes, several programs
    for shape, blocksize in [((64, 64), 64), ((33, 17), 64), ((5,), 64), ((300, 70), 128), ((3000,), 32)]:
        w = torch.randn(shape, generator=gen)
        packed, state = quantize_nf4(w, blocksize=blocksize)
        ref = dequantize_nf4_torch(packed, state.absmax, w.numel(), blocksize, torch.float32)
        out = nf4_dequantize_triton(packed, state.absmax, NF4_CODE, w.numel(), blocksize, torch.float32, block=64)
        assert torch.equal(out, ref), shape
        shaped = nf4_dequantize_triton(packed, state.absmax, NF4_CODE, w.shape, blocksize, torch.float32, block=64)
        assert shaped.shape == w.shape and torch.equal(shaped.reshape(-1), ref), shape
    print("ok")
''')


def test_nf4_dequant_kernel_is_bit_exact_with_torch_under_the_interpreter():
    """float32 output: the interpreter's cast to bf16 truncates instead of rounding (REFERENCE.md), so
    bf16 bit-exactness is checked on a real GPU by `course-bench nf4`."""
    assert run_interpreted(NF4_DEQUANT).strip().endswith("ok")
