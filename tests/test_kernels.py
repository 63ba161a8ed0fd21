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
