"""The verification math: greedy acceptance, the rejection-sampling rule and its losslessness.

Losslessness is checked two ways: exactly (the rule's output distribution, computed in closed
form, equals p for any p and q: hypothesis), and statistically (>= 1e5 vectorised draws of the
real sampler, total variation against p below a bound derived from the sample size), at the
first emitted token and jointly for the first two tokens of a 2-step toy model, where the second
token depends on the first and may come from a second verification round.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fleet.sampling import SparseDist
from server.verifier import (
    acceptance_probability,
    draft_probability,
    greedy_accept,
    pack_sparse,
    rejection_verify,
    residual_distribution,
    step_generator,
)
from tests.sampling_stats import total_variation, tv_bound

DRAWS = 200_000


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1)


def _draft_dists(p: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """q for each row of p: close to p, far from p, or with zeros where p is not zero."""
    if kind == "close":
        return _softmax(
            p.log() + 0.2 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        )
    far = _softmax(2.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    if kind == "far":
        return far
    # Keep q's 3 most likely tokens only: every other token has p > 0 and q = 0.
    cut = far.topk(far.shape[-1] - 3, dim=-1, largest=False).indices
    zeros = far.scatter(-1, cut, 0.0)
    return zeros / zeros.sum(-1, keepdim=True)


def _dense(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense q rows `[..., V]` as the sparse (ids, probs) pair the sampler takes."""
    ids = torch.arange(q.shape[-1]).expand(q.shape)
    return ids, q


def _sample_rows(dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(dist, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------ greedy


def test_greedy_accepts_matching_prefix_then_corrects():
    assert greedy_accept([5, 6, 7], [5, 6, 9, 1]) == (2, [5, 6, 9])


def test_greedy_all_accepted_gets_bonus_and_empty_draft_decodes_one():
    assert greedy_accept([5, 6], [5, 6, 8]) == (2, [5, 6, 8])
    assert greedy_accept([], [4]) == (0, [4])


def test_greedy_needs_k_plus_one_rows():
    with pytest.raises(ValueError, match="need 3 target rows"):
        greedy_accept([1, 2], [1, 2])


@given(
    draft=st.lists(st.integers(0, 3), max_size=8),
    argmax=st.lists(st.integers(0, 3), min_size=9, max_size=9),
)
def test_greedy_verdict_properties(draft, argmax):
    target = argmax[: len(draft) + 1]
    accepted, emitted = greedy_accept(draft, target)
    assert 0 <= accepted <= len(draft)
    assert emitted[:accepted] == draft[:accepted] == target[:accepted]
    assert emitted == [*draft[:accepted], target[accepted]]
    if accepted < len(draft):
        assert draft[accepted] != target[accepted]


# ------------------------------------------------------------------------ the rule, exactly

_weights = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=12).filter(
    lambda w: sum(w) > 1e-3
)


@st.composite
def _p_and_sparse_q(draw):
    weights = draw(_weights)
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    vocab = len(weights)
    support = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab, unique=True))
    q_weights = draw(st.lists(st.floats(0.01, 1.0), min_size=len(support), max_size=len(support)))
    q_probs = torch.tensor(q_weights, dtype=torch.float64)
    return p, torch.tensor(support), q_probs / q_probs.sum()


@given(_p_and_sparse_q())
def test_accept_then_residual_reproduces_p_exactly(case):
    """out(x) = q(x) a(x) + P(reject) residual(x) must equal p(x) for every p and q."""
    p, q_ids, q_probs = case
    q = torch.zeros_like(p).scatter(0, q_ids, q_probs)
    accept = acceptance_probability(p, q)
    reject_mass = 1.0 - (q * accept).sum()
    residual = residual_distribution(p[None], q_ids[None], q_probs[None])[0]
    assert torch.allclose(q * accept + reject_mass * residual, p, atol=1e-9)


@example((torch.tensor([5e-324, 1.0], dtype=torch.float64), torch.tensor([1]), torch.tensor([1.0], dtype=torch.float64)))
@given(_p_and_sparse_q())
def test_residual_is_a_distribution_supported_where_p_exceeds_q(case):
    p, q_ids, q_probs = case
    q = torch.zeros_like(p).scatter(0, q_ids, q_probs)
    residual = residual_distribution(p[None], q_ids[None], q_probs[None])[0]
    assert (residual >= 0).all()
    assert residual.sum().item() == pytest.approx(1.0, abs=1e-12)
    if ((p - q) > 1e-12).any():
        assert (residual[p <= q] == 0).all()
        assert (residual[(p - q) > 1e-12] > 0).all()


@given(_p_and_sparse_q())
def test_acceptance_probability_bounds(case):
    p, q_ids, q_probs = case
    q = torch.zeros_like(p).scatter(0, q_ids, q_probs)
    accept = acceptance_probability(p, q)
    assert ((accept >= 0) & (accept <= 1)).all()
    assert (accept[q == 0] == 0).all()
    assert (accept[(q > 0) & (p >= q)] == 1).all()


@settings(max_examples=60)
@given(_p_and_sparse_q(), st.integers(1, 4), st.integers(0, 2**32))
def test_rejection_verify_verdict_properties(case, k, seed):
    p_row, q_ids, q_probs = case
    generator = torch.Generator().manual_seed(seed)
    draft = q_ids[torch.multinomial(q_probs, k, replacement=True, generator=generator)]
    p = p_row.expand(1, k + 1, -1)
    accepted, token = rejection_verify(
        p, draft[None], q_ids.expand(1, k, -1), q_probs.expand(1, k, -1), generator
    )
    count = int(accepted[0])
    assert 0 <= count <= k
    # A drafted token the target cannot produce is never accepted.
    impossible = [i for i in range(k) if p_row[draft[i]] == 0]
    if impossible:
        assert count <= impossible[0]
    # The emitted token has positive probability under the distribution it came from.
    final = (
        p_row if count == k else residual_distribution(p_row[None], q_ids[None], q_probs[None])[0]
    )
    assert final[token[0]] > 0


def test_identical_p_and_q_accept_everything():
    p = torch.tensor([[0.0, 1.0, 0.0]]).expand(1, 4, 3)
    draft = torch.tensor([[1, 1, 1]])
    ids = torch.tensor([[[1], [1], [1]]])
    probs = torch.ones(1, 3, 1, dtype=torch.float64)
    accepted, token = rejection_verify(p, draft, ids, probs, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [3] and token.tolist() == [1]


def test_draft_probability_is_zero_outside_the_ids():
    draft = torch.tensor([2, 7])
    ids = torch.tensor([[2, 3], [1, 0]])
    probs = torch.tensor([[0.75, 0.25], [1.0, 0.0]], dtype=torch.float64)
    assert draft_probability(draft, ids, probs).tolist() == [0.75, 0.0]


def test_pack_sparse_pads_and_renormalises():
    q = [SparseDist(ids=(4, 9), probs=(0.5, 0.5004)), SparseDist(ids=(1,), probs=(1.0,))]
    ids, probs = pack_sparse(q)
    assert ids.tolist() == [[4, 9], [1, 0]]
    assert probs.dtype == torch.float64
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)
    assert probs[1, 1] == 0


def test_step_generator_is_a_function_of_seed_and_committed_length():
    draw = lambda seed, length: torch.rand(4, generator=step_generator(seed, length)).tolist()
    assert draw(7, 100) == draw(7, 100)
    assert draw(7, 100) != draw(7, 101)
    assert draw(7, 100) != draw(8, 100)


# ------------------------------------------------------------------------ the sampler, statistically


@pytest.mark.parametrize("kind", ["close", "far", "zeros"])
def test_first_token_is_distributed_as_p(kind):
    vocab, k = 16, 3
    generator = torch.Generator().manual_seed(["close", "far", "zeros"].index(kind))
    p = _softmax(2.0 * torch.randn(k + 1, vocab, generator=generator, dtype=torch.float64))
    q = _draft_dists(p[:k], kind, generator)
    draft = torch.stack(
        [torch.multinomial(q[i], DRAWS, replacement=True, generator=generator) for i in range(k)], 1
    )
    ids, probs = _dense(q.expand(DRAWS, k, vocab))
    accepted, token = rejection_verify(p.expand(DRAWS, k + 1, vocab), draft, ids, probs, generator)
    first = torch.where(accepted > 0, draft[:, 0], token)
    assert total_variation(first, p[0]) < tv_bound(DRAWS, vocab)


def test_statistical_check_catches_a_wrong_residual():
    """Negative control: resampling from p (not the residual) after a rejection is biased, and
    the same bound must flag it, or the tests above prove nothing."""
    vocab = 16
    generator = torch.Generator().manual_seed(3)
    p = _softmax(2.0 * torch.randn(2, vocab, generator=generator, dtype=torch.float64))
    q = _draft_dists(p[:1], "far", generator)
    draft = torch.multinomial(q[0], DRAWS, replacement=True, generator=generator)[:, None]
    ids, probs = _dense(q.expand(DRAWS, 1, vocab))
    accepted, _ = rejection_verify(p.expand(DRAWS, 2, vocab), draft, ids, probs, generator)
    wrong = torch.where(
        accepted > 0,
        draft[:, 0],
        torch.multinomial(p[0], DRAWS, replacement=True, generator=generator),
    )
    assert total_variation(wrong, p[0]) > 3 * tv_bound(DRAWS, vocab)


@pytest.mark.parametrize("first_round_k", [1, 2])
@pytest.mark.parametrize("kind", ["close", "far", "zeros"])
def test_first_two_tokens_are_jointly_distributed_as_the_target(kind, first_round_k):
    """Toy model over 6 tokens: p1(a), p2(b | a), p3(c | a, b), and a draft q1(a), q2(b | a).

    Round 1 drafts x1 ~ q1 (and with k = 2 also x2 ~ q2(. | x1)) and verifies them. The second
    emitted token is then x2 (both accepted), the bonus from p2(. | x1) (k = 1, x1 accepted), the
    residual sample at position 2 (k = 2, only x1 accepted), or, when x1 was rejected, comes
    from round 2: the board drafts from the corrected token y1 and the server verifies that.
    The pair must be distributed as p1(a) p2(b | a).
    """
    vocab = 6
    generator = torch.Generator().manual_seed(
        11 + 3 * first_round_k + ["close", "far", "zeros"].index(kind)
    )
    p1 = _softmax(2.0 * torch.randn(vocab, generator=generator, dtype=torch.float64))
    p2 = _softmax(2.0 * torch.randn(vocab, vocab, generator=generator, dtype=torch.float64))
    p3 = _softmax(2.0 * torch.randn(vocab, vocab, vocab, generator=generator, dtype=torch.float64))
    q1 = _draft_dists(p1[None], kind, generator)[0]
    q2 = _draft_dists(p2, kind, generator)

    x1 = torch.multinomial(q1, DRAWS, replacement=True, generator=generator)
    x2 = _sample_rows(q2[x1], generator)
    p = torch.stack([p1.expand(DRAWS, vocab), p2[x1], p3[x1, x2]], dim=1)[:, : first_round_k + 1]
    q = torch.stack([q1.expand(DRAWS, vocab), q2[x1]], dim=1)[:, :first_round_k]
    draft = torch.stack([x1, x2], 1)[:, :first_round_k]
    accepted, token = rejection_verify(p, draft, *_dense(q), generator)

    first = torch.where(accepted > 0, x1, token)
    second = torch.where(accepted == 2, x2, token)
    again = accepted == 0
    y1 = token[again]
    x2_again = _sample_rows(q2[y1], generator)
    p_again = torch.stack([p2[y1], p3[y1, x2_again]], dim=1)
    accepted_again, token_again = rejection_verify(
        p_again, x2_again[:, None], *_dense(q2[y1][:, None]), generator
    )
    second[again] = torch.where(accepted_again > 0, x2_again, token_again)

    joint = p1[:, None] * p2
    assert total_variation(first * vocab + second, joint) < tv_bound(DRAWS, vocab * vocab)
