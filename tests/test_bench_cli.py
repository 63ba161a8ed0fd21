"""`course-bench all` and `--device`: every benchmark runs in turn into ONE JSON file with the machine, date and
arguments; a failing benchmark is recorded and the others still run (exit 1); the device reaches every
benchmark; CUDA without a GPU is a clear error. The orchestration is tested with fake benchmarks (the real
ones have their own smoke tests: tests/test_bench_grpo.py, tests/test_lab.py -k bench); TRL's step timing
is tested on real trainers."""

import argparse
import json

import pytest
import torch

import course_lib.bench as bench
from course_lib.bench.device import bench_device, resolve_device


def _fakes(seen: list):
    def ok(args):
        seen.append(("ok", args.device, args.repeats))
        return {"device": args.device, "value": 1.5}

    def broken(args):
        seen.append(("broken", args.device, args.repeats))
        raise RuntimeError("boom: the library is missing")

    def after(args):
        seen.append(("after", args.device, args.repeats))
        return {"value": 2}
    return {"ok": ok, "broken": broken, "after": after}


def test_all_runs_every_benchmark_into_one_json_and_records_a_failure(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "BENCHMARKS", _fakes(seen))
    out = tmp_path / "run.json"
    rc = bench.main(["all", "--device", "cpu", "--repeats", "1", "--json", str(out), "--note", "a test run"])
    assert rc == 1  # one failed
    assert seen == [("ok", "cpu", 1), ("broken", "cpu", 1), ("after", "cpu", 1)]  # the failure did not stop the rest
    run = json.loads(out.read_text())
    assert run["command"] == "all" and run["note"] == "a test run"
    assert run["arguments"]["repeats"] == 1 and run["arguments"]["device"] == "cpu"
    assert list(run["benchmarks"]) == ["ok", "broken", "after"]
    assert run["benchmarks"]["ok"]["result"] == {"device": "cpu", "value": 1.5}
    assert run["benchmarks"]["broken"]["error"] == "RuntimeError: boom: the library is missing"
    assert "result" not in run["benchmarks"]["broken"]
    assert all(outcome["seconds"] >= 0 for outcome in run["benchmarks"].values())
    machine = run["machine"]
    assert machine["device"] == "cpu" and machine["device_type"] == "cpu" and machine["cpu_count"] >= 1
    assert machine["cpu_model"] and machine["python"]
    for library in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert machine["versions"][library]  # installed here, so a version string
    assert machine["versions"]["torch"] == torch.__version__.split("+")[0] or machine["versions"]["torch"] == torch.__version__
    assert run["date"][:4].isdigit() and "T" in run["date"]
    err = capsys.readouterr().err
    assert "1 of 3 benchmarks failed" in err and "broken: RuntimeError: boom" in err


def test_all_succeeds_with_exit_0_and_writes_the_default_file(tmp_path, monkeypatch):
    seen = []
    fakes = _fakes(seen)
    del fakes["broken"]
    monkeypatch.setattr(bench, "BENCHMARKS", fakes)
    monkeypatch.chdir(tmp_path)
    assert bench.main(["all", "--device", "cpu", "--repeats", "1"]) == 0
    written = list((tmp_path / "benchmarks" / "raw").glob("*-cpu.json"))
    assert len(written) == 1 and written[0].name[:4].isdigit()  # <date>-cpu.json
    assert set(json.loads(written[0].read_text())["benchmarks"]) == {"ok", "after"}
    # --json DIR: the default file name inside that folder
    folder = tmp_path / "out"
    folder.mkdir()
    assert bench.main(["all", "--device", "cpu", "--repeats", "1", "--json", str(folder)]) == 0
    assert [p.name for p in folder.iterdir()] == [written[0].name]


def test_one_benchmark_gets_the_device_and_its_json_has_the_same_shape(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "BENCHMARKS", _fakes(seen))
    out = tmp_path / "ok.json"
    assert bench.main(["ok", "--device", "cpu", "--repeats", "2", "--json", str(out)]) == 0
    assert seen == [("ok", "cpu", 2)]
    run = json.loads(out.read_text())
    assert run["command"] == "ok" and list(run["benchmarks"]) == ["ok"] and run["machine"]["device"] == "cpu"


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "BENCHMARKS", _fakes(seen))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["all", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is visible" in err and "--device cpu" in err
    assert seen == []  # nothing ran
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        bench_device(argparse.Namespace(device="cuda"))
    with pytest.raises(ValueError, match="device 'tpu': use one of cpu, cuda"):
        resolve_device("tpu")


def test_the_default_device_is_cuda_only_when_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_device(argparse.Namespace()) == torch.device("cpu")  # a Namespace without device: the tests' way
    assert bench_device(argparse.Namespace(device=None)) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_arguments_are_rejected_before_anything_runs(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "BENCHMARKS", _fakes(seen))
    assert bench.main(["all", "--repeats", "0"]) == 2
    assert "--repeats 0: it must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["all", "--device", "tpu"])  # argparse: invalid choice
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert bench.main(["nope"]) == 2 and "no benchmark 'nope'" in capsys.readouterr().err
    assert seen == []


@pytest.mark.slow
def test_each_trl_trainer_runs_with_its_own_precision_and_checkpointing():
    """transformers' train() gets autocast from accelerate's process-wide state: the last trainer built sets it
    for all. The timed steps must run each trainer as its own arguments say, whatever the build order."""
    import tempfile
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from course_lib.bench.trl_steps import ready_for_steps, trl_settings
    from course_lib.models import load_model
    from course_lib.templates import instruction_dataset

    rows = [{"messages": r["messages"]} for r in instruction_dataset(["sentiment"], per_task=8)]
    tokenizer = load_model(None)[1]

    def trainer(**overrides):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SFTTrainer(model=load_model(None)[0], processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
                              args=SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_steps=1,
                                             per_device_train_batch_size=4, save_strategy="no", use_cpu=True,
                                             disable_tqdm=True, **overrides))

    trainers = {"defaults": trainer(), "float32": trainer(bf16=False, gradient_checkpointing=False)}  # float32 last
    seen = {}
    for name, t in trainers.items():
        ready_for_steps(t, 1)
        dtypes, calls = set(), []
        layer = next(m for n, m in t.model.named_modules() if n.endswith("layers.0.mlp.down_proj.base_layer"))

        def record(module, inputs, output, dtypes=dtypes, calls=calls):
            dtypes.add(output.dtype)
            calls.append(1)
        hook = layer.register_forward_hook(record)
        t.training_step(t.model, next(iter(t.get_train_dataloader())))
        hook.remove()
        grads = [p.grad for p in t.model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)  # checkpointing still lets the adapters learn
        seen[name] = (dtypes, len(calls), trl_settings(t))
    assert seen["defaults"] == ({torch.bfloat16}, 2, "bfloat16 autocast, checkpointing on")  # forward re-run in backward
    assert seen["float32"] == ({torch.float32}, 1, "no autocast (float32), checkpointing off")
