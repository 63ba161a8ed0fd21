"""Lesson 07 (DPO): right answers, and plausible wrong answers with the phrase the feedback must contain."""

import torch
import torch.nn.functional as F


def _per_token(logits, input_ids):
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T−1)


def seq_ok(logits, batch):
    return (_per_token(logits, batch["input_ids"]) * batch["completion_mask"][:, 1:]).sum(1)


def dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, beta):
    margin = (policy_chosen - ref_chosen) / chosen_lengths - (policy_rejected - ref_rejected) / rejected_lengths
    return (margin - 1 / (2 * beta)) ** 2


RIGHT = {"07.1": seq_ok, "07.2": dpo_ok, "07.3": ipo_ok}


# 07.1
def seq_mean(logits, batch):
    mask = batch["completion_mask"][:, 1:]
    return (_per_token(logits, batch["input_ids"]) * mask).sum(1) / mask.sum(1)


def seq_prompt_counted(logits, batch):
    return (_per_token(logits, batch["input_ids"]) * batch["attention_mask"][:, 1:]).sum(1)


def seq_unmasked(logits, batch):
    return _per_token(logits, batch["input_ids"]).sum(1)


def seq_not_shifted(logits, batch):
    per_token = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][..., None]).squeeze(-1)
    return (per_token * batch["completion_mask"]).sum(1)


def seq_mask_not_shifted(logits, batch):
    return (_per_token(logits, batch["input_ids"]) * batch["completion_mask"][:, :-1]).sum(1)


def seq_raw_logits(logits, batch):
    per_token = logits[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def seq_softmax_wrong_dim(logits, batch):
    per_token = torch.log_softmax(logits[:, :-1], dim=1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


# 07.2
def dpo_swapped(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    return dpo_ok(policy_rejected, policy_chosen, ref_rejected, ref_chosen, beta)


def dpo_beta_twice(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen_rewards = beta * (policy_chosen - ref_chosen.detach())
    rejected_rewards = beta * (policy_rejected - ref_rejected.detach())
    return (-F.logsigmoid(beta * (chosen_rewards - rejected_rewards)), chosen_rewards.detach(),
            rejected_rewards.detach())


def dpo_no_beta(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    losses, c, r = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 1.0)
    return losses, beta * c, beta * r


def dpo_no_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    _, c, r = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected)), c, r


def dpo_unstable(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    _, c, r = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return -torch.log(torch.sigmoid(beta * margin)), c, r


def dpo_reference_not_detached(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    return -F.logsigmoid(beta * (chosen - rejected)), beta * chosen.detach(), beta * rejected.detach()


def dpo_rewards_not_detached(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    losses, _, _ = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return losses, beta * (policy_chosen - ref_chosen.detach()), beta * (policy_rejected - ref_rejected.detach())


def dpo_rewards_without_beta(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    losses, c, r = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return losses, c / beta, r / beta


def dpo_mean_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    losses, c, r = dpo_ok(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return losses.mean(), c, r


# 07.3
def _margin(pc, pr, rc, rr, lc, lr):
    return (pc - rc) / lc - (pr - rr) / lr


def ipo_target_one_over_beta(pc, pr, rc, rr, lc, lr, beta):
    return (_margin(pc, pr, rc, rr, lc, lr) - 1 / beta) ** 2


def ipo_target_precedence(pc, pr, rc, rr, lc, lr, beta):
    return (_margin(pc, pr, rc, rr, lc, lr) - 1 / 2 * beta) ** 2


def ipo_sums_not_averaged(pc, pr, rc, rr, lc, lr, beta):
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def ipo_beta_on_margin(pc, pr, rc, rr, lc, lr, beta):
    return (beta * _margin(pc, pr, rc, rr, lc, lr) - 1 / (2 * beta)) ** 2


def ipo_lengths_swapped(pc, pr, rc, rr, lc, lr, beta):
    return (_margin(pc, pr, rc, rr, lr, lc) - 1 / (2 * beta)) ** 2


def ipo_target_added(pc, pr, rc, rr, lc, lr, beta):
    return (_margin(pc, pr, rc, rr, lc, lr) + 1 / (2 * beta)) ** 2


def ipo_not_squared(pc, pr, rc, rr, lc, lr, beta):
    return (_margin(pc, pr, rc, rr, lc, lr) - 1 / (2 * beta)).abs()


CATALOGUE = [
    ("07.1", seq_mean, "mean instead of sum"), ("07.1", seq_prompt_counted, "prompt tokens counted"),
    ("07.1", seq_unmasked, "padding"), ("07.1", seq_not_shifted, "not shifted"),
    ("07.1", seq_mask_not_shifted, "off by one"), ("07.1", seq_raw_logits, "raw logits"),
    ("07.1", seq_softmax_wrong_dim, "vocabulary"),
    ("07.2", dpo_swapped, "chosen and rejected swapped"), ("07.2", dpo_beta_twice, "β applied twice"),
    ("07.2", dpo_no_beta, "β is missing"), ("07.2", dpo_no_reference, "reference is missing"),
    ("07.2", dpo_unstable, "logsigmoid"), ("07.2", dpo_reference_not_detached, "reference not detached"),
    ("07.2", dpo_rewards_not_detached, "detach them"), ("07.2", dpo_rewards_without_beta, "β times the log-ratio"),
    ("07.2", dpo_mean_loss, "one value per"),
    ("07.3", ipo_target_one_over_beta, "1/(2β) is wrong"), ("07.3", ipo_target_precedence, "1/2*beta"),
    ("07.3", ipo_sums_not_averaged, "not averaged"), ("07.3", ipo_beta_on_margin, "β multiplies the margin"),
    ("07.3", ipo_lengths_swapped, "OWN length"), ("07.3", ipo_target_added, "subtract it"),
    ("07.3", ipo_not_squared, "SQUARED"),
]
