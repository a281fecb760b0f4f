"""The drafting policy: how many tokens to propose, and how the draft KV cache follows verdicts.

One round of speculation, from the board's side:

    batch = drafter.draft(k_suggested, params, rng)   # propose up to k tokens
    ... send, the server verifies ...
    drafter.commit(accepted, target_token)            # keep accepted, add the target's token

Drafting stops early when the draft's confidence (its top probability) falls below the
threshold, as SLED does: an unsure token is likely rejected, and every drafted token costs
board time and server batch width. The first token is always drafted (unless the server asks
for k = 0): a round trip happens anyway and the server verifies one token for almost the cost
of none, so even an unsure token is a free chance of an extra committed token.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device.runner import DraftRunner
from device.sampling import draft_distribution, greedy_token, sample_token, top_probability
from fleet.sampling import SamplingParams, SparseDist


@dataclass(frozen=True)
class DraftBatch:
    """Drafted tokens, q per token when sampling (None when greedy), and the confidences:
    the top probability of the softmax at temperature 1 when greedy, of q when sampling."""

    tokens: tuple[int, ...]
    q: tuple[SparseDist, ...] | None
    top_probs: tuple[float, ...]


class Drafter:
    def __init__(self, runner: DraftRunner, k_max: int, threshold: float, top_k: int) -> None:
        if k_max < 1 or top_k < 1 or not 0.0 <= threshold <= 1.0:
            raise ValueError("need k_max >= 1, top_k >= 1 and 0 <= threshold <= 1")
        self.runner = runner
        self.k_max = k_max
        self.threshold = threshold
        self.top_k = top_k
        self._eos = frozenset(runner.manifest.eos_token_ids)
        self._committed = 0
        self._next_logits: np.ndarray | None = None  # after the committed context
        self._pending: tuple[int, ...] | None = None  # drafted, awaiting a verdict

    @property
    def committed_length(self) -> int:
        return self._committed

    def start(self, context: Sequence[int]) -> None:
        """Take `context` (the prompt, or prompt + committed tokens on a resync) as committed."""
        self._next_logits = self.runner.prefill(context)
        self._committed = len(context)
        self._pending = None

    def draft(
        self, k_suggested: int | None, params: SamplingParams, rng: np.random.Generator
    ) -> DraftBatch:
        """Up to min(k_max, k_suggested) tokens; stops after an end-of-text token."""
        if self._next_logits is None:
            raise RuntimeError("start() the drafter with a context first")
        if self._pending is not None:
            raise RuntimeError("the previous draft has no verdict yet: commit() it first")
        k = self.k_max if k_suggested is None else min(self.k_max, max(k_suggested, 0))
        k = min(
            k, self.runner.manifest.max_context - self._committed - 1
        )  # room for the target's token
        top_k = min(self.top_k, params.top_k) if params.top_k else self.top_k
        tokens: list[int] = []
        qs: list[SparseDist] = []
        confidences: list[float] = []
        logits = self._next_logits
        for position in range(k):
            token, q, confidence = _propose(logits, params, top_k, rng)
            if tokens and confidence < self.threshold:
                break
            tokens.append(token)
            confidences.append(confidence)
            if q is not None:
                qs.append(q)
            if token in self._eos or position == k - 1:
                break
            logits = self.runner.step(token)
        self._pending = tuple(tokens)
        return DraftBatch(tuple(tokens), None if params.greedy else tuple(qs), tuple(confidences))

    def commit(self, accepted: int, target_token: int) -> None:
        """Keep the first `accepted` drafted tokens, drop the rest, append the target's token.

        The cache may hold fewer drafted tokens than were accepted (the last drafted token is
        never fed while drafting) or more (those after a rejection): roll back to what is
        still valid, then feed what is missing in one pass.
        """
        if self._pending is None:
            raise RuntimeError("no draft is awaiting a verdict")
        if not 0 <= accepted <= len(self._pending):
            raise ValueError(f"accepted {accepted} of a draft of {len(self._pending)} tokens")
        kept = self._committed + accepted
        self.runner.rollback(min(self.runner.length, kept))
        missing = self._pending[self.runner.length - self._committed : accepted]
        self._next_logits = self.runner.feed([*missing, target_token])
        self._committed = kept + 1
        self._pending = None

    def discard(self) -> None:
        """Forget a draft that will get no verdict (server lost): back to the committed context."""
        self.runner.rollback(self._committed)
        self._pending = None


def _propose(
    logits: np.ndarray, params: SamplingParams, top_k: int, rng: np.random.Generator
) -> tuple[int, SparseDist | None, float]:
    """One drafted token, its q (sampling only) and the draft's confidence at this position."""
    if params.greedy:
        return greedy_token(logits), None, top_probability(logits)
    q = draft_distribution(logits, params.temperature, top_k, params.top_p)
    return sample_token(q, rng), q, q.probs[0]
