"""Mixed-adapter LoRA for a batch: row b uses adapter ``index[b]`` — a gather + batched matmul.

    delta[b] = x[b] · A[index[b]]ᵀ · B[index[b]]ᵀ          A: (K, r, in), B: (K, out, r), scaling folded into B

In the spirit of Punica's BGMV / S-LoRA's kernels: one "shrink" kernel (in → r) and one "expand"
kernel (r → out), each program handling a tile of one row's tokens with that row's adapter, so
no row ever loops in Python and no adapter weight is copied per row. Rows whose index is
``base_slot`` (no adapter) are skipped. The torch fallback computes the same with a gathered einsum;
the Triton path runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import torch

try:  # triton is optional: the `gpu` extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def lora_mixed_delta_torch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference: x (Bt, T, in), A (K, r, in), B (K, out, r), index (Bt,) → (Bt, T, out)."""
    xa = torch.einsum("bti,bri->btr", x, A[index])  # (Bt, T, r)
    return torch.einsum("btr,bor->bto", xa, B[index])  # (Bt, T, out)


if triton is not None:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, idx_ptr, out_ptr, T, IN: tl.constexpr, R, base_slot,
                       stride_xb, stride_xt, stride_ak, stride_ar, stride_ob, stride_ot,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        k = tl.load(idx_ptr + b)
        if k == base_slot:
            return
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        # IN is a compile-time constant: a runtime loop bound trips Triton 3.6's interpreter on numpy 2.
        for k0 in range(0, IN, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + b * stride_xb + t[:, None] * stride_xt + kk[None, :],
                         mask=(t[:, None] < T) & (kk[None, :] < IN), other=0.0)  # (BLOCK_T, BLOCK_K)
            a = tl.load(a_ptr + k * stride_ak + rr[None, :] * stride_ar + kk[:, None],
                        mask=(rr[None, :] < R) & (kk[:, None] < IN), other=0.0)  # (BLOCK_K, BLOCK_R) = Aᵀ tile
            if IEEE:  # fp32 inputs: true fp32 products (the default would use TF32, ~1e-3 relative error)
                acc += tl.dot(xs, a, input_precision="ieee")
            else:
                acc += tl.dot(xs, a)
        tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ot + rr[None, :], acc,
                 mask=(t[:, None] < T) & (rr[None, :] < R))

    @triton.jit
    def _expand_kernel(xa_ptr, b_ptr, idx_ptr, y_ptr, T, OUT, R, base_slot,
                       stride_xab, stride_xat, stride_bk, stride_bo, stride_yb, stride_yt,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        k = tl.load(idx_ptr + b)
        if k == base_slot:
            return
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + b * stride_xab + t[:, None] * stride_xat + rr[None, :],
                     mask=(t[:, None] < T) & (rr[None, :] < R), other=0.0)  # (BLOCK_T, BLOCK_R) fp32
        w = tl.load(b_ptr + k * stride_bk + n[None, :] * stride_bo + rr[:, None],
                    mask=(n[None, :] < OUT) & (rr[:, None] < R), other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_N) = Bᵀ tile
        if IEEE:
            acc = tl.dot(xa, w, input_precision="ieee")
        else:
            acc = tl.dot(xa, w)
        tl.store(y_ptr + b * stride_yb + t[:, None] * stride_yt + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(t[:, None] < T) & (n[None, :] < OUT))


def lora_mixed_delta_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                            base_slot: int = -1) -> torch.Tensor:
    """Triton shrink + expand. Rows with ``index == base_slot`` get exact zeros."""
    if triton is None:
        raise RuntimeError("triton is not installed: `pip install -e .[gpu]`, or use lora_mixed_delta_torch")
    Bt, T, IN = x.shape
    K, R, _ = A.shape
    OUT = B.shape[1]
    x, A, B, index = x.contiguous(), A.contiguous(), B.contiguous(), index.contiguous()
    block_r = max(16, triton.next_power_of_2(R))
    block_t, block_k, block_n = 16, 32, 64
    ieee = x.dtype == torch.float32
    xa = torch.empty(Bt, T, R, device=x.device, dtype=torch.float32)
    y = torch.zeros(Bt, T, OUT, device=x.device, dtype=x.dtype)
    _shrink_kernel[(Bt, triton.cdiv(T, block_t))](
        x, A, index, xa, T, IN, R, base_slot, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        xa.stride(0), xa.stride(1), BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, IEEE=ieee)
    _expand_kernel[(Bt, triton.cdiv(T, block_t), triton.cdiv(OUT, block_n))](
        xa, B, index, y, T, OUT, R, base_slot, xa.stride(0), xa.stride(1), B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee)
    return y


def use_triton(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The kernel serves inference: it has no backward, so whenever autograd needs a gradient through
    the delta (training mixed batches) the differentiable einsum runs instead, on any device."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
    return triton is not None and x.is_cuda and not needs_grad


def lora_mixed_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                     base_slot: int) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the gathered einsum elsewhere. ``base_slot`` indexes a
    zero adapter (rows without one); the einsum path multiplies by it, the kernel skips those rows."""
    if use_triton(x, A, B):
        return lora_mixed_delta_triton(x, A, B, index, base_slot)
    return lora_mixed_delta_torch(x, A, B, index)
