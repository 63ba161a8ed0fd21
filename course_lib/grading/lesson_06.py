"""Hidden checks for lesson 06 (RLHF: reward model and PPO). References: course_lib.reward_model
(tested against TRL's RewardTrainer), course_lib.ppo and course_lib.rl (tested on hand-computed vectors).
The wrong values each mistake would produce are computed here, so the feedback can name it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import CheckFailed, Exercise, expect


def _tensor(got, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: return a tensor, got {type(got).__name__}")
    if shape == () and got.numel() == 1:
        return got.detach().reshape(())  # a (1,) scalar is fine too
    if tuple(got.shape) != shape:
        raise CheckFailed(f"{what}: expected shape {shape}, got {tuple(got.shape)}")
    return got.detach()


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) right-padded response mask: 1 on the first ``lengths[b]`` positions."""
    return (torch.arange(T) < torch.tensor(lengths)[:, None]).float()


def _garbage_on_padding(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Padding positions hold whatever the model computed there: never 0 by luck."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------------------------------------------------------------------------------------------
# 06.1 bradley_terry_loss(r_chosen, r_rejected, margin) -> scalar
# ---------------------------------------------------------------------------------------------
def check_bradley_terry_loss(bradley_terry_loss) -> str:
    from ..reward_model import bradley_terry_loss as reference

    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(6, generator=gen) * 2, torch.randn(6, generator=gen) * 2, 0.5),
             (torch.randn(5, generator=gen), torch.randn(5, generator=gen), torch.tensor([0., 1., 0.5, 2., 0.])),
             (torch.tensor([1.0, -150.0, 3.0]), torch.tensor([0.5, 150.0, -1.0]), 0.0)]  # one pair badly wrong
    for r_chosen, r_rejected, margin in cases:
        got = bradley_terry_loss(r_chosen.clone(), r_rejected.clone(), margin)
        got = _tensor(got, "loss", ())
        m = torch.as_tensor(margin)
        if not torch.isfinite(got):
            raise CheckFailed(f"the loss is {got.item()} for a pair the model ranks wrongly by 300: log(sigmoid(x)) "
                              f"underflows to log 0 there; −log σ(x) is -F.logsigmoid(x), which stays finite")
        d = r_chosen - r_rejected
        expect(got, reference(r_chosen, r_rejected, margin), what=f"loss (margin {_short(margin)})", mistakes={
            "chosen and rejected swapped: the loss must fall as the CHOSEN score rises above the rejected one":
                -F.logsigmoid(-d - m).mean(),
            "the margin was added: the chosen must beat the rejected BY the margin, so subtract it from the gap":
                -F.logsigmoid(d + m).mean(),
            "the margin is ignored: the chosen must win by at least the margin": -F.logsigmoid(d).mean(),
            "summed over pairs: average, so the loss (and the learning rate) does not depend on the batch size":
                -F.logsigmoid(d - m).sum(),
            "that is log σ, not −log σ: the loss is the negative log-likelihood of the preference":
                F.logsigmoid(d - m).mean(),
        })
    return "−log σ(r_c − r_r − margin), averaged over pairs"


def _short(value) -> str:
    return f"{value.tolist()}" if isinstance(value, torch.Tensor) else f"{value}"


# ---------------------------------------------------------------------------------------------
# 06.2 sequence_scores(values, input_ids, attention_mask, pad_token_id) -> (B,)
# ---------------------------------------------------------------------------------------------
EOS = PAD = 2  # this tokenizer pads with its eos, as many do


def _scored_batch(full_row: bool):
    rows = [([5, 6, 7, EOS], "right"), ([5, 6, 7, 8, EOS], "left"), ([9, 5, EOS], "right")]
    if full_row:
        rows.append(([5, 6, 7, 8, 9, 10, EOS], "right"))
    T = 7
    ids, mask = torch.full((len(rows), T), PAD), torch.zeros(len(rows), T, dtype=torch.long)
    for b, (tokens, side) in enumerate(rows):
        span = slice(0, len(tokens)) if side == "right" else slice(T - len(tokens), T)
        ids[b, span], mask[b, span] = torch.tensor(tokens), 1
    gen = torch.Generator().manual_seed(int(full_row))
    return torch.randn(len(rows), T, generator=gen), ids, mask


def check_sequence_scores(sequence_scores) -> str:
    from ..reward_model import last_token_index

    for full_row in (False, True):
        values, ids, mask = _scored_batch(full_row)
        rows = torch.arange(len(ids))
        got = sequence_scores(values.clone(), ids.clone(), mask.clone(), PAD)
        got = _tensor(got, "scores", (len(ids),))
        not_pad = torch.arange(ids.shape[1]) * (ids != PAD)
        mistakes = {
            "read at a pad position: the last column is padding in right-padded rows; read each row at its own "
            "last real token": values[:, -1],
            "mask.sum() − 1 is the last real token only under right padding; with left padding it lands inside "
            "the text: take the position of the last 1 in the attention mask": values[rows, mask.sum(1) - 1],
            "read at a pad position: one past the last real token":
                values[rows, mask.sum(1).clamp(max=ids.shape[1] - 1)],
            "the pad id is also the eos id here, so input_ids != pad_token_id hides the eos, the token that closes "
            "the text: find the last real token from the attention mask": values[rows, not_pad.argmax(1)],
            "the score is read at the LAST real token (the one that has seen the whole text), not the first":
                values[rows, mask.float().argmax(1)],
            "the score is one number read at the last real token, not a mean over the text":
                (values * mask).sum(1) / mask.sum(1),
        }
        expect(got, values[rows, last_token_index(mask)], what="scores", mistakes=mistakes)
    return "each row read at its last attended token, whatever the padding side"


# ---------------------------------------------------------------------------------------------
# 06.3 kl_shaped_rewards(scores, logp, ref_logp, mask, kl_coef) -> (B, T)
# ---------------------------------------------------------------------------------------------
def _rollout(seed: int, lengths: list[int], T: int = 6):
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = _mask(lengths, T)
    logp = _garbage_on_padding(-torch.rand(B, T, generator=gen) * 3, mask, -9.0)
    ref_logp = _garbage_on_padding(logp + torch.randn(B, T, generator=gen) * 0.5, mask, -1.0)
    return logp, ref_logp, mask, gen


def check_kl_shaped_rewards(kl_shaped_rewards) -> str:
    from ..ppo import kl_shaped_rewards as reference

    for seed, lengths, kl_coef in [(0, [4, 5, 2], 0.2), (1, [6, 3, 1], 0.05)]:
        logp, ref_logp, mask, gen = _rollout(seed, lengths)
        scores = torch.randn(len(lengths), generator=gen) * 2
        B, T = mask.shape
        rows = torch.arange(B)
        last = torch.tensor(lengths) - 1
        got = kl_shaped_rewards(scores.clone(), logp.clone(), ref_logp.clone(), mask.clone(), kl_coef)
        got = _tensor(got, "rewards", (B, T))
        kl = (logp - ref_logp) * mask

        def at(index):
            out = -kl_coef * kl
            out[rows, index] += scores
            return out

        mistakes = {
            "the score added to every token: the reward model scores the whole text once, so its score goes on the "
            "last response token only (the KL penalty is the per-token part)": -kl_coef * kl + scores[:, None] * mask,
            "the score went to the first pad after the response (classic TRL's quirk): put it on the last REAL "
            "token, where the text the reward model read is complete": at((last + 1).clamp(max=T - 1)),
            "the score was read into a pad position (the last column): put it on each row's last real token":
                at(torch.full((B,), T - 1)),
            "the score belongs at the END of the response, where the text it judges is complete, not the first token":
                at(torch.zeros(B, dtype=torch.long)),
            "the KL's sign: the penalty is −β·(log π − log π_ref), it lowers the reward where the policy has moved "
            "away from the reference": at(last) + 2 * kl_coef * kl,
            "the KL penalty on padding: padding positions must be 0 (mask the per-token KL)":
                at(last) - kl_coef * (logp - ref_logp) * (1 - mask),
            "the KL coefficient is missing: the penalty is kl_coef·(log π − log π_ref)": at(last) + kl_coef * kl - kl,
        }
        expect(got, reference(scores, logp, ref_logp, mask, kl_coef), what=f"rewards (kl_coef {kl_coef})",
               rtol=1e-5, atol=1e-6, mistakes=mistakes)
    return "−β·KL on every response token, the score once on the last one, 0 on padding"


# ---------------------------------------------------------------------------------------------
# 06.4 gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
# ---------------------------------------------------------------------------------------------
def _gae_variant(rewards, values, mask, gamma, lam, *, bootstrap_gamma=None, recursion=None,
                 mask_values=True, forward=False):
    """GAE with one knob turned, to compute what a mistake gives."""
    bootstrap_gamma = gamma if bootstrap_gamma is None else bootstrap_gamma
    recursion = gamma * lam if recursion is None else recursion
    v = values * mask if mask_values else values
    r = rewards * mask
    B, T = values.shape
    next_values = torch.cat([v[:, 1:], torch.zeros(B, 1)], dim=1)
    delta = r + bootstrap_gamma * next_values - v
    advantages = torch.zeros(B, T)
    running = torch.zeros(B)
    steps = range(T) if forward else reversed(range(T))
    for t in steps:
        running = delta[:, t] + recursion * running
        advantages[:, t] = running
    return advantages * mask, (advantages + v) * mask


def check_gae(gae) -> str:
    from ..ppo import gae as reference

    for seed, lengths, gamma, lam in [(0, [6, 4, 2], 1.0, 0.95), (1, [5, 6, 3], 0.9, 0.7)]:
        gen = torch.Generator().manual_seed(seed)
        mask = _mask(lengths, 6)
        rewards = torch.randn(3, 6, generator=gen) * 0.3 * mask
        rewards[torch.arange(3), torch.tensor(lengths) - 1] += torch.tensor([1.5, -2.0, 0.8])  # the scores
        values = _garbage_on_padding(torch.randn(3, 6, generator=gen), mask, 3.0)  # the value head runs on padding too
        out = gae(rewards.clone(), values.clone(), mask.clone(), gamma, lam)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed("return a tuple (advantages, returns)")
        advantages, returns = (_tensor(x, name, (3, 6)) for x, name in zip(out, ("advantages", "returns")))
        want_a, want_r = reference(rewards, values, mask, gamma, lam)
        args = rewards, values, mask, gamma, lam
        swapped_a, swapped_r = _gae_variant(*args, bootstrap_gamma=lam)
        leak_a, leak_r = _gae_variant(*args, mask_values=False)
        where = f"(gamma {gamma}, lam {lam})"
        expect(advantages, want_a, what=f"advantages {where}", rtol=1e-5, atol=1e-5, mistakes={
            "no bootstrapping from the next value: the TD error is r_t + γ·V(s_{t+1}) − V(s_t)":
                _gae_variant(*args, bootstrap_gamma=0.0)[0],
            "λ and γ swapped: γ discounts the next value in the TD error, λ only weighs how far the sum of TD "
            "errors looks ahead": swapped_a,
            "bootstrapped from padding: after the last real token the episode is over, V = 0 there "
            "(mask the values before using V(s_{t+1}))": leak_a,
            "the advantage recursion must decay by γ·λ, not γ alone": _gae_variant(*args, recursion=gamma)[0],
            "the advantage recursion must decay by γ·λ, not λ alone": _gae_variant(*args, recursion=lam)[0],
            "the sum runs backwards from the end: A_t collects the TD errors of the steps AFTER t":
                _gae_variant(*args, forward=True)[0],
        })
        discounted = torch.zeros(3, 6)
        running = torch.zeros(3)
        for t in reversed(range(6)):
            running = rewards[:, t] + gamma * running
            discounted[:, t] = running
        expect(returns, want_r, what=f"returns {where}", rtol=1e-5, atol=1e-5, mistakes={
            "returns are the value targets A + V (the λ-return), not the discounted sum of rewards":
                discounted * mask,
            "returns are the value targets A + V: the values were not added": want_a,
            "bootstrapped from padding: after the last real token the episode is over, V = 0 there": leak_r,
            "λ and γ swapped: γ discounts the next value, λ weighs the TD errors": swapped_r,
            "returns on padding must be 0": want_a + values,
        })
    return "A_t = Σ (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, V = 0 after the end; returns A + V"


# ---------------------------------------------------------------------------------------------
# 06.5 whiten(advantages, mask) -> (B, T)
# ---------------------------------------------------------------------------------------------
def check_whiten(whiten) -> str:
    from ..rl import masked_whiten

    for seed, lengths in [(0, [6, 2, 4]), (1, [3, 5, 1])]:
        gen = torch.Generator().manual_seed(seed)
        mask = _mask(lengths, 6)
        advantages = (torch.randn(3, 6, generator=gen) * 2 + 1.5) * mask  # GAE's output: 0 on padding
        got = _tensor(whiten(advantages.clone(), mask.clone()), "whitened advantages", (3, 6))
        real = advantages[mask.bool()]
        mean, var = real.mean(), real.var()
        everywhere = (advantages - advantages.mean()) / torch.sqrt(advantages.var() + 1e-8)
        expect(got, masked_whiten(advantages, mask) * mask, what="whitened advantages", rtol=1e-4, atol=1e-5, mistakes={
            "whitening over padding: the mean and variance must come from the real tokens only (the mask)":
                everywhere * mask,
            "whitening over padding: the statistics and the output must both ignore padding": everywhere,
            "the variance is the unbiased one (n − 1), as TRL's masked_whiten":
                (advantages - mean) / torch.sqrt(real.var(unbiased=False) + 1e-8) * mask,
            "padding must stay 0 after whitening: mask the result": (advantages - mean) / torch.sqrt(var + 1e-8),
            "the mean must be subtracted too (shift and scale)": advantages / torch.sqrt(var + 1e-8) * mask,
            "divide by the standard deviation, not the variance": (advantages - mean) / (var + 1e-8) * mask,
            "centred but not scaled: divide by the standard deviation": (advantages - mean) * mask,
        })
    return "mean 0, variance 1 over the real tokens; padding 0"


# ---------------------------------------------------------------------------------------------
# 06.6 policy_loss(logp, old_logp, advantages, mask, cliprange) -> scalar
# ---------------------------------------------------------------------------------------------
def check_policy_loss(policy_loss) -> str:
    from ..ppo import policy_loss as reference

    for seed, lengths, cliprange in [(0, [6, 3, 5, 2], 0.2), (1, [4, 6, 1, 3], 0.1)]:
        gen = torch.Generator().manual_seed(seed)
        mask = _mask(lengths, 6)
        old_logp = _garbage_on_padding(-torch.rand(4, 6, generator=gen) * 3 - 0.1, mask, -1.0)
        logp = _garbage_on_padding(old_logp + torch.randn(4, 6, generator=gen) * 0.4, mask, -8.0)
        advantages = torch.randn(4, 6, generator=gen) * 1.5 * mask  # whitened, 0 on padding
        leaf = logp.clone().requires_grad_(True)
        got = policy_loss(leaf, old_logp.clone(), advantages.clone(), mask.clone(), cliprange)
        got_value = _tensor(got, "loss", ())
        ratio = torch.exp(logp - old_logp)
        clipped = ratio.clamp(1 - cliprange, 1 + cliprange)
        A = advantages

        def token_mean(x):
            return (x * mask).sum() / mask.sum()

        right = torch.max(-A * ratio, -A * clipped)
        inverted = 1 / ratio
        want = reference(logp, old_logp, advantages, mask, cliprange)[0]
        expect(got_value, want, what=f"loss (cliprange {cliprange})", rtol=1e-5, atol=1e-6, mistakes={
                   "the ratio is inverted: ρ = π_new/π_old = exp(logp − old_logp)":
                       token_mean(torch.max(-A * inverted, -A * inverted.clamp(1 - cliprange, 1 + cliprange))),
                   "the clip applied to the advantage: clip the probability RATIO to [1 − ε, 1 + ε], the advantage "
                   "stays as it is": token_mean(torch.max(-A * ratio, -A.clamp(1 - cliprange, 1 + cliprange) * ratio)),
                   "the product ratio·advantage was clipped: clip the RATIO, then multiply by the advantage":
                       token_mean(torch.max(-A * ratio, -(A * ratio).clamp(1 - cliprange, 1 + cliprange))),
                   "the optimistic term won: the loss takes the LARGER of the two negated terms (the objective the "
                   "smaller), so clipping can only remove incentive, never add it":
                       token_mean(torch.min(-A * ratio, -A * clipped)),
                   "no clipping: without it one batch can move the policy arbitrarily far": token_mean(-A * ratio),
                   "the sign: minimise −A·ρ (a loss), which raises the probability of tokens with positive advantage":
                       -token_mean(right),
                   "averaging over padding: mean over the real tokens only": right.mean(),
                   "every real token weighs the same in PPO's loss (a masked mean over the batch), not every sequence":
                       ((right * mask).sum(1) / mask.sum(1)).mean(),
               })
        if not got.requires_grad:
            raise CheckFailed("the loss carries no gradient to logp: compute it from logp with torch operations")
        got.backward()
        reference_leaf = logp.clone().requires_grad_(True)
        reference(reference_leaf, old_logp, advantages, mask, cliprange)[0].backward()
        expect(leaf.grad, reference_leaf.grad, what="gradient with respect to logp", rtol=1e-4, atol=1e-6)
    return "masked token mean of max(−Aρ, −A·clip(ρ, 1 ± ε))"


# ---------------------------------------------------------------------------------------------
# 06.7 value_loss(values, old_values, returns, mask, cliprange_value) -> scalar
# ---------------------------------------------------------------------------------------------
def check_value_loss(value_loss) -> str:
    from ..ppo import value_loss as reference

    for seed, lengths, eps in [(0, [6, 3, 5, 2], 0.2), (1, [4, 6, 1, 3], 0.5)]:
        gen = torch.Generator().manual_seed(seed)
        mask = _mask(lengths, 6)
        old_values = _garbage_on_padding(torch.randn(4, 6, generator=gen), mask, 2.0)
        values = _garbage_on_padding(old_values + torch.randn(4, 6, generator=gen) * 0.5, mask, -3.0)
        returns = torch.randn(4, 6, generator=gen) * mask
        got = _tensor(value_loss(values.clone(), old_values.clone(), returns.clone(), mask.clone(), eps), "loss", ())
        clipped = old_values + (values - old_values).clamp(-eps, eps)
        plain, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2

        def token_mean(x):
            return (x * mask).sum() / mask.sum()

        expect(got, reference(values, old_values, returns, mask, eps)[0], what=f"value loss (cliprange_value {eps})",
               rtol=1e-5, atol=1e-6, mistakes={
                   "the ½ is missing: PPO's value loss is ½·(V − R)²": token_mean(torch.max(plain, clipped_loss)),
                   "no clipping: the new value may not leave old_values ± cliprange_value to lower its loss":
                       0.5 * token_mean(plain),
                   "min where PPO takes the max: the pessimistic (larger) of the clipped and unclipped errors":
                       0.5 * token_mean(torch.min(plain, clipped_loss)),
                   "the clipped value is old_values + clip(values − old_values, ±ε): the clipped CHANGE is added "
                   "back to where the value was": 0.5 * token_mean(
                       torch.max(plain, ((values - old_values).clamp(-eps, eps) - returns) ** 2)),
                   "only the clipped error: take the max of the clipped and the unclipped errors":
                       0.5 * token_mean(clipped_loss),
                   "averaging over padding: mean over the real tokens only":
                       0.5 * torch.max(plain, clipped_loss).mean(),
               })
    return "½·masked mean of max((V − R)², (clip(V, V_old ± ε) − R)²)"


EXERCISES = [
    Exercise("06.1", "the Bradley–Terry loss", ("bradley_terry_loss",), check_bradley_terry_loss),
    Exercise("06.2", "a reward model's score per sequence", ("sequence_scores",), check_sequence_scores),
    Exercise("06.3", "KL-shaped rewards", ("kl_shaped_rewards",), check_kl_shaped_rewards),
    Exercise("06.4", "generalised advantage estimation", ("gae",), check_gae),
    Exercise("06.5", "whitening over real tokens", ("whiten",), check_whiten),
    Exercise("06.6", "the clipped policy loss", ("policy_loss",), check_policy_loss),
    Exercise("06.7", "the clipped value loss", ("value_loss",), check_value_loss),
]
