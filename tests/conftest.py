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


@pytest.fixture(scope="session")
def embedded():
    from course_lib.models import load_model

    return load_model(None, device="cpu")


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

    return load_model(hub_model_dir, device="cpu")
