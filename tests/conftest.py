"""Tests never touch the network: the hub and datasets libraries are told so before they load."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each (notebook kernels inherit this), or they thrash
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


# The session's shared (model, tokenizer) pairs, each with its fingerprint when loaded: a test that changes
# one (adds an adapter, trains it, flips padding_side) would change what every later test in the same xdist
# worker sees — a failure that depends on test order. `_shared_models_unchanged` names the culprit instead.
_SHARED: dict[str, tuple] = {}


def _fingerprint(model, tokenizer) -> tuple:
    """What a test could change: the module tree, every parameter and buffer (name, shape, dtype,
    requires_grad, a float64 sum), train/eval mode, and the tokenizer's padding settings."""
    with torch.no_grad():
        tensors = tuple((name, tuple(t.shape), str(t.dtype), t.requires_grad, float(t.double().sum()))
                        for name, t in [*model.named_parameters(), *model.named_buffers()])
    modules = tuple((name, type(m).__name__, m.training) for name, m in model.named_modules())
    return tensors, modules, tokenizer.padding_side, tokenizer.pad_token, tokenizer.truncation_side


def _shared(key: str, load):
    if key not in _SHARED:
        model, tokenizer = load()
        _SHARED[key] = (model, tokenizer, _fingerprint(model, tokenizer))
    return _SHARED[key][:2]


@pytest.fixture(autouse=True)
def _shared_models_unchanged(request):
    """After each test: the shared models it could reach are as they were loaded (copy.deepcopy first)."""
    yield
    for key, (model, tokenizer, fingerprint) in list(_SHARED.items()):
        if _fingerprint(model, tokenizer) != fingerprint:
            _SHARED[key] = (model, tokenizer, _fingerprint(model, tokenizer))  # only the culprit fails
            pytest.fail(f"{request.node.nodeid} changed the session's shared {key!r} model or tokenizer; "
                        f"work on copy.deepcopy(model) (and leave tokenizer settings alone)", pytrace=False)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded model, shared by the session: copy the model before changing it."""
    from course_lib.models import load_model

    return _shared("embedded", lambda: load_model(None, device="cpu"))


def tiny_llama(seed: int = 0, tied: bool = True):
    """A seeded, randomly initialised Llama small enough to train in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.fixture(scope="session")
def hub_model_dir(tmp_path_factory) -> Path:
    """A hub-shaped checkpoint folder (Qwen2, left-padding ChatML tokenizer, bf16): tests/hub_model.py."""
    from .hub_model import build_hub_model

    return build_hub_model(tmp_path_factory.mktemp("hub_model"))


@pytest.fixture(scope="session")
def hub(hub_model_dir):
    """(model, tokenizer) of the hub-shaped checkpoint, loaded as a learner would (float32, CPU).
    Shared by the session: copy the model before changing it, and leave the tokenizer's settings alone."""
    from course_lib.models import load_model

    return _shared("hub", lambda: load_model(hub_model_dir, device="cpu"))
