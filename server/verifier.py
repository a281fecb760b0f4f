"""Verification math: greedy acceptance and lossless rejection sampling (pure functions).

Conventions (as in vLLM's rejection sampler): a session drafted k tokens `x_1..x_k`; the
target scored k + 1 positions, where row i (0-based) is the target's distribution for the
token after the committed text plus `x_1..x_i`. Row k is the bonus position, used only when
every drafted token is accepted.

Sampling follows Leviathan et al. (2023) / Chen et al. (2023): accept x_i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a token drawn from
norm(max(0, p_i - q_i)); after k acceptances emit a bonus token from p_k. The emitted tokens
are then distributed exactly as the target sampling alone would. p is the target's
distribution after temperature, top-k and top-p, applied by transformers' own logits warpers
in the order `generate()` applies them, so "the target alone" means `generate(do_sample=True,
temperature=..., top_k=..., top_p=...)` with the same parameters.

q(x_i) = 0 for a drafted token means the draft cannot have sampled it from q: the engine
refuses such a draft as a bad q before it gets here; these functions treat it as a rejection.
"""

import hashlib
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fleet.sampling import SamplingParams, SparseDist


def greedy_accept(draft: Sequence[int], target_argmax: Sequence[int]) -> tuple[int, list[int]]:
    """Accept drafted tokens while they equal the target's argmax.

    draft: k ids; target_argmax: k + 1 ids (argmax of each scored row).
    Returns (accepted, emitted) with emitted = draft[:accepted] + [target_argmax[accepted]]:
    the correction at the first mismatch, or the bonus token after k matches.
    """
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(
            f"{len(draft)} drafted tokens need {len(draft) + 1} target rows, got {len(target_argmax)}"
        )
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target_argmax[accepted]:
        accepted += 1
    return accepted, [*draft[:accepted], target_argmax[accepted]]


def logits_warpers(params: SamplingParams) -> list[LogitsProcessor]:
    """transformers' warpers for these params, in `generate()`'s order and with its skips
    (none for greedy: argmax needs no warping)."""
    warpers: list[LogitsProcessor] = []
    if params.greedy:
        return warpers
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def target_probs(logits: torch.Tensor, warpers: Sequence[LogitsProcessor]) -> torch.Tensor:
    """p: `[n, vocab]` float32 logits -> `[n, vocab]` float32 probabilities after the warpers.

    The warpers are called directly rather than through a LogitsProcessorList, which inspects
    every processor's signature on every call (a tenth of a millisecond per session-step).
    """
    scores = logits.float()
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)


def pack_sparse(q: Sequence[SparseDist]) -> tuple[torch.Tensor, torch.Tensor]:
    """k sparse distributions -> (ids `[k, K]` int64, probs `[k, K]` float64), K the widest.

    Short rows are padded with id 0 at probability 0, which adds nothing anywhere. Each row is
    renormalised in float64: the board sampled from its probabilities as a categorical, which
    normalises, so the renormalised values are exactly the q it drew from.
    """
    width = max((len(dist.ids) for dist in q), default=1)
    ids = torch.zeros((len(q), width), dtype=torch.int64)
    probs = torch.zeros((len(q), width), dtype=torch.float64)
    for row, dist in enumerate(q):
        ids[row, : len(dist.ids)] = torch.tensor(dist.ids, dtype=torch.int64)
        probs[row, : len(dist.probs)] = torch.tensor(dist.probs, dtype=torch.float64)
    return ids, probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def draft_probability(
    draft: torch.Tensor, q_ids: torch.Tensor, q_probs: torch.Tensor
) -> torch.Tensor:
    """q_i(x_i): draft `[..., k]`, q_ids/q_probs `[..., k, K]` -> `[..., k]` (0 if x_i not in ids)."""
    return (q_probs * (q_ids == draft[..., None])).sum(dim=-1)


def acceptance_probability(p_drafted: torch.Tensor, q_drafted: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) elementwise, 0 where q(x) = 0."""
    safe_q = torch.where(q_drafted > 0, q_drafted, torch.ones_like(q_drafted))
    return torch.where(
        q_drafted > 0, (p_drafted / safe_q).clamp(max=1.0), torch.zeros_like(p_drafted)
    )


def residual_distribution(
    p: torch.Tensor, q_ids: torch.Tensor, q_probs: torch.Tensor
) -> torch.Tensor:
    """norm(max(0, p - q)): p `[B, vocab]`, q as sparse `[B, K]` -> `[B, vocab]` float64.

    A row with no residual mass (p <= q everywhere: only float rounding with p == q gets a
    rejection there, at probability ~0) falls back to p rather than dividing by zero. A mass
    that is positive but subnormal is divided by as it is: clamping it up to the smallest
    normal float would leave the row summing to far less than 1.
    """
    p = p.double()
    residual = p.scatter_add(-1, q_ids, -q_probs).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    return torch.where(has_mass, residual / torch.where(has_mass, mass, 1.0), p)


def rejection_verify(
    p: torch.Tensor,
    draft: torch.Tensor,
    q_ids: torch.Tensor,
    q_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for B independent drafts of equal length k.

    p: `[B, k + 1, vocab]` target probabilities; draft: `[B, k]` int64 drafted ids;
    q_ids/q_probs: `[B, k, K]` the sparse draft distribution each x_i was sampled from.
    Random draws, in this order from `generator`: `[B, k]` float64 uniforms for acceptance,
    then one categorical draw per row for the emitted token.
    Returns (accepted `[B]` int64 in 0..k, token `[B]` int64): the output is
    draft[:accepted] followed by token (the residual sample at the first rejection, or the
    bonus sample from p_k when all k are accepted).
    """
    batch, k = draft.shape
    rows = torch.arange(batch, device=p.device)
    if k > 0:
        p_drafted = p[:, :k].gather(-1, draft[..., None]).squeeze(-1).double()
        ratio = acceptance_probability(p_drafted, draft_probability(draft, q_ids, q_probs))
        uniforms = torch.rand((batch, k), dtype=torch.float64, generator=generator, device=p.device)
        accepted = (uniforms < ratio).long().cumprod(dim=-1).sum(dim=-1)
        rejected_at = accepted.clamp(max=k - 1)
        residual = residual_distribution(
            p[rows, rejected_at], q_ids[rows, rejected_at], q_probs[rows, rejected_at]
        )
        final = torch.where((accepted < k)[:, None], residual, p[:, k].double())
    else:
        accepted = torch.zeros(batch, dtype=torch.int64, device=p.device)
        final = p[:, 0].double()
    token = torch.multinomial(final, 1, generator=generator).squeeze(-1)
    return accepted, token


def step_generator(seed: int, committed_len: int) -> torch.Generator:
    """The random stream of one verification step, a function of (seed, committed length) only.

    Deriving it per step (instead of keeping one generator per session) means a session that
    is re-opened with its context after a server restart or eviction continues with the very
    same draws, and two runs with the same seed and drafts reproduce token for token.
    """
    digest = hashlib.blake2b(f"{seed}:{committed_len}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
