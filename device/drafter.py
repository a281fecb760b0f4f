"""The drafting policy: how many tokens to propose, and how the draft KV cache follows verdicts.

One round of speculation, from the board's side:

    batch = drafter.draft(k_suggested, params, rng)   # propose up to k tokens
    ... send, the server verifies ...
    drafter.commit(accepted, target_token)            # keep accepted, add the target's token

With pipelining, the board keeps drafting while the verdict is in flight, as if the whole
draft were accepted (`draft_ahead`): the first token ahead is the board's guess of the target's
bonus token, the rest are the next round's draft. When the verdict accepts everything and its
bonus token is that guess, the tokens after it are still valid and open the next draft
(`commit` keeps them); otherwise they are rolled back with the rejected tail. Round-trip time
is then spent drafting instead of waiting.

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

# While the board waits with no draft out, the cache is fed once this many committed tokens
# are missing from it (see `keep_up`): one pass over them costs about one drafted token.
KEEP_UP_TOKENS = 8


@dataclass(frozen=True)
class Proposal:
    """One drafted token, its q (sampling only) and the draft's confidence in it: the top
    probability of the softmax at temperature 1 when greedy, of q when sampling."""

    token: int
    q: SparseDist | None
    confidence: float


@dataclass(frozen=True)
class DraftBatch:
    """Drafted tokens, q per token when sampling (None when greedy), and the confidences.
    `fresh` of the tokens were drafted by this call, the others ahead of it (pipelining)."""

    tokens: tuple[int, ...]
    q: tuple[SparseDist, ...] | None
    top_probs: tuple[float, ...]
    fresh: int

    @classmethod
    def of(cls, proposals: Sequence[Proposal], greedy: bool, fresh: int) -> "DraftBatch":
        return cls(
            tokens=tuple(p.token for p in proposals),
            q=None if greedy else tuple(p.q for p in proposals),  # type: ignore[misc]
            top_probs=tuple(p.confidence for p in proposals),
            fresh=fresh,
        )


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
        # Logits after the committed context; None while carried tokens already follow it.
        self._next_logits: np.ndarray | None = None
        self._pending: tuple[int, ...] | None = None  # drafted, awaiting a verdict
        self._ahead: list[Proposal] = []  # drafted past the pending draft (pipelining)
        self._ahead_done = False
        self._carried: list[Proposal] = []  # drafted ahead and still valid: the next draft's start
        self.carried_total = 0  # tokens the next drafts took from drafting ahead
        self._unfed: list[int] = []  # committed by the server alone, not yet in the cache

    # The runner's cache always holds the committed context plus every token drafted after it
    # (pending, then ahead, or carried) except the last one: a token is fed only to draft the
    # next, so the last drafted token waits until the verdict says what follows.

    @property
    def committed_length(self) -> int:
        return self._committed

    @property
    def ahead_tokens(self) -> tuple[int, ...]:
        """Tokens drafted ahead of the pending draft so far."""
        return tuple(p.token for p in self._ahead)

    def start(self, context: Sequence[int]) -> None:
        """Take `context` (the prompt, or prompt + committed tokens on a resync) as committed.

        It reaches the cache when the board first drafts (`catch_up`), or earlier while the
        board waits with no draft out (`keep_up`)."""
        if not context:
            raise ValueError("a session starts from at least one token")
        self.runner.reset()
        self._next_logits = None
        self._committed = len(context)
        self._pending = None
        self._ahead, self._carried, self._ahead_done = [], [], False
        self._unfed = list(context)

    def catch_up(self) -> None:
        """Feed the cache, in one pass, what it lacks: a new session's context, or tokens the
        server committed alone. `draft` does it when needed; a board calls it first so that
        this one-off cost is not taken for the time of drafting. An empty draft awaiting its
        verdict (an open without one) leaves the cache at the committed context, so it may be
        fed then too."""
        if not self._pending and self._unfed:
            self._reset_to_committed()

    def keep_up(self) -> None:
        """`catch_up` once `KEEP_UP_TOKENS` tokens are missing: a board calls it while it waits
        with no draft out (its open in the server's prefill, rounds the server decodes alone).

        Left to the first draft, the whole backlog (the prompt, and every token the server
        decoded alone) delays that draft: when the server asked a batch of sessions handed over
        to draft again, their drafts came in out of step and split the batch (16 emulated boards:
        passes of 2-12 sessions of 16 for the first rounds of a window). Fed in passes of a few
        tokens meanwhile, the backlog costs about one drafted token's time per `KEEP_UP_TOKENS`
        tokens the server commits."""
        if len(self._unfed) >= KEEP_UP_TOKENS:
            self.catch_up()

    def draft(
        self, k_suggested: int | None, params: SamplingParams, rng: np.random.Generator
    ) -> DraftBatch:
        """Up to min(k_max, k_suggested) tokens; stops after an end-of-text token. Tokens
        carried from drafting ahead come first, cut by the same rules."""
        if self._pending is not None:
            raise RuntimeError("the previous draft has no verdict yet: commit() it first")
        k = self.k_max if k_suggested is None else min(self.k_max, max(k_suggested, 0))
        k = min(
            k, self.runner.manifest.max_context - self._committed - 1
        )  # room for the target's token
        if self._unfed:
            if k == 0:  # nothing to draft: the cache may stay behind
                self._pending, self._ahead, self._ahead_done = (), [], True
                return DraftBatch.of([], params.greedy, fresh=0)
            self._reset_to_committed()
        if self._next_logits is None and not self._carried:
            raise RuntimeError("start() the drafter with a context first")
        proposals = self._take_carried(k)
        carried = len(proposals)
        if proposals and len(proposals) < k and proposals[-1].token not in self._eos:
            logits = self.runner.step(proposals[-1].token)
        else:
            logits = self._next_logits
        top_k = self._top_k(params)
        while len(proposals) < k and not (proposals and proposals[-1].token in self._eos):
            proposal = _propose(logits, params, top_k, rng)
            if proposals and proposal.confidence < self.threshold:
                self.runner.rollback(self.runner.length - 1)  # the last drafted stays unfed
                break
            proposals.append(proposal)
            if proposal.token in self._eos or len(proposals) == k:
                break
            logits = self.runner.step(proposal.token)
        self._pending = tuple(p.token for p in proposals)
        self._ahead, self._ahead_done = [], False
        return DraftBatch.of(proposals, params.greedy, fresh=len(proposals) - carried)

    def _take_carried(self, k: int) -> list[Proposal]:
        """The carried tokens the next draft keeps: at most k, and none past one the
        threshold would have stopped at. The cache is cut to match."""
        carried, self._carried = self._carried, []
        if not carried:
            return []
        kept = [carried[0]] if k > 0 else []
        for proposal in carried[1:k]:
            if proposal.confidence < self.threshold:
                break
            kept.append(proposal)
        if len(kept) == len(carried):
            return kept
        self.carried_total -= len(carried) - len(kept)
        if kept:
            self.runner.rollback(self._committed + len(kept) - 1)
        else:
            self._reset_to_committed()
        return kept

    def draft_ahead(self, params: SamplingParams, rng: np.random.Generator) -> bool:
        """Draft one more token past the pending draft, as if all of it were accepted.

        The first token ahead guesses the target's bonus token; the ones after it are the next
        round's draft (at most k_max, cut at the threshold as `draft` would). Returns False
        when nothing more is worth drafting until the verdict comes.
        """
        if self._pending is None or self._ahead_done:
            return False
        drafted = self._committed + len(self._pending) + len(self._ahead)
        last = self._ahead[-1].token if self._ahead else (self._pending[-1] if self._pending else None)
        if (
            len(self._ahead) > self.k_max
            or last in self._eos
            or drafted + 1 >= self.runner.manifest.max_context
        ):
            self._ahead_done = True
            return False
        logits = self._next_logits if last is None else self.runner.step(last)
        proposal = _propose(logits, params, self._top_k(params), rng)
        if len(self._ahead) >= 2 and proposal.confidence < self.threshold:
            self.runner.rollback(self.runner.length - 1)
            self._ahead_done = True
            return False
        self._ahead.append(proposal)
        return True

    def drop_last_ahead(self) -> None:
        """Forget the newest token drafted ahead (an emulated board had not finished it when
        the verdict came)."""
        if not self._ahead:
            return
        self._ahead.pop()
        if self._pending or self._ahead:  # drafting it fed the token before it
            self.runner.rollback(self.runner.length - 1)
        self._ahead_done = True

    def commit(self, accepted: int, target_token: int) -> None:
        """Keep the first `accepted` drafted tokens, drop the rest, append the target's token.

        When everything was accepted and the target's token is the first token drafted ahead,
        the tokens ahead after it stay (carried into the next draft). Otherwise the cache may
        hold fewer drafted tokens than were accepted (the last drafted token is never fed) or
        more (those after a rejection, and any drafted ahead): roll back to what is still
        valid, then feed what is missing in one pass.
        """
        if self._pending is None:
            raise RuntimeError("no draft is awaiting a verdict")
        if not 0 <= accepted <= len(self._pending):
            raise ValueError(f"accepted {accepted} of a draft of {len(self._pending)} tokens")
        kept = self._committed + accepted
        pending, ahead = self._pending, self._ahead
        self._pending, self._ahead = None, []
        if self._unfed:  # an empty draft on a cache still behind: one more token to catch up
            self.follow([target_token])
            return
        if accepted == len(pending) and len(ahead) > 1 and ahead[0].token == target_token:
            self._committed = kept + 1
            self._carried = ahead[1:]
            self.carried_total += len(self._carried)
            self._next_logits = None
            return
        self.runner.rollback(min(self.runner.length, kept))
        missing = pending[self.runner.length - self._committed : accepted]
        self._next_logits = self.runner.feed([*missing, target_token])
        self._committed = kept + 1

    def follow(self, tokens: Sequence[int]) -> None:
        """Tokens the server committed without a draft (it decodes alone while speculation
        does not pay). They reach the cache in passes of `KEEP_UP_TOKENS` while the board
        waits (`keep_up`), the rest when it drafts again."""
        if self._pending is not None:
            raise RuntimeError("a draft is awaiting a verdict: commit() it instead")
        if not self._unfed:
            self._carried = []
            self.runner.rollback(min(self.runner.length, self._committed))
            self._next_logits = None
        self._unfed.extend(tokens)
        self._committed += len(tokens)

    def discard(self) -> None:
        """Forget a draft that will get no verdict (server lost): back to the committed context."""
        self._pending, self._ahead, self._carried = None, [], []
        self._reset_to_committed()

    def _reset_to_committed(self) -> None:
        """Cut the cache back to the committed context, with the logits after it at hand."""
        if self._unfed:
            self.runner.rollback(self._committed - len(self._unfed))
            self._next_logits = self.runner.feed(self._unfed)
            self._unfed = []
            return
        if self._next_logits is not None:
            self.runner.rollback(self._committed)
            return
        last = self.runner.tokens[self._committed - 1]
        self.runner.rollback(self._committed - 1)
        self._next_logits = self.runner.step(last)

    def _top_k(self, params: SamplingParams) -> int:
        return min(self.top_k, params.top_k) if params.top_k else self.top_k


def _propose(
    logits: np.ndarray, params: SamplingParams, top_k: int, rng: np.random.Generator
) -> Proposal:
    if params.greedy:
        return Proposal(greedy_token(logits), None, top_probability(logits))
    q = draft_distribution(logits, params.temperature, top_k, params.top_p)
    return Proposal(sample_token(q, rng), q, float(q.probs[0]))
