"""Turning draft logits into a drafted token and the exact q it was drawn from.

Lossless speculative sampling needs the server to know q(x) exactly as the board sampled it.
Probabilities are therefore snapped to multiples of 2**-24 that sum to exactly 1: such values
are exact in float32 and float64, so q survives any wire encoding bit for bit, and the token is
drawn with an integer uniform over 2**24 slots, i.e. from that very q and nothing else.
Probabilities below 2**-25 become 0 and leave the support; that changes q, not its exactness.
"""

import numpy as np

from fleet.sampling import SparseDist

PROB_BITS = 24
PROB_SCALE = 1 << PROB_BITS


def greedy_token(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def top_probability(logits: np.ndarray) -> float:
    """The largest softmax probability at temperature 1: the draft's confidence (SLED)."""
    z = logits.astype(np.float64)
    return float(1.0 / np.exp(z - z.max()).sum())


def draft_distribution(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float = 1.0
) -> SparseDist:
    """Temperature, then top-K truncation, then top-p within it, renormalised; most likely first.

    The full-vocabulary normaliser cancels after truncation, so only the K kept logits are
    exponentiated.
    """
    if temperature <= 0:
        raise ValueError("sampling needs a temperature > 0 (temperature 0 is greedy)")
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    k = min(top_k, logits.shape[-1])
    kept = np.argpartition(-logits, k - 1)[:k]
    kept = kept[np.lexsort((kept, -logits[kept]))]  # by logit, ties by id: deterministic
    z = logits[kept].astype(np.float64) / temperature
    weights = np.exp(z - z[0])
    probs = weights / weights.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        kept = kept[:keep]
    counts = _snap(probs)
    support = counts > 0
    return SparseDist(
        ids=tuple(int(i) for i in kept[support]),
        probs=tuple(float(c) / PROB_SCALE for c in counts[support]),
    )


def sample_token(dist: SparseDist, rng: np.random.Generator) -> int:
    """Draw from `dist` exactly (it must come from `draft_distribution`)."""
    probs = np.asarray(dist.probs, dtype=np.float64)
    counts = np.rint(probs * PROB_SCALE).astype(np.int64)
    if counts.sum() != PROB_SCALE or np.any(counts / PROB_SCALE != probs):
        raise ValueError("q is not on the 2**-24 grid that draft_distribution produces")
    slot = rng.integers(0, PROB_SCALE)
    return dist.ids[int(np.searchsorted(np.cumsum(counts), slot, side="right"))]


def _snap(probs: np.ndarray) -> np.ndarray:
    """Integer counts out of PROB_SCALE closest to `probs` that sum to PROB_SCALE exactly
    (largest-remainder rounding)."""
    scaled = probs * PROB_SCALE
    counts = np.floor(scaled).astype(np.int64)
    short = PROB_SCALE - int(counts.sum())
    if short:
        counts[np.argsort(-(scaled - counts), kind="stable")[:short]] += 1
    return counts
