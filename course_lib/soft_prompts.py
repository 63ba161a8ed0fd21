"""Soft prompts: prompt tuning, P-tuning and prefix tuning on a frozen causal LM.

All three learn a handful of *virtual tokens* and leave every weight of the model alone:

* **prompt tuning** (Lester et al. 2021): ``NV`` free vectors ``P ∈ R^{NV×d}`` are put in front of the
  input embeddings, ``h⁰ = [P ; E(x)]``;
* **P-tuning** (Liu et al. 2021): the same, but ``P = f(E_v)`` — an encoder over free vectors, which
  reparameterises them: peft's MLP (Linear-ReLU-Linear-ReLU-Linear) or the paper's bidirectional LSTM
  followed by a two-layer MLP, so that each virtual token depends on all the others (Liu et al., §3);
* **prefix tuning** (Li & Liang 2021): learned keys and values ``(K_p, V_p)`` for *every* layer, so
  ``attn(q, [K_p; K], [V_p; V])``; optionally reparameterised by ``MLP(E_v)`` (``prefix_projection``).

The conventions follow peft (``PeftModelForCausalLM.forward``) so that logits and losses are the same:
the attention mask gains ``NV`` ones on the left, labels gain ``NV`` × −100, prompt-tuned logits include
the virtual positions ``(B, NV+L, V)``, prefix-tuned ones do not ``(B, L, V)`` and real tokens sit at
positions ``NV … NV+L−1`` (given ``position_ids`` are shifted by ``NV`` for a prefix; prompt tuning and
P-tuning ignore them with a warning, as peft does). Parameter names match peft's prompt encoders, and ``save_adapter`` writes
peft's file (one tensor, ``prompt_embeddings``: the encoder's output).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from .adapters import read_peft_adapter, refuse_unknown_keys, refuse_unsupported, write_peft_adapter

Method = Literal["prompt", "p-tuning", "prefix"]
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
# peft spells P-tuning's type "P_TUNING" in PeftType; its config class writes that value.


# ------------------------------------------------------------------------------------------------
# The encoders: each maps nothing to its (NV, D) virtual tokens. Same submodule names as peft's.
# ------------------------------------------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """Prompt tuning: the virtual tokens *are* the parameters, ``P = embedding.weight`` (NV, d)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # N(0, 1), like peft's RANDOM init
        if init is not None:
            self.embedding.weight = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (NV, d)


class PromptEncoderMLP(nn.Module):
    """P-tuning: ``P = MLP(E_v)`` with peft's three-layer MLP (hidden size ``encoder_hidden_size``)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size), nn.ReLU(),
                                      nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                      nn.Linear(hidden_size, token_dim))

    def forward(self) -> torch.Tensor:
        return self.mlp_head(self.embedding.weight)  # (NV, d)


class PromptEncoderLSTM(nn.Module):
    """P-tuning as in Liu et al. 2021 (§3, eq. for ``h_i``): a bidirectional LSTM reads the ``NV`` free
    vectors as one sequence, so each virtual token depends on all the others, then a two-layer MLP maps
    ``[→h_i ; ←h_i]`` back to the model's width — peft's ``encoder_reparameterization_type="LSTM"``."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden_size: int, num_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden_size, num_layers=num_layers,
                                 dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(),
                                      nn.Linear(2 * hidden_size, token_dim))

    def forward(self) -> torch.Tensor:
        sequence = self.embedding.weight.unsqueeze(0)  # (1, NV, d): the NV tokens read as one sequence
        return self.mlp_head(self.lstm_head(sequence)[0])[0]  # (1, NV, 2h) → (NV, d)


class PrefixEncoder(nn.Module):
    """Prefix tuning: per virtual token, a key and a value for every layer, laid out like peft:
    ``[K_0 | V_0 | K_1 | V_1 | …]``, each ``kv_dim = num_key_value_heads × head_dim`` wide (GQA-aware).
    With ``projection`` the flat prefix is ``Linear-Tanh-Linear`` of an (NV, d) embedding."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int, *, projection: bool = False,
                 token_dim: int | None = None, hidden_size: int | None = None):
        super().__init__()
        self.projection = projection
        width = num_layers * 2 * kv_dim
        if projection:
            # peft's transform maps token_dim → hidden → width, where its token_dim is already kv_dim.
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden_size or kv_dim), nn.Tanh(),
                                           nn.Linear(hidden_size or kv_dim, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        """(NV, layers·2·kv_dim); with ``batch_size`` the MLP runs on (B, NV, ·) rows, as peft runs it, so
        the matmul blocks — and the last bits — are peft's."""
        if not self.projection:
            return self.embedding.weight
        if batch_size is None:
            return self.transform(self.embedding.weight)
        return self.transform(self.embedding.weight.expand(batch_size, -1, -1))


# ------------------------------------------------------------------------------------------------
# The three small operations the wrapper is made of (exercises 01.1–01.3 rebuild them)
# ------------------------------------------------------------------------------------------------
def prepend_virtual_tokens(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor | None, virtual: torch.Tensor):
    """``[P ; E(x)]`` with the mask and labels to match: virtual tokens are always attended to (mask 1)
    and never predicted (label −100). ``virtual`` is (NV, d) or per row (B, NV, d)."""
    batch_size = inputs_embeds.shape[0]
    if virtual.dim() == 2:
        virtual = virtual.unsqueeze(0).expand(batch_size, -1, -1)  # (B, NV, d)
    nv = virtual.shape[1]
    embeds = torch.cat([virtual.to(inputs_embeds.dtype), inputs_embeds], dim=1)  # (B, NV+L, d)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch_size, nv), attention_mask], dim=1)  # (B, NV+L)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch_size, nv), -100), labels], dim=1)  # (B, NV+L)
    return embeds, attention_mask, labels


def split_prefix(prefix: torch.Tensor, num_layers: int, num_key_value_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, NV, layers·2·kv_dim) → per layer (keys, values), each (B, H_kv, NV, head_dim) — the shape an
    attention layer's cache holds. Per virtual token the flat vector is ``[K_0 | V_0 | K_1 | V_1 | …]``."""
    b, nv, width = prefix.shape
    if width % (num_layers * 2 * num_key_value_heads):
        raise ValueError(f"a prefix of width {width} does not split into {num_layers} layers × (key, value) × "
                         f"{num_key_value_heads} heads")
    kv = prefix.view(b, nv, num_layers * 2, num_key_value_heads, -1).permute(2, 0, 3, 1, 4)  # (2·layers, B, H_kv, NV, hd)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]


def text_init_ids(token_ids: list[int], num_virtual_tokens: int, decode=None) -> list[int]:
    """peft's TEXT init: the text's ids repeated cyclically up to ``num_virtual_tokens``, or cut to it.

    peft cuts a longer text silently; here the cut warns (``UserWarning``), naming what is lost (through
    ``decode(ids) -> str`` when given): a description whose task words fall past ``num_virtual_tokens``
    never reaches the prompt."""
    if not token_ids:
        raise ValueError("init_text tokenizes to no tokens")
    if len(token_ids) > num_virtual_tokens:
        dropped = list(token_ids[num_virtual_tokens:])
        lost = f" ({decode(dropped)!r})" if decode is not None else ""
        warnings.warn(f"the init text has {len(token_ids)} tokens but num_virtual_tokens is {num_virtual_tokens}: its "
                      f"last {len(dropped)} tokens{lost} are cut and never reach the prompt (peft cuts it the same way, "
                      f"silently); use num_virtual_tokens={len(token_ids)} or a shorter text", UserWarning, stacklevel=3)
    return (list(token_ids) * (num_virtual_tokens // len(token_ids) + 1))[:num_virtual_tokens]


# ------------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------------
class SoftPromptModel(nn.Module):
    """A frozen causal LM plus named soft prompts; ``forward`` takes the model's usual arguments and
    ``prompt_names`` (one per row) to mix tasks in one batch."""

    def __init__(self, base_model: nn.Module):
        super().__init__()
        if isinstance(base_model, SoftPromptModel):
            raise TypeError("the model already is a SoftPromptModel: call add_soft_prompt on it to add a prompt")
        self.base_model = base_model
        for p in base_model.parameters():
            p.requires_grad_(False)
        # transformers ≥ 5.2x renamed past_key_values to cache (the old name warns until 5.40); ask once
        self._cache_kwarg = ("cache" if "cache" in inspect.signature(base_model.forward).parameters
                             else "past_key_values")
        self.prompts = nn.ModuleDict()
        self.prompt_config: dict[str, dict] = {}
        self.active: str | None = None

    # -- plumbing the rest of the course relies on ------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def set_prompt(self, name: str) -> None:
        self._require(name)
        self.active = name

    def _require(self, name: str) -> None:
        if name not in self.prompts:
            raise KeyError(f"no soft prompt named {name!r}; this model has {sorted(self.prompts)}")

    def virtual_tokens(self, name: str | None = None) -> torch.Tensor:
        """What the encoder produces — and what peft saves as ``prompt_embeddings``: (NV, D)."""
        name = name or self.active
        self._require(name)
        return self.prompts[name]()

    # -- forward ------------------------------------------------------------------------------------
    def _per_row(self, batch_size: int, prompt_names: list[str] | None) -> tuple[dict, torch.Tensor]:
        """The config shared by the rows and their virtual tokens stacked per row: (B, NV, D)."""
        names = prompt_names or [self.active] * batch_size
        if len(names) != batch_size:
            raise ValueError(f"prompt_names has {len(names)} entries for a batch of {batch_size} rows")
        distinct = list(dict.fromkeys(names))
        for name in distinct:
            if name is None:
                raise ValueError("no soft prompt is active: call set_prompt(name) or pass prompt_names")
            self._require(name)
        configs = {self.prompt_config[n]["method"] for n in distinct}
        sizes = {self.prompt_config[n]["num_virtual_tokens"] for n in distinct}
        if len(configs) > 1 or len(sizes) > 1:
            raise ValueError(f"one batch can only mix prompts of one method and one length; got methods "
                             f"{sorted(configs)} and lengths {sorted(sizes)}")
        config = self.prompt_config[distinct[0]]
        if len(distinct) == 1 and config["method"] == "prefix" and config.get("prefix_projection"):
            return config, self.prompts[distinct[0]](batch_size=batch_size)  # (B, NV, D), row by row as peft
        tokens = {n: self.virtual_tokens(n) for n in distinct}  # each encoder runs once per batch
        if len(distinct) == 1:
            stacked = tokens[distinct[0]].unsqueeze(0).expand(batch_size, -1, -1)  # (B, NV, D)
        else:
            stacked = torch.stack([tokens[n] for n in names])  # (B, NV, D)
        return config, stacked

    def _prefix_cache(self, config: dict, prefix: torch.Tensor) -> DynamicCache:
        """(B, NV, layers·2·kv_dim) → a cache holding (B, H_kv, NV, head_dim) keys and values per layer;
        a fresh one per forward, because attention appends the real tokens' keys to it."""
        return DynamicCache(split_prefix(prefix, config["num_layers"], config["num_key_value_heads"]))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                prompt_names: list[str] | None = None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        config, virtual = self._per_row(batch_size, prompt_names)
        if kwargs.get("position_ids") is not None:
            if config["method"] == "prefix":  # the real tokens come after NV cached positions
                kwargs["position_ids"] = kwargs["position_ids"] + virtual.shape[1]
            else:  # peft: prompt tuning and P-tuning have no positions for the virtual tokens
                warnings.warn("position_ids are ignored with prompt tuning and P-tuning (as peft ignores them): "
                              "the sequence [P ; E(x)] takes positions 0 … NV+L−1", UserWarning, stacklevel=2)
                kwargs["position_ids"] = None
        if config["method"] == "prefix":
            if attention_mask is not None:  # the cached prefix is attended to like NV real tokens
                attention_mask = torch.cat([attention_mask.new_ones(batch_size, virtual.shape[1]), attention_mask], 1)
            dtype = next(self.base_model.parameters()).dtype
            kwargs[self._cache_kwarg] = self._prefix_cache(config, virtual.to(dtype))
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)  # (B, L, d)
        inputs_embeds, attention_mask, labels = prepend_virtual_tokens(inputs_embeds, attention_mask, labels, virtual)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def _shape(model: nn.Module) -> dict:
    """The sizes a soft prompt depends on, read from a transformers config (GQA-aware like peft)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return {"token_dim": cfg.hidden_size, "num_layers": cfg.num_hidden_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "kv_dim": kv_heads * head_dim}


def add_soft_prompt(model: nn.Module, method: Method = "prompt", num_virtual_tokens: int = 20, *,
                    name: str = "default", init_text: str | None = None, tokenizer=None,
                    encoder_hidden_size: int | None = None, prefix_projection: bool = False,
                    encoder_type: Literal["MLP", "LSTM"] = "MLP", encoder_num_layers: int = 2,
                    encoder_dropout: float = 0.0) -> SoftPromptModel:
    """Freeze ``model`` (or reuse a :class:`SoftPromptModel`) and add a soft prompt called ``name``.

    ``init_text`` (prompt tuning only) starts the virtual tokens from the word embeddings of that text's
    token ids, repeated cyclically to ``num_virtual_tokens`` or cut to it (peft's ``PromptTuningInit.TEXT``;
    a cut warns, see :func:`text_init_ids`). P-tuning's encoder is peft's MLP or, with
    ``encoder_type="LSTM"``, its bidirectional LSTM (``encoder_num_layers``, ``encoder_dropout``) + MLP.
    Returns the wrapper; the new prompt is active.
    """
    if method not in PEFT_TYPES:
        raise ValueError(f"unknown soft-prompt method {method!r}; use one of {sorted(PEFT_TYPES)}")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    wrapper = model if isinstance(model, SoftPromptModel) else SoftPromptModel(model)
    if name in wrapper.prompts:
        raise ValueError(f"the model already has a soft prompt named {name!r}")
    shape = _shape(wrapper.base_model)
    config = {"method": method, "num_virtual_tokens": num_virtual_tokens, **shape}
    if init_text is not None:
        if method != "prompt":
            raise ValueError("init_text is for prompt tuning; P-tuning and prefix tuning start at random")
        if tokenizer is None:
            raise ValueError("init_text needs the tokenizer that turns it into token ids")
        # with special tokens (a BOS here), exactly as peft does
        ids = text_init_ids(tokenizer(init_text)["input_ids"], num_virtual_tokens, decode=tokenizer.decode)
        embeddings = wrapper.base_model.get_input_embeddings().weight
        init = embeddings[torch.tensor(ids, device=embeddings.device)]
        encoder = PromptEmbedding(num_virtual_tokens, shape["token_dim"], init=init)
        config["init_text"] = init_text
    elif method == "prompt":
        encoder = PromptEmbedding(num_virtual_tokens, shape["token_dim"])
    elif method == "p-tuning":
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_type {encoder_type!r}: P-tuning's encoder is 'MLP' or 'LSTM' (peft's two)")
        hidden = encoder_hidden_size or shape["token_dim"]
        if encoder_type == "LSTM":
            encoder = PromptEncoderLSTM(num_virtual_tokens, shape["token_dim"], hidden, encoder_num_layers,
                                        encoder_dropout)
        else:
            encoder = PromptEncoderMLP(num_virtual_tokens, shape["token_dim"], hidden)
        config["encoder_hidden_size"] = hidden
        config["encoder_type"] = encoder_type
    else:
        encoder = PrefixEncoder(num_virtual_tokens, shape["num_layers"], shape["kv_dim"],
                                projection=prefix_projection, hidden_size=encoder_hidden_size)
        config["prefix_projection"] = prefix_projection
        config["encoder_hidden_size"] = encoder_hidden_size or shape["kv_dim"]
    wrapper.prompts[name] = encoder.to(wrapper.device)
    wrapper.prompt_config[name] = config
    wrapper.active = name
    return wrapper


# ------------------------------------------------------------------------------------------------
# peft-format save / load
# ------------------------------------------------------------------------------------------------
def _peft_config(config: dict) -> dict:
    """peft's adapter_config.json fields for one prompt (its token_dim for prefix tuning is kv_dim)."""
    prefix = config["method"] == "prefix"
    out = {"peft_type": PEFT_TYPES[config["method"]], "num_virtual_tokens": config["num_virtual_tokens"],
           "token_dim": config["kv_dim"] if prefix else config["token_dim"],
           "num_transformer_submodules": 1, "num_layers": config["num_layers"],
           "num_attention_heads": config["num_key_value_heads" if prefix else "num_attention_heads"]}
    if config["method"] == "prompt":
        out["prompt_tuning_init"] = "RANDOM"
    elif config["method"] == "p-tuning":
        out.update(encoder_reparameterization_type=config.get("encoder_type", "MLP"),
                   encoder_hidden_size=config["encoder_hidden_size"])
    else:
        out.update(prefix_projection=False, encoder_hidden_size=config["encoder_hidden_size"])
    return out


def save_adapter(model: SoftPromptModel, directory: str | Path, name: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (key ``prompt_embeddings``), the files
    ``PeftModel.from_pretrained`` loads. Like peft, a reparameterised prompt is saved as its output."""
    if not isinstance(model, SoftPromptModel):
        raise TypeError("save_adapter needs the SoftPromptModel that add_soft_prompt returned")
    name = name or model.active
    model._require(name)
    with torch.no_grad():
        tokens = model.virtual_tokens(name).detach().float().cpu().contiguous()
    return write_peft_adapter(directory, model, _peft_config(model.prompt_config[name]), {"prompt_embeddings": tokens})


# The prompt-learning config fields course_lib reads or can ignore (None: any value; the saved tensor is
# the encoder's output, so encoder settings do not matter), and what it refuses unless off.
SUPPORTED_CONFIG = {key: None for key in (
    "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size", "encoder_dropout",
    "encoder_num_layers", "encoder_reparameterization_type", "init_weights", "prefix_projection", "prompt_tuning_init",
    "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")}
SUPPORTED_CONFIG.update(num_transformer_submodules=1, modules_to_save=False)


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> SoftPromptModel:
    """Add the soft prompt saved in ``directory`` (by course_lib or peft) to ``model``; returns the wrapper.

    The saved tensor is the encoder's output, so a P-tuning or projected prefix prompt comes back as
    plain virtual tokens — the same logits, fewer parameters (peft does the same in inference mode)."""
    methods = {v: k for k, v in PEFT_TYPES.items()}
    saved, tensors = read_peft_adapter(directory, methods)
    refuse_unsupported(saved, SUPPORTED_CONFIG, directory, saved["peft_type"])
    refuse_unknown_keys(tensors, "prompt_embeddings", directory, saved["peft_type"])
    tokens = tensors["prompt_embeddings"]  # (NV, D)
    method = methods[saved["peft_type"]]
    wrapper = add_soft_prompt(model, method, saved["num_virtual_tokens"], name=name)
    config = wrapper.prompt_config[name]
    expected = (config["num_virtual_tokens"],
                config["num_layers"] * 2 * config["kv_dim"] if method == "prefix" else config["token_dim"])
    if tuple(tokens.shape) != expected or saved.get("num_layers", config["num_layers"]) != config["num_layers"]:
        del wrapper.prompts[name], wrapper.prompt_config[name]
        raise ValueError(f"the soft prompt in {directory} was saved for another model: its tensor is "
                         f"{tuple(tokens.shape)} ({saved.get('num_layers')} layers), this model needs {expected} "
                         f"({config['num_layers']} layers)")
    encoder = PromptEmbedding(*expected, init=tokens).to(wrapper.device)  # plain virtual tokens, any method
    wrapper.prompts[name] = encoder
    config["encoder_hidden_size"] = saved.get("encoder_hidden_size")
    return wrapper
