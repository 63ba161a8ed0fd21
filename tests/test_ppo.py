"""PPO maths against numbers computed independently with plain loops (TRL 1.16 ships no PPO trainer),
rollout bookkeeping against per-row forward passes, and the loop on the embedded model."""

import math

import pytest
import torch

from course_lib import lora, ppo
from course_lib.models import load_model

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def rand(seed, shape=(3, 4), scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ------------------------------------------------------------------------------------------------
def test_kl_shaped_rewards_by_hand():
    logp, ref = rand(0), rand(1)
    scores = torch.tensor([2.0, -1.0, 0.5])
    got = ppo.kl_shaped_rewards(scores, logp, ref, MASK, kl_coef=0.1)
    for b in range(3):
        n = int(MASK[b].sum())
        for t in range(4):
            expected = 0.0
            if t < n:
                expected = -0.1 * (logp[b, t].item() - ref[b, t].item())
                if t == n - 1:
                    expected += scores[b].item()  # the score only on the last real token
            assert got[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)


def test_kl_shaped_rewards_reject_bad_input():
    logp = rand(0)
    with pytest.raises(ValueError, match=r"logp, ref_logp, mask must have one shape"):
        ppo.kl_shaped_rewards(torch.zeros(3), logp, logp[:, :3], MASK, 0.1)
    with pytest.raises(ValueError, match=r"scores must be \(B,\) = \(3,\)"):
        ppo.kl_shaped_rewards(torch.zeros(3, 1), logp, logp, MASK, 0.1)
    with pytest.raises(ValueError, match=r"mask row\(s\) \[1\] have no active token"):
        ppo.kl_shaped_rewards(torch.zeros(3), logp, logp, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), 0.1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scores holds 1 non-finite value"):
            ppo.kl_shaped_rewards(torch.tensor([0.0, bad, 1.0]), logp, logp, MASK, 0.1)
    with pytest.raises(ValueError, match="kl_coef must be a finite number"):
        ppo.kl_shaped_rewards(torch.zeros(3), logp, logp, MASK, -0.1)


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------
def gae_by_hand(rewards, values, length, gamma, lam):
    """A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} written as the explicit sum, δ_t = r_t + γV_{t+1} − V_t, V_length = 0."""
    def value(t):
        return values[t] if t < length else 0.0
    deltas = [rewards[t] + gamma * value(t + 1) - value(t) for t in range(length)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)]
    return advantages, [a + values[t] for t, a in enumerate(advantages)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.5, 0.9), (1.0, 1.0)])
def test_gae_by_hand(gamma, lam):
    rewards, values = rand(2), rand(3)
    advantages, returns = ppo.gae(rewards, values, MASK, gamma=gamma, lam=lam)
    for b in range(3):
        n = int(MASK[b].sum())
        exp_adv, exp_ret = gae_by_hand(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(exp_adv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returns[b, :n], torch.tensor(exp_ret), rtol=1e-5, atol=1e-6)
        assert advantages[b, n:].eq(0).all() and returns[b, n:].eq(0).all()


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards, values = rand(4), rand(5)
    advantages, returns = ppo.gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    for b in range(3):
        n = int(MASK[b].sum())
        for t in range(n):
            reward_to_go = sum(rewards[b, k].item() for k in range(t, n))
            assert returns[b, t].item() == pytest.approx(reward_to_go, abs=1e-5)
            assert advantages[b, t].item() == pytest.approx(reward_to_go - values[b, t].item(), abs=1e-5)


def test_gae_ignores_what_padding_holds():
    rewards, values = rand(6), rand(7)
    noisy_r, noisy_v = rewards.clone(), values.clone()
    noisy_r[MASK == 0] = 100.0
    noisy_v[MASK == 0] = -50.0
    for a, b in zip(ppo.gae(rewards, values, MASK), ppo.gae(noisy_r, noisy_v, MASK)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="lam must lie in"):
        ppo.gae(rewards, values, MASK, lam=1.5)
    with pytest.raises(ValueError, match="rewards, values, mask must have one shape"):
        ppo.gae(rewards, values[:2], MASK)


# ------------------------------------------------------------------------------------------------
# Clipped losses
# ------------------------------------------------------------------------------------------------
def test_policy_loss_by_hand():
    logp = rand(8, scale=0.3)
    old = rand(9, scale=0.3)
    adv = rand(10)
    loss, stats = ppo.policy_loss(logp, old, adv, MASK, cliprange=0.2)
    terms, clipped_count, kl_terms, n = 0.0, 0, 0.0, 0
    for b in range(3):
        for t in range(4):
            if not MASK[b, t]:
                continue
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            kl_terms += (logp[b, t].item() - old[b, t].item()) ** 2
            n += 1
    assert loss.item() == pytest.approx(terms / n, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(clipped_count / n)
    assert 0 < stats["clipfrac"] < 1  # the vectors exercise both branches
    assert stats["approx_kl"] == pytest.approx(0.5 * kl_terms / n, rel=1e-5)


def test_policy_loss_gradient_pushes_up_positive_advantages_and_stops_beyond_the_clip():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.0, 0.5, 0.0, -0.5]], requires_grad=True)  # ratios 1, e^.5 > 1.2, 1, e^-.5 < 0.8
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, _ = ppo.policy_loss(logp, old, adv, torch.ones(1, 4))
    loss.backward()
    # token 0: A > 0, ratio 1 → gradient lowers the loss by raising logp; token 1 is clipped (no gradient);
    # token 2: A < 0 → lowers logp; token 3: A < 0 and ratio already below 1 − ε → clipped
    assert logp.grad[0, 0] < 0 and logp.grad[0, 1] == 0 and logp.grad[0, 2] > 0 and logp.grad[0, 3] == 0


def test_value_loss_by_hand():
    values, old, returns = rand(11), rand(12), rand(13)
    loss, stats = ppo.value_loss(values, old, returns, MASK, cliprange_value=0.2)
    total, clipped_count, n = 0.0, 0, 0
    for b in range(3):
        for t in range(4):
            if not MASK[b, t]:
                continue
            v, vo, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            v_clipped = min(max(v, vo - 0.2), vo + 0.2)
            total += max((v - r) ** 2, (v_clipped - r) ** 2)
            clipped_count += (v_clipped - r) ** 2 > (v - r) ** 2
            n += 1
    assert loss.item() == pytest.approx(0.5 * total / n, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(clipped_count / n)
    with pytest.raises(ValueError, match="values, old_values, returns, mask must have one shape"):
        ppo.value_loss(values, old[:, :3], returns, MASK)
    with pytest.raises(ValueError, match=r"mask row\(s\) \[0\] have no active token"):
        ppo.value_loss(values, old, returns, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]))


# ------------------------------------------------------------------------------------------------
# Adaptive KL controller
# ------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller_by_hand():
    controller = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    expected = 0.2
    for kl, n in [(3.0, 256), (9.0, 256), (60.0, 256), (0.0, 128), (6.0, 64)]:
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)  # 3 → −0.2 (clipped from −0.5), 9 → 0.2, 60 → 0.2, 0 → −0.2, 6 → 0
        expected = expected * (1 + error * n / 10_000)
        assert controller.update(kl, n) == pytest.approx(expected)
        assert controller.value == pytest.approx(expected)
    assert expected != pytest.approx(0.2)
    with pytest.raises(FloatingPointError, match="current_kl is nan"):
        controller.update(float("nan"), 8)
    with pytest.raises(ValueError, match="target .* must be positive"):
        ppo.AdaptiveKLController(0.2, target=0, horizon=10)


# ------------------------------------------------------------------------------------------------
# Rollouts on the embedded model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_and_tokenizer():
    model, tokenizer = load_model(None, device="cpu")
    lora.add_lora(model, target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    return model, tokenizer


OPENERS = ["There was a kind fox called Ben. One day, Ben went to the park with a kite. Ben played with the "
           "kite for a long time. But the kite fell into the water.",
           "Mia was a shy owl who lived near the lake.",
           "Once upon a time, there was a little duck named Tom."]


def test_response_mask_stops_after_the_first_eos_even_when_pad_is_eos():
    eos = 1
    response = torch.tensor([[5, 6, 1, 1, 1], [5, 1, 7, 1, 1], [5, 6, 7, 8, 9]])
    assert ppo.response_mask_after_eos(response, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_logprobs_and_values_equal_per_row_forward_passes(policy_and_tokenizer):
    """Left-padded prompts, right-padded responses: each row's log-probs and values must equal those of
    the row alone, without any padding, aligned by hand (the logits at position p predict token p+1)."""
    model, tokenizer = policy_and_tokenizer
    rollout = ppo.sample_rollout(model, tokenizer, OPENERS, max_new_tokens=12, seed=0)
    head = ppo.ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, values, _ = ppo.response_forward(model, rollout, head)
    assert rollout.prompt_length == rollout.input_ids.shape[1] - rollout.response_mask.shape[1]
    for b, opener in enumerate(OPENERS):
        prompt_ids = tokenizer(opener)["input_ids"]
        n = int(rollout.response_mask[b].sum())
        response_ids = rollout.input_ids[b, rollout.prompt_length:rollout.prompt_length + n].tolist()
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        for t in range(n):
            position = len(prompt_ids) - 1 + t  # predicts response token t
            expected = torch.log_softmax(out.logits[0, position], -1)[response_ids[t]]
            assert logp[b, t].item() == pytest.approx(expected.item(), abs=1e-4)
            expected_value = head(out.hidden_states[-1][0, position][None, None])[0, 0]
            assert values[b, t].item() == pytest.approx(expected_value.item(), abs=1e-4)
        decoded = tokenizer.decode(response_ids, skip_special_tokens=True)
        assert rollout.continuations[b] == decoded
        if response_ids[-1] == tokenizer.eos_token_id:  # ended: everything after it is padding
            assert rollout.attention_mask[b, rollout.prompt_length + n:].eq(0).all()


def test_sampling_is_reproducible_and_needs_prompts(policy_and_tokenizer):
    model, tokenizer = policy_and_tokenizer
    a = ppo.sample_rollout(model, tokenizer, OPENERS, max_new_tokens=10, seed=3)
    b = ppo.sample_rollout(model, tokenizer, OPENERS, max_new_tokens=10, seed=3)
    assert a.continuations == b.continuations
    with pytest.raises(ValueError, match="prompts is empty"):
        ppo.sample_rollout(model, tokenizer, [], max_new_tokens=4)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def length_reward(prompts, continuations):
    """A stand-in reward model: longer continuations score higher."""
    return torch.tensor([len(c) / 20.0 for c in continuations])


def tiny_config(**overrides):
    return ppo.PPOConfig(**{"iterations": 2, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 2,
                            "max_new_tokens": 8, "progress": False, "target_kl": 6.0, "horizon": 100,
                            **overrides})


def test_ppo_loop_runs_logs_every_stat_and_trains_only_the_adapter():
    model, tokenizer = load_model(None, device="cpu")
    lora.add_lora(model, target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    seen = []
    result = ppo.run_ppo(model, tokenizer, OPENERS * 2, length_reward, tiny_config(),
                         callback=lambda it, m, h: seen.append(it))
    history = result.history
    assert seen == [0, 1] and history.step == [0, 1] and len(history.loss) == 2
    for name in ppo.STATS:
        assert len(history.extra[name]) == 2 and all(math.isfinite(v) for v in history.extra[name]), name
    # LoRA's B starts at zero, so the first rollout's policy IS the reference: KL exactly 0
    assert history.extra["kl"][0] == 0.0
    assert history.extra["kl"][1] != 0.0
    # the controller's update: kl 0 < target → coefficient shrinks by (1 − 0.2·4/100)
    assert history.extra["kl_coef"] == [0.2, pytest.approx(0.2 * (1 - 0.2 * 4 / 100))]
    assert result.kl_controller.value == pytest.approx(0.2 * (1 - 0.2 * 4 / 100) * (1 + max(
        -0.2, min(0.2, history.extra["kl"][1] / 6 - 1)) * 4 / 100))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert any(not torch.equal(state[k], v) for k, v in adapter.items())
    assert result.value_head.summary.weight.abs().sum() > 0
    assert len(result.last_rollout.continuations) == 4


def test_ppo_loop_stops_on_bad_input_and_non_finite_numbers():
    model, tokenizer = load_model(None, device="cpu")
    with pytest.raises(ValueError, match="no trainable parameters: add a LoRA adapter"):
        model.requires_grad_(False)
        ppo.run_ppo(model, tokenizer, OPENERS, length_reward, tiny_config())
    lora.add_lora(model, target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    with pytest.raises(ValueError, match="prompts is empty"):
        ppo.run_ppo(model, tokenizer, [], length_reward, tiny_config())
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer needs a pad token"):
        ppo.run_ppo(model, no_pad, OPENERS, length_reward, tiny_config())
    with pytest.raises(ValueError, match="scores holds 1 non-finite value"):
        ppo.run_ppo(model, tokenizer, OPENERS + OPENERS[:1],
                    lambda p, c: torch.tensor([0.0, float("nan"), 1.0, 2.0]), tiny_config())
    with pytest.raises(FloatingPointError, match="iteration 0: the loss became inf"):
        ppo.run_ppo(model, tokenizer, OPENERS + OPENERS[:1], lambda p, c: torch.full((4,), 1e30), tiny_config())
    with pytest.raises(ValueError, match="minibatch_size .* cannot exceed batch_size"):
        tiny_config(minibatch_size=8)


def test_reward_model_as_reward_fn_needs_a_pad_token():
    import copy

    from course_lib import reward_model as rm

    model, tokenizer = load_model(None, device="cpu")
    scorer = rm.RewardModel.from_causal_lm(model, tokenizer)
    scores = rm.as_reward_fn(scorer, tokenizer)(OPENERS[:2], [" It was a happy day.", " It was a sad day."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        rm.as_reward_fn(scorer, no_pad)


def test_sampled_kl_is_the_masked_sum_of_policy_minus_adapter_off_logprobs(policy_and_tokenizer):
    """The judge of lessons 06 and 07: per sequence Σ (log π − log π_ref) over the sampled response tokens
    (padding after the eos left out), π_ref the adapter switched off; exactly 0 for a fresh adapter (B = 0)."""
    import copy

    from course_lib.lora import disable_adapters

    fresh, tokenizer = policy_and_tokenizer
    trained = copy.deepcopy(fresh)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(trained):
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    rollout = ppo.sample_rollout(trained, tokenizer, OPENERS, max_new_tokens=12, seed=1)
    with torch.no_grad():
        logp = ppo.response_forward(trained, rollout)[0]
        with disable_adapters(trained):
            ref = ppo.response_forward(trained, rollout)[0]
    expected = torch.stack([(logp[b] - ref[b])[rollout.response_mask[b].bool()].sum() for b in range(len(OPENERS))])
    got = ppo.sampled_kl(trained, rollout)
    assert got.shape == (len(OPENERS),) and bool((got != 0).all())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(ppo.sampled_kl(fresh, rollout), torch.zeros(len(OPENERS)))
