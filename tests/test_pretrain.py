"""`python -m course_lib.pretrain` end to end on a tiny configuration."""

import json
import subprocess
import sys

from course_lib.models import load_model
from course_lib.pretrain import PretrainConfig, run


def test_tiny_pretraining_writes_a_loadable_reproducible_model(tmp_path):
    report_a = run(PretrainConfig.tiny(), tmp_path / "a")
    report_b = run(PretrainConfig.tiny(), tmp_path / "b")
    assert report_a["checksums"] == report_b["checksums"]  # same seed, same bits
    assert json.loads((tmp_path / "a" / "pretrain_report.json").read_text())["checksums"] == report_a["checksums"]
    model, tokenizer = load_model(tmp_path / "a", device="cpu")
    assert model.config.hidden_size == 32
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert [e["step"] for e in report_a["evaluations"]] == [2, 3]


def test_module_cli_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "course_lib.pretrain", "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
