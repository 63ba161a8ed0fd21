"""Hidden checks for lesson 08 (GRPO). References: course_lib.grpo (tested against TRL's GRPOTrainer) and
course_lib.evaluate.parse_number. Each wrong value a mistake would produce is computed here, from the
reference's pieces, so the feedback can name it."""

from __future__ import annotations

import re

import torch

from . import CheckFailed, Exercise, expect

EPS = 1e-4  # TRL's epsilon in the advantage's denominator


def _as_tensor(got, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(got, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise CheckFailed(f"{what}: return a tensor, got {type(got).__name__}") from None


# ---------------------------------------------------------------------------------------------
# 08.1 group_advantages(rewards, group_size) -> (N,)
# ---------------------------------------------------------------------------------------------
def check_group_advantages(group_advantages) -> str:
    from ..grpo import group_advantages as reference

    cases = [  # rows are grouped prompt by prompt: [q0 × G, q1 × G, …]
        (torch.tensor([1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 1., 0.]), 4),  # the middle group: no signal
        (torch.tensor([0.5, 2., 1., 0., 1.5, 0., 2., 2., 0., 1., 0.5, 1.5]), 3),
        (torch.tensor([1., 0., 0., 0., 1., 0.]), 2),
    ]
    for rewards, group in cases:
        got = group_advantages(rewards.clone(), group)
        got = _as_tensor(got, "advantages")
        grouped = rewards.view(-1, group)
        centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
        if torch.isnan(got).any() or torch.isinf(got).any():
            raise CheckFailed("a group whose rewards are all equal has std 0, so it divided 0 by 0: keep the small eps "
                              "(1e-4) in the denominator; such a group's advantages are 0, it teaches nothing")
        interleaved = rewards.view(group, -1)
        interleaved = ((interleaved - interleaved.mean(0)) / (interleaved.std(0) + EPS)).flatten()
        expect(got, reference(rewards, group), what=f"advantages of {len(rewards)} rewards in groups of {group}",
               rtol=1e-4, atol=1e-5, mistakes={
                   "population std (n): GRPO, like TRL and torch.std, divides by the unbiased (n − 1) std of the group":
                       centred / (grouped.std(1, unbiased=False, keepdim=True).expand_as(grouped).flatten() + EPS),
                   "normalised across the batch: the baseline and the std must be each prompt's own group's "
                   "(mean and std over the G completions of one prompt)":
                       (rewards - rewards.mean()) / (rewards.std() + EPS),
                   "the std is the whole batch's: divide by each group's own std (scale='group')":
                       centred / (rewards.std() + EPS),
                   "not divided by the group's std: (r − mean) is Dr. GRPO's advantage; GRPO also scales by the std":
                       centred,
                   "the mean is not subtracted: the group mean is the baseline, so the advantage says better or worse "
                   "than the other answers":
                       grouped.flatten() / (grouped.std(1, keepdim=True).expand_as(grouped).flatten() + EPS),
                   "groups taken the wrong way: the G completions of one prompt are adjacent rows "
                   "(view(-1, G)), not every G-th row": interleaved,
               })
    return "Â = (r − group mean) / (group std + ε); an all-equal group gets 0"


# ---------------------------------------------------------------------------------------------
# 08.2 clipped_objective(logp, old_logp, advantages, mask, epsilon) -> scalar loss
# ---------------------------------------------------------------------------------------------
def _policy_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    old_logp = -torch.rand(B, T, generator=gen) * 3 - 0.1  # (B, T)
    logp = old_logp + torch.randn(B, T, generator=gen) * 0.4  # ratios inside and outside 1 ± ε
    lengths = torch.tensor([6, 2, 4, 3])
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T) right padding
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -7.0))  # padding holds garbage, as it does
    old_logp = torch.where(mask.bool(), old_logp, torch.full_like(old_logp, -1.0))
    advantages = torch.tensor([1.8, -0.8, 0.5, -1.5])  # (B,)
    return logp, old_logp, advantages, mask


def check_clipped_objective(clipped_objective) -> str:
    from ..grpo import grpo_loss

    for seed, epsilon in [(0, 0.2), (1, 0.1)]:
        logp, old_logp, advantages, mask = _policy_inputs(seed)
        A = advantages[:, None]  # (B, 1)
        ratio = torch.exp(logp - old_logp)

        def seq_mean(per_token):
            return ((per_token * mask).sum(1) / mask.sum(1)).mean()

        clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
        right = -torch.min(ratio * A, clipped * A)
        inverted = 1 / ratio
        mistakes = {
            "the clip went on the advantage: clip the probability RATIO to [1 − ε, 1 + ε], the advantage stays "
            "as it is":
                seq_mean(-torch.min(ratio * A, ratio * A.clamp(1 - epsilon, 1 + epsilon))),
            "the product ratio·advantage was clipped: clip the RATIO, then multiply by the advantage":
                seq_mean(-torch.min(ratio * A, (ratio * A).clamp(1 - epsilon, 1 + epsilon))),
            "the ratio is inverted: it is π_θ/π_old = exp(logp − old_logp)":
                seq_mean(-torch.min(inverted * A, inverted.clamp(1 - epsilon, 1 + epsilon) * A)),
            "max where the objective takes the min: the pessimistic (smaller) of the clipped and unclipped terms":
                seq_mean(-torch.max(ratio * A, clipped * A)),
            "no clipping: the ratio must be clipped to [1 − ε, 1 + ε] so one update cannot move the policy far":
                seq_mean(-ratio * A),
            "the sign: return the LOSS to minimise, the negative of the objective": -seq_mean(right),
            "averaging over padding: mean over each sequence's real tokens only (the mask), padding never counts":
                right.mean(),
            "averaging over padding: padding never counts, and each sequence weighs the same":
                (right * mask).sum(1).div(right.shape[1]).mean(),
            "every token of the batch weighs the same (that is BNPO): GRPO averages each sequence over its own "
            "tokens, then the sequences": (right * mask).sum() / mask.sum(),
        }
        leaf = logp.clone().requires_grad_(True)
        got = clipped_objective(leaf, old_logp.clone(), advantages.clone(), mask.clone(), epsilon)
        want = grpo_loss(logp, old_logp, advantages, mask, epsilon=epsilon, loss_type="grpo")
        if not isinstance(got, torch.Tensor) or got.numel() != 1:
            raise CheckFailed(f"return the loss as one scalar tensor, got {_describe(got)}")
        expect(got.detach().reshape(()), want, what=f"loss with epsilon={epsilon}", mistakes=mistakes,
               rtol=1e-5, atol=1e-6)
        if not got.requires_grad:
            raise CheckFailed("the loss carries no gradient to logp: compute the ratio from logp with torch "
                              "operations (no .item(), no .detach() on logp)")
        got.backward()
        reference_leaf = logp.clone().requires_grad_(True)
        grpo_loss(reference_leaf, old_logp, advantages, mask, epsilon=epsilon, loss_type="grpo").backward()
        expect(leaf.grad, reference_leaf.grad, what="gradient with respect to logp", rtol=1e-4, atol=1e-6)
    return "−min(ρÂ, clip(ρ)Â), averaged over each sequence's tokens, then over sequences"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# 08.3 k3_kl(logp, ref_logp) -> (B, T)
# ---------------------------------------------------------------------------------------------
def check_k3_kl(k3_kl) -> str:
    from ..grpo import k3_kl as reference

    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 5, generator=gen) * 3
    ref_logp = logp + torch.randn(3, 5, generator=gen) * 0.7
    got = _as_tensor(k3_kl(logp.clone(), ref_logp.clone()), "KL")
    forward = logp - ref_logp  # log π_θ/π_ref
    expect(got, reference(logp, ref_logp), what="per-token KL", rtol=1e-5, atol=1e-6, mistakes={
        "the KL's sign is reversed: k3 is exp(x) − x − 1 with x = log(π_ref/π_θ) = ref_logp − logp (the samples "
        "come from π_θ)": torch.exp(forward) - forward - 1,
        "that is k1 = log(π_θ/π_ref): unbiased but noisy and negative on some tokens; k3 is never negative":
            forward,
        "that is k1 with the KL's sign reversed, and k1 is not k3: k3 = exp(x) − x − 1, x = ref_logp − logp":
            -forward,
        "that is k2 = ½·(log ratio)²; GRPO uses k3 = exp(x) − x − 1, x = ref_logp − logp": 0.5 * forward ** 2,
        "the −1 is missing: k3 is 0 where the two models agree": torch.exp(-forward) + forward,
    })
    same = _as_tensor(k3_kl(logp.clone(), logp.clone()), "KL")
    if not torch.allclose(same, torch.zeros_like(same), atol=1e-6):
        raise CheckFailed("the KL of a model to itself must be 0 on every token")
    return "k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0"


# ---------------------------------------------------------------------------------------------
# 08.4 correctness_reward(prompts, completions, answer, **kwargs) -> list[float]
# ---------------------------------------------------------------------------------------------
def check_correctness_reward(correctness_reward) -> str:
    from ..evaluate import parse_number

    prompts = ["Q: What is 12 + 34?\nA:"] * 8 + ["Q: What is 5 + 7?\nA:"] * 4
    answers = [46] * 8 + [12] * 4
    completions = [" 46", " 46\nQ: What is 3 + 4?\nA: 7", " 47", " 146", "46", " 64", " 4", " 460",
                   " 12", " 12 is the sum", " 13\nQ: What is 6 + 6?\nA: 12", " 21"]
    unparsable = [" forty-six", "", " ?", "\n", " the answer is 46"]
    a = [12] * 8 + [5] * 4
    b = [34] * 8 + [7] * 4
    got = correctness_reward(list(prompts), list(completions), list(answers))
    if not isinstance(got, (list, tuple)) and not hasattr(got, "tolist"):
        raise CheckFailed(f"return a list with one float per completion, got {type(got).__name__}")
    got = [float(x) for x in (got.tolist() if hasattr(got, "tolist") else got)]
    if len(got) != len(completions):
        raise CheckFailed(f"return one reward per completion: {len(completions)} completions, got {len(got)} rewards")
    want = [float(parse_number(c) == ans) for c, ans in zip(completions, answers)]
    def last_number(c):
        numbers = re.findall(r"-?\d+", c)
        return int(numbers[-1]) if numbers else None

    expect(got, want, what="rewards", mistakes={
        "46 is inside 146 and 460: compare the parsed NUMBER with the answer, not substrings":
            [float(str(ans) in c) for c, ans in zip(completions, answers)],
        "the answer is the FIRST number of the completion; the model often goes on with a new question, whose "
        "numbers are not its answer": [float(last_number(c) == ans) for c, ans in zip(completions, answers)],
        "text after the number (a new 'Q: …') must not cost the correctness reward — that is the format "
        "reward's job: compare the leading number only":
            [float(c.strip() == str(ans)) for c, ans in zip(completions, answers)],
        "every reward is 0: the answer column holds integers, so compare numbers with numbers (int(...))":
            [0.0] * len(completions),
    })
    try:  # as TRL calls it: by keyword, with every column of the dataset
        by_keyword = correctness_reward(prompts=list(prompts), completions=list(completions), answer=list(answers),
                                        a=list(a), b=list(b))
    except TypeError as e:
        if "keyword" in str(e):
            raise CheckFailed(f"accept **kwargs: TRL passes every column of the dataset (here also 'a' and 'b') to "
                              f"each reward function, by keyword ({e})") from None
        raise
    expect([float(x) for x in by_keyword], want, what="rewards when called by keyword, as TRL calls it")
    n = len(unparsable)
    try:
        got_bad = correctness_reward(["Q: What is 12 + 34?\nA:"] * n, list(unparsable), [46] * n)
    except Exception as e:  # noqa: BLE001 — this is the mistake being diagnosed
        raise CheckFailed(f"it crashes on unparsable text ({type(e).__name__}: {e}): a sampled completion can be "
                          f"anything, so text that does not start with a number must get 0.0, not an exception "
                          f"that stops training") from None
    got_bad = [float(x) for x in got_bad]
    expect(got_bad, [0.0] * n, what=f"rewards for {unparsable!r}", mistakes={
        "a number later in the text is not the answer: the completion must START with it (after spaces)":
            [float(x) for x in [0, 0, 0, 0, 1]],
    })
    return "1.0 exactly when the leading number is right; anything unparsable is 0.0"


EXERCISES = [
    Exercise("08.1", "group-normalised advantages", ("group_advantages",), check_group_advantages),
    Exercise("08.2", "the clipped per-token objective", ("clipped_objective",), check_clipped_objective),
    Exercise("08.3", "the k3 KL estimator", ("k3_kl",), check_k3_kl),
    Exercise("08.4", "a correctness reward that parses the answer", ("correctness_reward",), check_correctness_reward),
]
