"""``course-bench grpo``: a GRPO step, generation included, through course_lib and through TRL's
``GRPOTrainer``, and the generation throughput of each (completion tokens per second).

Timed like ``course-bench dpo`` (medians of alternating runs in one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

PROMPTS_PER_STEP, GROUP_SIZE, MAX_COMPLETION_LENGTH, BETA, LOSS_TYPE = 16, 8, 6, 0.1, "dapo"  # lesson 08's cpu profile
DEFAULT_STEPS = 3  # optimizer steps per timed run


def bench_grpo(args: argparse.Namespace) -> dict:
    """A GRPO step: course_lib's ``grpo_train`` vs ``GRPOTrainer``'s steady-state step, same model, LoRA,
    prompts, G, completion length and loss; then generation alone, same prompts, both sides.

    Lesson 08's set-up: the embedded model, LoRA r=8 α=16 on all linear layers, 2-digit addition prompts
    (``grpo.addition_rows(data.addition_pairs("train"))``) rewarded by ``grpo.correctness_reward``, 16 prompts
    per step × G = 8 completions each (128 rows), at most 6 completion tokens, sampling at temperature 1
    (no top-k / top-p), loss "dapo" (TRL's default), ε = 0.2, group-scaled advantages, one optimizer step per
    generation (μ = 1), and β = 0.1 on both sides (the lesson's value; TRL's default is 0): so both do the
    reference forward with the adapter switched off, as both do with LoRA.

    One step covers the same work on both sides: 16 prompts × 8 completions generated in ONE batched
    ``generate`` call, scored, one reference forward, one policy forward + backward over all 128 rows, one
    optimizer step. TRL counts ``per_device_train_batch_size`` in completions, not prompts: 128 with
    ``gradient_accumulation_steps`` = 1 gives ``steps_per_generation`` = 1 and ``generation_batch_size`` = 128,
    so each ``training_step`` generates a fresh batch (``_prepare_inputs``: ``_step % steps_per_generation
    == 0``) and trains on all of it — no buffered slices carried between measured steps.

    course_lib: ``grpo.grpo_train`` end to end (sampling, rewards, advantages, reference log-probs, loss,
    backward, clipping, optimizer; ``log_kl`` is moot at β ≠ 0), timed twice in the same alternation: with
    each prompt run once for its G completions (``GRPOConfig.share_prompt``, the default: generation prefills
    each prompt once and repeats its cache G times; the reference and policy log-probs pack the prompt and
    its G completions in one row behind a prefix-sharing mask — the same samples and log-probs, fewer
    tokens through the model) and without (``share_prompt=False``: every completion re-runs its prompt, as
    TRL does — the equal-work figure). TRL 1.16 shares prompts only through vLLM's prefix caching
    (``trl vllm-serve --enable_prefix_caching``), which needs a GPU server; its transformers generation and
    its log-prob forwards run the G copies. TRL: the trainer's own ``training_step``
    (which generates, scores and trains) on generation batches from its own sampler, plus its optimizer and
    scheduler step (``bench.trainer_steps``) — without ``trainer.train()``'s set-up, logging and gradient
    clipping. TRL is timed twice in the same alternation: with its own defaults (bf16 autocast — what a
    learner gets, and how ``course-bench sft`` times TRL; gradient checkpointing only if its constructor switched
    it on, which ``trl_settings`` reports) and in float32 without
    checkpointing (course_lib's arithmetic); its other defaults stay (its fused chunked LM head for
    log-probs, per-step metrics, linear
    learning-rate schedule: course_lib's is constant, which costs the same). The prompts of each step come
    from each side's own shuffler: the same pool, so the same lengths on average.

    Generation throughput: ``grpo.sample_completions`` vs TRL's ``GRPOTrainer._generate`` (tokenize, generate,
    decode) on one identical batch of 16 prompts × 8, the torch RNG reseeded before each call so each side
    samples the same completions every time; completion tokens (up to and including the first end token,
    as both count them) per second.
    """
    import tempfile
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from .. import data
    from ..grpo import GRPOConfig, addition_rows, correctness_reward, grpo_train, sample_completions
    from ..lora import add_lora
    from ..models import load_model
    from .device import bench_device, device_name, synchronizer
    from .timing import alternate_all, ratio_range
    from .trl_steps import TRL_VARIANTS, ready_for_steps, time_with_and_without_sharing_and_trl, trl_step_times

    device = bench_device(args)
    cuda = device.type == "cuda"
    steps = getattr(args, "steps", None) or DEFAULT_STEPS
    rows = addition_rows(data.addition_pairs("train"))
    ours, tokenizer = load_model(None, device=device)
    add_lora(ours, "all-linear", r=8, alpha=16)
    config = GRPOConfig(steps=steps, prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP_SIZE,
                        max_new_tokens=MAX_COMPLETION_LENGTH, temperature=1.0, lr=1e-3, loss_type=LOSS_TYPE,
                        beta=BETA, progress=False)

    def trl_trainer(**overrides):
        """A GRPOTrainer on a fresh copy of the model, ready to step, with its own generation batches;
        ``overrides`` change TRL's defaults."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GRPOTrainer(model=load_model(None, device=device)[0], processing_class=tokenizer,
                                  reward_funcs=[correctness_reward], train_dataset=Dataset.from_list(rows),
                                  peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"),
                                  args=TRLGRPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_steps=steps,
                                                     learning_rate=1e-3,
                                                     per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
                                                     gradient_accumulation_steps=1, num_generations=GROUP_SIZE,
                                                     max_completion_length=MAX_COMPLETION_LENGTH, temperature=1.0,
                                                     loss_type=LOSS_TYPE, beta=BETA, save_strategy="no",
                                                     use_cpu=not cuda, disable_tqdm=True, **overrides))
        trl_args = trainer.args
        if (trl_args.steps_per_generation, trl_args.generation_batch_size) != (1, PROMPTS_PER_STEP * GROUP_SIZE):
            raise RuntimeError(f"TRL batches generations differently than this benchmark assumes: steps_per_generation="
                               f"{trl_args.steps_per_generation}, generation_batch_size={trl_args.generation_batch_size}")
        ready_for_steps(trainer, steps)
        # Trainer.train() passes num_items_in_batch; GRPO's loss ignores it (it counts tokens in its own batch).
        trainer.training_step = functools.partial(trainer.training_step, num_items_in_batch=None)
        their_batches = []  # generation batches: lists of 128 rows, each prompt G times in a row
        for batch in trainer.get_train_dataloader():
            their_batches.append(batch)
            if len(their_batches) == steps:
                break
        return trainer, their_batches

    def run_ours(share_prompt: bool = True):
        grpo_train(ours, tokenizer, rows, [correctness_reward], dataclasses.replace(config, share_prompt=share_prompt))

    variants = {name: trl_trainer(**overrides) for name, overrides in TRL_VARIANTS.items()}
    sync = synchronizer(device)
    t_ours, t_concatenated, t_theirs, settings, round_ratios = time_with_and_without_sharing_and_trl(
        run_ours, variants, repeats=args.repeats, sync=sync)
    trainer, their_batches = variants["float32"]

    # Generation alone, on one identical batch of prompts.
    batch = their_batches[0]
    distinct_rows = batch[::GROUP_SIZE]  # (16,) the sampler repeats each prompt G times in a row
    if [row["prompt"] for row in batch] != [row["prompt"] for row in distinct_rows for _ in range(GROUP_SIZE)]:
        raise RuntimeError("TRL's generation batch is not each prompt G times in a row; the generation "
                           "comparison needs the same prompts on both sides")
    tokens = {}

    def generate_ours(share_prompt: bool = True):
        torch.manual_seed(0)
        rollout = sample_completions(ours, tokenizer, distinct_rows, GROUP_SIZE, max_new_tokens=MAX_COMPLETION_LENGTH,
                                     temperature=1.0, share_prompt=share_prompt)
        tokens["ours" if share_prompt else "ours_concatenated"] = int(rollout.completion_mask.sum())

    def generate_theirs():
        torch.manual_seed(0)
        completion_ids = trainer._generate([row["prompt"] for row in batch])[1]  # (128,) lists of token ids
        tokens["theirs"] = sum(len(ids) for ids in completion_ids)

    g_ours, g_concatenated, g_theirs = alternate_all([generate_ours, functools.partial(generate_ours, False),
                                                      generate_theirs], repeats=args.repeats, sync=sync)
    throughput = [tokens["ours"] / g_ours, tokens["theirs"] / g_theirs]

    rows_per_step = PROMPTS_PER_STEP * GROUP_SIZE
    times = trl_step_times(t_ours, t_concatenated, t_theirs, round_ratios, steps)
    result = {"device": device_name(device), "model": "embedded", "steps": steps,
              "prompts_per_step": PROMPTS_PER_STEP, "group_size": GROUP_SIZE,
              "max_completion_length": MAX_COMPLETION_LENGTH, "beta": BETA, "loss_type": LOSS_TYPE,
              **times, "sharing_speedup": t_concatenated / t_ours,
              "generation_s": [g_ours, g_theirs], "generation_s_concatenated": g_concatenated, "generation_tokens": [tokens["ours"], tokens["theirs"]],
              "generation_tokens_per_s": throughput, "generation_ratio": g_ours / g_theirs, "trl_settings": settings,
              "settings": {"course_lib": "float32, checkpointing off, each prompt run once for its G completions (cache "
                                         "prefilled once for generation; prompt ++ G completions packed for the "
                                         "log-probs), LM head over completion positions only, constant lr",
                           "course_lib_concatenated": "float32, checkpointing off, every completion re-runs its prompt "
                                                      "(share_prompt=False), log-probs from the LM head over the "
                                                      "completion (logits_to_keep), constant lr",
                           **{f"trl_{k}": f"{v}, log-probs from its chunked LM head, linear lr decay"
                              for k, v in settings.items()}}}
    print(f"grpo · {result['device']} · embedded model · LoRA r=8 all-linear · {LOSS_TYPE} β={BETA} · "
          f"{PROMPTS_PER_STEP} prompts × G={GROUP_SIZE} = {rows_per_step} completions of ≤{MAX_COMPLETION_LENGTH} "
          f"tokens per step · {steps} steps per run")
    print(f"  step (generation included)  course_lib, prompt shared {t_ours / steps * 1e3:8.1f} ms   TRL GRPOTrainer in "
          f"float32 without checkpointing {t_theirs['float32'] / steps * 1e3:8.1f} ms   ratio "
          f"{result['step_ratio']['float32']:.2f}× (rounds {ratio_range(round_ratios['float32'])})")
    print(f"        course_lib, prompt re-run per completion (TRL's arithmetic) {t_concatenated / steps * 1e3:8.1f} ms   "
          f"ratio {result['step_ratio_concatenated']['float32']:.2f}× TRL float32   sharing saves "
          f"{1 - t_ours / t_concatenated:.0%}")
    print(f"        TRL GRPOTrainer, its defaults ({settings['defaults']}) {t_theirs['defaults'] / steps * 1e3:8.1f} ms   "
          f"course_lib shared ÷ it {result['step_ratio']['defaults']:.2f}×")
    print(f"  generation {rows_per_step} completions  course_lib, prompt prefilled once {g_ours * 1e3:8.1f} ms "
          f"({throughput[0]:7.1f} tok/s)   TRL {g_theirs * 1e3:8.1f} ms ({throughput[1]:7.1f} tok/s)   ratio "
          f"{g_ours / g_theirs:.2f}×   course_lib, prompt per completion {g_concatenated * 1e3:8.1f} ms")
    return result
