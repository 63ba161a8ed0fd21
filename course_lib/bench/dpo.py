"""``course-bench dpo``: a DPO step through course_lib and through TRL's ``DPOTrainer``, and the memory
of the two ways to hold the reference (the adapter switched off vs a second, frozen model).

Timed like ``course-bench sft`` (medians of alternating runs in one process).
"""

from __future__ import annotations

import argparse
import copy


def _ending_rows(n: int, seed: int = 0) -> list[dict]:
    """Story openers with a happy (chosen) and a sad (rejected) ending."""
    from .. import data

    return data.preference_rows("ending", "train", n=n, seed=seed)


def bench_dpo(args: argparse.Namespace) -> dict:
    """A DPO step: course_lib's loop vs ``DPOTrainer``'s steady-state step, same model, LoRA, rows and loss.

    Embedded model, LoRA r=8 α=16 on all linear layers, sigmoid loss, β = 0.1, AdamW, batch 8 pairs
    ("ending" preference rows). course_lib: ``training.train`` end to end (collation, policy forward,
    reference forward with the adapter off, backward, clipping, optimizer), timed twice in the same
    alternation: with each pair's prompt run once for chosen and rejected (``DPOLoss``'s default,
    prefix sharing after Wang et al. 2024 — the same log-probs, fewer tokens through the model) and with
    the concatenated forward over the 2B full sequences (``share_prompt=False``: TRL's arithmetic, the
    equal-work figure). TRL 1.16 has no counterpart to time: ``DPOConfig.padding_free`` warns and falls
    back to padding since its DPO refactor, and there is no prompt-sharing option. TRL: the trainer's own
    ``training_step`` on batches from its own collator plus its optimizer and scheduler step — without
    ``trainer.train()``'s set-up and logging. TRL is timed twice in the same alternation: with its own
    defaults (bf16 autocast — what a learner gets, and how ``course-bench sft`` times TRL; gradient checkpointing
    only if its constructor switched it on, which ``trl_settings`` reports) and in float32 without
    checkpointing (the same arithmetic as course_lib); its per-step
    metrics stay on in both.

    Memory: measured peak of a few course_lib DPO steps with the reference as the adapter switched off,
    and with a separate frozen copy of the model as the reference (built inside the measurement)."""
    import tempfile
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from ..dpo import DPOLoss, dpo_batches
    from ..lora import add_lora
    from ..memory import measure_peak_memory, tensor_bytes
    from ..models import load_model
    from ..training import TrainConfig, train
    from .device import bench_device, device_name, synchronizer
    from .timing import ratio_range
    from .trl_steps import TRL_VARIANTS, ready_for_steps, time_with_and_without_sharing_and_trl, trl_step_times

    device = bench_device(args)
    cuda = device.type == "cuda"
    steps, batch_size, beta = getattr(args, "steps", None) or 10, 8, 0.1
    rows = _ending_rows(steps * batch_size)
    ours, tokenizer = load_model(None, device=device)
    add_lora(ours, "all-linear", r=8, alpha=16)
    batches = dpo_batches(rows, tokenizer, batch_size)
    config = TrainConfig(steps=steps, lr=1e-3, progress=False)

    def trl_trainer(**overrides):
        """A DPOTrainer on a fresh copy of the model, ready to step, and its own collated batches;
        ``overrides`` change TRL's defaults."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=load_model(None, device=device)[0], processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(rows),
                                 peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        task_type="CAUSAL_LM"),
                                 args=DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_steps=steps,
                                                learning_rate=1e-3, per_device_train_batch_size=batch_size, beta=beta,
                                                max_length=None, save_strategy="no", use_cpu=not cuda,
                                                disable_tqdm=True, **overrides))
        ready_for_steps(trainer, steps)
        return trainer, [{k: v.to(device) for k, v in b.items()} for b in trainer.get_train_dataloader()][:steps]

    def run_ours(share_prompt: bool = True):
        train(ours, batches, config, loss_fn=DPOLoss(beta, share_prompt=share_prompt), device=device)

    variants = {name: trl_trainer(**overrides) for name, overrides in TRL_VARIANTS.items()}
    sync = synchronizer(device)
    t_ours, t_concatenated, t_theirs, settings, round_ratios = time_with_and_without_sharing_and_trl(
        run_ours, variants, repeats=args.repeats, sync=sync)

    def dpo_steps(separate_reference: bool):
        model = copy.deepcopy(ours)
        reference = load_model(None, device=device)[0].requires_grad_(False) if separate_reference else None
        train(model, batches, TrainConfig(steps=3, lr=1e-3, progress=False), loss_fn=DPOLoss(beta, reference=reference),
              device=device)
        return tensor_bytes(model) + (tensor_bytes(reference) if reference is not None else 0)

    held_adapter, peak_adapter = measure_peak_memory(lambda: dpo_steps(False), device)
    held_separate, peak_separate = measure_peak_memory(lambda: dpo_steps(True), device)

    times = trl_step_times(t_ours, t_concatenated, t_theirs, round_ratios, steps)
    result = {"device": device_name(device), "model": "embedded", "steps": steps,
              "batch_pairs": batch_size, **times, "sharing_speedup": t_concatenated / t_ours,
              "peak_mb": {"adapter_off": peak_adapter.mb, "separate_reference": peak_separate.mb},
              "weights_held_mb": {"adapter_off": held_adapter / 1e6, "separate_reference": held_separate / 1e6},
              "memory_method": peak_adapter.method, "trl_settings": settings,
              "settings": {"course_lib": "float32, checkpointing off, each pair's prompt run once (prefix sharing: "
                                         "prompt ++ chosen ++ rejected packed in one row, no padding inside it), "
                                         "reference = the adapter switched off",
                           "course_lib_concatenated": "float32, checkpointing off, pairs padded to the longest in the "
                                                     "batch (share_prompt=False), reference = the adapter switched off",
                           **{f"trl_{k}": f"{v}, pairs padded to the longest in the batch, reference = the adapter "
                                          "switched off" for k, v in settings.items()}}}
    print(f"dpo · {result['device']} · embedded model · LoRA r=8 all-linear · sigmoid β={beta} · "
          f"batch {batch_size} pairs · {steps} steps per run")
    print(f"  step  course_lib, prompt shared {t_ours / steps * 1e3:8.1f} ms   TRL DPOTrainer in float32 without "
          f"checkpointing {t_theirs['float32'] / steps * 1e3:8.1f} ms   ratio {result['step_ratio']['float32']:.2f}× (rounds {ratio_range(round_ratios['float32'])})")
    print(f"        course_lib, concatenated (TRL's arithmetic) {t_concatenated / steps * 1e3:8.1f} ms   ratio "
          f"{result['step_ratio_concatenated']['float32']:.2f}× TRL float32   sharing saves "
          f"{1 - t_ours / t_concatenated:.0%}")
    print(f"        TRL DPOTrainer, its defaults ({settings['defaults']}) {t_theirs['defaults'] / steps * 1e3:8.1f} ms   "
          f"course_lib shared ÷ it {result['step_ratio']['defaults']:.2f}×")
    print(f"  reference  adapter off: peak {peak_adapter.mb:7.1f} MB, weights {held_adapter / 1e6:5.1f} MB   "
          f"separate model: peak {peak_separate.mb:7.1f} MB, weights {held_separate / 1e6:5.1f} MB   "
          f"({peak_adapter.method})")
    return result
