"""What every module-injecting adapter (LoRA, IA3) shares, once: target matching, the adapter layer's
bookkeeping (which adapter is active, which ones train, which are merged), switching adapters on the
whole model, and peft's file format with strict validation.

The shape is peft's ``tuners/tuners_utils.py`` (``BaseTunerLayer``) and ``utils/save_and_load.py``:
a technique module (``lora``, ``ia3``) only says what its layer computes, how its weights fold into
the base weight, and which config fields it understands.

The semantics are peft's, so the two can be mixed freely:

* ``set_adapter(model, name)`` makes ``name`` active **and the only adapter that trains** (peft's
  ``set_adapter``); ``None`` runs the base model and trains nothing.
* ``disable_adapters(model)`` is a block that runs the base model and restores everything after
  (peft's ``disable_adapter()``): the frozen reference of the alignment lessons, one copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------
# Which layers to adapt
# ------------------------------------------------------------------------------------------------
def matches(name: str, target: str) -> bool:
    """A target names a module exactly or as a dotted suffix: "v_proj" matches "….self_attn.v_proj",
    not "….kv_proj"."""
    return name == target or name.endswith("." + target)


def pattern_value(patterns: dict, name: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the module
    name as a regular expression (``(.*\\.)?KEY$``) gives the value; otherwise ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def default_targets(model: nn.Module, method: str) -> list[str]:
    """peft's default target modules for this architecture (``config.model_type``): ``method`` is
    "lora", "ia3" or "ia3_feedforward". Llama: q_proj+v_proj for LoRA, k_proj+v_proj+down_proj for IA3;
    Qwen2's IA3 adapts q_proj instead of k_proj — the defaults differ between architectures."""
    from peft.utils import constants

    mapping = {"lora": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
               "ia3": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
               "ia3_feedforward": constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING}[method]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in mapping:
        raise ValueError(f"peft has no default {method.split('_')[0].upper()} target modules for model type "
                         f"{model_type!r}: pass target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    return list(mapping[model_type])


def _is_linear(module: nn.Module) -> bool:
    from .nf4 import NF4Linear  # nn.Linear subclasses (bitsandbytes' Linear4bit too) count as linear

    return isinstance(module, (nn.Linear, NF4Linear))


def _inside_adapter(name: str) -> bool:
    """A Linear that belongs to an adapter wrapper (its frozen base or its own weights), not a target."""
    return ".base_layer" in name or re.search(r"\.lora_[AB]\b", name) is not None


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the linear modules to adapt: exact names or name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``), or ``"all-linear"`` = every Linear but the output head.
    A Linear already wrapped by an adapter layer counts under its own name."""
    if not isinstance(target_modules, str) and not (
            isinstance(target_modules, Iterable) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a module name, a list of names (e.g. ['q_proj', 'v_proj']) or "
                        f"'all-linear', got {target_modules!r}")
    if not target_modules:
        raise ValueError("target_modules is empty: name the layers to adapt (e.g. ['q_proj', 'v_proj']) or 'all-linear'")
    linears = [name for name, m in model.named_modules()
               if (_is_linear(m) or isinstance(m, AdapterLayer)) and not _inside_adapter(name)]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        return [n for n in linears if n not in heads]
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found = [n for n in linears if any(matches(n, t) for t in targets)]
    missing = [t for t in targets if not any(matches(n, t) for n in linears)]
    if missing:
        suffixes = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(f"target module(s) {missing} match no nn.Linear in the model; "
                         f"linear layer names are {suffixes}")
    return found


# ------------------------------------------------------------------------------------------------
# The adapter layer
# ------------------------------------------------------------------------------------------------
class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus named adapters, at most one active. Subclasses list the attributes
    that hold per-adapter parameters (``adapter_param_names``: ModuleDicts/ParameterDicts keyed by
    adapter name) and implement ``_merge(name)`` / ``_unmerge(name)``."""

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self, self.adapter_param_names[0]).keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_param_names:
            entry = getattr(self, attr)[name]
            yield from ([entry] if isinstance(entry, nn.Parameter) else entry.parameters())

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; this layer has {self.adapters}")

    def set_adapter(self, name: str | None, trainable: bool = True) -> None:
        """Run ``name`` (None: the base) and let only its parameters train (none if ``trainable`` is False)."""
        if name is not None:
            self._require(name)
        if self.merged_adapters and name not in self.merged_adapters:
            raise RuntimeError(f"adapter {self.merged_adapters[0]!r} is merged into the base weight: unmerge it "
                               f"before switching to {name!r}")
        self.active_adapter = name
        for adapter in self.adapters:
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(trainable and adapter == name)

    def merge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name is None:
            raise RuntimeError("no adapter is active, so there is nothing to merge: name one")
        self._require(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is already merged into this layer: unmerge it first")
        with torch.no_grad():
            self._merge(name)
        self.merged_adapters.append(name)

    def unmerge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name not in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is not merged into this layer, so it cannot be unmerged")
        with torch.no_grad():
            self._unmerge(name)
        self.merged_adapters.remove(name)

    def _merge(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unmerge(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> list[tuple[str, AdapterLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def require_layers(model: nn.Module, kind: type, method: str, adder: str) -> list[tuple[str, nn.Module]]:
    """The model's adapter layers of ``kind`` (name, layer), or an error saying how to add them."""
    layers = adapter_layers(model, kind)
    if not layers:
        raise ValueError(f"the model has no {method} layers: call {adder} first")
    return layers


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's own; adapters keep their state (``set_adapter``
    decides which of them train)."""
    own = {id(p) for _, layer in adapter_layers(model) for name in layer.adapters for p in layer.adapter_parameters(name)}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def set_adapter(layers: list[tuple[str, AdapterLayer]], name: str | None, method: str = "") -> None:
    """Make ``name`` active in every layer and the only adapter that trains (None: the base model)."""
    if name is not None and not any(name in layer.adapters for _, layer in layers):
        known = sorted({a for _, layer in layers for a in layer.adapters})
        raise KeyError(f"unknown {method + ' ' if method else ''}adapter {name!r}; the model has {known}")
    for _, layer in layers:
        # A layer the adapter does not adapt runs its base (as in peft).
        layer.set_adapter(name if name is None or name in layer.adapters else None)


@contextlib.contextmanager
def disable_adapters(layers: list[tuple[str, AdapterLayer]]):
    """Within the block the layers run their base; the active adapters come back afterwards. What
    trains is left as it is (the block usually runs under ``torch.no_grad()``)."""
    active = [layer.active_adapter for _, layer in layers]
    if any(layer.merged_adapters for _, layer in layers):
        raise RuntimeError("an adapter is merged into the base weights, so disabling it would still run it: unmerge first")
    for _, layer in layers:
        layer.active_adapter = None
    try:
        yield
    finally:
        for (_, layer), name in zip(layers, active):
            layer.active_adapter = name


# ------------------------------------------------------------------------------------------------
# peft's files
# ------------------------------------------------------------------------------------------------
# Fields every peft adapter_config.json may carry that do not change what the adapter computes.
COMMON_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision",
                 "auto_mapping", "peft_version"}


def recorded_base_name(model: nn.Module) -> str | None:
    """What adapter_config.json records as the base model: a hub id as it is, a local folder by its
    name only — an absolute path would leak the learner's file system and mean nothing elsewhere."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    return Path(name).name if os.path.isabs(name) or os.path.isdir(name) else name


def write_peft_adapter(directory: str | Path, model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """peft's two files: ``adapter_config.json`` and ``adapter_model.safetensors`` (no pickle). ``config``
    holds the method's fields; the ones every adapter shares (task, base model, inference mode) are added."""
    from safetensors.torch import save_file

    config = {"peft_type": config["peft_type"], "task_type": "CAUSAL_LM", "base_model_name_or_path": recorded_base_name(model),
              "inference_mode": True, **config}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def read_peft_adapter(directory: str | Path, peft_types: Iterable[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved adapter, or a clear error: no adapter there, or another method's."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} holds no adapter_config.json: not a saved adapter")
    config = json.loads(config_path.read_text())
    peft_types = list(peft_types)
    if config.get("peft_type") not in peft_types:
        raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter, not {' or '.join(peft_types)}")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has adapter_config.json but no adapter_model.safetensors "
                                f"(a .bin file is a pickle, which the course does not load: re-save with safetensors)")
    return config, load_file(weights)


def refuse_unsupported(config: dict, supported: dict[str, object], directory: str | Path, method: str) -> None:
    """Refuse a saved config that asks for something this implementation does not compute, rather than
    load it silently wrong. ``supported`` maps each understood field to the one value that is supported
    (or ``None`` when every value is). Fields set to their "off" value (False, None, empty) pass."""
    problems = []
    for key, value in config.items():
        if key in COMMON_FIELDS or key in supported and supported[key] is None:
            continue
        if key in supported:
            if value != supported[key] and value not in (None, False, [], {}):
                problems.append(f"{key}={value!r} (supported: {supported[key]!r})")
        elif value not in (None, False, [], {}, "", 0):
            problems.append(f"{key}={value!r}")
    if problems:
        raise NotImplementedError(f"the {method} adapter in {directory} uses {', '.join(problems)}, which course_lib "
                                  f"does not implement; load it with peft (PeftModel.from_pretrained) instead")


def refuse_unknown_keys(tensors: dict[str, torch.Tensor], pattern: str, directory: str | Path, method: str) -> None:
    """Every saved tensor must be one this method reads (``pattern``: a regex its keys match)."""
    unknown = sorted(k for k in tensors if not re.fullmatch(pattern, k))
    if unknown:
        raise NotImplementedError(f"the {method} adapter in {directory} holds tensors course_lib does not know how to "
                                  f"use: {unknown[:3]}{' …' if len(unknown) > 3 else ''}; load it with peft instead")


def require_modules(model: nn.Module, modules: list[str], directory: str | Path) -> None:
    """Every module a saved adapter adapts must exist in ``model``."""
    known = dict(model.named_modules())
    absent = [m for m in modules if m not in known]
    if absent:
        raise ValueError(f"the adapter in {directory} was saved for another model: it adapts {absent[:3]}, "
                         f"which this model does not have")


def copy_saved(param: nn.Parameter, saved: torch.Tensor, what: str) -> None:
    """Load one saved tensor into an adapter parameter, refusing a shape that does not fit."""
    if saved.shape != param.shape:
        raise ValueError(f"{what}: saved shape {tuple(saved.shape)} does not fit this model's {tuple(param.shape)} "
                         f"(another base model or rank?)")
    with torch.no_grad():
        param.copy_(saved)
