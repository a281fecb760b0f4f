"""The board's sampling: q is exactly the distribution the drafted token is drawn from."""

import math

import numpy as np
import pytest

from device.sampling import (
    PROB_SCALE,
    draft_distribution,
    greedy_token,
    sample_token,
    top_probability,
)
from fleet.sampling import SparseDist


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(7).normal(0.0, 3.0, size=384).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - x.max())
    return z / z.sum()


def test_greedy_and_confidence(logits):
    assert greedy_token(logits) == int(np.argmax(logits))
    assert top_probability(logits) == pytest.approx(softmax(logits).max(), rel=1e-12)


def test_q_is_the_top_k_of_the_temperature_scaled_distribution(logits):
    q = draft_distribution(logits, temperature=0.7, top_k=16)
    assert set(q.ids) == set(np.argsort(-logits)[:16].tolist())
    assert list(q.probs) == sorted(q.probs, reverse=True)
    kept = np.array(q.ids)
    expected = softmax(logits[kept] / 0.7)
    np.testing.assert_allclose(q.probs, expected, atol=1.0 / PROB_SCALE)


def test_q_sums_to_exactly_one_and_survives_float32(logits):
    for temperature, top_k, top_p in (
        (1.0, 32, 1.0),
        (0.3, 5, 1.0),
        (2.0, 200, 0.9),
        (0.05, 40, 1.0),
    ):
        q = draft_distribution(logits, temperature, top_k, top_p)
        assert math.fsum(q.probs) == 1.0
        assert all(float(np.float32(p)) == p for p in q.probs)
        assert all(p > 0 for p in q.probs)


def test_temperature_sharpens_and_top_p_trims(logits):
    sharp = draft_distribution(logits, temperature=0.3, top_k=32)
    flat = draft_distribution(logits, temperature=1.5, top_k=32)
    assert sharp.probs[0] > flat.probs[0]
    full = draft_distribution(logits, temperature=1.0, top_k=32)
    nucleus = draft_distribution(logits, temperature=1.0, top_k=32, top_p=0.5)
    cumulative = np.cumsum(full.probs)
    needed = int(np.searchsorted(cumulative, 0.5) + 1)
    assert nucleus.ids == full.ids[:needed]


def test_sample_frequencies_match_q(logits):
    q = draft_distribution(logits, temperature=1.0, top_k=8)
    rng = np.random.default_rng(2024)
    draws = 100_000
    counts = {token: 0 for token in q.ids}
    for _ in range(draws):
        counts[sample_token(q, rng)] += 1
    expected = np.array(q.probs) * draws
    observed = np.array([counts[token] for token in q.ids])
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001
    assert chi_square < 24.3
    assert 0.5 * np.abs(observed / draws - np.array(q.probs)).sum() < 0.01


class FixedSlot:
    """A generator stand-in that returns a chosen uniform slot, to probe slot boundaries."""

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def integers(self, low: int, high: int) -> int:
        assert (low, high) == (0, PROB_SCALE)
        return self.slot


def test_each_token_owns_exactly_its_share_of_slots(logits):
    q = draft_distribution(logits, temperature=1.0, top_k=6)
    boundaries = np.cumsum([round(p * PROB_SCALE) for p in q.probs])
    assert boundaries[-1] == PROB_SCALE
    start = 0
    for token, end in zip(q.ids, boundaries):
        assert sample_token(q, FixedSlot(start)) == token
        assert sample_token(q, FixedSlot(int(end) - 1)) == token
        start = int(end)


def test_refuses_q_that_it_did_not_make():
    with pytest.raises(ValueError, match="2\\*\\*-24 grid"):
        sample_token(SparseDist(ids=(1, 2), probs=(0.3333333, 0.6666667)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="temperature"):
        draft_distribution(np.zeros(4, np.float32), temperature=0.0, top_k=2)
