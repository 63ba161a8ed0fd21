"""``course-bench nf4``: NF4 dequantization, course_lib vs bitsandbytes."""

from __future__ import annotations

import argparse

import torch

from .device import bench_device, device_name, synchronizer
from .timing import alternate


def bench_nf4(args: argparse.Namespace) -> dict:
    """NF4 dequantization throughput: course_lib (Triton on CUDA, torch on CPU) vs bitsandbytes, and a
    plain bf16 copy of the same tensor as the bandwidth ceiling. Outputs are compared bit for bit.

    Like with like: both sides dequantize the very same packed bytes and absmax values (bitsandbytes'
    own quantization of the tensor) to bf16, blocksize 64; library defaults are these settings, so
    there is no separate defaults row."""
    import bitsandbytes.functional as bnbf

    from ..nf4 import dequantize_nf4, quantize_nf4

    device = bench_device(args)
    cuda = device.type == "cuda"
    sync = synchronizer(device)
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    rows = []
    print(f"nf4 dequant · {device_name(device)} · bf16 output, blocksize 64")
    for shape in shapes:
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).to(device)
        their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4")
        packed, state = quantize_nf4(w)
        same_quantization = torch.equal(packed, their_packed) and torch.equal(state.absmax, their_state.absmax)
        packed, state.absmax = their_packed, their_state.absmax  # dequantize the very same bytes
        exact = torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(their_packed, their_state))
        n = w.numel()
        moved = n // 2 + state.absmax.numel() * 4 + n * 2  # bytes read + written by a dequantization
        inner = 20 if cuda else 1  # GPU calls take tens of µs: time 20 back to back, not one plus a sync

        def many(fn):
            def run():
                for _ in range(inner):
                    fn()
            return run
        t_ours, t_bnb = alternate(many(lambda: dequantize_nf4(packed, state)),
                                  many(lambda: bnbf.dequantize_4bit(their_packed, their_state)),
                                  repeats=args.repeats, sync=sync)
        t_copy, _ = alternate(many(lambda: w.clone()), lambda: None, repeats=args.repeats, sync=sync)
        t_ours, t_bnb, t_copy = t_ours / inner, t_bnb / inner, t_copy / inner
        row = {"shape": list(shape), "us": [t_ours * 1e6, t_bnb * 1e6], "ours_GBps": moved / t_ours / 1e9, "bnb_GBps": moved / t_bnb / 1e9,
               "copy_GBps": 2 * n * 2 / t_copy / 1e9, "ratio_to_bnb": t_bnb / t_ours, "bit_exact": exact,
               "same_quantization": same_quantization}
        row["share_of_copy"] = row["ours_GBps"] / row["copy_GBps"]
        print(f"  {shape[0]:5d}×{shape[1]:<5d} course_lib {row['ours_GBps']:7.1f} GB/s   bitsandbytes {row['bnb_GBps']:7.1f} GB/s"
              f"   ({row['ratio_to_bnb']:.2f}× bnb's throughput)   bf16 copy {row['copy_GBps']:7.1f} GB/s"
              f" ({row['share_of_copy']:.0%} of it)   dequant bit-exact {exact} · quantize bit-exact {same_quantization}")

        # Double quantization: the absmax values themselves in 8 bits (bnb's compress_statistics).
        dq_packed, dq_state = quantize_nf4(w, double_quant=True)
        their_packed, their_state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        agree = (dq_state.absmax == their_state.absmax).float().mean().item()  # 8-bit absmax indices
        dq_same = (torch.equal(dq_packed, their_packed) and torch.equal(dq_state.offset, their_state.offset)
                   and torch.equal(dq_state.absmax_scale, their_state.state2.absmax))
        dq_state.absmax = their_state.absmax  # dequantize the very same bytes
        dq_exact = torch.equal(dequantize_nf4(dq_packed, dq_state), bnbf.dequantize_4bit(their_packed, their_state))
        t_ours, t_bnb = alternate(many(lambda: dequantize_nf4(dq_packed, dq_state)),
                                  many(lambda: bnbf.dequantize_4bit(their_packed, their_state)),
                                  repeats=args.repeats, sync=sync)
        row.update(dq_ratio_to_bnb=t_bnb / t_ours, dq_us=[t_ours / inner * 1e6, t_bnb / inner * 1e6],
                   dq_bit_exact=dq_exact, dq_same_except_absmax=dq_same, dq_absmax_index_agreement=agree)
        print(f"              double quant: course_lib {row['dq_us'][0]:7.1f} µs   bitsandbytes {row['dq_us'][1]:7.1f} µs"
              f"   ({row['dq_ratio_to_bnb']:.2f}× bnb's throughput)   dequant bit-exact {dq_exact} · 4-bit data, offset"
              f" and scales equal {dq_same} · 8-bit absmax indices equal {agree:.2%}")
        rows.append(row)
    same = "the same packed NF4 bytes and absmax (bitsandbytes' quantization) → bf16, blocksize 64"
    return {"device": device_name(device), "settings": {"course_lib": same, "bitsandbytes": same}, "rows": rows}
