"""A memory planner: how many bytes fine-tuning (or serving) a decoder-only transformer needs, before you load it.

Usage::

    from course_lib.memory import plan, plan_for_config, feasibility_table
    p = plan(6.74e9, "qlora", batch=1, seq_len=512, n_layers=32, hidden=4096, intermediate=11008,
             n_heads=32, vocab=32000, lora_r=16, grad_checkpointing=True)
    print(p)              # weights, gradients, optimizer state, activations, transient, in GB
    p.fits(24)            # does the step's peak fit a 24 GB GPU?  (p.peak, p.total: bytes)
    plan_for_config(LlamaConfig.from_pretrained("path/to/model"), "lora", batch=8, seq_len=512)
    feasibility_table()   # Llama-2 7B / 13B / 70B × 24 / 48 / 80 GB GPUs: which techniques fit
    plan(7e9, "inference", bits=16).total / 1e9   # 16.8: the serving rule params × bytes × 1.2

Each term, and where it comes from:

* **weights** — every parameter at its storage precision. QLoRA (Dettmers et al. 2023, §3) stores each
  linear layer of the blocks as 4-bit NF4 codes plus one float32 absmax per block of 64 weights (4.5
  bits per weight), or, with double quantization, an 8-bit absmax per block and one float32 scale per
  256 blocks (≈ 4.127 bits); embeddings, norms and the output head stay in the compute dtype. Adapters
  (LoRA's A and B, IA3's vectors, soft prompts) are float32 whatever the base, as peft keeps them
  (``autocast_adapter_dtype=True``). Mixed precision with float32 master weights (``master_weights=True``,
  Micikevicius et al. 2018) adds a float32 copy of every trainable parameter: ZeRO's 2 + 2 + 12 bytes per
  parameter (Rajbhandari et al. 2020, §3.1) for full fine-tuning.
* **gradients** — one per trainable parameter, same shape and dtype (`course_lib.memory.training_state_bytes`).
* **optimizer** — AdamW (Loshchilov & Hutter 2019, Alg. 2) keeps two moments per trainable parameter
  plus torch's float32 step counter per tensor; SGD with momentum one buffer.
* **activations** — what autograd keeps for the backward pass, counted per token for a Llama-style
  block (RMSNorm, rotary embeddings, grouped-query attention through SDPA, SwiGLU MLP). This follows
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1), who
  count ``sbh(34 + 5as/h)`` bytes per layer of a GPT block in fp16, tensor by tensor; the same count
  redone for the Llama block as transformers runs it differs in four ways: (1) SDPA / flash attention
  keeps q, k, v, the output and one float32 log-sum-exp per head and token instead of the s × s scores,
  softmax and dropout mask (their ``5as/h`` term; ``attention="eager"`` puts the scores back);
  (2) there is no dropout (their masks); (3) RMSNorm keeps its input in float32 and one float32 rsqrt per
  token; (4) SwiGLU keeps three ``intermediate``-wide tensors (gate, silu(gate), up). What a technique
  freezes changes the count: a frozen linear layer keeps nothing for its weight's gradient, so only
  full fine-tuning and the adapted layers keep their inputs. The loss keeps a float32 log-softmax of
  the vocabulary for every token, often the largest single tensor. For a Llama-2-7B block in bf16, full
  fine-tuning keeps 186 504 bytes per token ≈ 45.5·h (Korthikanti's GPT block: 34·h + 5·a·s): SwiGLU's
  wider MLP (8·i ≈ 21.5·h) and the float32 norm inputs add more than the s × s scores would at s ≲ 1 000
  tokens, and those are gone. With gradient checkpointing
  (Chen et al. 2016; Korthikanti's "full recomputation", ``2sbh`` per layer) each block keeps only its
  input and recomputes the rest in the backward pass.
* **transient** — the step's largest short-lived tensors: the float32 gradients flowing into and out of
  the log-softmax at the start of the backward pass (``8 × tokens × vocab`` bytes); with checkpointing,
  or one block's recomputed activations if larger. The logits themselves are freed before the backward
  pass when the loop keeps only the loss (``model(**batch).loss.backward()``, transformers' Trainer); a
  loop that holds the model's output through the backward pass adds ``tokens × vocab × b``.
* **overhead** — serving only: the rule of thumb's 20 % (`course_lib.memory.estimate_serving_memory_gb`).

``total`` is the sum of all terms, the figure planners usually quote. ``peak`` follows the step's
timeline: the weights and optimizer state are always there; activations and the transient exist up to
the start of the backward pass, while the gradients and the optimizer's temporary (one moment-sized
buffer, √v, in torch's foreach AdamW, its default on CUDA; a CPU's per-tensor loop needs less) exist at
the end — so ``peak = weights + optimizer + max(activations +
transient, gradients + step temporary)``. ``fits`` compares ``peak`` with a GPU's memory.

How close it is (tests/test_planner.py; ``python tests/scripts/planner_table.py`` prints the table): weights,
gradients, optimizer state and activations are exact, byte for byte, for every technique on the embedded
model and a tiny Llama (fp32 and bf16, SDPA and eager, checkpointing on and off); the step's peak is within
0.01 % of the CUDA peaks in benchmarks/RESULTS.md (TinyLlama-1.1B shape, LoRA, 8 × 512 tokens: 13 437 MB with
peft, 8 711 MB with bf16 adapters) and within 2 % of a CPU step's peak resident memory without checkpointing;
with checkpointing within −5 … +11 % (it takes a recomputed block as alive all at once, and nothing else
alive with it). The feasibility
table's cells are checked against arithmetic done by hand.

Compared with ``accelerate estimate-memory`` (accelerate/commands/estimate.py): that command needs the hub
API even for a local folder (it asks ``huggingface_hub.model_info`` first), so it cannot run offline; its
arithmetic can (``estimate_training_usage``), and differs from this planner in three ways. It builds
``AutoModel`` — the model without its output head — so an untied head's parameters are missing; its
"Training using Adam" column is the *largest* of model, gradients, optimizer and step (float32: 4 × the
model's bytes, the same 16 bytes per parameter as here; float16/bf16: 8 bytes per parameter, where mixed
precision holds bf16 weights, float32 masters, bf16 gradients and float32 moments together: 16); and it
has no activations, so it is the same for batch 1 and batch 64, and says nothing about adapters or NF4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

TECHNIQUES = ("full", "lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "inference")
TRAINING_BITS = (16, 32)
SERVING_BITS = (4, 8, 16, 32)
OPTIMIZERS = ("adamw", "sgd")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's defaults for Llama; down_proj scales its input
NF4_BLOCK = 64  # QLoRA's block of weights sharing one absmax
DOUBLE_QUANT_BLOCK = 256  # blocks of absmax sharing one float32 scale under double quantization
LOG_SOFTMAX_BYTES = 4  # transformers computes the loss on float32 logits
INDEX_BYTES = 8  # int64 token ids and labels
SERVING_OVERHEAD = 0.2  # the serving rule's 20 %


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder the planner needs (a transformers config's names in brackets)."""

    n_layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size (the SwiGLU width)
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads (grouped-query attention; = n_heads without it)
    head_dim: int  # head_dim (hidden // n_heads by default)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings: the output head is the embedding matrix

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def n_params(self) -> int:
        """Parameters of a Llama-style model of this shape (no biases): embedding, blocks (7 linears, 2
        norms), final norm, and the output head unless tied."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.n_layers * (self.block_linear_params() + 2 * self.hidden) + self.hidden


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of a training step (or of serving); ``str()`` prints them in GB."""

    technique: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    overhead: int
    trainable_params: int
    peak: int  # the step's timeline peak (module docstring)
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        """Every term added up (weights + gradients + optimizer + activations + transient + overhead)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient + self.overhead

    @property
    def step_peak(self) -> int:
        """What one steady-state step adds above the loaded model and the optimizer's state: what
        `course_lib.memory.measure_peak_memory` reports for a step after a warm-up step, with the
        gradients freed by ``zero_grad(set_to_none=True)``."""
        return self.peak - self.weights - self.optimizer

    def fits(self, gpu_gb: float) -> bool:
        """Whether the peak fits a GPU of ``gpu_gb`` decimal GB (1e9 bytes, as the serving rule counts;
        leave room yourself for the CUDA context, ~0.5 GB, and fragmentation)."""
        if not isinstance(gpu_gb, (int, float)) or isinstance(gpu_gb, bool) or gpu_gb <= 0:
            raise ValueError(f"gpu_gb must be a positive number of GB (e.g. 24, 48 or 80), got {gpu_gb!r}")
        return self.peak <= gpu_gb * GB

    def as_dict(self) -> dict:
        """The terms in GB, one flat dict (a notebook's table row)."""
        terms = ("weights", "gradients", "optimizer", "activations", "transient", "overhead")
        return {"technique": self.technique, **{t: getattr(self, t) / GB for t in terms},
                "total": self.total / GB, "peak": self.peak / GB, "trainable_params": self.trainable_params}

    def __str__(self) -> str:
        d = self.as_dict()
        parts = ", ".join(f"{k} {d[k]:.3f}" for k in ("weights", "gradients", "optimizer", "activations", "transient",
                                                        "overhead", "peak"))
        return f"{self.technique}: {parts} GB (total {d['total']:.3f} GB, {self.trainable_params:,} trainable)"


# ------------------------------------------------------------------------------------------------
# Input checks: each names the argument and the fix
# ------------------------------------------------------------------------------------------------
def _positive_int(name: str, value, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{hint}, got {value!r}")
    return value


def _require_shape(technique: str, **sizes) -> None:
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise ValueError(f"planning {technique!r} training needs {', '.join(missing)}: pass "
                         f"{', '.join(f'{k}=…' for k in missing)} (or use plan_for_config with the model's config)")


def _shape(n_params: int, n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, tied) -> ModelShape:
    _positive_int("n_layers", n_layers)
    _positive_int("hidden", hidden)
    _positive_int("vocab", vocab, " (the tokenizer's vocabulary size; Llama-2: 32000)")
    if n_heads is None:
        n_heads = max(1, hidden // 128)  # head_dim 128, as in Llama-2 and most 7B+ models
    _positive_int("n_heads", n_heads)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    _positive_int("n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}): each key/value head serves "
                         f"a group of query heads")
    if head_dim is None:
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) is not a multiple of n_heads ({n_heads}): pass head_dim=…")
        head_dim = hidden // n_heads
    _positive_int("head_dim", head_dim)
    if intermediate is None:
        # the width that makes the shape hold n_params parameters (one SwiGLU = 3·hidden·intermediate)
        h, q, kv = hidden, n_heads * head_dim, n_kv_heads * head_dim
        rest = n_params - vocab * h * (1 if tied else 2) - hidden - n_layers * (2 * h * q + 2 * h * kv + 2 * h)
        intermediate = int(rest / (3 * h * n_layers))
        if intermediate <= 0:
            raise ValueError(f"n_params={n_params:.3g} is too small for {n_layers} layers of hidden {hidden} and a "
                             f"vocabulary of {vocab}: check n_params, or pass intermediate=…")
    _positive_int("intermediate", intermediate)
    return ModelShape(n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, bool(tied))


def _targets(lora_targets) -> tuple[str, ...]:
    if lora_targets == "all-linear":
        return LINEARS
    names = (lora_targets,) if isinstance(lora_targets, str) else tuple(lora_targets)
    unknown = [n for n in names if n not in LINEARS]
    if unknown or not names:
        raise ValueError(f"lora_targets {list(names)}: use 'all-linear' or names among {list(LINEARS)}")
    return names


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
def plan(n_params: float, technique: str, *, bits: int = 16, batch: int | None = None, seq_len: int | None = None,
         n_layers: int | None = None, hidden: int | None = None, intermediate: int | None = None,
         n_heads: int | None = None, n_kv_heads: int | None = None, head_dim: int | None = None,
         vocab: int = 32000, tied_embeddings: bool = False, lora_r: int = 16,
         lora_targets: str | Iterable[str] = "all-linear", num_virtual_tokens: int = 20,
         grad_checkpointing: bool = False, optimizer: str = "adamw", master_weights: bool = False,
         adapter_bits: int = 32, double_quant: bool = True, attention: Literal["sdpa", "eager"] = "sdpa",
         lora_backward: Literal["course_lib", "peft"] = "course_lib") -> MemoryPlan:
    """Bytes of weights, gradients, optimizer state, activations and the step's transient tensors for
    training a Llama-style model of ``n_params`` parameters with ``technique`` (one of `TECHNIQUES`), or
    of serving it (``"inference"``: the serving rule, ``n_params × bits/8 × 1.2``; only ``bits`` matters).

    Shape: ``n_layers``, ``hidden`` (required for training); ``intermediate`` (default: the width that
    makes the shape hold ``n_params``), ``n_heads`` (default ``hidden // 128``), ``n_kv_heads`` (default
    ``n_heads``), ``head_dim`` (default ``hidden // n_heads``), ``vocab`` (default 32000, Llama-2's),
    ``tied_embeddings``. Step: ``batch`` rows × ``seq_len`` tokens, no padding mask (packed or equal-length
    rows), ``attention`` "sdpa" (transformers' default) or "eager" (keeps the s × s probabilities).

    Precision: ``bits`` is the dtype the base model is stored and computes in (16: bf16/fp16, 32: float32;
    QLoRA: the compute dtype, its block weights being NF4); ``master_weights`` adds float32 master copies
    and float32 optimizer state for 16-bit trainable parameters (classic mixed precision). Adapters are
    ``adapter_bits`` (32, as peft). ``lora_backward``: "course_lib" keeps each distinct 16-bit input of
    the adapted layers once (`course_lib.lora.LoRAFunction`); "peft" keeps a float32 copy per adapted
    layer (autograd through peft's ``x.to(lora_A.dtype)``). ``optimizer``: "adamw" or "sgd" (momentum).
    Not modelled: autocast over float32 weights (it keeps bf16 copies of the weights for the backward),
    padding masks, optimizers that shard or page their state, and per-architecture extras (biases aside).
    """
    if technique not in TECHNIQUES:
        raise ValueError(f"technique {technique!r} is not one the planner knows: use one of {list(TECHNIQUES)}")
    if isinstance(n_params, bool) or not isinstance(n_params, (int, float)) or not n_params > 0:
        raise ValueError(f"n_params must be a positive number of parameters (e.g. 7e9), got {n_params!r}")
    if technique == "inference":
        if bits not in SERVING_BITS:
            raise ValueError(f"bits={bits!r}: serving is planned at bits in {list(SERVING_BITS)}")
        weights = math.ceil(n_params * bits / 8)
        overhead = math.ceil(weights * SERVING_OVERHEAD)
        return MemoryPlan(technique, weights, 0, 0, 0, 0, overhead, 0, weights + overhead, {"bits": bits})
    if bits not in TRAINING_BITS:
        hint = " (for a 4-bit base use technique='qlora')" if bits < 16 else ""
        raise ValueError(f"bits={bits!r}: training is planned at bits in {list(TRAINING_BITS)}{hint}")
    if adapter_bits not in TRAINING_BITS:
        raise ValueError(f"adapter_bits={adapter_bits!r}: use one of {list(TRAINING_BITS)} (peft keeps adapters in 32)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: use one of {list(OPTIMIZERS)}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention {attention!r}: use 'sdpa' (transformers' default) or 'eager'")
    if lora_backward not in ("course_lib", "peft"):
        raise ValueError(f"lora_backward {lora_backward!r}: use 'course_lib' or 'peft'")
    _require_shape(technique, batch=batch, seq_len=seq_len, n_layers=n_layers, hidden=hidden)
    _positive_int("batch", batch)
    _positive_int("seq_len", seq_len)
    shape = _shape(n_params, n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, tied_embeddings)
    targets: tuple[str, ...] = ()
    if technique in ("lora", "qlora"):
        _positive_int("lora_r", lora_r, " (the adapter rank, e.g. 8 or 16)")
        targets = _targets(lora_targets)
    if technique in ("prompt_tuning", "prefix_tuning"):
        _positive_int("num_virtual_tokens", num_virtual_tokens, " (e.g. 20)")
    if technique == "prefix_tuning" and grad_checkpointing:
        raise ValueError("prefix tuning with grad_checkpointing=True: the prefix is passed as a key/value cache, "
                         "which transformers drops under gradient checkpointing; plan it with grad_checkpointing=False")

    b, a = bits // 8, adapter_bits // 8  # compute bytes, adapter bytes
    trainable, tensors = _trainable(technique, shape, n_params, lora_r, targets, num_virtual_tokens)
    train_b = b if technique == "full" else a  # dtype of the trainable parameters
    weights = _weights(technique, shape, n_params, b, double_quant) + (trainable * a if technique != "full" else 0)
    master = master_weights and train_b < 4
    if master:
        weights += trainable * 4
    gradients = trainable * train_b
    state_b = 4 if master else train_b
    moments = 2 if optimizer == "adamw" else 1
    optimizer_bytes = moments * trainable * state_b + (ADAMW_STEP_COUNTER_BYTES * tensors if optimizer == "adamw" else 0)
    acts = activation_bytes(shape, technique, batch=batch, seq_len=seq_len, bits=bits, adapter_bits=adapter_bits,
                            lora_r=lora_r, lora_targets=targets, num_virtual_tokens=num_virtual_tokens,
                            grad_checkpointing=grad_checkpointing, attention=attention, lora_backward=lora_backward)
    tokens = batch * (seq_len + (num_virtual_tokens if technique == "prompt_tuning" else 0))
    loss_transient = tokens * shape.vocab * 2 * LOG_SOFTMAX_BYTES  # float32 gradients in and out of log-softmax
    transient = loss_transient
    if grad_checkpointing:  # the backward recomputes one block at a time, after the loss' gradient is gone
        one_block = activation_bytes(shape, technique, batch=batch, seq_len=seq_len, bits=bits,
                                     adapter_bits=adapter_bits, lora_r=lora_r, lora_targets=targets,
                                     num_virtual_tokens=num_virtual_tokens, grad_checkpointing=False,
                                     attention=attention, lora_backward=lora_backward, per_block=True)
        transient = max(loss_transient, one_block)
    step_temporary = trainable * state_b if optimizer == "adamw" else 0  # foreach AdamW (CUDA): one √v buffer
    peak = weights + optimizer_bytes + max(acts + transient, gradients + step_temporary)
    settings = dict(n_params=n_params, bits=bits, batch=batch, seq_len=seq_len, shape=shape, lora_r=lora_r,
                    lora_targets=targets, num_virtual_tokens=num_virtual_tokens, grad_checkpointing=grad_checkpointing,
                    optimizer=optimizer, master_weights=master_weights, adapter_bits=adapter_bits,
                    double_quant=double_quant, attention=attention, lora_backward=lora_backward)
    return MemoryPlan(technique, weights, gradients, optimizer_bytes, acts, transient, 0, trainable, peak, settings)


def _trainable(technique: str, shape: ModelShape, n_params: int, r: int, targets, nv: int) -> tuple[int, int]:
    """(trainable parameters, trainable tensors) — the tensors count for AdamW's per-tensor step counter."""
    L, lin = shape.n_layers, shape.linear_shapes()
    if technique == "full":
        # every tensor: 7 linears + 2 norms per block, embedding, final norm, head unless tied
        return int(n_params), L * (len(LINEARS) + 2) + 2 + (0 if shape.tied else 1)
    if technique in ("lora", "qlora"):  # A: (r, in), B: (out, r) per adapted layer
        return L * sum(r * (lin[t][0] + lin[t][1]) for t in targets), 2 * L * len(targets)
    if technique == "ia3":  # k, v: one scale per output; down_proj: one per input
        return L * (2 * shape.kv_dim + shape.intermediate), L * len(IA3_TARGETS)
    if technique == "prompt_tuning":  # num_virtual_tokens embeddings
        return nv * shape.hidden, 1
    return nv * L * 2 * shape.kv_dim, 1  # prefix tuning: a key and a value per virtual token and layer


def _weights(technique: str, shape: ModelShape, n_params: int, b: int, double_quant: bool) -> int:
    """The base model's bytes: n_params at b bytes; QLoRA's block linears as NF4 (4 bits + the block scales)."""
    if technique != "qlora":
        return int(n_params) * b
    quantized = sum(nf4_bytes(fan_in * fan_out, double_quant) for fan_in, fan_out in shape.linear_shapes().values())
    kept = int(n_params) - shape.n_layers * shape.block_linear_params()  # embeddings, norms, head
    return shape.n_layers * quantized + kept * b


def nf4_bytes(n_weights: int, double_quant: bool = True) -> int:
    """Bytes of one NF4-quantized weight matrix (Dettmers et al. 2023, §3): two 4-bit codes per byte, one
    float32 absmax per block of 64 weights; with double quantization the absmax are 8-bit codes with one
    float32 scale per 256 blocks and one float32 offset per matrix (`course_lib.nf4.NF4Linear`'s buffers,
    bitsandbytes' format)."""
    blocks = math.ceil(n_weights / NF4_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 4 if double_quant else 4 * blocks
    return math.ceil(n_weights / 2) + scales


def activation_bytes(shape: ModelShape, technique: str, *, batch: int, seq_len: int, bits: int = 16,
                     adapter_bits: int = 32, lora_r: int = 16, lora_targets: Iterable[str] = LINEARS,
                     num_virtual_tokens: int = 20, grad_checkpointing: bool = False,
                     attention: str = "sdpa", lora_backward: str = "course_lib", per_block: bool = False) -> int:
    """Bytes autograd keeps for the backward pass of one step (what `course_lib.memory.saved_activation_bytes`
    counts), tensor by tensor for a Llama block run by transformers (module docstring); ``per_block``: one
    block's share only (what a checkpointed block recomputes).

    Per token and block, with b = compute bytes, a = adapter bytes, h hidden, i intermediate, q = heads ×
    head_dim, kv = kv heads × head_dim:
      RMSNorm ×2           4h + 4 each (float32 input, rsqrt), + b·h if its weight trains (normalised input)
      q, k, v, out, lse    b(q + kv + kv + q) + 4·heads (SDPA)
      eager attention      b(q + q + q) + heads·keys·(4 + b) (q, k and v repeated to every head, the float32
                           softmax and its b-byte copy: one copy in float32), + o_proj's input (a fresh copy)
      SwiGLU               3·b·i (gate, silu(gate), up)
      linear inputs        b·h (q/k/v), b·h (gate/up), b·i (down) when their weights train or are
                           LoRA-adapted (o_proj's input is SDPA's output, already kept); "peft" keeps a·in per
                           adapted layer instead when b ≠ a; LoRA also keeps A x (a·r per adapted layer)
      IA3                  b·kv twice (k, v before scaling), a·i (down_proj's input, cast to the vector's dtype)
    Once per step: the token ids (full fine-tuning: the embedding's gradient), the final norm, the head's
    input (if it trains), the float32 log-softmax (4·vocab) and the labels (8) per token, rotary cos/sin
    (2·s·head_dim·b, shared by every block). Checkpointing keeps b·h per block instead of the block's terms.
    Prompt tuning runs s + num_virtual_tokens positions; prefix tuning attends to s + P keys (repeated to
    every head, with a b-byte mask, because transformers passes a mask to SDPA when a cache is present), and
    its first block keeps nothing below its attention. The first block of the techniques that freeze the
    embedding keeps nothing for its input norm, and under eager attention its keys only if the queries
    need a gradient.
    """
    b, a, L = bits // 8, adapter_bits // 8, shape.n_layers
    h, i, q, kv, heads, d = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads, shape.head_dim
    targets = set(lora_targets) if technique in ("lora", "qlora") else set()
    full = technique == "full"
    nv = num_virtual_tokens if technique in ("prompt_tuning", "prefix_tuning") else 0
    s = seq_len + (nv if technique == "prompt_tuning" else 0)  # query positions
    keys = seq_len + nv  # key positions (prefix tuning: the cached prefix too)
    rows = batch
    tokens = rows * s

    def kept_input(names: tuple[str, ...], width: int) -> int:
        """Bytes per token kept for the inputs of linears that share one input tensor."""
        if full:
            return b * width
        adapted = [n for n in names if n in targets]
        if not adapted:
            return 0
        if lora_backward == "peft" and a != b:
            return a * width * len(adapted)
        return b * width

    norm = 4 * h + 4 + (b * h if full else 0)
    attn_in = kept_input(("q_proj", "k_proj", "v_proj"), h)
    if attention == "eager":  # o_proj reads a fresh contiguous copy of the attention output
        o_in = kept_input(("o_proj",), q)
    else:  # o_proj reads SDPA's output, which SDPA keeps anyway (peft: a float32 copy of it)
        o_in = kept_input(("o_proj",), q) if (lora_backward == "peft" and a != b and not full) else 0
    mlp_in = kept_input(("gate_proj", "up_proj"), h)
    down_in = kept_input(("down_proj",), i)
    lora_h = a * lora_r * len(targets)
    ia3 = (2 * b * kv + a * i) if technique == "ia3" else 0
    per_token = norm + attn_in + o_in + norm + mlp_in + 3 * b * i + down_in + lora_h + ia3  # without attention
    if attention == "eager":  # q, k and v repeated to every head, the float32 softmax and its b-byte copy
        attention_bytes = rows * (s * b * q + keys * 2 * b * q + heads * s * keys * (4 + (b if b != 4 else 0)))
    elif technique == "prefix_tuning":  # keys and values over s + P positions, repeated to every head, and a mask
        attention_bytes = rows * (s * (b * 2 * q + 4 * heads) + keys * 2 * b * q + s * keys * b)
    else:
        attention_bytes = tokens * (b * (2 * q + 2 * kv) + 4 * heads)
    block = tokens * per_token + attention_bytes
    if per_block:
        return block
    if grad_checkpointing:
        blocks = L * tokens * b * h  # each block's input
    else:
        blocks = L * block - _first_block_savings(technique, targets, attention, lora_backward, a, b, h, i, q, heads,
                                                  s, tokens, rows, keys, attention_bytes)
        if L > 1 or technique not in ("lora", "qlora") or targets & {"q_proj", "k_proj", "v_proj"}:
            blocks += 2 * s * d * b  # rotary cos and sin, (1, s, head_dim), shared by the blocks
    once = tokens * (norm + (b * h if full else 0) + LOG_SOFTMAX_BYTES * shape.vocab + INDEX_BYTES) + 4
    if full:
        once += tokens * INDEX_BYTES  # token ids, for the embedding's gradient
    return blocks + once


def _first_block_savings(technique, targets, attention, lora_backward, a, b, h, i, q, heads, s, tokens, rows, keys,
                         attention_bytes) -> int:
    """What the first block does not keep, compared with the others, when the embedding is frozen: a tensor
    is kept only for a gradient, and below the first trained layer nothing needs one."""
    if technique in ("full", "prompt_tuning"):  # the gradient reaches the input embeddings
        return 0
    savings = tokens * (4 * h + 4)  # the input norm: its input needs no gradient, its weight is frozen
    attention_needs_grad = technique in ("ia3", "prefix_tuning") or bool(targets & {"q_proj", "k_proj", "v_proj"})
    if not attention_needs_grad:  # LoRA on o_proj / the MLP only: attention keeps nothing in this block
        savings += attention_bytes
        if attention == "sdpa" and "o_proj" in targets and not (lora_backward == "peft" and a != b):
            savings -= tokens * b * q  # o_proj's LoRA still keeps its input (SDPA's output)
        if "o_proj" not in targets:  # nothing trains before the MLP: its norm keeps nothing, SwiGLU less
            gate, up = "gate_proj" in targets, "up_proj" in targets
            kept = b * i * (2 * gate + up)  # silu's input and up for gate's gradient; silu(gate) for up's
            savings += tokens * (4 * h + 4 + 3 * b * i - kept)
    elif attention == "eager":  # unlike SDPA, a matmul keeps one operand only for the other one's gradient
        q_grad = "q_proj" in targets  # ia3, prefix tuning: frozen queries, trained keys and values
        k_grad = technique in ("ia3", "prefix_tuning") or "k_proj" in targets
        v_grad = technique in ("ia3", "prefix_tuning") or "v_proj" in targets
        p_grad = q_grad or k_grad  # the attention probabilities
        # softmax keeps its float32 output for its own gradient; p·v its b-byte copy for v's gradient
        probabilities = 4 * p_grad + (b * v_grad if b != 4 else 4 * (v_grad and not p_grad))
        kept = rows * (s * b * q * k_grad + keys * b * q * q_grad + keys * b * q * p_grad
                       + heads * s * keys * probabilities)
        savings += attention_bytes - kept
    return savings


# ------------------------------------------------------------------------------------------------
# From a transformers config
# ------------------------------------------------------------------------------------------------
def shape_of_config(config) -> ModelShape:
    """The planner's shape of a transformers config (LlamaConfig, MistralConfig, Qwen2Config, …)."""
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if getattr(config, name, None) is None:
            raise ValueError(f"config {type(config).__name__} has no {name}: plan_for_config reads Llama-style "
                             f"configs; call plan(...) with the sizes instead")
    heads = config.num_attention_heads
    return ModelShape(n_layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=config.intermediate_size, n_heads=heads,
                      n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))


def count_parameters_of_config(config) -> int:
    """The exact parameter count of the model a config describes: by formula for the Llama family (Llama,
    Mistral: no biases unless ``attention_bias`` / ``mlp_bias``; Qwen2: q, k, v biases), otherwise by
    building the model on the ``meta`` device (no memory, a few seconds)."""
    family = getattr(config, "model_type", None)
    if family in ("llama", "mistral", "qwen2"):
        shape = shape_of_config(config)
        biases = 0
        if family == "qwen2" or getattr(config, "attention_bias", False):
            biases += shape.q_dim + 2 * shape.kv_dim + (shape.hidden if family != "qwen2" else 0)
        if getattr(config, "mlp_bias", False):
            biases += 2 * shape.intermediate + shape.hidden
        return shape.n_params() + shape.n_layers * biases
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def plan_for_config(config, technique: str, **kwargs) -> MemoryPlan:
    """`plan` for the model a transformers config describes (e.g. ``LlamaConfig.from_pretrained(folder)``,
    ``AutoConfig.from_pretrained(folder)``: only config.json is read). The parameter count is exact
    (`count_parameters_of_config`); the keyword arguments are `plan`'s (batch, seq_len, bits, …)."""
    shape = shape_of_config(config)
    n_params = kwargs.pop("n_params", None) or count_parameters_of_config(config)
    return plan(n_params, technique, n_layers=shape.n_layers, hidden=shape.hidden, intermediate=shape.intermediate,
                n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim, vocab=shape.vocab,
                tied_embeddings=shape.tied, **kwargs)


# ------------------------------------------------------------------------------------------------
# Can I fine-tune X on a Y GB GPU?
# ------------------------------------------------------------------------------------------------
# Llama-2's published shapes: the config.json of meta-llama/Llama-2-7b-hf, Llama-2-13b-hf and Llama-2-70b-hf
# on the Hugging Face hub (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
# intermediate_size, vocab_size; untied embeddings). 70B uses grouped-query attention (8 kv heads).
LLAMA2_SHAPES = {
    "7B": ModelShape(n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32, head_dim=128,
                     vocab=32000, tied=False),
    "13B": ModelShape(n_layers=40, hidden=5120, intermediate=13824, n_heads=40, n_kv_heads=40, head_dim=128,
                      vocab=32000, tied=False),
    "70B": ModelShape(n_layers=80, hidden=8192, intermediate=28672, n_heads=64, n_kv_heads=8, head_dim=128,
                      vocab=32000, tied=False),
}
FEASIBILITY_SETTINGS = dict(batch=1, seq_len=512, grad_checkpointing=True, bits=16, lora_r=16,
                            lora_targets="all-linear", optimizer="adamw")
FEASIBILITY_TECHNIQUES = ("full", "lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "inference")


def feasibility_table(sizes: Iterable[str] = ("7B", "13B", "70B"), gpus_gb: Iterable[float] = (24, 48, 80),
                      techniques: Iterable[str] = FEASIBILITY_TECHNIQUES, **settings) -> list[dict]:
    """One row per (model, technique): the planned peak in GB and, per GPU, whether it fits — "can I
    fine-tune Llama-2 X on a Y GB GPU, and with which technique?".

    Defaults (`FEASIBILITY_SETTINGS`): batch 1 × 512 tokens, gradient checkpointing, bf16, AdamW, LoRA/QLoRA
    r = 16 on every linear layer; full fine-tuning in mixed precision (bf16 weights and gradients, float32
    master weights and moments: 16 bytes per parameter); prefix tuning without checkpointing (it cannot
    run checkpointed in transformers). ``settings`` override them (e.g. batch=4)."""
    sizes, gpus_gb, techniques = list(sizes), list(gpus_gb), list(techniques)
    unknown = [s for s in sizes if s not in LLAMA2_SHAPES]
    if unknown:
        raise ValueError(f"sizes {unknown}: the table knows Llama-2 {list(LLAMA2_SHAPES)}")
    options = {**FEASIBILITY_SETTINGS, **settings}
    rows = []
    for size in sizes:
        shape = LLAMA2_SHAPES[size]
        for technique in techniques:
            extra = {"master_weights": True} if technique == "full" else {}
            if technique == "prefix_tuning":  # its cache-based prefix cannot run checkpointed (see plan)
                extra["grad_checkpointing"] = False
            p = plan(shape.n_params(), technique, n_layers=shape.n_layers, hidden=shape.hidden,
                     intermediate=shape.intermediate, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                     head_dim=shape.head_dim, vocab=shape.vocab, tied_embeddings=shape.tied,
                     **({"bits": options["bits"]} if technique == "inference" else {**options, **extra}))
            row = {"model": f"Llama-2 {size}", "technique": technique, "peak_gb": round(p.peak / GB, 1),
                   "checkpointing": bool(p.settings.get("grad_checkpointing", False))}
            row.update({f"{g:g} GB": p.fits(g) for g in gpus_gb})
            rows.append(row)
    return rows


# Last, because course_lib.memory imports this module at its end (it exposes plan & co.): whichever of the
# two is imported first, every name the other needs exists by then. Both are used only inside functions.
from .memory import ADAMW_STEP_COUNTER_BYTES, GB  # noqa: E402
