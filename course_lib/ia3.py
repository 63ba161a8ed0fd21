"""IA3 (Liu et al. 2022, "(IA)³"): learned vectors that rescale activations of a frozen model.

    attention keys/values:  k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x)         (output scaling, l: (out,))
    feed-forward:           h = W_down (l_ff ⊙ a)                          (input scaling,  l: (in,))

Every vector starts at ones, so training starts from the pretrained model. Because a rescaling is
linear it folds into the weight: ``W ← W · diag(l)`` or ``diag(l) · W`` (and ``b ← l ⊙ b`` for output
scaling), after which inference costs exactly what the base model costs.

Same shape as ``course_lib.lora`` and peft's ``tuners/ia3``: layer · inject · merge · save, with
peft's parameter names (``ia3_l``) and file keys; tests/test_ia3.py checks logits, merged weights and
files against peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import adapters
from .adapters import (PEFT_PREFIX, AdapterLayer, copy_saved, find_targets, matches, read_peft_adapter, refuse_unknown_keys,
                       refuse_unsupported, require_layers, require_modules, write_peft_adapter)



class IA3Linear(AdapterLayer):
    """``base_layer`` (frozen ``nn.Linear``) plus named IA3 vectors; one active at a time (`course_lib.adapters`)."""

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool):
        if not isinstance(base_layer, nn.Linear) or not base_layer.weight.is_floating_point():
            raise TypeError(f"IA3Linear wraps a floating-point nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward  # True: scale the input; False: scale the output
        self.ia3_l = nn.ParameterDict()  # name -> (1, in) if feed-forward else (out, 1), like peft

    def add_adapter(self, name: str) -> None:
        if name in self.ia3_l:
            raise ValueError(f"IA3 adapter {name!r} already exists on this layer")
        shape = (1, self.base_layer.in_features) if self.is_feedforward else (self.base_layer.out_features, 1)
        # Float32 ones, like peft's (its randn-then-fill also consumes the RNG, so do the same).
        vector = torch.randn(shape)
        nn.init.constant_(vector, 1.0)
        self.ia3_l[name] = nn.Parameter(vector.to(self.base_layer.weight.device))
        # Like peft: the first adapter becomes the active one, and only the active adapter trains.
        self.set_adapter(self.active_adapter if self.active_adapter is not None else name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self.base_layer(x)
        scale = self.ia3_l[name].flatten()  # (in,) or (out,)
        if self.is_feedforward:
            # scale in the vector's precision, then back to the input's, as peft does
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # (..., in) → (..., out)
        result = self.base_layer(x)  # (..., out)
        return (result * scale).to(result.dtype)

    def _merge(self, name: str) -> None:
        """W ← W ⊙ l (broadcast over columns for input scaling, rows for output scaling); bias too for
        output scaling — the input-side vector never touches the bias."""
        weight, vector = self.base_layer.weight, self.ia3_l[name]
        weight.data = (weight.data * vector.data).to(weight.dtype)  # (out, in) ⊙ (1, in) or (out, 1)
        if not self.is_feedforward and self.base_layer.bias is not None:
            bias = self.base_layer.bias
            bias.data = (bias.data * vector.data.reshape(bias.shape)).to(bias.dtype)

    def _unmerge(self, name: str) -> None:
        """Divide back out (peft adds 1e-8 to avoid dividing by zero, so this is not bit-exact)."""
        weight, vector = self.base_layer.weight, self.ia3_l[name].data + 1e-8
        weight.data = (weight.data / vector).to(weight.dtype)
        if not self.is_feedforward and self.base_layer.bias is not None:
            bias = self.base_layer.bias
            bias.data = (bias.data / vector.reshape(bias.shape)).to(bias.dtype)

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, adapters={list(self.ia3_l)}, active={self.active_adapter!r}, merged={self.merged_adapters}"


def add_ia3(model: nn.Module, target_modules: str | Iterable[str] | None = None,
            feedforward_modules: str | Iterable[str] | None = None, adapter_name: str = "default",
            freeze: bool = True) -> list[str]:
    """Wrap the target linears in :class:`IA3Linear` (once) and add vectors ``adapter_name`` (ones).

    ``feedforward_modules`` (a subset of the targets, by the same exact-or-suffix rule) scale their
    input; the others their output. ``None`` (both): peft's defaults for the architecture (Llama: k_proj,
    v_proj and down_proj, down_proj scaling its input).
    Returns the adapted module names."""
    if target_modules is None:
        target_modules = adapters.default_targets(model, "ia3")
    names = find_targets(model, target_modules)
    if feedforward_modules is None:
        feedforward_modules = [f for f in adapters.default_targets(model, "ia3_feedforward")
                               if any(matches(n, f) for n in names)]
    ff = [feedforward_modules] if isinstance(feedforward_modules, str) else list(feedforward_modules)
    stray = [f for f in ff if not any(matches(n, f) for n in names)]
    if stray:
        raise ValueError(f"feedforward_modules {stray} are not among the target modules "
                         f"{sorted({n.split('.')[-1] for n in names})}: a feed-forward module must also be a target")
    if freeze:  # the base model; vectors added earlier keep their state
        adapters.freeze_base(model)
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, IA3Linear):
            if isinstance(layer, AdapterLayer) or not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} is a {type(layer).__name__}; IA3 here adapts plain nn.Linear layers")
            layer = IA3Linear(layer, is_feedforward=any(matches(name, f) for f in ff))
            model.set_submodule(name, layer)
        layer.add_adapter(adapter_name)
    model._ia3_config = getattr(model, "_ia3_config", {})
    model._ia3_config[adapter_name] = {
        "target_modules": sorted({n.split(".")[-1] for n in names}),
        "feedforward_modules": sorted({n.split(".")[-1] for n in names if model.get_submodule(n).is_feedforward})}
    return names


def _require_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return require_layers(model, IA3Linear, "IA3", "add_ia3")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active IA3 vectors everywhere (None: the base model) and the only trainable ones.
    Switching tasks is this one call: the frozen weights are shared, only a few thousand numbers change."""
    adapters.set_adapter(_require_layers(model), name, "IA3")


def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` runs the base model; the active vectors come back afterwards."""
    return adapters.disable_adapters(_require_layers(model))


def merge_ia3(model: nn.Module, name: str | None = None) -> None:
    for _, layer in _require_layers(model):
        layer.merge(name)


def unmerge_ia3(model: nn.Module, name: str | None = None) -> None:
    for _, layer in _require_layers(model):
        layer.unmerge(name)


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold ``name`` (None: each layer's active vectors) into the weights and put each layer's plain base
    ``nn.Linear`` back in place of its :class:`IA3Linear` (peft's ``merge_and_unload``). The result is
    the base architecture with other weights: same modules, same parameter count, the same forward code
    — so it costs exactly what the base model costs. The other adapters' vectors are dropped with their
    wrappers. Returns ``model`` (changed in place)."""
    for layer_name, layer in _require_layers(model):
        if (name or layer.active_adapter) not in layer.merged_adapters:  # merge unless already merged
            layer.merge(name)
        model.set_submodule(layer_name, layer.base_layer)
    if hasattr(model, "_ia3_config"):
        del model._ia3_config
    return model


def ia3_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's key names: ``base_model.model.<module path>.ia3_l`` (adapter name dropped)."""
    out = {f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name].detach().contiguous()
           for name, layer in _require_layers(model) if adapter_name in layer.ia3_l}
    if not out:
        raise KeyError(f"no IA3 adapter named {adapter_name!r} in the model")
    return out


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads."""
    config = getattr(model, "_ia3_config", {}).get(adapter_name)
    if config is None:
        raise KeyError(f"no IA3 adapter named {adapter_name!r} was added with add_ia3")
    return write_peft_adapter(directory, model, {"peft_type": "IA3", "fan_in_fan_out": False, "init_ia3_weights": True,
                                                 **config}, ia3_state_dict(model, adapter_name))


# The IA3Config fields course_lib computes (None: any value), and the features it refuses unless off.
SUPPORTED_CONFIG = {"target_modules": None, "feedforward_modules": None, "init_ia3_weights": None,
                    "exclude_modules": None, "fan_in_fan_out": False, "modules_to_save": False}


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> list[str]:
    """Add the IA3 adapter saved in ``directory`` (by course_lib or peft) to ``model``."""
    config, tensors = read_peft_adapter(directory, ["IA3"])
    refuse_unsupported(config, SUPPORTED_CONFIG, directory, "IA3")
    refuse_unknown_keys(tensors, r"base_model\.model\.(.+)\.ia3_l", directory, "IA3")
    modules = sorted(k[len(PEFT_PREFIX):].removesuffix(".ia3_l") for k in tensors)
    require_modules(model, modules, directory)
    ff_suffixes = set(config.get("feedforward_modules") or [])
    ff = [m for m in modules if m.split(".")[-1] in ff_suffixes]
    names = add_ia3(model, modules, ff, adapter_name=adapter_name)
    for name in names:
        copy_saved(model.get_submodule(name).ia3_l[adapter_name], tensors[f"{PEFT_PREFIX}{name}.ia3_l"], f"{name}.ia3_l")
    return names
