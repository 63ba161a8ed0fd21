"""Round trips across processes (issue 14): every adapter type, NF4 state and a reward-model checkpoint
saved in this process and loaded in a fresh Python process give bit-identical outputs (torch.equal).

Saved by course_lib: LoRA, DoRA, IA3, prompt / prefix / P-tuning soft prompts (loaded by course_lib), LoRA
and IA3 (also loaded by peft). Saved by peft: LoRA, IA3 and prompt tuning (loaded by course_lib). One
subprocess loads every artefact (a process start and a model load cost seconds), writes its logits to a
file, and this process compares them with the logits it computed before saving. Equivalence of course_lib
and peft on the same weights is tested elsewhere (test_lora, test_ia3, test_soft_prompts, test_adapters);
here the reference for an artefact the other library loads is that library loading it in this process.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TEXTS = ["Once upon a time a fox", "Q: What colour is the sky?\nA:"]

# The fresh process: loads the embedded model, every artefact in ARTEFACTS, and writes {name: logits}.
LOADER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from course_lib import ia3, lora, soft_prompts
    from course_lib.models import load_model
    from course_lib.nf4 import NF4State, dequantize_nf4

    root = Path(sys.argv[1])
    model, tok = load_model(None, device="cpu")
    batch = torch.load(root / "batch.pt", weights_only=True)
    fresh = lambda: load_model(None, device="cpu")[0]
    out = {}

    @torch.no_grad()
    def logits(m):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    for name in ("lora", "dora", "peft_lora"):
        m = fresh(); lora.load_adapter(m, root / name); out[name] = logits(m.eval())
    for name in ("ia3", "peft_ia3"):
        m = fresh(); ia3.load_adapter(m, root / name); out[name] = logits(m.eval())
    for name in ("prompt", "prefix", "p-tuning", "peft_prompt"):
        out[name] = logits(soft_prompts.load_adapter(fresh(), root / name).eval())

    from peft import PeftModel
    for name in ("lora", "ia3"):
        out["peft_loads_" + name] = logits(PeftModel.from_pretrained(fresh(), root / name).eval())

    saved = torch.load(root / "nf4.pt", weights_only=True)
    meta = json.loads((root / "nf4.json").read_text())
    state = NF4State(shape=meta["shape"], dtype=getattr(torch, meta["dtype"]), blocksize=meta["blocksize"],
                     absmax=saved["absmax"], double_quant=meta["double_quant"], absmax_scale=saved["absmax_scale"],
                     offset=saved["offset"], absmax_blocksize=meta["absmax_blocksize"])
    out["nf4"] = dequantize_nf4(saved["packed"], state)

    from transformers import AutoModelForSequenceClassification
    with torch.no_grad():
        out["reward_model"] = AutoModelForSequenceClassification.from_pretrained(root / "reward_model").eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save(out, root / "fresh.pt")
""")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Adapters start as the identity (LoRA B = 0, IA3 = 1): give every trainable tensor seeded values so
    a lost or misplaced tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.slow
def test_every_artefact_reloads_bit_identically_in_a_fresh_process(tmp_path):
    from peft import (IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model)

    from course_lib import ia3, lora, soft_prompts
    from course_lib import reward_model as rm
    from course_lib.nf4 import dequantize_nf4, quantize_nf4

    from course_lib.models import load_model

    # a fresh copy, not the session fixture: another test in the same worker may have changed that one
    base, tok = load_model(None, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels (and summation order) as the fresh process
    try:
        batch = dict(tok(TEXTS, return_tensors="pt", padding=True))
        torch.save({k: batch[k] for k in ("input_ids", "attention_mask")}, tmp_path / "batch.pt")
        expected: dict[str, torch.Tensor] = {}

        @torch.no_grad()
        def logits(m):
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        for seed, (name, extra) in enumerate([("lora", {}), ("dora", {"use_dora": True})]):
            m = copy.deepcopy(base)
            lora.add_lora(m, ["q_proj", "v_proj", "down_proj"], r=4, **extra)
            _randomize(m, seed)
            lora.save_adapter(m, tmp_path / name)
            expected[name] = logits(m.eval())
        m = copy.deepcopy(base)
        ia3.add_ia3(m, ["k_proj", "v_proj", "down_proj"], ["down_proj"])
        _randomize(m, 2)
        ia3.save_adapter(m, tmp_path / "ia3")
        expected["ia3"] = logits(m.eval())
        for seed, (method, extra) in enumerate([("prompt", {}), ("prefix", {}), ("p-tuning", {})], start=3):
            sp = soft_prompts.add_soft_prompt(copy.deepcopy(base), method, 4, **extra)
            _randomize(sp, seed)
            soft_prompts.save_adapter(sp, tmp_path / method)
            expected[method] = logits(sp.eval())

        # saved by peft, loaded by course_lib (the reference: course_lib loading it here)
        peft_configs = {
            "peft_lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "peft_ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  init_ia3_weights=False),
            "peft_prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        }
        for name, config in peft_configs.items():
            torch.manual_seed(7)
            get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / name)
        for name, loader in [("peft_lora", lora.load_adapter), ("peft_ia3", ia3.load_adapter)]:
            m = copy.deepcopy(base)
            loader(m, tmp_path / name)
            expected[name] = logits(m.eval())
        expected["peft_prompt"] = logits(soft_prompts.load_adapter(copy.deepcopy(base), tmp_path / "peft_prompt").eval())
        # saved by course_lib, loaded by peft (the reference: peft loading it here)
        for name in ("lora", "ia3"):
            expected["peft_loads_" + name] = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval())

        # NF4 state (double quantization: the state holds uint8 absmax, their scales and the offset)
        w = torch.randn(96, 64, generator=torch.Generator().manual_seed(9))  # (out, in); 6144 values, 96 blocks
        packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
        torch.save({"packed": packed, "absmax": state.absmax, "absmax_scale": state.absmax_scale,
                    "offset": state.offset}, tmp_path / "nf4.pt")
        (tmp_path / "nf4.json").write_text(json.dumps(
            {"shape": list(state.shape), "dtype": str(state.dtype).removeprefix("torch."), "blocksize": state.blocksize,
             "double_quant": state.double_quant, "absmax_blocksize": state.absmax_blocksize}))
        expected["nf4"] = dequantize_nf4(packed, state)

        # reward-model checkpoint (lesson 06): the transformers sequence classifier it saves as
        scorer = rm.RewardModel.from_causal_lm(copy.deepcopy(base), tok, init_std=0.5).eval()
        rm.save_reward_model(scorer, tok, tmp_path / "reward_model")
        # the reference is the checkpoint loaded here (from_pretrained picks its own attention kernel, which
        # differs from the in-memory copy in the last bit); test_reward_model checks it scores as the RewardModel
        from transformers import AutoModelForSequenceClassification

        with torch.no_grad():
            expected["reward_model"] = AutoModelForSequenceClassification.from_pretrained(
                tmp_path / "reward_model").eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            in_memory = rm.to_transformers(scorer, tok).eval()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(expected["reward_model"], in_memory, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert sorted(fresh) == sorted(expected)
    differ = {name: (expected[name] - fresh[name]).abs().max().item() if expected[name].shape == fresh[name].shape
              else f"shape {tuple(expected[name].shape)} vs {tuple(fresh[name].shape)}"
              for name in expected if not torch.equal(expected[name], fresh[name])}
    assert not differ, f"not bit-identical after a round trip through a fresh process: {differ}"
    base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    for name in expected:  # the adapters were not identities: a lost adapter would change the output
        if name not in ("nf4", "reward_model"):
            assert not torch.equal(expected[name][:, -base_logits.shape[1]:], base_logits), name
