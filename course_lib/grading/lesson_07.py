"""Hidden checks for lesson 07 (DPO). References: course_lib.dpo.dpo_loss (tested against TRL's DPOTrainer)
and course_lib.rl.token_logprobs. The wrong values each mistake would produce are computed here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import CheckFailed, Exercise, expect


def _tensor(got, what: str, shape: tuple[int, ...], unit: str = "sequence") -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: return a tensor, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        if got.numel() == 1 and shape != ():
            raise CheckFailed(f"{what}: return one value per {unit}, shape {shape}, not their mean")
        raise CheckFailed(f"{what}: expected shape {shape}, got {tuple(got.shape)}")
    return got


# ---------------------------------------------------------------------------------------------
# 07.1 sequence_logprobs(logits, batch) -> (2B,)
# ---------------------------------------------------------------------------------------------
def _batch(seed: int):
    """Two pairs as the collator stacks them: the 2 chosen sequences, then the 2 rejected ones, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    V, T = 11, 9
    prompt_lengths = [3, 2, 3, 2]  # chosen and rejected of a pair share the prompt
    completion_lengths = [4, 5, 2, 6]
    input_ids = torch.zeros(4, T, dtype=torch.long)  # pad id 0
    attention_mask = torch.zeros(4, T, dtype=torch.long)
    completion_mask = torch.zeros(4, T, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        input_ids[row, :p + c] = torch.randint(1, V, (p + c,), generator=gen)
        attention_mask[row, :p + c] = 1
        completion_mask[row, p:p + c] = 1
    logits = torch.randn(4, T, V, generator=gen) * 2
    return logits, {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def check_sequence_logprobs(sequence_logprobs) -> str:
    from ..rl import token_logprobs

    for seed in (0, 1):
        logits, batch = _batch(seed)
        ids, completion, attention = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
        shifted = token_logprobs(logits[:, :-1], ids[:, 1:])  # (2B, T−1): position t predicts token t+1
        c = completion[:, 1:].float()
        want = (shifted * c).sum(1)
        unshifted = token_logprobs(logits, ids)  # (2B, T)
        got = sequence_logprobs(logits.clone(), {k: v.clone() for k, v in batch.items()})
        got = _tensor(got, "sequence log-probs", (4,))
        expect(got, want, what="sequence log-probs", rtol=1e-5, atol=1e-5, mistakes={
            "mean instead of sum over tokens: log π(y|x) of a sequence is the SUM of its tokens' log-probs "
            "(a probability of the whole completion)": want / c.sum(1),
            "prompt tokens counted: only the completion's tokens belong to log π(y|x); use the completion mask, "
            "not the attention mask": (shifted * attention[:, 1:]).sum(1),
            "prompt and padding tokens counted: mask with the completion mask": shifted.sum(1),
            "not shifted: the logits at position t predict the token at t + 1, so drop the last logit and the "
            "first token": (unshifted * completion.float()).sum(1),
            "the mask is off by one: after shifting, the mask must be shifted with the tokens (completion_mask[:, 1:])":
                (shifted * completion[:, :-1].float()).sum(1),
            "raw logits are not log-probabilities: take log_softmax over the vocabulary first":
                (logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * c).sum(1),
            "log_softmax must run over the vocabulary (the last dimension), not over positions":
                (torch.log_softmax(logits[:, :-1], dim=1).gather(-1, ids[:, 1:, None]).squeeze(-1) * c).sum(1),
        })
    return "Σ log p over the completion's tokens, each read from the logits one position earlier"


# ---------------------------------------------------------------------------------------------
# 07.2 dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
#      -> (losses, chosen_rewards, rejected_rewards), each (B,)
# ---------------------------------------------------------------------------------------------
def _logps(seed: int, B: int = 5, spread: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=gen) * 20 + 5) + torch.randn(B, generator=gen) * spread for _ in range(4)]


def check_dpo_sigmoid_loss(dpo_sigmoid_loss) -> str:
    from ..dpo import dpo_loss

    cases = [(_logps(0), 0.1), (_logps(1), 0.5)]
    big = _logps(2)
    big[1] = big[1] + torch.tensor([0.0, 0.0, 900.0, 0.0, -900.0])  # a rejected far above and one far below the chosen
    cases.append((big, 0.2))
    for logps, beta in cases:
        pc, pr, rc, rr = logps
        policy_chosen, policy_rejected = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        ref_chosen, ref_rejected = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)  # a careless caller
        out = dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise CheckFailed("return a tuple of three tensors: (losses, chosen_rewards, rejected_rewards)")
        losses, chosen_rewards, rejected_rewards = out
        losses = _tensor(losses, "losses", (5,), unit="pair")
        want, want_chosen, want_rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
        if not torch.isfinite(losses).all():
            bad = losses.detach()[~torch.isfinite(losses.detach())][0].item()
            raise CheckFailed(f"a loss is {bad} where the pair's "
                              f"margin is large: log(sigmoid(x)) underflows to log 0; −log σ(x) is "
                              f"-F.logsigmoid(x), which stays finite")
        d = (pc - rc) - (pr - rr)
        expect(losses.detach(), want, what=f"losses with beta={beta}", rtol=1e-5, atol=1e-5, mistakes={
            "chosen and rejected swapped: the loss must fall as the CHOSEN completion's log-ratio rises above the "
            "rejected one's": -F.logsigmoid(-beta * d),
            "β applied twice: the implicit rewards already carry β, so the logistic loss takes their difference "
            "as it is": -F.logsigmoid(beta * beta * d),
            "β is missing: the margin is β times the difference of log-ratios": -F.logsigmoid(d),
            "the reference is missing: each completion's reward is its log-RATIO to the reference, "
            "log π − log π_ref": -F.logsigmoid(beta * (pc - pr)),
            "the reference's sign is flipped: the log-ratio is log π − log π_ref":
                -F.logsigmoid(beta * ((pc + rc) - (pr + rr))),
            "that is log σ, not −log σ: the loss must fall as the margin grows": F.logsigmoid(beta * d),
        })
        for name, got, right, logratio in (("chosen_rewards", chosen_rewards, want_chosen, pc - rc),
                                          ("rejected_rewards", rejected_rewards, want_rejected, pr - rr)):
            got = _tensor(got, name, (5,), unit="pair")
            if got.requires_grad:
                raise CheckFailed(f"{name} carry a gradient: the implicit rewards are metrics to log, detach them")
            expect(got, right, what=name, rtol=1e-5, atol=1e-5, mistakes={
                "the implicit reward is β times the log-ratio (eq. 5 without the β·log Z that cancels)": logratio,
                "the implicit reward is β·log(π/π_ref): the reference is missing":
                    beta * (pc if name == "chosen_rewards" else pr),
            })
        losses.sum().backward()
        if ref_chosen.grad is not None or ref_rejected.grad is not None:
            raise CheckFailed("the reference not detached: a gradient reached ref_chosen/ref_rejected. The reference "
                              "is frozen; detach its log-probs, so no caller's graph can train it")
        if policy_chosen.grad is None or policy_rejected.grad is None:
            raise CheckFailed("no gradient reached the policy's log-probs: compute the loss from them with torch "
                              "operations (no .item(), no .detach() on the policy)")
        reference_leaves = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        dpo_loss(*reference_leaves, rc, rr, beta=beta)[0].sum().backward()
        expect(policy_chosen.grad, reference_leaves[0].grad, what="gradient with respect to the chosen log-probs",
               rtol=1e-4, atol=1e-6)
    return "−log σ(β·margin of log-ratios); rewards β·log(π/π_ref), detached; the reference gets no gradient"


# ---------------------------------------------------------------------------------------------
# 07.3 ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, beta)
# ---------------------------------------------------------------------------------------------
def check_ipo_loss(ipo_loss) -> str:
    from ..dpo import dpo_loss

    chosen_lengths = torch.tensor([4, 9, 6, 3, 12])
    rejected_lengths = torch.tensor([7, 5, 6, 10, 2])
    for seed, beta in [(3, 0.1), (4, 0.5), (5, 2.0)]:
        pc, pr, rc, rr = _logps(seed, spread=6.0)
        got = ipo_loss(pc.clone(), pr.clone(), rc.clone(), rr.clone(), chosen_lengths.clone(),
                       rejected_lengths.clone(), beta)
        got = _tensor(got, "losses", (5,), unit="pair")
        lc, lr = chosen_lengths.float(), rejected_lengths.float()
        want = dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=beta, loss_type="ipo")[0]
        d = (pc - rc) / lc - (pr - rr) / lr  # margin of per-token average log-ratios
        d_sum = (pc - rc) - (pr - rr)
        expect(got.detach(), want, what=f"IPO losses with beta={beta}", rtol=1e-5, atol=1e-5, mistakes={
            "the IPO target 1/(2β) is wrong: you used 1/β": (d - 1 / beta) ** 2,
            "the IPO target 1/(2β) is wrong: 1/2*beta is (1/2)·β in Python; write 1 / (2 * beta)": (d - beta / 2) ** 2,
            "the IPO target 1/(2β) is wrong: you used 2β": (d - 2 * beta) ** 2,
            "the IPO target is a positive margin: the chosen must beat the rejected by 1/(2β), so subtract it":
                (d + 1 / (2 * beta)) ** 2,
            "the sums were not averaged: IPO (as TRL runs it) compares per-token AVERAGE log-probs, each "
            "completion's sum divided by its own length": (d_sum - 1 / (2 * beta)) ** 2,
            "each completion is averaged over its OWN length: chosen by chosen_lengths, rejected by rejected_lengths":
                ((pc - rc) / lr - (pr - rr) / lc - 1 / (2 * beta)) ** 2,
            "β multiplies the margin: in IPO β only sets the target 1/(2β) the margin is pulled towards":
                (beta * d - 1 / (2 * beta)) ** 2,
            "the loss is the SQUARED distance to the target": (d - 1 / (2 * beta)).abs(),
            "chosen and rejected swapped: the margin is chosen minus rejected": (-d - 1 / (2 * beta)) ** 2,
        })
    return "(margin of per-token log-ratios − 1/(2β))²: a target, so the margin cannot run off"


EXERCISES = [
    Exercise("07.1", "masked sequence log-probs", ("sequence_logprobs",), check_sequence_logprobs),
    Exercise("07.2", "the DPO loss and its implicit rewards", ("dpo_sigmoid_loss",), check_dpo_sigmoid_loss),
    Exercise("07.3", "IPO", ("ipo_loss",), check_ipo_loss),
]
