"""course_lib.rl: masked statistics against hand-computed values, log-probs and entropy against TRL."""

import pytest
import torch

from course_lib import rl


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rl.masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert rl.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])


def test_masked_mean_rejects_empty_and_mismatched_masks():
    with pytest.raises(ValueError, match="no active entry"):
        rl.masked_mean(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="along dim 1"):
        rl.masked_mean(torch.ones(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1)
    with pytest.raises(ValueError, match="must match"):
        rl.masked_mean(torch.ones(2, 3), torch.ones(3, 2))


def test_masked_whiten_is_unbiased_over_active_entries():
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    active = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (active - 2.5) / torch.sqrt(active.var(unbiased=True) + 1e-8)  # torch's own unbiased var
    got = rl.masked_whiten(x, m)[m.bool()]
    torch.testing.assert_close(got, expected)
    kept = rl.masked_whiten(x, m, shift_mean=False)[m.bool()]
    torch.testing.assert_close(kept, expected + 2.5)


def test_token_logprobs_and_entropy_equal_trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    torch.testing.assert_close(rl.token_logprobs(logits, tokens), selective_log_softmax(logits, tokens))
    torch.testing.assert_close(rl.token_logprobs(logits, tokens, temperature=0.7),
                               selective_log_softmax(logits, tokens, temperature=0.7))
    torch.testing.assert_close(rl.entropy_from_logits(logits), entropy_from_logits(logits))
    with pytest.raises(ValueError, match="agree"):
        rl.token_logprobs(logits, tokens[:, :4])
