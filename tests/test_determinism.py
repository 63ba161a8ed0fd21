"""Determinism (issue 14): the same short training (course_lib.training.train on the embedded model with a
LoRA adapter, fixed seed, CPU) run in two fresh processes gives exactly the same losses and weights."""

import json
import os
import subprocess
import sys
import textwrap

from .conftest import ROOT

RUN = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from course_lib import data, lora
    from course_lib.models import load_model
    from course_lib.training import ShuffledEpochs, TrainConfig, train

    model, tok = load_model(None, device="cpu")
    torch.manual_seed(0)  # the adapter's init draws from the global RNG (as peft's does): TrainConfig.seed
    # only seeds train(); without this line the runs differ from step 2 on (B = 0 hides A's draw at step 1)
    lora.add_lora(model, ["q_proj", "v_proj"], r=4, dropout=0.1)  # dropout: the seed must fix its masks too
    texts = data.take(data.documents(seed=0), 8)
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    order = ShuffledEpochs(len(texts), seed=0)

    def batch(step):
        idx = torch.tensor(order.take(2 * step, 2))
        return {k: v[idx] for k, v in rows.items()}

    history = train(model, batch, TrainConfig(steps=4, lr=5e-3, warmup_steps=1, grad_accum=2, seed=123,
                                              progress=False))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in sorted(
        (n, p) for n, p in model.named_parameters() if p.requires_grad))).hexdigest()
    print("RESULT=" + json.dumps({"loss": [float(x).hex() for x in history.loss], "weights": digest}))
""")


def _run() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONHASHSEED": "random"}
    done = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT=")[1])


def test_two_runs_with_the_same_seed_give_identical_losses_and_weights():
    first, second = _run(), _run()
    assert len(first["loss"]) == 4
    assert first == second  # exact: float.hex of every loss, sha256 of the trained weights
