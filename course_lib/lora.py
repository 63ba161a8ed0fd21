"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    h = W₀ x + s · B A dropout(x)          (paper eq. 3; A: (r, in), B: (out, r), s = α / r)

A starts like an ``nn.Linear`` weight (Kaiming-uniform, a = √5) and B at zero, so training starts
from the pretrained model exactly. rsLoRA (Kalajdzievski 2023) uses s = α / √r, which keeps the
update's scale stable as r grows.

DoRA (Liu et al. 2024, ``use_dora=True``) splits the weight into a magnitude and a direction and lets
LoRA move only the direction:

    W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_c        (paper eq. 5; m: (out,), trained)

‖·‖_c is the L2 norm of each output's weight row (the paper's "column-wise": it writes W as (in, out)),
and m starts at ‖W₀ + s·BA‖_c = ‖W₀‖_c, so W' = W₀ at the start. W' is never built: with the scale
g = m / ‖W₀ + s·BA‖_c, (out,), the layer adds to the base output W₀x + b

    (g − 1) ⊙ W₀x + g ⊙ s·BAx,   so   h = g ⊙ (W₀x + s·BAx) + b = W'x + b,

and the norm is a constant for the backward (paper §4.3: "treating ‖V + ΔV‖_c as a constant"), which
saves the memory its gradient would need.

The module's shape follows peft's ``tuners/lora``: layer · inject · merge · save, with the same
attribute and file key names, so adapters move between course_lib and peft unchanged
(tests/test_lora.py checks logits, initialisation and merged weights against peft; tests/test_dora.py
the same for DoRA, gradients included).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from . import adapters
from .adapters import (PEFT_PREFIX, AdapterLayer, copy_saved, find_targets, pattern_value,
                       read_peft_adapter, refuse_unknown_keys, refuse_unsupported, require_layers, require_modules,
                       write_peft_adapter)
from .kernels.multi_lora import lora_mixed_delta
from .nf4 import NF4Linear

BASE = "__base__"  # per-row adapter name meaning "no adapter" (peft's convention)


class LoRALinear(AdapterLayer):
    """``base_layer`` (a frozen ``nn.Linear``, any subclass of it such as bitsandbytes' ``Linear4bit``, or
    an ``NF4Linear``) plus any number of named LoRA adapters, one active (`course_lib.adapters`)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> (out,): DoRA's m, DoRA adapters only
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.row_adapters: list[str] | None = None  # set by `mixed_batch` for per-row serving
        # ‖W₀ + s·BA‖_c of a merged DoRA adapter, kept to unmerge it (the merged weight no longer tells W₀'s norms).
        self.merged_weight_norm: dict[str, torch.Tensor] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from super().adapter_parameters(name)  # A, B
        if name in self.lora_magnitude_vector:
            yield self.lora_magnitude_vector[name]

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    use_dora: bool = False) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or r > min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank r={r} must be an integer in 1..min(in, out) = "
                             f"{min(self.in_features, self.out_features)} for this layer "
                             f"({self.in_features} → {self.out_features})")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = _weight_like(self.base_layer)
        # Created in float32 on the CPU and drawn from the CPU generator in peft's order (nn.Linear
        # default init of A, then of B, then A re-initialised, B zeroed), so the same seed gives the
        # same adapter as peft on any device.
        A = torch.empty(r, self.in_features)
        B = torch.empty(self.out_features, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
        # Like peft (autocast_adapter_dtype=True), adapters of a 16-bit base are trained in float32:
        # their updates are small relative to their values, which bf16 would round away. peft first
        # casts the fresh weights to the base dtype and then back up, so the initial values are
        # bf16-rounded; doing the same keeps the two bit-identical.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        A, B = A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype)  # (r, in), (out, r)
        self.lora_A[name] = nn.Parameter(A.to(dtype))
        self.lora_B[name] = nn.Parameter(B.to(dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if use_dora:
            # m = ‖W₀ + s·BA‖_c, computed as peft does it: from A and B in the base dtype (in float32 for
            # float16, which some CPUs cannot multiply), then kept in the adapters' dtype.
            half = weight.dtype == torch.float16
            lora_weight = B.float() @ A.float() if half else B @ A  # (out, in)
            magnitude = dora_weight_norm(_dora_base_weight(self.base_layer, weight.dtype),
                                         lora_weight.half() if half else lora_weight, self.scaling[name])  # (out,)
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude.detach().to(dtype))
        # Like peft: the first adapter becomes the active one, and only the active adapter trains.
        self.set_adapter(self.active_adapter if self.active_adapter is not None else name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A, the (out, in) update this adapter adds to W₀."""
        return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        # F.linear (one GEMM on the flattened batch, with a fused backward) rather than `x @ A.T`.
        return nn.functional.linear(nn.functional.linear(x, A), B) * self.scaling[name]  # (..., in) → (..., r) → (..., out)

    def dora_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """What a DoRA adapter adds to the base output ``result`` = W₀x + b, (..., out):

            (g − 1) ⊙ W₀x + g ⊙ s·BAx,     g = m / ‖W₀ + s·BA‖_c   (paper eq. 5, the norm detached: §4.3)

        Without dropout (or in eval mode) W₀x is ``result`` less the bias, so the base layer runs once.
        With dropout training, peft applies it to both terms and recomputes W₀·dropout(x) (no bias),
        while the base output keeps the undropped x: h = W₀x + b + (g − 1) ⊙ W₀x̃ + g ⊙ s·BAx̃,
        x̃ = dropout(x). The same here, so that training with dropout matches peft too.
        """
        A, B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
        magnitude = self.lora_magnitude_vector[name]  # m, (out,)
        x = x.to(A.dtype)  # (..., in)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_result = result if bias is None else result - bias  # W₀x, (..., out)
        else:
            x = dropout(x)
            base_result = None
        # BA as peft builds it (B(A(I))ᵀ, and A(I) = Aᵀ exactly), without gradient: only the norm uses it.
        lora_weight = nn.functional.linear(A.detach().t().contiguous(), B.detach()).t().to(x.dtype)  # (out, in)
        weight = _dora_base_weight(self.base_layer, x.dtype).to(x.dtype)  # W₀, (out, in)
        weight_norm = dora_weight_norm(weight, lora_weight, scaling).detach()  # (out,), a constant (§4.3)
        scale = (magnitude / weight_norm).view(1, -1)  # g, (1, out)
        lora_result = nn.functional.linear(nn.functional.linear(x, A), B)  # BAx, (..., in) → (..., r) → (..., out)
        if base_result is None:
            base_result = nn.functional.linear(x, weight)  # W₀x̃, (..., out)
        return (scale - 1) * base_result + scale * lora_result * scaling  # (..., out)

    # The hand-written backward (`LoRAFunction`) is used wherever it applies; False runs the
    # module-by-module forward and lets autograd derive the backward (the reference it is tested against).
    fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.row_adapters is None and name is not None and name not in self.merged_adapters \
                and not self.is_dora(name) and self.fused and self._fusable(x, name):  # DoRA: the plain path
            return LoRAFunction.apply(x, self.lora_A[name], self.lora_B[name], self.base_layer, self.scaling[name])
        result = self.base_layer(x)  # (B, T, out)
        if self.row_adapters is not None:
            return result + mixed_lora_delta(self, x, self.row_adapters).to(result.dtype)
        if name is None or name in self.merged_adapters:
            return result
        # Add in the adapter's precision, then round once (as peft does): with a bf16 base and float32
        # adapters that is one rounding instead of two.
        if self.is_dora(name):
            return (result + self.dora_output(x, result, name)).to(result.dtype)
        return (result + self.lora_output(x, name)).to(result.dtype)

    def _fusable(self, x: torch.Tensor, name: str) -> bool:
        """LoRAFunction computes the base layer itself, so it is used only where that is provably what
        ``base_layer.forward`` does: an exact ``nn.Linear`` or ``NF4Linear`` (not a subclass with its own
        forward, such as bitsandbytes' ``Linear4bit``) with no hooks; and where its saved tensors stay
        valid: a frozen base, no active dropout, no autocast (which would change dtypes between passes)."""
        base, dropout = self.base_layer, self.lora_dropout[name]
        hooked = bool(base._forward_hooks or base._forward_pre_hooks or nn.modules.module._global_forward_hooks
                      or nn.modules.module._global_forward_pre_hooks)
        base_trains = any(p.requires_grad for p in base.parameters())
        return (type(base) in (nn.Linear, NF4Linear) and not hooked and not base_trains
                and (isinstance(dropout, nn.Identity) or not dropout.training)
                and not torch.is_autocast_enabled(x.device.type))

    def _mergeable(self) -> None:
        base = self.base_layer
        if isinstance(base, NF4Linear) or not base.weight.is_floating_point():
            raise RuntimeError(f"cannot merge LoRA into a 4-bit weight ({type(base).__name__}: the sum is not "
                               f"4-bit): serve the adapter separately, or merge into a dequantized copy of the model")

    def _merge(self, name: str) -> None:
        self._mergeable()
        weight = self.base_layer.weight
        dora_merged = [n for n in self.merged_adapters if self.is_dora(n)]
        if dora_merged or (self.is_dora(name) and self.merged_adapters):
            raise RuntimeError(f"cannot merge {name!r} while {self.merged_adapters[0]!r} is merged into this layer: a "
                               f"DoRA adapter rescales the whole weight, so it merges only alone (unmerge first)")
        if not self.is_dora(name):
            weight += self.delta_weight(name).to(weight.dtype)
            return
        # W ← m / ‖W₀ + s·BA‖_c ⊙ (W₀ + s·BA), row by row; the norm is kept to undo it (peft's merge).
        delta = self.delta_weight(name)  # (out, in)
        weight_norm = dora_weight_norm(weight, delta, 1).detach()  # (out,)
        self.merged_weight_norm[name] = weight_norm
        scale = (self.lora_magnitude_vector[name] / weight_norm).view(-1, 1)  # (out, 1)
        weight.copy_((scale * (weight + delta)).to(weight.dtype))

    def _unmerge(self, name: str) -> None:
        weight = self.base_layer.weight
        if not self.is_dora(name):
            weight -= self.delta_weight(name).to(weight.dtype)
            return
        # W₀ = W / (m / ‖W₀ + s·BA‖_c) − s·BA, with the norm recorded at merge time.
        scale = (self.lora_magnitude_vector[name] / self.merged_weight_norm.pop(name)).view(-1, 1)  # (out, 1)
        weight.copy_((weight / scale - self.delta_weight(name)).to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = {n: tuple(a.shape)[0] for n, a in self.lora_A.items()}
        dora = f", dora={list(self.lora_magnitude_vector)}" if self.lora_magnitude_vector else ""
        return f"adapters(rank)={ranks}{dora}, active={self.active_adapter!r}, merged={self.merged_adapters}"


def dora_weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W₀ + s·ΔW‖_c: the L2 norm of each output's row of the adapted weight, (out,) from (out, in)
    (peft's ``get_weight_norm``), in the dtype the sum is computed in."""
    weight = weight + scaling * lora_weight  # (out, in)
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)  # (out,)


def _dora_base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W₀ for DoRA's norms, (out, in): a float weight as it is, an NF4 weight dequantized to ``dtype``."""
    _require_dora_base(base)
    return _base_weight(base, dtype)


def _require_dora_base(base: nn.Module) -> None:
    if not (isinstance(base, NF4Linear) or base.weight.is_floating_point()):
        raise TypeError(f"use_dora=True needs the base weight's row norms, and {type(base).__name__} holds a packed "
                        f"4-bit weight course_lib does not dequantize: quantize with course_lib.nf4 (NF4Linear), "
                        f"use peft, or set use_dora=False")


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W₀ as a (out, in) matrix: the Linear's weight, or an NF4 layer's weight dequantized (again: QLoRA
    keeps only the 4-bit copy between forward and backward)."""
    return base.dequantized_weight(dtype) if isinstance(base, NF4Linear) else base.weight


class LoRAFunction(torch.autograd.Function):
    """y = W₀x + b + s·B(Ax) for a frozen base, with LoRA's backward written out (g = ∂L/∂y):

        ∂L/∂B = s·gᵀ h,    ∂L/∂A = (s·g B)ᵀ x,    ∂L/∂x = g W₀ + (s·g B) A,     h = A x

    The forward performs the module-by-module forward's operations in the same order and precision,
    so outputs are bit-identical to it (and to peft). The saving is in what is kept for the backward.
    With a bf16 base and float32 adapters autograd keeps, for every adapted layer, a float32 copy of
    the layer's input (∂L/∂A needs it; the frozen base itself needs nothing). Here the bf16 input is
    kept instead, cast again in the backward (one cheap elementwise pass): half the bytes, and one
    copy for all the layers that read the same input (q, k and v; gate and up). The final add and
    cast are also one kernel in each direction instead of three.
    """

    @staticmethod
    def forward(ctx, x, A, B, base, scaling):
        result = nn.functional.linear(x, _base_weight(base, x.dtype), base.bias)  # (..., out), x's dtype
        h = nn.functional.linear(x.to(A.dtype), A)  # (..., r), adapter dtype
        delta = nn.functional.linear(h, B).mul_(scaling)  # (..., out)
        torch.add(result, delta, out=result)  # summed in the adapter's precision, rounded once to x's dtype
        ctx.save_for_backward(x, A, B, h)
        ctx.base, ctx.scaling = base, scaling
        return result

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out) in x's dtype
        x, A, B, h = ctx.saved_tensors
        grad_delta = grad.to(A.dtype)  # (..., out): ∂L/∂(BAx) in the adapter's precision
        grad_delta = grad_delta.mul_(ctx.scaling) if grad_delta is not grad else grad_delta * ctx.scaling
        grad_h = grad_delta.matmul(B)  # (..., r)
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_A = grad_h.reshape(-1, grad_h.shape[-1]).t().mm(x.to(A.dtype).reshape(-1, x.shape[-1]))  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_B = grad_delta.reshape(-1, grad_delta.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))  # (out, r)
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(_base_weight(ctx.base, grad.dtype))  # (..., in) through the frozen base
            torch.add(grad_x, grad_h.matmul(A), out=grad_x)  # + the adapter's path, rounded once
        return grad_x, grad_A, grad_B, None, None


def _weight_like(base: nn.Module) -> torch.Tensor:
    """A tensor with the dtype the base layer computes in and its device. A quantized weight is packed
    bytes: NF4Linear computes in the dtype it was quantized from, bitsandbytes' Linear4bit in its
    ``compute_dtype`` (float32 when unset, as bitsandbytes does)."""
    if isinstance(base, NF4Linear):
        return torch.empty(0, dtype=base.weight_dtype, device=base.packed.device)
    if not base.weight.is_floating_point():
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        return torch.empty(0, dtype=dtype, device=base.weight.device)
    return base.weight


def mixed_lora_delta(layer: LoRALinear, x: torch.Tensor, row_adapters: list[str]) -> torch.Tensor:
    """The LoRA term for a batch whose rows use different adapters, in one gathered batched matmul.

    Adapters of different ranks are zero-padded to the largest rank (padding adds exact zeros), the
    scaling is folded into B, and each row gathers its own (A, B): no Python loop over rows
    (`course_lib.kernels.multi_lora`: a Triton kernel on CUDA, an einsum elsewhere).
    ``__base__`` rows use an all-zero slot, so they get a zero update.
    """
    if len(row_adapters) != x.shape[0]:
        raise ValueError(f"{len(row_adapters)} adapter names for a batch of {x.shape[0]} rows")
    names = list(layer.lora_A)  # an adapter that does not adapt this layer adds nothing here (as in peft)
    r_max = max(a.shape[0] for a in layer.lora_A.values())
    ref = layer.lora_A[names[0]]
    A_all = torch.zeros(len(names) + 1, r_max, layer.in_features, device=ref.device, dtype=ref.dtype)
    B_all = torch.zeros(len(names) + 1, layer.out_features, r_max, device=ref.device, dtype=ref.dtype)
    for k, name in enumerate(names):  # slot len(names) stays zero: the base model
        r = layer.lora_A[name].shape[0]
        A_all[k, :r] = layer.lora_A[name]
        B_all[k, :, :r] = layer.lora_B[name] * layer.scaling[name]
    index = torch.tensor([names.index(n) if n in layer.lora_A else len(names) for n in row_adapters], device=x.device)
    flat = x.to(ref.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in) whatever the middle dims
    delta = lora_mixed_delta(flat, A_all, B_all, index, base_slot=len(names))  # (B, T, out)
    return delta.reshape(*x.shape[:-1], layer.out_features)


# ------------------------------------------------------------------------------------------------
# Injection
# ------------------------------------------------------------------------------------------------
def add_lora(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
             alpha: float = 8, dropout: float = 0.0, rslora: bool = False, adapter_name: str = "default",
             freeze: bool = True, rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, use_dora: bool = False) -> list[str]:
    """Wrap the target linears in :class:`LoRALinear` (once) and add adapter ``adapter_name``.

    Freezes every non-adapter parameter (``freeze``). As in peft, the first adapter added becomes the
    active one and only the active adapter trains: after adding a second one, ``set_adapter`` picks
    which. ``rank_pattern`` / ``alpha_pattern`` give some layers another rank or alpha (peft's
    ``LoraConfig`` fields: keys are regular expressions matched against the end of the module name).
    ``use_dora`` makes it a DoRA adapter (a trained magnitude per output row, see the module docstring;
    peft's ``LoraConfig(use_dora=True)``). Returns the adapted module names. Defaults are peft's: r = 8,
    α = 8, and (``target_modules=None``) peft's targets for the architecture (q_proj and v_proj for Llama and Qwen2).
    """
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE:
        raise ValueError(f"adapter_name must be a non-empty string other than {BASE!r}, got {adapter_name!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number (the scale is alpha / r), got {alpha!r}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    names = find_targets(model, adapters.default_targets(model, "lora") if target_modules is None else target_modules)
    if use_dora:  # every layer checked before any is changed
        for name in names:
            layer = model.get_submodule(name)
            if isinstance(layer, (LoRALinear, nn.Linear, NF4Linear)):
                _require_dora_base(layer.base_layer if isinstance(layer, LoRALinear) else layer)
    if freeze:
        adapters.freeze_base(model)
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            if isinstance(layer, AdapterLayer):
                raise TypeError(f"{name} already holds a {type(layer).__name__} adapter; LoRA and it cannot be stacked "
                                f"on one layer here")
            layer = LoRALinear(layer)
            model.set_submodule(name, layer)
        layer.add_adapter(adapter_name, pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha),
                          dropout, rslora, use_dora)
    model._lora_config = getattr(model, "_lora_config", {})
    model._lora_config[adapter_name] = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
                                        "use_dora": use_dora,
                                        "target_modules": sorted({n.split(".")[-1] for n in names}),
                                        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    yield from adapters.adapter_layers(model, LoRALinear)


def _require_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return require_layers(model, LoRALinear, "LoRA", "add_lora")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter everywhere and the only one that trains (peft's ``set_adapter``);
    None runs the base model."""
    adapters.set_adapter(_require_layers(model), name)


def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` runs the base model (every LoRA layer bypassed), as peft's
    ``disable_adapter()``: the frozen reference of DPO, PPO and GRPO without a second copy of the weights.
    The active adapter comes back afterwards; what trains is not changed."""
    return adapters.disable_adapters(_require_layers(model))


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """W₀ ← W₀ + s·BA in every adapted layer (DoRA: W₀ ← m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_c): afterwards
    inference costs what the base model costs."""
    for _, layer in _require_layers(model):
        layer.merge(name)


def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    for _, layer in _require_layers(model):
        layer.unmerge(name)


@contextlib.contextmanager
def autograd_backward():
    """Within the block LoRA layers run module by module and autograd derives the backward: the
    reference ``LoRAFunction`` is tested and benchmarked against."""
    LoRALinear.fused = False
    try:
        yield
    finally:
        LoRALinear.fused = True


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]):
    """Serve a batch whose row i uses adapter ``adapter_names[i]`` (``"__base__"`` for none)."""
    layers = _require_layers(model)
    known = {name for _, layer in layers for name in layer.lora_A}
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {sorted(known)} (or {BASE!r} for none)")
    dora = sorted({n for _, layer in layers for n in set(adapter_names) if layer.is_dora(n)})
    if dora:  # as in peft: the per-row kernel computes plain LoRA only
        raise ValueError(f"mixed batches serve plain LoRA adapters, and {dora} use DoRA: run their rows in a batch of "
                         f"their own after set_adapter(model, name)")
    for _, layer in layers:
        if layer.merged_adapters:
            raise RuntimeError("unmerge the adapters before serving mixed batches (merged weights are shared by all rows)")
        layer.row_adapters = list(adapter_names)
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.row_adapters = None


# ------------------------------------------------------------------------------------------------
# peft-format save / load
# ------------------------------------------------------------------------------------------------
# The LoraConfig fields course_lib computes (None: any value), and the features it refuses unless off.
SUPPORTED_CONFIG = {
    "r": None, "lora_alpha": None, "lora_dropout": None, "use_rslora": None, "target_modules": None,
    "rank_pattern": None, "alpha_pattern": None, "init_lora_weights": None, "layers_pattern": None,
    "layers_to_transform": None, "exclude_modules": None, "megatron_core": None, "qalora_group_size": None,
    "ensure_weight_tying": None, "loftq_config": False,
    "use_dora": None,
    "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": False,
}
SAVED_KEY = rf"{PEFT_PREFIX.replace('.', chr(92) + '.')}(.+)\.lora_[AB]\.weight"
DORA_SAVED_KEY = rf"{PEFT_PREFIX.replace('.', chr(92) + '.')}(.+)\.(lora_[AB]\.weight|lora_magnitude_vector)"


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's key names: ``base_model.model.<module path>.lora_A.weight`` (adapter name dropped), and for
    DoRA ``….lora_magnitude_vector`` (no ``.weight``: peft saves it so)."""
    out = {}
    for name, layer in _require_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().contiguous()
            if layer.is_dora(adapter_name):
                magnitude = layer.lora_magnitude_vector[adapter_name]
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().contiguous()
    if not out:
        raise KeyError(f"no adapter named {adapter_name!r} in the model")
    return out


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads."""
    config = getattr(model, "_lora_config", {}).get(adapter_name)
    if config is None:
        raise KeyError(f"no adapter named {adapter_name!r} was added with add_lora")
    return write_peft_adapter(directory, model, {
        "peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, **config},
        lora_state_dict(model, adapter_name))


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> list[str]:
    """Add the adapter saved in ``directory`` (by course_lib or peft) to ``model``; returns the adapted layers.

    A config that asks for what course_lib does not compute (LoRA biases, trained biases,
    modules_to_save, …) or a file with tensors it does not know is refused, never loaded half-right;
    ``rank_pattern``, ``alpha_pattern`` and ``use_dora`` (the magnitudes loaded too) are honoured."""
    config, tensors = read_peft_adapter(directory, ["LORA"])
    refuse_unsupported(config, SUPPORTED_CONFIG, directory, "LoRA")
    use_dora = bool(config.get("use_dora"))
    refuse_unknown_keys(tensors, DORA_SAVED_KEY if use_dora else SAVED_KEY, directory, "LoRA")
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    require_modules(model, modules, directory)
    parts = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if use_dora else [])
    absent = [f"{m}.{part}" for m in modules for part in parts if f"{PEFT_PREFIX}{m}.{part}" not in tensors]
    if absent:
        raise ValueError(f"the adapter in {directory} is incomplete: it holds no {absent[:3]}"
                         f"{' (a DoRA adapter saves a magnitude per layer)' if use_dora else ''}")
    names = add_lora(model, modules, r=config["r"], alpha=config["lora_alpha"],
                     dropout=config.get("lora_dropout") or 0.0, rslora=bool(config.get("use_rslora")),
                     adapter_name=adapter_name, rank_pattern=config.get("rank_pattern") or None,
                     alpha_pattern=config.get("alpha_pattern") or None, use_dora=use_dora)
    model._lora_config[adapter_name]["target_modules"] = config.get("target_modules") or model._lora_config[adapter_name]["target_modules"]
    for name in names:
        layer: LoRALinear = model.get_submodule(name)
        for part in parts:
            attr = part.removesuffix(".weight")
            copy_saved(getattr(layer, attr)[adapter_name], tensors[f"{PEFT_PREFIX}{name}.{part}"], f"{name}.{attr}")
    return names
