"""Lesson 08 (GRPO): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import re

import torch


def advantages_ok(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()


def objective_ok(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def k3_ok(logp, ref_logp):
    x = ref_logp - logp
    return x.exp() - x - 1


def reward_ok(prompts, completions, answer, **kwargs):
    rewards = []
    for completion, expected in zip(completions, answer):
        match = re.match(r"\s*(-?\d+)", completion)
        rewards.append(1.0 if match and int(match.group(1)) == int(expected) else 0.0)
    return rewards


RIGHT = {"08.1": advantages_ok, "08.2": objective_ok, "08.3": k3_ok, "08.4": reward_ok}


# 08.1
def advantages_population_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()


def advantages_across_batch(rewards, group_size):
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def advantages_batch_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).flatten() / (rewards.std() + 1e-4)


def advantages_no_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).flatten()


def advantages_no_eps(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, keepdim=True)).flatten()


def advantages_interleaved(rewards, group_size):
    grouped = rewards.view(group_size, -1)
    return ((grouped - grouped.mean(0)) / (grouped.std(0) + 1e-4)).flatten()


def advantages_no_baseline(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped / (grouped.std(1, keepdim=True) + 1e-4)).flatten()


# 08.2
def _aggregate(per_token, mask):
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def objective_clips_advantage(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    return _aggregate(-torch.min(ratio * a, ratio * torch.clamp(a, 1 - epsilon, 1 + epsilon)), mask)


def objective_clips_product(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    return _aggregate(-torch.min(ratio * a, torch.clamp(ratio * a, 1 - epsilon, 1 + epsilon)), mask)


def objective_ratio_inverted(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(old_logp - logp)
    a = advantages.unsqueeze(1)
    return _aggregate(-torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a), mask)


def objective_max(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    return _aggregate(-torch.max(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a), mask)


def objective_unclipped(logp, old_logp, advantages, mask, epsilon):
    return _aggregate(-torch.exp(logp - old_logp) * advantages.unsqueeze(1), mask)


def objective_not_negated(logp, old_logp, advantages, mask, epsilon):
    return -objective_ok(logp, old_logp, advantages, mask, epsilon)


def objective_over_padding(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    return (-torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)).mean()


def objective_token_mean(logp, old_logp, advantages, mask, epsilon):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    return (per_token * mask).sum() / mask.sum()


def objective_no_gradient(logp, old_logp, advantages, mask, epsilon):
    return objective_ok(logp.detach(), old_logp, advantages, mask, epsilon)


# 08.3
def k3_sign_reversed(logp, ref_logp):
    x = logp - ref_logp
    return x.exp() - x - 1


def k3_is_k1(logp, ref_logp):
    return logp - ref_logp


def k3_is_k2(logp, ref_logp):
    return 0.5 * (logp - ref_logp) ** 2


def k3_no_minus_one(logp, ref_logp):
    x = ref_logp - logp
    return x.exp() - x


# 08.4
def reward_crashes_on_text(prompts, completions, answer, **kwargs):
    return [float(int(c.split()[0]) == a) for c, a in zip(completions, answer)]


def reward_substring(prompts, completions, answer, **kwargs):
    return [float(str(a) in c) for c, a in zip(completions, answer)]


def reward_last_number(prompts, completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        numbers = re.findall(r"\d+", c)
        out.append(float(bool(numbers) and int(numbers[-1]) == a))
    return out


def reward_exact_text(prompts, completions, answer, **kwargs):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


def reward_compares_strings(prompts, completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        match = re.match(r"\s*(\d+)", c)
        out.append(float(bool(match) and match.group(1) == a))
    return out


def reward_number_anywhere(prompts, completions, answer, **kwargs):
    out = []
    for c, a in zip(completions, answer):
        match = re.search(r"\d+", c)
        out.append(float(bool(match) and int(match.group()) == a))
    return out


def reward_no_kwargs(prompts, completions, answer):
    return reward_ok(prompts, completions, answer)


CATALOGUE = [
    ("08.1", advantages_population_std, "population std"), ("08.1", advantages_across_batch, "across the batch"),
    ("08.1", advantages_batch_std, "each group's own std"), ("08.1", advantages_no_std, "Dr. GRPO"),
    ("08.1", advantages_no_eps, "eps"), ("08.1", advantages_interleaved, "adjacent"),
    ("08.1", advantages_no_baseline, "baseline"),
    ("08.2", objective_clips_advantage, "clip went on the advantage"),
    ("08.2", objective_clips_product, "product"), ("08.2", objective_ratio_inverted, "inverted"),
    ("08.2", objective_max, "min"), ("08.2", objective_unclipped, "no clipping"),
    ("08.2", objective_not_negated, "sign"), ("08.2", objective_over_padding, "padding"),
    ("08.2", objective_token_mean, "BNPO"), ("08.2", objective_no_gradient, "no gradient"),
    ("08.3", k3_sign_reversed, "sign is reversed"), ("08.3", k3_is_k1, "k1"), ("08.3", k3_is_k2, "k2"),
    ("08.3", k3_no_minus_one, "−1"),
    ("08.4", reward_crashes_on_text, "unparsable"), ("08.4", reward_substring, "substrings"),
    ("08.4", reward_last_number, "FIRST number"), ("08.4", reward_exact_text, "format"),
    ("08.4", reward_compares_strings, "integers"), ("08.4", reward_number_anywhere, "START"),
    ("08.4", reward_no_kwargs, "**kwargs"),
]
