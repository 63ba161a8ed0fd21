"""Load the embedded model, a local checkpoint, or (GPU lab) a hub model — one function for all.

``load_model(None)`` is the course's embedded Llama (data/embedded, checked against its recorded
checksums); a path loads a local transformers checkpoint; anything else is a hub id, which fails
within seconds and says what to do when this machine is offline.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from .pretrain import EMBEDDED_DIR, checksums

QUANTIZATIONS = (None, "bnb-nf4")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight (embedding = output head) counts once."""
    params = list(model.parameters())  # parameters() already yields each shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def verify_embedded(folder: Path = EMBEDDED_DIR) -> None:
    """Raise if the committed weights or tokenizer differ from the checksums pretraining recorded."""
    report = folder / "pretrain_report.json"
    if not (folder / "model.safetensors").is_file() or not report.is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {folder}: restore data/ from git, or regenerate it "
            f"with `python -m course_lib.pretrain`")
    expected = json.loads(report.read_text())["checksums"]
    actual = checksums(folder)
    bad = [name for name in expected if expected[name] != actual[name]]
    if bad:
        raise ValueError(f"{', '.join(bad)} in {folder} do(es) not match the checksum in pretrain_report.json: "
                         f"restore the files from git, or regenerate with `python -m course_lib.pretrain`")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else, or whose first part is a local
    folder (``data/embeded``), is a mistyped path rather than a hub id."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or Path(name.split("/")[0]).is_dir() and "/" in name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a download start? A quick connection to the configured endpoint (``HF_ENDPOINT`` or the Hub).
    Behind a proxy a direct connection says nothing, so then the answer is left to the download itself."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_snapshot(name: str) -> str | None:
    """The local folder of hub id ``name`` if the hub cache holds its config, else None (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def _offline_error(name: str) -> OSError:
    return OSError(
        f"cannot load {name!r}: it is not a local folder, and the Hugging Face Hub cannot be reached "
        f"(offline, or HF_HUB_OFFLINE=1). Download it on a connected machine "
        f"(`hf download {name} --local-dir DIR`) and pass DIR, or pass None for the embedded model.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine can use (None: :func:`default_device`), or a clear error
    naming ``device`` and what to pass instead: a ValueError for a string PyTorch does not read as a device
    (``"tpu"``, ``"gpu"``, ``"cuda:x"``), a RuntimeError for one this machine lacks (``"cuda"`` without a
    CUDA GPU, ``"cuda:3"`` with fewer GPUs, ``"mps"`` off Apple silicon)."""
    if device is None:
        return default_device()
    here = f"this machine has: 'cpu'{', ' + repr('cuda') if torch.cuda.is_available() else ''}; None picks {str(default_device())!r}"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', a torch.device, or None for the default, "
                        f"got {type(device).__name__} {device!r:.40} ({here})")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        tpu = " (TPUs are reached through torch_xla, which the course does not use)" if "tpu" in str(device).lower() else ""
        raise ValueError(f"device={device!r} is not a device PyTorch knows{tpu}: pass 'cpu', 'cuda' or 'cuda:N' "
                         f"(N: the GPU's index), 'mps' on Apple silicon, or None for the default ({here})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise RuntimeError(f"device={device!r}, but {why} (torch.cuda.is_available() is False): pass device='cpu', "
                               f"or None, which picks 'cuda' where a GPU is available")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise RuntimeError(f"device={device!r}, but this machine has {count} CUDA GPU(s), indices 0 to {count - 1}: "
                               f"pass one of those, e.g. 'cuda:0'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={device!r}, but MPS (Apple silicon GPUs) is not available here "
                           f"(torch.backends.mps.is_available() is False): pass device='cpu' or None ({here})")
    return resolved


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, quantization: str | None = None):
    """Return ``(model, tokenizer)``.

    * ``dtype`` defaults to float32: a bf16 checkpoint would otherwise load as bf16, which trains
      badly and slowly on most CPUs.
    * ``quantization="bnb-nf4"`` loads the linear layers in 4-bit NF4 through bitsandbytes
      (the library the QLoRA lesson compares against), kept on its NF4 path on every CPU
      (:func:`course_lib.nf4.bitsandbytes_reference_path`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    device = resolve_device(device)  # before any loading: a wrong device fails at once, saying what to pass
    dtype = dtype or torch.float32
    kwargs: dict = {"dtype": dtype}
    if quantization == "bnb-nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        # A 4-bit model cannot be moved after loading (bitsandbytes quantizes on the way to the device),
        # so the device is chosen while loading.
        kwargs["device_map"] = {"": str(device)}

    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a folder, a hub id (str) or None for the embedded model, "
                        f"got {type(name_or_path).__name__} {name_or_path!r:.60}")
    if name_or_path is None:
        verify_embedded()
        source = str(EMBEDDED_DIR)
    else:
        name = os.fspath(name_or_path)
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is a folder but holds no config.json: not a transformers checkpoint")
            source = str(path)
        elif _looks_like_path(name):
            raise FileNotFoundError(f"no model folder at {path.resolve()} (check the path; None loads the embedded model)")
        else:  # a hub id: try the local cache first, then the network, failing fast when offline
            source = name
            cached = _cached_snapshot(name)
            if cached is not None:  # load the folder: from_pretrained(hub id) asks the hub for an adapter config
                # even with local_files_only, retrying for ~15 s when it cannot be reached
                return _finish(AutoModelForCausalLM.from_pretrained(cached, **kwargs),
                               AutoTokenizer.from_pretrained(cached), device, quantization)
            if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
                raise _offline_error(name)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return _finish(model, tokenizer, device, quantization)


def _finish(model, tokenizer, device: torch.device, quantization: str | None):
    if tokenizer.pad_token is None:
        # Many hub models ship no pad token; reusing eos is the usual fix, but remember that then
        # "last non-pad token" logic (reward models) must not treat the real eos as padding.
        tokenizer.pad_token = tokenizer.eos_token
    if quantization is None:
        model.to(device)
    else:  # an eval-mode forward must not move bitsandbytes off its NF4 path (see the function)
        from .nf4 import bitsandbytes_reference_path

        bitsandbytes_reference_path(model)
    model.eval()
    return model, tokenizer
