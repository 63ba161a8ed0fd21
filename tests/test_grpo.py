"""course_lib.grpo against TRL 1.16's GRPOTrainer and RLOOTrainer, run on the same fixed tensors.

TRL's own code computes every expected value: a real ``GRPOTrainer`` / ``RLOOTrainer`` is built on the
embedded model saved to a folder, its generation is replaced by fixed completions (``_generate``) and its
forward by fixed per-token log-probs (``_get_per_token_logps_and_entropies``), and then its
``_generate_and_score_completions`` (rewards → advantages) and ``_compute_loss`` (the objective) run
unchanged. The fixed inputs are chosen so that each mistake of lesson 08's catalogue changes the
result (test_fixed_inputs_catch_the_catalogued_mistakes proves it).
"""

import math
import tempfile
import warnings

import pytest
import torch

from course_lib import grpo

G = 4
# three groups of G: different spreads (so group std ≠ batch std), one group with no signal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0])


@pytest.fixture(scope="module")
def model_dir(embedded):
    """The embedded model and tokenizer saved to a folder: TRL loads its policy (and reference) from it,
    so the session's shared model is never touched."""
    model, tokenizer = embedded
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        yield folder


def fixed_reward(prompts, completions, reward, **kwargs):
    """A reward function that returns the dataset's ``reward`` column: the rewards are whatever we feed."""
    return list(reward)


def _trainer(kind, model_dir, tokenizer, reward_funcs, batch_size, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = Config(output_dir=f"{model_dir}/out", report_to="none", bf16=False, use_cpu=True,
                      gradient_checkpointing=False, per_device_train_batch_size=batch_size,
                      **{"num_generations": G, **config})
        trainer = Trainer(model=model_dir, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": "Q: What is 1 + 2?\nA:", "reward": 0.0}] * 4))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the HF Trainer sets at the start of a step
    return trainer


def _fixed_generation(trainer, kind, completions):
    """Replace the trainer's sampling by fixed completions (token ids only matter for shapes here)."""
    n = len(completions)
    prompt_ids, completion_ids = [[0, 55, 32]] * n, [[227, 26, 1]] * n
    if kind == "grpo":
        trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, completions, None, {}, None, [])
    else:
        trainer._generate = lambda prompts: (prompt_ids, completion_ids, completions)


def trl_advantages(kind, model_dir, tokenizer, rewards, **config):
    trainer = _trainer(kind, model_dir, tokenizer, [fixed_reward], len(rewards), **config)
    _fixed_generation(trainer, kind, ["x"] * len(rewards))
    out = trainer._generate_and_score_completions([{"prompt": "Q", "reward": float(r)} for r in rewards])
    return out["advantages"]


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_grpo_trainer(embedded, model_dir, scale):
    theirs = trl_advantages("grpo", model_dir, embedded[1], REWARDS, scale_rewards=scale)
    torch.testing.assert_close(grpo.group_advantages(REWARDS, G, scale=scale), theirs)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_rloo_trainer(embedded, model_dir, normalize):
    theirs = trl_advantages("rloo", model_dir, embedded[1], REWARDS, beta=0.0, normalize_advantages=normalize)
    torch.testing.assert_close(grpo.rloo_advantages(REWARDS, G, normalize=normalize), theirs)


def test_group_advantages_by_hand():
    # group [1, 0, 0, 1]: mean ½, unbiased std √(1/3); group of equal rewards: 0 everywhere
    a = grpo.group_advantages(REWARDS, G)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a[:4].tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)
    assert a[4:8].tolist() == [0.0] * 4
    # leave-one-out: 2 − (−1 + 0 + 3)/3
    assert grpo.rloo_advantages(REWARDS, G)[8].item() == pytest.approx(2 - 2 / 3)
    assert grpo.zero_signal_fraction(REWARDS, G) == pytest.approx(1 / 3)


def test_advantages_reject_bad_groups_and_rewards():
    with pytest.raises(ValueError, match="group_size must be an integer ≥ 2"):
        grpo.group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="do not split into groups of group_size=5"):
        grpo.group_advantages(REWARDS, 5)
    with pytest.raises(ValueError, match="do not split"):
        grpo.rloo_advantages(REWARDS[:7], G)
    with pytest.raises(ValueError, match="at row 2 is not finite"):
        grpo.group_advantages(torch.tensor([1.0, 0.0, float("nan"), 1.0]), G)
    with pytest.raises(ValueError, match="scale must be one of"):
        grpo.group_advantages(REWARDS, G, scale="global")


# --------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------
COMPLETIONS = [" 46", " 46\nQ: What", " 45", " ?\nA: 46", "", " -3 ", " 7x", " 1000"]
ANSWERS = [46, 46, 46, 46, 46, -3, 7, 1000]


def test_correctness_and_format_rewards_by_hand():
    prompts = ["Q"] * len(COMPLETIONS)
    assert grpo.correctness_reward(prompts, COMPLETIONS, answer=ANSWERS) == [1, 1, 0, 0, 0, 1, 1, 1]
    assert grpo.format_reward(prompts, COMPLETIONS) == [1, 0, 1, 0, 0, 1, 0, 1]


def test_weighted_rewards_equal_grpo_trainer(embedded, model_dir):
    """TRL calls each function with the dataset's columns and sums them with ``reward_weights``."""
    weights = [1.0, 0.25]
    trainer = _trainer("grpo", model_dir, embedded[1], [grpo.correctness_reward, grpo.format_reward],
                       len(COMPLETIONS), reward_weights=weights, scale_rewards="none")
    _fixed_generation(trainer, "grpo", COMPLETIONS)
    out = trainer._generate_and_score_completions([{"prompt": "Q", "answer": a} for a in ANSWERS])
    per_function, total = grpo.compute_rewards([grpo.correctness_reward, grpo.format_reward], ["Q"] * 8,
                                               COMPLETIONS, {"answer": ANSWERS}, weights)
    for k, name in enumerate(["correctness_reward", "format_reward"]):
        assert per_function[:, k].tolist() == list(trainer._logs["rewards"][name])
    assert total.mean().item() == pytest.approx(trainer._metrics["train"]["reward"][-1])
    torch.testing.assert_close(grpo.group_advantages(total, G, scale="none"), out["advantages"])


def test_bad_reward_functions_are_named_with_their_row():
    prompts, columns = ["Q"] * 4, {"answer": [1, 2, 3, 4]}

    def crashes_on_text(prompts, completions, **kw):
        return [float(int(c)) for c in completions]

    def too_few(prompts, completions, **kw):
        return [1.0] * (len(completions) - 1)

    def gives_nan(prompts, completions, **kw):
        return [0.0, 0.0, float("nan"), 0.0]

    def gives_none(prompts, completions, **kw):
        return [None, 0.0, 0.0, 0.0]

    with pytest.raises(RuntimeError, match=r"'crashes_on_text' raised ValueError.*row 2 .*'abc'"):
        grpo.compute_rewards([crashes_on_text], prompts, ["1", "2", "abc", "4"], columns)
    with pytest.raises(ValueError, match=r"'too_few' returned 3 rewards for 4 completions"):
        grpo.compute_rewards([too_few], prompts, ["1"] * 4, columns)
    with pytest.raises(ValueError, match=r"'gives_nan' returned nan for row 2"):
        grpo.compute_rewards([gives_nan], prompts, ["1"] * 4, columns)
    with pytest.raises(ValueError, match=r"'gives_none' returned None for row 0"):
        grpo.compute_rewards([gives_none], prompts, ["1"] * 4, columns)
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        grpo.compute_rewards([grpo.format_reward], prompts, ["1"] * 4, columns, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="column 'answer' has 4 values for 3 completions"):
        grpo.compute_rewards([grpo.format_reward], prompts[:3], ["1"] * 3, columns)


# --------------------------------------------------------------------------------------------
# The clipped objective and the KL
# --------------------------------------------------------------------------------------------
def loss_inputs():
    """B = 4 completions of lengths 5, 3, 2, 4 (T = 5). Ratios fall on both sides of the clip range
    with advantages of both signs; padding holds large values a wrong mean would pick up."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    old = -torch.rand(4, 5, generator=g) * 2
    logp = old + torch.tensor([[0.5, -0.5, 0.1, 0.3, -0.05], [0.25, -0.3, 0.0, 9.0, 9.0],
                               [-0.4, 0.4, 9.0, 9.0, 9.0], [0.15, 0.22, -0.21, -0.1, 9.0]])
    ref = old + torch.randn(4, 5, generator=g) * 0.5
    advantages = torch.tensor([1.5, -0.7, 0.9, -1.2])
    return logp, old, ref, advantages, mask


def trl_loss(embedded, model_dir, loss_type, beta, bias_correction, epsilon_high, max_len=6):
    """TRL's ``_compute_loss`` on :func:`loss_inputs`: its loss, the gradient w.r.t. logp, its metrics."""
    logp, old, ref, advantages, mask = loss_inputs()
    logp = logp.clone().requires_grad_(True)
    config = dict(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias_correction,
                  max_completion_length=max_len, num_generations=2)
    if epsilon_high is not None:
        config["epsilon_high"] = epsilon_high
    trainer = _trainer("grpo", model_dir, embedded[1], [fixed_reward], 4, **config)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(4, 1, dtype=torch.long), "prompt_mask": torch.ones(4, 1, dtype=torch.long),
              "completion_ids": torch.zeros(4, 5, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), logp.grad, metrics


def our_loss(loss_type, beta, bias_correction, epsilon_high, max_len=6):
    logp, old, ref, advantages, mask = loss_inputs()
    logp = logp.clone().requires_grad_(True)
    loss, stats = grpo.grpo_loss(logp, old, advantages, mask, ref_logp=ref if beta else None, beta=beta,
                                 epsilon_high=epsilon_high, loss_type=loss_type, max_completion_length=max_len,
                                 kl_bias_correction=bias_correction, return_stats=True)
    loss.backward()
    return loss.detach(), logp.grad, stats


KL_CASES = [(0.0, False), (0.04, False), (0.04, True)]  # no KL; TRL's KL without and with use_bias_correction_kl


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("beta,bias_correction", KL_CASES)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_and_gradient_equal_grpo_trainer(embedded, model_dir, loss_type, beta, bias_correction,
                                                   epsilon_high):
    their_loss, their_grad, metrics = trl_loss(embedded, model_dir, loss_type, beta, bias_correction, epsilon_high)
    loss, grad, stats = our_loss(loss_type, beta, bias_correction, epsilon_high)
    torch.testing.assert_close(loss, their_loss)
    torch.testing.assert_close(grad, their_grad)
    assert stats["clip_fraction"] == pytest.approx(metrics["clip_ratio/region_mean"])
    assert stats["clip_low"] == pytest.approx(metrics["clip_ratio/low_mean"])
    assert stats["clip_high"] == pytest.approx(metrics["clip_ratio/high_mean"])
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"])


def test_loss_defaults_to_the_scalar_and_the_clip_ranges_differ():
    logp, old, _, advantages, mask = loss_inputs()
    loss = grpo.grpo_loss(logp, old, advantages, mask)
    assert loss.dim() == 0
    # with these ratios, clip-higher (ε_high = 0.28 > ε) changes the objective
    assert not torch.isclose(loss, grpo.grpo_loss(logp, old, advantages, mask, epsilon_high=0.28))


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -1.0, -0.5])
    # exp(ref − logp) − (ref − logp) − 1, in plain floats
    expected = [math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]
    assert grpo.k3_kl(logp, ref).tolist() == pytest.approx(expected)
    assert (grpo.k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_loss_rejects_bad_arguments():
    logp, old, ref, advantages, mask = loss_inputs()
    with pytest.raises(ValueError, match="max_completion_length must be a positive"):
        grpo.grpo_loss(logp, old, advantages, mask, loss_type="dr_grpo", max_completion_length=0)
    with pytest.raises(ValueError, match="pass max_completion_length"):
        grpo.grpo_loss(logp, old, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="more than max_completion_length=4"):
        grpo.grpo_loss(logp, old, advantages, mask, loss_type="dr_grpo", max_completion_length=4)
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logp"):
        grpo.grpo_loss(logp, old, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo.grpo_loss(logp, old, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="mask has shape"):
        grpo.grpo_loss(logp, old, advantages, mask[:, :3])
    with pytest.raises(ValueError, match="advantages must be"):
        grpo.grpo_loss(logp, old, advantages[:3], mask)


# --------------------------------------------------------------------------------------------
# RLOO's sequence-level KL-in-reward and loss
# --------------------------------------------------------------------------------------------
def test_rloo_kl_rewards_and_loss_equal_rloo_trainer(embedded, model_dir):
    logp, old, ref, _, mask = loss_inputs()
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    beta, epsilon_high = 0.05, 0.28
    trainer = _trainer("rloo", model_dir, embedded[1], [fixed_reward], 4, beta=beta, num_generations=2,
                       epsilon_high=epsilon_high)
    # completions with the lengths of the mask (1 = end token), so TRL builds the same completion mask
    completion_ids = [[227] * (int(n) - 1) + [1] for n in mask.sum(1)]
    trainer._generate = lambda prompts: ([[0, 55]] * 4, completion_ids, ["x"] * 4)
    trainer._get_per_token_logps_and_entropies = (
        lambda model, *a, **k: (ref if model is trainer.ref_model else old, torch.zeros_like(old), None))
    out = trainer._generate_and_score_completions([{"prompt": "Q", "reward": float(r)} for r in rewards])
    assert torch.equal(out["completion_mask"], mask)
    ours = grpo.rloo_advantages(grpo.rloo_kl_rewards(rewards, old, ref, mask, beta), 2)
    torch.testing.assert_close(ours, out["advantages"])

    theirs_logp = logp.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (theirs_logp, torch.zeros_like(old), None)
    their_loss = trainer._compute_loss(trainer.model, {**out, "advantages": ours})
    their_loss.backward()
    our_logp = logp.clone().requires_grad_(True)
    loss, stats = grpo.rloo_loss(our_logp, old, ours, mask, epsilon_high=epsilon_high, return_stats=True)
    loss.backward()
    torch.testing.assert_close(loss, their_loss.detach())
    torch.testing.assert_close(our_logp.grad, theirs_logp.grad)
    assert stats["clip_fraction"] == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1])


# --------------------------------------------------------------------------------------------
# The mistakes catalogue: each wrong version gives a different value on the fixed inputs
# --------------------------------------------------------------------------------------------
def test_fixed_inputs_catch_the_catalogued_mistakes(embedded, model_dir):
    grouped = REWARDS.view(-1, G)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    right = trl_advantages("grpo", model_dir, embedded[1], REWARDS, scale_rewards="group")
    population_std = centred / (grouped.std(1, unbiased=False, keepdim=True).expand_as(grouped).flatten() + 1e-4)
    across_batch = (REWARDS - REWARDS.mean()) / (REWARDS.std() + 1e-4)
    for wrong in (population_std, across_batch):
        assert not torch.allclose(wrong, right, atol=1e-3)

    right_loss, _, _ = trl_loss(embedded, model_dir, "grpo", 0.04, False, None)
    logp, old, ref, advantages, mask = loss_inputs()
    ratio, a, m = torch.exp(logp - old), advantages[:, None], mask.float()
    kl = grpo.k3_kl(logp, ref)
    unclipped = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
    clip_advantage = -ratio * torch.clamp(a, -0.2, 0.2)  # clips the advantage instead of the ratio
    kl_wrong_sign = grpo.k3_kl(ref, logp)  # KL(π_ref ‖ π_θ)'s estimator, i.e. the ratio upside down
    per_seq = lambda x: ((x * m).sum(1) / m.sum(1)).mean()  # noqa: E731
    wrongs = {"clip the advantage": per_seq(clip_advantage + 0.04 * kl),
              "KL sign": per_seq(unclipped + 0.04 * kl_wrong_sign),
              "subtract the KL": per_seq(unclipped - 0.04 * kl),
              "average over padding": (unclipped + 0.04 * kl).mean()}
    for name, value in wrongs.items():
        assert not torch.isclose(value, right_loss, atol=1e-4), name


# --------------------------------------------------------------------------------------------
# Sampling, log-probs and the loop on the embedded model
# --------------------------------------------------------------------------------------------
def test_sampling_groups_rows_and_masks_after_the_end(embedded):
    model, tokenizer = embedded
    rows = grpo.addition_rows([(12, 34), (5, 7), (80, 19)])
    torch.manual_seed(0)
    rollout = grpo.sample_completions(model, tokenizer, rows, G, max_new_tokens=6)
    assert rollout.completion_ids.shape[0] == len(rows) * G
    assert [r["answer"] for r in rollout.rows] == [46] * G + [12] * G + [99] * G
    assert (rollout.prompt_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
    for ids, m in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)
        if tokenizer.eos_token_id in ids:
            assert ids.index(tokenizer.eos_token_id) == n - 1  # the first end token is the last counted
    assert len(set(rollout.completions)) > 1  # sampled, not greedy
    with pytest.raises(ValueError, match="group_size must be ≥ 2"):
        grpo.sample_completions(model, tokenizer, rows, 1, max_new_tokens=6)


def test_completion_logprobs_ignore_left_padding(embedded):
    """Each row's log-probs equal those of the same prompt + completion run alone, without padding."""
    model, tokenizer = embedded
    rows = grpo.addition_rows([(3, 4), (56, 78)])  # prompts of different lengths
    torch.manual_seed(1)
    rollout = grpo.sample_completions(model, tokenizer, rows, 2, max_new_tokens=5)
    assert (rollout.prompt_mask == 0).any()
    with torch.no_grad():
        logp, entropy = grpo.completion_logprobs(model, rollout, temperature=0.7, with_entropy=True)
        for i in range(len(rollout.rows)):
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i] == 1]
            completion = rollout.completion_ids[i][rollout.completion_mask[i] == 1]
            logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1:-1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, completion[:, None])[:, 0]
            torch.testing.assert_close(logp[i, :len(completion)], alone, atol=1e-5, rtol=1e-5)
            probs = torch.softmax(logits, -1)
            torch.testing.assert_close(entropy[i, :len(completion)], -(probs * probs.log()).sum(-1),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm,beta", [("grpo", 0.04), ("rloo", 0.05)])
def test_loop_trains_the_adapter_and_records_history(embedded, algorithm, beta):
    import copy

    from course_lib import data, lora

    model = copy.deepcopy(embedded[0])
    lora.add_lora(model, "all-linear", r=4, alpha=8)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    config = grpo.GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=5, algorithm=algorithm,
                             beta=beta, num_iterations=2, progress=False, eval_every=2)
    rows = grpo.addition_rows(data.addition_pairs("train")[:40])
    history = grpo.grpo_train(model, embedded[1], rows, [grpo.correctness_reward, grpo.format_reward], config,
                              eval_fn=lambda m: 0.5)
    keys = {"reward", "reward/correctness_reward", "reward/format_reward", "accuracy", "kl", "completion_length",
            "clip_fraction", "entropy", "zero_signal_fraction"}
    assert keys <= set(history.extra)
    assert all(len(history.extra[k]) == 2 and all(math.isfinite(v) for v in history.extra[k]) for k in keys)
    assert history.extra["eval_step"] == [2] and history.extra["eval"] == [0.5]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert any(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)


def test_loop_rejects_bad_configs():
    with pytest.raises(ValueError, match="group_size must be ≥ 2"):
        grpo.GRPOConfig(steps=1, group_size=1)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        grpo.GRPOConfig(steps=1, max_new_tokens=0)
    with pytest.raises(ValueError, match="algorithm must be"):
        grpo.GRPOConfig(steps=1, algorithm="ppo")
