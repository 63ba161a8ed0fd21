"""NF4: 4-bit NormalFloat quantization (Dettmers et al. 2023, QLoRA §3), bit-exact with bitsandbytes.

Pretrained weights are roughly normal, so NF4 puts its 16 levels at quantiles of N(0, 1), scaled to
[−1, 1]: equal probability mass per level. It is asymmetric — 8 positive levels, 7 negative and an
exact zero — so that 0 is representable. A weight tensor is cut into blocks of 64; each block is
scaled by its absolute maximum (kept in float32), every scaled value is replaced by the index of the
nearest level, and two 4-bit indices share a byte (the first element in the high nibble):

    q_i = argmin_j |w_i / absmax_b − c_j|,        ŵ_i = c_{q_i} · absmax_b

Double quantization (QLoRA §3) stores the absmax values themselves in 8 bits: subtract their mean,
then blockwise 8-bit quantization (blocks of 256) with bitsandbytes' signed dynamic map.

tests/test_nf4.py compares codes, packed bytes, absmax and dequantized values with
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# δ = 1 − ½(1/30 + 1/32) = 0.96770833…: the outermost quantiles of the positive and negative halves are
# placed symmetrically. QLoRA's code (and bitsandbytes' table) uses it rounded to 7 digits; with the
# unrounded value the levels differ from bitsandbytes' by up to 3e-7.
NF4_OFFSET = 0.9677083


def build_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, ascending: 8 positive quantiles Φ⁻¹(linspace(δ, ½, 9)[:-1]), 7 negative
    −Φ⁻¹(linspace(δ, ½, 8)[:-1]) and 0, divided by the largest (so the ends are exactly ±1)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # linspace in float32, then the quantile function in float64: the order of roundings bitsandbytes used
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return levels / levels.max()


NF4_CODE: torch.Tensor = build_nf4_code()  # (16,) float32
NF4_BOUNDS: torch.Tensor = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) midpoints: ties go to the lower level


def build_dynamic_map(total_bits: int = 8, max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers 2015): per exponent 10^-k a linear fraction
    grid, both signs, plus 0 and 1 — 256 values in [−1, 1], fine near 0, coarse near ±1; ascending
    (the stored byte is the index into this sorted list)."""
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic map has {len(data)} values, expected {2 ** total_bits}")
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP: torch.Tensor = build_dynamic_map()  # (256,) float32


@dataclass
class NF4State:
    """What dequantization needs. Without double quantization ``absmax`` is float32 (one per block);
    with it, ``absmax`` is uint8 indices into ``DYNAMIC_MAP`` and ``absmax_scale`` (one float32 per 256
    blocks) and ``offset`` undo the second quantization."""
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    double_quant: bool = False
    absmax_scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    absmax_blocksize: int = 256

    def __post_init__(self):
        self.shape = torch.Size(self.shape)  # a tuple or list is accepted; numel() is then always there

    @property
    def bits_per_parameter(self) -> float:
        """Storage per weight: 4 bits plus the scales, amortised over their blocks."""
        n = self.shape.numel()
        scale_bits = self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            scale_bits += self.absmax_scale.numel() * 32 + 32  # second-level scales and the offset
        return 4 + scale_bits / n


def _check_input(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"NF4 quantizes float tensors (float32, float16, bfloat16), got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two ≥ 2 (bitsandbytes allows 32 … 4096), got {blocksize}")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"the tensor holds {bad} NaN/inf value(s); NF4 would silently turn a block into "
                         f"garbage — fix the weights first")


def _blockwise_absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, values scaled into [−1, 1]) — full blocks multiply by the float32 reciprocal,
    a last partial block divides (bitsandbytes does exactly this)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1).values  # (n_blocks,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``w`` to packed NF4: returns (uint8 tensor of shape (ceil(n/2), 1), state)."""
    _check_input(w, blocksize)
    flat = w.detach().reshape(-1).float()  # (n,)
    absmax, scaled = _blockwise_absmax_scale(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = torch.bucketize(scaled, _on_device(NF4_BOUNDS, scaled.device)).to(torch.uint8)  # nearest level, ties low
    packed = ((index[0::2] << 4) | index[1::2]).unsqueeze(1)  # first element in the high nibble
    state = NF4State(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=absmax)
    if double_quant:
        offset = absmax.mean()
        q, scale = quantize_blockwise_8bit(absmax - offset, 256)
        state = NF4State(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=q, double_quant=True,
                         absmax_scale=scale, offset=offset)
    return packed, state


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling, then the nearest value of the dynamic map: (uint8 indices, absmax).

    Nearest rounding; bitsandbytes' CPU kernel instead looks the value up in a 65 536-entry table, which
    picks a neighbouring index for a small share of values (tests/test_nf4.py measures how many)."""
    _check_input(x, blocksize)
    absmax, scaled = _blockwise_absmax_scale(x.reshape(-1).float(), blocksize)
    levels = _on_device(DYNAMIC_MAP, scaled.device)  # ascending
    right = torch.searchsorted(levels, scaled).clamp(1, len(levels) - 1)
    left = right - 1
    nearest = torch.where((scaled - levels[left]).abs() <= (levels[right] - scaled).abs(), left, right)
    return nearest.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    values = _on_device(DYNAMIC_MAP, q.device).index_select(0, q.reshape(-1).int())  # (n,) float32
    n = values.numel()
    per_element = absmax.repeat_interleave(blocksize)[:n]
    return values * per_element


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """ŵ = c[q] · absmax(block), computed in float32 and cast to the original dtype and shape."""
    if not isinstance(state, NF4State):
        raise TypeError("dequantize_nf4 needs the NF4State that quantize_nf4 returned with this tensor")
    n = state.shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed tensor does not match its state: {packed.numel()} bytes of {packed.dtype} for "
                         f"{n} values (expected {(n + 1) // 2} uint8) — was it quantized with another state?")
    absmax = _block_scales(state)
    blocks = -(-n // state.blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"the state holds {absmax.numel()} block scales; {n} values in blocks of "
                         f"{state.blocksize} need {blocks}")
    return _dequantize(packed, absmax, state.shape, state.blocksize, state.dtype)


def _block_scales(state: NF4State) -> torch.Tensor:
    """One float32 absmax per block (undoing the double quantization if there is one)."""
    if state.double_quant:
        return dequantize_blockwise_8bit(state.absmax, state.absmax_scale, state.absmax_blocksize) + state.offset
    return state.absmax


def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The checked-elsewhere core: the Triton kernel for CUDA tensors, the torch path otherwise. On a
    GPU a 4096 × 4096 dequantization takes ~10 µs, as long as the Python around the launch, so this
    path does no more than it must: no re-checks, no reshapes, no host-to-device copies."""
    if packed.is_cuda and blocksize % 2 == 0 and (launch := _triton_launcher()) is not None:
        return launch(packed, absmax, _on_device(NF4_CODE, packed.device), shape, blocksize, dtype)
    return dequantize_nf4_torch(packed, absmax, shape.numel(), blocksize, dtype).reshape(shape)


_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A constant table (NF4_CODE, DYNAMIC_MAP) on ``device``, copied once: a host-to-device copy per
    call would cost more than the dequantization of a small matrix."""
    key = (id(table), device)
    copy = _ON_DEVICE.get(key)
    if copy is None:
        copy = _ON_DEVICE[key] = table.to(device)
    return copy


@functools.cache
def _triton_launcher():
    """``nf4_dequantize_triton``, imported on first use (None where triton is not installed)."""
    from .kernels import nf4_dequant

    return nf4_dequant.nf4_dequantize_triton if nf4_dequant.triton is not None else None


_PAIR_TABLE = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1)  # (256, 2): byte → (hi, lo)


def dequantize_nf4_torch(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                         dtype: torch.dtype, chunk_bytes: int = 1 << 18) -> torch.Tensor:
    """The reference path: ŵ = c[q] · absmax in float32, rounded once to ``dtype``. Returns (n,).

    One lookup per *byte* in a 256 × 2 table gives both weights of the pair at once (no shifts, no
    masks), and the work runs in chunks of 256 KiB of packed bytes (2 MiB of float32 intermediates):
    small enough to stay in cache, large enough that the Python loop costs little. On the two-core
    reference machine, 16 KiB chunks ran at 0.3× bitsandbytes' CPU throughput, 256 KiB at 0.65×, the
    whole tensor at once at 0.25× (2026-11-26, 4096 × 4096 and 4096 × 14336 bf16).
    """
    flat = packed.reshape(-1)
    table, absmax = _on_device(_PAIR_TABLE, flat.device), absmax.float()
    out = torch.empty(n, dtype=dtype, device=flat.device)
    full = n - n % blocksize  # values in whole blocks (an even count)
    full_bytes, step = full // 2, max(chunk_bytes - chunk_bytes % (blocksize // 2), blocksize // 2)
    for start in range(0, full_bytes, step):
        stop = min(start + step, full_bytes)
        values = table.index_select(0, flat[start:stop].int()).view(-1, blocksize)  # (blocks, blocksize)
        scale = absmax[2 * start // blocksize:2 * stop // blocksize].view(-1, 1)
        torch.mul(values, scale, out=out[2 * start:2 * stop].view(-1, blocksize))  # float32 product, one rounding
    if full < n:  # the last, partial block
        values = table.index_select(0, flat[full_bytes:].int()).view(-1)[:n - full]
        out[full:] = (values * absmax[-1]).to(dtype)
    return out


# ------------------------------------------------------------------------------------------------
# A 4-bit linear layer, a quantized model, QLoRA
# ------------------------------------------------------------------------------------------------
class _NF4LinearFunction(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ dequantized on the fly. Backward dequantizes again instead of keeping Ŵ from
    the forward pass — the point of QLoRA's memory saving. The 4-bit weight is frozen (no gradient); the
    bias gets one if it trains."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        weight = layer.dequantized_weight(x.dtype)  # (out, in)
        ctx.layer = layer
        # The bias is kept in its own precision and used in the input's, as bitsandbytes' Linear4bit does.
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantized_weight(grad_output.dtype)  # (out, in)
            grad_x = grad_output @ weight  # (..., out) @ (out, in) → (..., in)
        if ctx.needs_input_grad[2]:
            bias = ctx.layer.bias
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)  # (out,)
        return grad_x, None, grad_bias


class NF4Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` stored as packed NF4 (4.5 or ~4.127 bits per weight); computes in the
    input's dtype. Bias, if any, stays in full precision (frozen)."""

    def __init__(self, linear: torch.nn.Linear, blocksize: int = 64, double_quant: bool = False):
        super().__init__()
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"NF4Linear quantizes an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, state = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_scale", state.absmax_scale if double_quant else None)
        self.register_buffer("offset", state.offset.view(1) if double_quant else None)
        self.weight_dtype, self.blocksize, self.double_quant = linear.weight.dtype, blocksize, double_quant
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def state(self) -> NF4State:
        return NF4State(shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                        blocksize=self.blocksize, absmax=self.absmax, double_quant=self.double_quant,
                        absmax_scale=self.absmax_scale, offset=None if self.offset is None else self.offset[0])

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) in ``dtype``. Runs twice per training step, so it skips dequantize_nf4's checks:
        the buffers were made consistent by the constructor."""
        absmax = self.absmax if not self.double_quant else _block_scales(self.state)
        weight = _dequantize(self.packed, absmax, torch.Size((self.out_features, self.in_features)), self.blocksize,
                             self.weight_dtype)
        return weight if dtype is None else weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4LinearFunction.apply(x, self, self.bias)

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` must move the quantization state, never round it: the block scales
        are float32 in bitsandbytes' format, and a bf16 absmax would dequantize to other weights. So the
        float buffers follow the device change and keep their dtype."""
        kept = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {self.blocksize}"
                f"{' + double quant' if self.double_quant else ''}")


def quantize_model(model: torch.nn.Module, *, blocksize: int = 64, double_quant: bool = False,
                   skip_output_head: bool = True) -> list[str]:
    """Replace every ``nn.Linear`` (but the output head) by :class:`NF4Linear`, in place; embeddings and
    norms stay as they are (QLoRA does the same). Returns the quantized module names."""
    head = model.get_output_embeddings() if skip_output_head and hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if not names:
        raise ValueError("the model has no nn.Linear layers to quantize")
    for name in names:
        model.set_submodule(name, NF4Linear(model.get_submodule(name), blocksize=blocksize, double_quant=double_quant))
    return names


def bitsandbytes_reference_path(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` in ``model`` on its reference NF4 path on CPU; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight the first time the layer
    runs in eval mode on an input without gradient, and from then on multiplies through a bf16 kernel:
    outputs move by ~1e-2 from the NF4 definition (dequantize, then an fp32 matmul), and the layer can no
    longer train — its next forward with gradients fails inside bitsandbytes ("a view of a leaf Variable
    that requires grad is being used in an in-place operation", the bias added in place). An evaluation
    before QLoRA training, as every lesson does, triggers both. Switching the repacking off keeps the
    layer on the path the course compares against, on every CPU; GPUs are not affected."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # read in Linear4bit.forward before repacking
    return len(layers)
