"""Lesson 06 (RLHF: reward model, PPO): right answers, and plausible wrong answers with the phrase the feedback
must contain."""

import torch
import torch.nn.functional as F


def bt_ok(r_chosen, r_rejected, margin):
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def scores_ok(values, input_ids, attention_mask, pad_token_id):
    positions = torch.arange(values.shape[1]).expand_as(values)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    return values[torch.arange(values.shape[0]), last]


def _last(mask):
    return mask.sum(1).long() - 1  # right padding, as sampling produces it


def shaped_ok(scores, logp, ref_logp, mask, kl_coef):
    rewards = -kl_coef * (logp - ref_logp) * mask
    rewards[torch.arange(len(scores)), _last(mask)] += scores
    return rewards


def gae_ok(rewards, values, mask, gamma, lam):
    rewards, values = rewards * mask, values * mask
    B, T = values.shape
    advantages = torch.zeros(B, T)
    running = torch.zeros(B)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros(B)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def whiten_ok(advantages, mask):
    real = advantages[mask.bool()]
    return (advantages - real.mean()) / torch.sqrt(real.var() + 1e-8) * mask


def policy_ok(logp, old_logp, advantages, mask, cliprange):
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    return (loss * mask).sum() / mask.sum()


def value_ok(values, old_values, returns, mask, cliprange_value):
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()


RIGHT = {"06.1": bt_ok, "06.2": scores_ok, "06.3": shaped_ok, "06.4": gae_ok, "06.5": whiten_ok,
         "06.6": policy_ok, "06.7": value_ok}


# 06.1
def bt_swapped(r_chosen, r_rejected, margin):
    return -F.logsigmoid(r_rejected - r_chosen - margin).mean()


def bt_margin_added(r_chosen, r_rejected, margin):
    return -F.logsigmoid(r_chosen - r_rejected + margin).mean()


def bt_margin_ignored(r_chosen, r_rejected, margin):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def bt_sum(r_chosen, r_rejected, margin):
    return -F.logsigmoid(r_chosen - r_rejected - margin).sum()


def bt_unstable(r_chosen, r_rejected, margin):
    return -torch.log(torch.sigmoid(r_chosen - r_rejected - margin)).mean()


def bt_no_minus(r_chosen, r_rejected, margin):
    return F.logsigmoid(r_chosen - r_rejected - margin).mean()


# 06.2
def scores_last_column(values, input_ids, attention_mask, pad_token_id):
    return values[:, -1]


def scores_sum_minus_one(values, input_ids, attention_mask, pad_token_id):
    return values[torch.arange(values.shape[0]), attention_mask.sum(1) - 1]


def scores_not_pad(values, input_ids, attention_mask, pad_token_id):
    positions = torch.arange(values.shape[1]).expand_as(values)
    last = torch.where(input_ids != pad_token_id, positions, -1).max(dim=1).values
    return values[torch.arange(values.shape[0]), last]


def scores_first_token(values, input_ids, attention_mask, pad_token_id):
    return values[torch.arange(values.shape[0]), attention_mask.argmax(1)]


def scores_mean(values, input_ids, attention_mask, pad_token_id):
    return (values * attention_mask).sum(1) / attention_mask.sum(1)


def scores_one_past(values, input_ids, attention_mask, pad_token_id):
    return values[torch.arange(values.shape[0]), attention_mask.sum(1)]


# 06.3
def shaped_every_token(scores, logp, ref_logp, mask, kl_coef):
    return (-kl_coef * (logp - ref_logp) + scores[:, None]) * mask


def shaped_first_pad(scores, logp, ref_logp, mask, kl_coef):
    rewards = -kl_coef * (logp - ref_logp) * mask
    rewards[torch.arange(len(scores)), mask.sum(1).long()] += scores
    return rewards


def shaped_last_column(scores, logp, ref_logp, mask, kl_coef):
    rewards = -kl_coef * (logp - ref_logp) * mask
    rewards[:, -1] += scores
    return rewards


def shaped_first_token(scores, logp, ref_logp, mask, kl_coef):
    rewards = -kl_coef * (logp - ref_logp) * mask
    rewards[:, 0] += scores
    return rewards


def shaped_kl_sign(scores, logp, ref_logp, mask, kl_coef):
    return shaped_ok(scores, ref_logp, logp, mask, kl_coef)


def shaped_kl_unmasked(scores, logp, ref_logp, mask, kl_coef):
    rewards = -kl_coef * (logp - ref_logp)
    rewards[torch.arange(len(scores)), _last(mask)] += scores
    return rewards


def shaped_no_coef(scores, logp, ref_logp, mask, kl_coef):
    return shaped_ok(scores, logp, ref_logp, mask, 1.0)


# 06.4
def _gae(rewards, values, mask, bootstrap, decay, mask_values=True, forward=False):
    values = values * mask if mask_values else values
    rewards = rewards * mask
    B, T = values.shape
    next_values = torch.cat([values[:, 1:], torch.zeros(B, 1)], dim=1)
    delta = rewards + bootstrap * next_values - values
    advantages, running = torch.zeros(B, T), torch.zeros(B)
    for t in (range(T) if forward else reversed(range(T))):
        running = delta[:, t] + decay * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def gae_no_bootstrap(rewards, values, mask, gamma, lam):
    return _gae(rewards, values, mask, 0.0, gamma * lam)


def gae_swapped(rewards, values, mask, gamma, lam):
    return _gae(rewards, values, mask, lam, gamma * lam)


def gae_padding_values(rewards, values, mask, gamma, lam):
    return _gae(rewards, values, mask, gamma, gamma * lam, mask_values=False)


def gae_no_lambda(rewards, values, mask, gamma, lam):
    return _gae(rewards, values, mask, gamma, gamma)


def gae_forward(rewards, values, mask, gamma, lam):
    return _gae(rewards, values, mask, gamma, gamma * lam, forward=True)


def gae_returns_to_go(rewards, values, mask, gamma, lam):
    advantages, _ = gae_ok(rewards, values, mask, gamma, lam)
    returns, running = torch.zeros_like(rewards), torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        returns[:, t] = running
    return advantages, returns * mask


def gae_returns_without_values(rewards, values, mask, gamma, lam):
    advantages, _ = gae_ok(rewards, values, mask, gamma, lam)
    return advantages, advantages


# 06.5
def whiten_over_padding(advantages, mask):
    return (advantages - advantages.mean()) / torch.sqrt(advantages.var() + 1e-8) * mask


def whiten_population(advantages, mask):
    real = advantages[mask.bool()]
    return (advantages - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8) * mask


def whiten_padding_kept(advantages, mask):
    real = advantages[mask.bool()]
    return (advantages - real.mean()) / torch.sqrt(real.var() + 1e-8)


def whiten_no_shift(advantages, mask):
    real = advantages[mask.bool()]
    return advantages / torch.sqrt(real.var() + 1e-8) * mask


def whiten_by_variance(advantages, mask):
    real = advantages[mask.bool()]
    return (advantages - real.mean()) / (real.var() + 1e-8) * mask


# 06.6
def _policy(ratio, advantages, mask, cliprange, clip_advantage=False, optimistic=False):
    if clip_advantage:
        clipped = -torch.clamp(advantages, 1 - cliprange, 1 + cliprange) * ratio
    else:
        clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = (torch.min if optimistic else torch.max)(-advantages * ratio, clipped)
    return (loss * mask).sum() / mask.sum()


def policy_inverted(logp, old_logp, advantages, mask, cliprange):
    return _policy(torch.exp(old_logp - logp), advantages, mask, cliprange)


def policy_clips_advantage(logp, old_logp, advantages, mask, cliprange):
    return _policy(torch.exp(logp - old_logp), advantages, mask, cliprange, clip_advantage=True)


def policy_optimistic(logp, old_logp, advantages, mask, cliprange):
    return _policy(torch.exp(logp - old_logp), advantages, mask, cliprange, optimistic=True)


def policy_unclipped(logp, old_logp, advantages, mask, cliprange):
    loss = -advantages * torch.exp(logp - old_logp)
    return (loss * mask).sum() / mask.sum()


def policy_not_negated(logp, old_logp, advantages, mask, cliprange):
    return -policy_ok(logp, old_logp, advantages, mask, cliprange)


def policy_over_padding(logp, old_logp, advantages, mask, cliprange):
    ratio = torch.exp(logp - old_logp)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)).mean()


def policy_sequence_mean(logp, old_logp, advantages, mask, cliprange):
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    return ((loss * mask).sum(1) / mask.sum(1)).mean()


def policy_detached(logp, old_logp, advantages, mask, cliprange):
    return policy_ok(logp.detach(), old_logp, advantages, mask, cliprange)


# 06.7
def value_no_half(values, old_values, returns, mask, cliprange_value):
    return 2 * value_ok(values, old_values, returns, mask, cliprange_value)


def value_unclipped(values, old_values, returns, mask, cliprange_value):
    return 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()


def value_min(values, old_values, returns, mask, cliprange_value):
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = torch.min((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()


def value_change_not_added_back(values, old_values, returns, mask, cliprange_value):
    clipped = torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()


def value_over_padding(values, old_values, returns, mask, cliprange_value):
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()


CATALOGUE = [
    ("06.1", bt_swapped, "chosen and rejected swapped"), ("06.1", bt_margin_added, "margin was added"),
    ("06.1", bt_margin_ignored, "margin is ignored"), ("06.1", bt_sum, "summed"),
    ("06.1", bt_unstable, "logsigmoid"), ("06.1", bt_no_minus, "−log σ"),
    ("06.2", scores_last_column, "pad position"), ("06.2", scores_sum_minus_one, "left padding"),
    ("06.2", scores_not_pad, "hides the eos"), ("06.2", scores_first_token, "not the first"),
    ("06.2", scores_mean, "not a mean"), ("06.2", scores_one_past, "one past"),
    ("06.3", shaped_every_token, "every token"), ("06.3", shaped_first_pad, "first pad"),
    ("06.3", shaped_last_column, "pad position"), ("06.3", shaped_first_token, "not the first token"),
    ("06.3", shaped_kl_sign, "KL's sign"), ("06.3", shaped_kl_unmasked, "padding"),
    ("06.3", shaped_no_coef, "coefficient is missing"),
    ("06.4", gae_no_bootstrap, "no bootstrapping"), ("06.4", gae_swapped, "λ and γ swapped"),
    ("06.4", gae_padding_values, "bootstrapped from padding"), ("06.4", gae_no_lambda, "not γ alone"),
    ("06.4", gae_forward, "backwards"), ("06.4", gae_returns_to_go, "not the discounted sum"),
    ("06.4", gae_returns_without_values, "values were not added"),
    ("06.5", whiten_over_padding, "whitening over padding"), ("06.5", whiten_population, "unbiased"),
    ("06.5", whiten_padding_kept, "padding must stay 0"), ("06.5", whiten_no_shift, "mean must be subtracted"),
    ("06.5", whiten_by_variance, "standard deviation"),
    ("06.6", policy_inverted, "ratio is inverted"), ("06.6", policy_clips_advantage, "clip applied to the advantage"),
    ("06.6", policy_optimistic, "optimistic"), ("06.6", policy_unclipped, "no clipping"),
    ("06.6", policy_not_negated, "sign"), ("06.6", policy_over_padding, "padding"),
    ("06.6", policy_sequence_mean, "every real token"), ("06.6", policy_detached, "no gradient"),
    ("06.7", value_no_half, "½"), ("06.7", value_unclipped, "no clipping"), ("06.7", value_min, "max"),
    ("06.7", value_change_not_added_back, "added back"), ("06.7", value_over_padding, "padding"),
]
