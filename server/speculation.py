"""Adaptive speculation length: the k each verdict suggests to its board.

Drafting more tokens pays while the server's forward pass is memory-bound (extra tokens in the
batch are almost free) and loses once it is compute-bound (every token costs its share, and the
whole batch waits for it). So the server chooses the ks of all sessions of a batch together, to
maximise the committed tokens per second of the *whole batch*: a session that drafts more slows
every other session in the same forward pass. The model, in short (docs/speculation.md has it
in full), with sessions j in lockstep rounds of drafting, round trip and one forward pass:

    E_j(k)   = 1 + sum_{m=1..k} prod_{i=1..m} a_ji        expected committed tokens per round
               (= (1 - alpha^(k+1)) / (1 - alpha) when every a_ji = alpha)
    T        = sum_j (k_j + 1)                            tokens in the forward pass
    V(T)     = c0 + c1 * max(0, T - knee)                 verification seconds
    rate(ks) = sum_j E_j(k_j) / ([k_j > 0] (k_j * t_j + rtt_j) + V(T))

`plan_batch` maximises rate(ks), then checks its plan as the service runs it (a drafter beside
sessions handed over is held for or misses a pass: `_prefer_hand_off`). Under heavy load every
drafted token slows the pass more than it gains and all ks fall to 0: the server then decodes
those sessions alone, with no drafting and no round trip (the hand-off), which is plain
continuous batching, the server alone.

Everything here is plain arithmetic on estimates; the service feeds the estimators with what it
measures (`observe_batch`, `observe_verdict`) and asks `next_k` when it publishes a verdict.
`SpeculationPolicy` is not thread-safe: the service's scheduler thread owns it.
"""

import dataclasses
import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from fleet.logging import get_logger

PolicyKind = Literal["adaptive", "fixed", "off"]

# Each verdict multiplies a session's acceptance evidence by this: about the last 20 rounds
# count, so the estimate follows a session from code into prose within tens of rounds.
DEFAULT_DECAY = 0.95
# Before any evidence: acceptance 0.6 worth 2 drafted tokens (weak; two rounds override it).
PRIOR_ALPHA = 0.6
PRIOR_ALPHA_WEIGHT = 2.0
# A position's own acceptance counts as much as this many observations of the overall rate
# before it outweighs it (positions far out are reached rarely).
POSITION_SHRINKAGE = 4.0
# A new session starts from what its board's earlier sessions showed (the fleet's, for a board
# not seen yet), worth at most this many judged draft tokens: enough to choose a sensible first
# k (a request of a few tens of tokens has only a few rounds to learn in), little enough that
# the session's own rounds take over within a few.
SEED_TOKENS = 8.0
# Weight of the newest draft-time and round-trip measurement in their moving averages.
TIME_EWMA = 0.3
# Until measured: a board step of 20 ms (a Pi-class board) and a 10 ms round trip (one LAN).
PRIOR_DRAFT_STEP_S = 0.020
PRIOR_ROUND_TRIP_S = 0.010
# A drafted token must add at least this fraction of its session's rate: a flat optimum is no
# reason to load the server.
RATE_TOLERANCE = 1e-3
# A batch handed over starts drafting again only where the model says that gains at least
# this share: a switch costs what the model does not see (drafts of the first round out of
# step, the boards' catch-up, a load fit from a few passes at a new size).
SWITCH_MARGIN = 0.05
# Load fit: recent (tokens, seconds) samples kept; timing noise below this fraction of the
# mean is not evidence of a knee; each parameter a model adds must pay for itself by this much
# in the information criterion (2 is Akaike's; more keeps jitter from passing for a knee).
LOAD_WINDOW = 512
# The scale of passes with (or without) drafted tokens: the median over the last this many of
# them. When the plan has chosen one kind for PROBE_FIRST passes (up to PROBE_MAX once probes
# keep confirming it), it tries the other for PROBE_PASSES passes, so that a scale measured
# long ago, under other load, does not decide for ever (see SpeculationPolicy._probe).
SCALE_PASSES = 3
# Committed tokens per second per open session, as realized, over the last this many passes
# of each kind; compared once each kind has at least REALIZED_MIN of them.
REALIZED_PASSES = 8
REALIZED_MIN = 3
# Plain rounds must have delivered more than drafting ones by this many standard errors of
# the difference before the batch is handed over (plain_delivers_more).
HANDOVER_ERRORS = 2.0
PROBE_FIRST = 8
PROBE_MAX = 128
PROBE_PASSES = 3
# A probe that found its kind far behind the chosen one (which delivered this share more,
# beyond HANDOVER_ERRORS standard errors: `delivers_far_more`) sets the interval to PROBE_MAX
# at once; the interval starts again from PROBE_FIRST when the load moves (see _probe).
PROBE_FAR_BEHIND = 0.25
# Boards keep their draft caches fed while no draft is out (the verdict's `keep_up`) only while
# they draft, or a drafting probe that would have them draft is at most this many passes away:
# enough for a board to feed a prompt and a hand-over's tokens before it drafts, so the probe's
# drafts come in step, and no ONNX work beside the server's passes for the rest of a long
# hand-over (see SpeculationPolicy.keep_up).
KEEP_UP_AHEAD = 8
# A plan drafts only a batch of tokens the load fit has measured: at least LOAD_SUPPORT recent
# passes of LOAD_SUPPORT_SHARE of its tokens or more (see SpeculationPolicy._probe).
LOAD_SUPPORT = 3
LOAD_SUPPORT_SHARE = 0.75
LOAD_NOISE_FLOOR = 0.02
LOAD_PARAMETER_PENALTY = 3.0


# --- the load model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadModel:
    """Seconds of one verification forward pass over T tokens (all sessions' drafts plus one
    token each): flat at `c0_s` while memory-bound, then `c1_s` per token past `knee_tokens`.
    `single_s`, when set, is what a pass over one token costs: a matrix-vector product, which
    CPU BLAS runs on another kernel than the matrix products of two tokens or more (on the
    AVX2 servers measured, a 1-token pass cost a third of a 2-token one; docs/speculation.md).
    `proportional_past`, when set, is the largest size measured: a larger pass costs at least
    a pass of that size scaled by its tokens (`with_proportional_floor`)."""

    c0_s: float
    knee_tokens: float
    c1_s: float
    single_s: float | None = None
    proportional_past: float | None = None

    def __post_init__(self) -> None:
        if self.c0_s <= 0 or self.knee_tokens < 0 or self.c1_s < 0:
            raise ValueError(f"a load model needs c0 > 0, knee >= 0 and c1 >= 0, got {self}")
        if self.single_s is not None and not self.single_s > 0:
            raise ValueError(f"a 1-token pass must cost more than 0 s, got {self.single_s}")
        if self.proportional_past is not None and not self.proportional_past > 0:
            raise ValueError(f"a measured size must be more than 0 tokens, got {self.proportional_past}")

    def seconds(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=float)
        batched = self._line(tokens)
        if (measured := self.proportional_past) is not None:
            floor = self._line(np.asarray(measured)) * tokens / measured
            batched = np.where(tokens > measured, np.maximum(batched, floor), batched)
        return batched if self.single_s is None else np.where(tokens <= 1, self.single_s, batched)

    def _line(self, tokens: np.ndarray) -> np.ndarray:
        return self.c0_s + self.c1_s * np.maximum(0.0, tokens - self.knee_tokens)

    def with_proportional_floor(self, measured_tokens: float) -> "LoadModel":
        """This model, with passes larger than `measured_tokens` priced at least in proportion
        to a pass of that size, where the model puts that size past its knee (compute-bound).
        A compute-bound pass does the same work per token whatever its size, so extrapolated
        from smaller passes, a fitted slope can only err by finding tokens cheaper than they
        are: at 16 boards in float32, a line fitted to passes of 1-21 tokens (knee 3, 0.027 s
        a token) priced a drafting probe's 32 tokens at 1.38 s; it cost 1.67 s, about 21
        tokens' worth of 1.09 s scaled up. Below the knee (memory-bound: a GPU's batches, a
        CPU's smallest ones) nothing changes: there extra tokens really are almost free."""
        if measured_tokens < 2 or measured_tokens <= self.knee_tokens:
            return self
        return dataclasses.replace(self, proportional_past=measured_tokens)


# Roofline-shaped prior (past the knee each token costs the floor spread over the knee's
# tokens), with the knee of the 1.5B target on 2 CPU cores (DESIGN.md section 8). The floor is
# replaced by the first measurement; the knee only matters until the batches reach it.
PRIOR_LOAD = LoadModel(c0_s=0.05, knee_tokens=24.0, c1_s=0.05 / 24.0)


def fit_load_model(
    tokens: Sequence[float], seconds: Sequence[float], prior: LoadModel = PRIOR_LOAD
) -> LoadModel:
    """The load model that best explains measured (tokens in batch, verify seconds) pairs.

    One-token passes are set apart once larger ones were measured too: their median becomes
    `single_s` (unless it is no cheaper than the fit of the others prices one token) and the
    shape is fitted to the rest. A matrix-vector product's cost says nothing of how a matrix
    product's grows: fitted together, the step from 1 to 2 tokens of a CPU server passed for a
    slope, and the plan priced each drafted token at 0.21 s where it cost about 0.05 s."""
    t_all = np.asarray(tokens, dtype=float)
    y_all = np.asarray(seconds, dtype=float)
    single = t_all <= 1
    if not single.any() or single.all():
        return _fit_batched(t_all, y_all, prior)
    batched = _fit_batched(t_all[~single], y_all[~single], prior)
    alone = float(np.median(y_all[single]))
    if alone >= float(batched.seconds(np.array(1.0))):
        return batched
    return dataclasses.replace(batched, single_s=alone)


def _fit_batched(t_all: np.ndarray, y_all: np.ndarray, prior: LoadModel) -> LoadModel:
    """The fit of `fit_load_model`, over passes of any size.

    Samples are reduced to the median per token count (robust to a scheduler hiccup on a
    shared machine). Candidates, simplest first:
    - the prior's shape scaled to the data (one parameter: what little data can support);
    - flat over everything seen, the knee past the largest batch seen (and the prior's
      roofline slope beyond it, so a batch larger than any seen is never assumed free);
    - one line over everything seen (the knee lies below the smallest batch seen);
    - a roofline max(c0, c1*T), split at each observed count;
    - a hinge at each observed count: the floor is the mean below it, the slope a
      least-squares line through (knee, floor) above it.
    The winner has the lowest information criterion m*log(SSE/m) + penalty*parameters over the
    m distinct counts, with a noise floor in the SSE so timing jitter is never taken for a knee.
    """
    if t_all.size == 0:
        return prior
    order = np.lexsort((y_all, t_all))  # by token count, then seconds: medians by position
    t, start, counts = np.unique(t_all[order], return_index=True, return_counts=True)
    ranked = y_all[order]
    y = (ranked[start + (counts - 1) // 2] + ranked[start + counts // 2]) / 2
    w = counts.astype(float)
    m = t.size
    mean = max(float(np.average(y, weights=w)), 1e-6)
    noise = (LOAD_NOISE_FLOOR * mean) ** 2 * m

    def score(model: LoadModel, parameters: int) -> float:
        sse = float(np.sum(w * (y - model.seconds(t)) ** 2))
        return m * math.log((sse + noise) / m) + LOAD_PARAMETER_PENALTY * parameters

    shape = prior.seconds(t)
    scale = max(float(np.sum(w * y * shape) / np.sum(w * shape * shape)), 1e-6)
    flat_knee = max(prior.knee_tokens, float(t[-1]))
    candidates = [  # (model, parameters), simplest first
        (LoadModel(scale * prior.c0_s, prior.knee_tokens, scale * prior.c1_s), 1),
        (LoadModel(mean, flat_knee, mean / max(flat_knee, 1.0)), 1),
    ]
    if m >= 3 and (line := _line(t, y, w)) is not None:
        candidates.append((line, 2))
    if m >= 2:
        candidates.append((_best_roofline(t, y, w), 2))
    if m >= 5:
        candidates.append((_best_hinge(t, y, w), 3))
    scores = [score(model, parameters) for model, parameters in candidates]
    return candidates[int(np.argmin(np.round(scores, 9)))][0]  # a tie keeps the simpler


def _line(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> LoadModel | None:
    """The weighted least-squares line, as a hinge at the smallest count; None if not rising."""
    slope = float(np.cov(t, y, aweights=w)[0, 1] / np.cov(t, aweights=w))
    if slope <= 0:
        return None
    at_first = float(np.average(y, weights=w) + slope * (t[0] - np.average(t, weights=w)))
    return LoadModel(max(at_first, 1e-6), float(t[0]), slope)


def _best_roofline(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> LoadModel:
    """The least-squares roofline max(c0, c1*T) (a hinge whose line passes through the origin,
    knee = c0/c1): the floor is the mean of the smallest counts, the slope a line through the
    origin over the rest, every split tried. Unlike the free hinge it places the knee between
    the batches seen, from how steep the compute-bound ones are."""
    W, Sy = np.cumsum(w), np.cumsum(w * y)
    Stt, Sty = np.cumsum(w * t * t), np.cumsum(w * t * y)
    splits = np.arange(t.size - 1)  # the last count at the floor
    c0 = Sy[splits] / W[splits]
    c1 = np.maximum(_suffix(Sty)[splits] / _suffix(Stt)[splits], 1e-12)
    predicted = np.maximum(c0[:, None], c1[:, None] * t[None, :])
    best = int(np.argmin((w * (y[None, :] - predicted) ** 2).sum(axis=1)))
    c0_best, c1_best = max(float(c0[best]), 1e-6), float(c1[best])
    return LoadModel(c0_best, c0_best / c1_best, c1_best)


def _best_hinge(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> LoadModel:
    """The least-squares hinge over every knee with at least 2 counts below and 3 above,
    all knees at once from prefix sums (counts at or below the knee) and suffix sums (above)."""
    W, Sy, Syy = np.cumsum(w), np.cumsum(w * y), np.cumsum(w * y * y)
    St, Stt, Sty = np.cumsum(w * t), np.cumsum(w * t * t), np.cumsum(w * t * y)
    knees = np.arange(1, t.size - 3)
    kappa = t[knees]
    c0 = Sy[knees] / W[knees]
    sse_low = Syy[knees] - Sy[knees] ** 2 / W[knees]
    w_hi, y_hi, yy_hi = (_suffix(s)[knees] for s in (W, Sy, Syy))
    t_hi, tt_hi, ty_hi = (_suffix(s)[knees] for s in (St, Stt, Sty))
    dd = tt_hi - 2 * kappa * t_hi + kappa**2 * w_hi  # sum w (t - knee)^2
    dr = ty_hi - kappa * y_hi - c0 * t_hi + c0 * kappa * w_hi  # sum w (t - knee)(y - c0)
    c1 = np.maximum(0.0, dr / dd)
    rr = yy_hi - 2 * c0 * y_hi + c0**2 * w_hi  # sum w (y - c0)^2 above the knee
    best = int(np.argmin(sse_low + rr - 2 * c1 * dr + c1**2 * dd))
    return LoadModel(max(float(c0[best]), 1e-6), float(kappa[best]), float(c1[best]))


def _suffix(prefix: np.ndarray) -> np.ndarray:
    """From prefix sums, the sums of everything after each index."""
    return prefix[-1] - prefix


class LoadEstimator:
    """The verification cost model, refitted from the service's recent batches when asked.

    One shape for all passes (how cost grows with tokens), and one scale for passes with
    drafted tokens and one for passes without: drafting rounds may cost the server more than
    their tokens say (sampling sessions' q to check, drafts to decode, and in an emulated
    fleet the boards' drafting on the server's own cores), and handing a batch over must be
    judged by what plain passes really cost. Each scale is the median ratio of the measured
    time to the shared fit over the last `SCALE_PASSES` passes of that kind (what the other
    load on the server is now), 1 until there is one."""

    def __init__(self, prior: LoadModel = PRIOR_LOAD, window: int = LOAD_WINDOW) -> None:
        self.prior = prior
        self._samples: deque[tuple[int, float, bool]] = deque(maxlen=window)
        self._models: tuple[LoadModel, LoadModel, LoadModel] | None = (prior, prior, prior)
        self._since = {True: 0, False: 0}  # passes since the last with / without drafts
        self.passes = 0  # passes observed

    def observe(self, total_tokens: int, verify_s: float, drafted: bool = False) -> None:
        if total_tokens < 1 or not verify_s > 0:
            return  # an empty batch or a clock that did not move says nothing about cost
        self._samples.append((total_tokens, verify_s, drafted))
        self._since[drafted], self._since[not drafted] = 0, self._since[not drafted] + 1
        self.passes += 1
        self._models = None

    def measured(self, drafted: bool) -> bool:
        """Whether any recent pass was with (`drafted`) or without drafted tokens."""
        return any(kind == drafted for _, _, kind in self._samples)

    def supported_tokens(self) -> float:
        """The largest batch the fit has measured: passes of T tokens are read off passes, not
        extrapolated, while `LOAD_SUPPORT` recent passes had `LOAD_SUPPORT_SHARE` of T or more
        (0 before there are that many). A fresh server at 32 boards in float32, its largest
        passes the 32 tokens of plain decoding, priced a pass of 64 at about 4.4 s, drafted,
        and paid 6.1 s."""
        largest = heapq.nlargest(LOAD_SUPPORT, (tokens for tokens, _, _ in self._samples))
        return largest[-1] / LOAD_SUPPORT_SHARE if len(largest) == LOAD_SUPPORT else 0.0

    def passes_since(self, drafted: bool) -> int:
        """Passes observed since the last one with (`drafted`) or without drafted tokens."""
        return self._since[drafted]

    def model(self) -> LoadModel:
        """The shared fit over every pass."""
        return self._fitted()[0]

    def costs(self) -> tuple[LoadModel, LoadModel]:
        """(passes with drafted tokens, passes without): the shared fit, scaled."""
        _, drafting, plain = self._fitted()
        return drafting, plain

    def _fitted(self) -> tuple[LoadModel, LoadModel, LoadModel]:
        if self._models is None:
            tokens, seconds, drafted = (np.array(column) for column in zip(*self._samples, strict=True))
            shared = fit_load_model(tokens, seconds, self.prior)
            ratio = seconds / shared.seconds(tokens)
            scaled = [
                _scaled(shared, float(np.median(ratio[kind][-SCALE_PASSES:])) if kind.any() else 1.0)
                for kind in (drafted, ~drafted)
            ]
            measured = self.supported_tokens()
            shared, drafting, plain = (m.with_proportional_floor(measured) for m in (shared, *scaled))
            self._models = (shared, drafting, plain)
        return self._models


def _scaled(model: LoadModel, factor: float) -> LoadModel:
    single = None if model.single_s is None else model.single_s * factor
    return dataclasses.replace(model, c0_s=model.c0_s * factor, c1_s=model.c1_s * factor, single_s=single)


class RealizedRates:
    """What each kind of plan really delivered: committed tokens per second per open session,
    over the last `REALIZED_PASSES` passes made under a plan that had some session draft and
    as many under plans that had none draft. By the plan, not by each pass's content: while a
    few sessions draft beside handed-over ones, passes without their drafts come between those
    with them, and counted as plain decoding those made it look worse than it is (0.33
    tokens/s a session at 8 boards in a probe run, where a plain plan gave 0.40). A pass's
    time is the time since the previous pass ended (drafting, round trips and holds
    included), so the figure is what the fleet got, whatever the plan's model says; less the
    prefill of sessions opened meanwhile, which every request pays once whatever is planned
    (counted, it fell on whichever kind of pass the boards opened with, mostly drafting ones:
    one prefill among a few drafting passes was enough to hand a fleet over)."""

    def __init__(self) -> None:
        self._kinds: dict[bool, deque[tuple[float, float, int]]] = {
            kind: deque(maxlen=REALIZED_PASSES) for kind in (True, False)
        }
        self._last: float | None = None

    def observe(
        self, drafted: bool, committed: int, sessions: int, at: float, prefill_s: float = 0.0
    ) -> None:
        if self._last is not None and sessions > 0 and (seconds := at - prefill_s - self._last) > 0:
            self._kinds[drafted].append((seconds, committed / sessions, sessions))
        self._last = at

    def estimate(self, drafted: bool, sessions: int | None = None) -> "Delivered | None":
        """Tokens per second per session, and its standard error, as a ratio of sums over the
        passes made with about `sessions` open (within a quarter, and at least one, either
        way; all passes when None): a session's share of a pass depends on how many share it
        (counted together, the plain passes of a one-session warm-up, 1.8 tokens/s a session,
        held 4 boards at plain decoding against drafting's 0.9). None with fewer than
        `REALIZED_MIN` such passes."""
        passes = np.array([
            (seconds, tokens)
            for seconds, tokens, open_sessions in self._kinds[drafted]
            if sessions is None or same_load(open_sessions, sessions)
        ]).reshape(-1, 2)
        if len(passes) < REALIZED_MIN:
            return None
        seconds, tokens = passes[:, 0], passes[:, 1]
        rate = float(tokens.sum() / seconds.sum())
        # The ratio estimator's variance: the spread of what each pass delivered beyond the
        # rate's share of its time, relative to the mean pass.
        spread = float(np.sqrt(np.sum((tokens - rate * seconds) ** 2) / (len(passes) - 1) / len(passes)))
        return Delivered(rate, spread / float(seconds.mean()))


def same_load(sessions: float, other: float) -> bool:
    """Whether two numbers of open sessions are about the same load: within a quarter of
    `other`, and at least one session, either way."""
    return abs(sessions - other) <= max(1.0, other / 4)


class Delivered(NamedTuple):
    """Committed tokens per second per open session, as realized, and its standard error."""

    rate: float
    error: float


def plain_delivers_more(drafting: Delivered | None, plain: Delivered | None) -> bool:
    """Whether plain passes delivered more per session than drafting ones, beyond
    `HANDOVER_ERRORS` standard errors of the difference. A drafting round commits 1 to k + 1
    tokens as the text lets the draft guess, so a few passes of each kind differ by chance:
    at one board in bfloat16, stretches of hard text (3.2 against plain's 3.4 tokens/s)
    handed the session over again and again, 59% of a window's plans were plain, and the
    fleet made 3.32 tokens/s where a fixed k = 5 made 4.56 on the same jobs. With one
    standard error, 4 boards in float32 were handed over after 3 drafting passes that
    delivered 1.14 +- 0.25 tokens/s a session against plain's 1.48, where every fixed k from
    2 to 6 beat the server alone (twelfth run). False until both kinds have been measured."""
    return _more_beyond_noise(plain, drafting)


def drafting_delivers_less(drafting: Delivered | None, plain: Delivered | None) -> bool:
    """Whether drafting rounds delivered less per session than plain ones, by any margin:
    the test a drafting probe must pass before the batch drafts again. Handing over waits
    for `plain_delivers_more` (noise must not hand a paying session over), but drafting
    starts again only once it has shown that it beats the server alone: judged by the model
    alone after each probe, 4 boards in float32, where drafting and plain rounds delivered
    about the same, swapped between them all window, and each switch cost out-of-step drafts
    and catch-ups (sled 7.83 tokens/s against server-only's 8.48 and 9.10). False until both
    kinds have been measured."""
    if drafting is None or plain is None:
        return False
    return drafting.rate < plain.rate


def _more_beyond_noise(more: Delivered | None, less: Delivered | None) -> bool:
    """Whether `more` delivered more than `less` by `HANDOVER_ERRORS` standard errors of the
    difference; False until both have been measured."""
    if more is None or less is None:
        return False
    return more.rate - less.rate >= HANDOVER_ERRORS * math.hypot(more.error, less.error)


def delivers_far_more(chosen: Delivered | None, probed: Delivered | None) -> bool:
    """Whether the chosen kind of round delivered `PROBE_FAR_BEHIND` more per session than
    the kind a probe measured, and beyond `HANDOVER_ERRORS` standard errors of the
    difference: that probe had little chance of changing the choice, and another soon would
    only pay for the look again. At one board, drafting rounds delivered 4.4 +- 0.6 tokens/s
    against the plain probe's 1.9 +- 0.3, and each plain probe (3 passes, and the pass that
    hands the session back) cost about 6 tokens, two of them in a 25-s window. False until
    both kinds have been measured."""
    if chosen is None or probed is None:
        return False
    return chosen.rate >= (1 + PROBE_FAR_BEHIND) * probed.rate and _more_beyond_noise(chosen, probed)


# --- one session --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionEstimate:
    """What the plan needs to know of one session: acceptance per draft position (the chance
    position i is accepted given all before it were), board step time, round trip, and `fill`,
    the share of a suggested k the board really drafts (its own k_max, its confidence
    threshold)."""

    acceptance: tuple[float, ...]
    draft_step_s: float
    round_trip_s: float
    fill: float = 1.0

    def expected_committed(self, k: np.ndarray | int) -> np.ndarray:
        """E[tokens committed by a round that drafts k] = 1 + sum_j prod_{i<=j} a_i."""
        reach = np.concatenate(([1.0], np.cumprod(self.acceptance)))
        return np.cumsum(reach)[np.asarray(k)]


class SessionEstimator:
    """Acceptance per position as decayed counts (a moving average that forgets old rounds),
    draft step time, round trip and fill as moving averages."""

    def __init__(self, positions: int, decay: float = DEFAULT_DECAY) -> None:
        self.decay = decay
        self.reached = np.zeros(positions)  # rounds that verified position i
        self.accepted = np.zeros(positions)  # ... and accepted it
        self.draft_step_s: float | None = None
        self.round_trip_s: float | None = None
        self.fill = 1.0

    def seeded(self) -> "SessionEstimator":
        """A new estimator that starts from this one's estimates, its acceptance evidence
        scaled down to at most `SEED_TOKENS` judged tokens."""
        seed = SessionEstimator(self.reached.size, self.decay)
        evidence = float(self.reached.sum())
        scale = min(1.0, SEED_TOKENS / evidence) if evidence > 0 else 0.0
        seed.reached, seed.accepted = self.reached * scale, self.accepted * scale
        seed.draft_step_s, seed.round_trip_s = self.draft_step_s, self.round_trip_s
        seed.fill = self.fill
        return seed

    def observe(
        self,
        drafted: int,
        accepted: int,
        draft_ms: float,
        rtt_s: float | None,
        suggested: int | None = None,
    ) -> None:
        """One round: `drafted` tokens answering a suggestion of `suggested` (None for an
        opening draft, which answers no suggestion of this session's)."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted {accepted} of {drafted} drafted tokens")
        # Decay also when nothing was drafted (the board's threshold stopped at the first
        # token): a board sending empty drafts drifts back towards the prior instead of being
        # judged forever on old rounds. Pushed rounds (k = 0) are not observed at all.
        self.reached *= self.decay
        self.accepted *= self.decay
        verified = min(drafted, accepted + 1, self.reached.size)
        self.reached[:verified] += 1
        self.accepted[: min(accepted, verified)] += 1
        if suggested:
            self.fill = _ewma(self.fill, min(1.0, drafted / suggested))
        if drafted and draft_ms > 0:
            self.draft_step_s = _ewma(self.draft_step_s, draft_ms / 1000)
        if rtt_s is not None:
            self.round_trip_s = _ewma(self.round_trip_s, max(0.0, rtt_s))

    @property
    def alpha(self) -> float:
        """Overall acceptance rate per drafted token, shrunk towards the prior."""
        return (float(self.accepted.sum()) + PRIOR_ALPHA * PRIOR_ALPHA_WEIGHT) / (
            float(self.reached.sum()) + PRIOR_ALPHA_WEIGHT
        )

    def estimate(self) -> SessionEstimate:
        alpha = self.alpha
        per_position = (self.accepted + POSITION_SHRINKAGE * alpha) / (
            self.reached + POSITION_SHRINKAGE
        )
        return SessionEstimate(
            acceptance=tuple(float(a) for a in per_position),
            draft_step_s=self.step_s,
            round_trip_s=self.trip_s,
            fill=self.fill,
        )

    @property
    def step_s(self) -> float:
        """Board seconds per drafted token (the prior until measured)."""
        return PRIOR_DRAFT_STEP_S if self.draft_step_s is None else self.draft_step_s

    @property
    def trip_s(self) -> float:
        """Round trip beyond drafting (the prior until measured)."""
        return PRIOR_ROUND_TRIP_S if self.round_trip_s is None else self.round_trip_s


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - TIME_EWMA) * previous + TIME_EWMA * value


# --- the choice -----------------------------------------------------------------------------------
class _Batch:
    """The sessions of one planned batch as arrays, for `batch_rate` and `plan_batch`.

    Sessions without estimates (just opened, or decoded by the server) are `plain`: they draft
    nothing, add one token each to the forward pass and commit one token per round, after
    `plain_round_trip_s` (none when the whole batch is handed over: the server decodes them
    too). They are counted, not listed, so a large batch costs nothing extra."""

    def __init__(
        self,
        sessions: Sequence[SessionEstimate],
        cost: LoadModel,
        k_max: int,
        plain: int,
        plain_round_trip_s: float,
        plain_cost: LoadModel | None = None,
    ) -> None:
        if k_max < 0 or plain < 0:
            raise ValueError(f"need k_max >= 0 and plain_sessions >= 0, got {k_max}, {plain}")
        self.cost = cost
        self.plain_cost = cost if plain_cost is None else plain_cost
        self.plain = plain
        self.plain_round_trip_s = plain_round_trip_s
        self.k_max = min([k_max, *(len(s.acceptance) for s in sessions)])
        self.committed = np.array(
            [s.expected_committed(np.arange(self.k_max + 1)) for s in sessions]
        ).reshape(len(sessions), self.k_max + 1)
        self.fill = np.array([s.fill for s in sessions])
        # Board seconds per *suggested* token: it drafts `fill` of what it is told.
        self.step_s = self.fill * np.array([s.draft_step_s for s in sessions])
        self.round_trip_s = np.array([s.round_trip_s for s in sessions])
        self.rows = np.arange(len(sessions))

    def tokens(self, ks: np.ndarray) -> float:
        return float(len(ks) + self.plain + self.fill @ ks)

    def plain_rate(self, verify_s: np.ndarray, round_trip_s: float) -> np.ndarray:
        return self.plain / (round_trip_s + verify_s)

    @staticmethod
    def _beside_handed_over(ks: np.ndarray, overhead: np.ndarray, verify: float) -> np.ndarray:
        """Each session's time off the pass when some draft and the rest are handed over.
        Passes then follow one another for the handed-over sessions: the scheduler holds one
        for due drafts only while that pays the sessions in hand, up to V * J / (H + J) for J
        drafts and H sessions (`VerificationService._due_by`). A draft due within that is
        waited for, and everyone waits with it; a later one misses the pass that started
        without it and joins the next, so its round is at least two passes however quick
        its board."""
        drafting = ks > 0
        hold = verify * drafting.sum() / len(ks)
        held = drafting & (overhead <= hold)
        waited = float(overhead[held].max(initial=0.0))
        return np.where(held, overhead, np.where(drafting, np.maximum(overhead, verify), waited))

    def rate(self, ks: np.ndarray, hand_off: bool = True) -> float:
        """With `hand_off`, a session at k = 0 is decoded by the server alone: its rounds
        have no drafting and no round trip, only the shared forward pass (what the service
        does), and the sessions drafting beside it are held for or miss passes
        (`_beside_handed_over`). Without, every round pays its round trip (what the ascent
        optimises). A batch in which nothing is drafted costs `plain_cost`."""
        verify = (self.cost if ks.any() else self.plain_cost).seconds(self.tokens(ks))
        overhead = self.round_trip_s + self.step_s * ks
        if hand_off:
            overhead = np.where(ks > 0, overhead, 0.0)
            if ks.any() and not ks.all():
                overhead = self._beside_handed_over(ks, overhead, verify)
        own = self.committed[self.rows, ks] / (overhead + verify)
        # Handed over, the sessions without estimates are decoded by the server too: no round
        # trip. While others draft, each of their passes waits out a drafting round.
        trip = 0.0 if hand_off and not ks.any() else self.plain_round_trip_s
        return float(own.sum() + self.plain_rate(verify, trip))


def batch_rate(
    sessions: Sequence[SessionEstimate],
    ks: Sequence[int],
    cost: LoadModel,
    plain_sessions: int = 0,
    plain_round_trip_s: float = PRIOR_ROUND_TRIP_S,
    hand_off: bool = True,
    plain_cost: LoadModel | None = None,
) -> float:
    """Committed tokens per second of a batch whose sessions draft `ks`, all in lockstep: each
    round is drafting + round trip + one shared forward pass over every session's tokens; with
    `hand_off` (as the service runs), a session at k = 0 is decoded by the server alone, with
    no drafting and no round trip. `plain_cost`, when given, is the cost of a pass in which
    nothing is drafted."""
    batch = _Batch(
        sessions, cost, max(ks, default=0), plain_sessions, plain_round_trip_s, plain_cost
    )
    return batch.rate(np.array(ks, dtype=int), hand_off)


def plan_batch(
    sessions: Sequence[SessionEstimate],
    cost: LoadModel,
    k_max: int,
    plain_sessions: int = 0,
    plain_round_trip_s: float = PRIOR_ROUND_TRIP_S,
    plain_cost: LoadModel | None = None,
    hand_off_margin: float = RATE_TOLERANCE,
) -> list[int]:
    """Speculation lengths for the sessions of the next batch, chosen together.

    Greedy ascent from plain decoding: hand out one drafted token at a time to the session where
    it adds the most to the batch's committed tokens per second, charging it the slow-down its
    token causes every session in the forward pass; stop when no token adds anything.
    Choosing each session's k alone, given the others, gets stuck where one session has taken
    the cheap tokens below the knee that two would use better; handing them out one at a time
    shares them by marginal value (optimal when each session's gain is concave in k, as
    geometric acceptance makes it). `cost` prices passes with drafted tokens, `plain_cost`
    (default: the same) passes without, for the final choice of handing the batch over: the
    batch is handed over unless drafting beats that by `hand_off_margin` of its rate.
    A lone session whose one-token pass is priced apart (`LoadModel.single_s`) climbs from
    k = 1 instead: the step to a matrix product is not concave, and no single token pays it.
    """
    batch = _Batch(sessions, cost, k_max, plain_sessions, plain_round_trip_s, plain_cost)
    ks = np.zeros(len(sessions), dtype=int)
    if cost.single_s is not None and batch.tokens(ks) <= 1 and batch.k_max > 0:
        # A lone session whose one-token pass is priced apart: its first drafted token pays
        # the step to a matrix product, which no single token earns back but a long enough
        # draft may; climb from there (the hand-off check below still compares with plain).
        ks[:] = 1
    others = ~np.eye(len(ks), dtype=bool)
    while len(ks):
        overhead = batch.round_trip_s + batch.step_s * ks
        verify = cost.seconds(batch.tokens(ks))
        now = batch.committed[batch.rows, ks]
        # For each session j: the forward pass with its one more token, and what that does to
        # its own rate and to everyone else's (each as a difference, so that a token that does
        # not slow the pass changes nothing for the others, exactly).
        verify_after = cost.seconds(batch.tokens(ks) + batch.fill)
        grown = np.minimum(ks + 1, batch.k_max)
        own = batch.committed[batch.rows, grown] / (
            overhead + batch.step_s + verify_after
        ) - now / (overhead + verify)
        slowed = now[None, :] * (
            1 / (overhead[None, :] + verify_after[:, None]) - 1 / (overhead + verify)[None, :]
        )
        slowed = (
            (slowed * others).sum(axis=1)
            + batch.plain_rate(verify_after, batch.plain_round_trip_s)
            - batch.plain_rate(verify, batch.plain_round_trip_s)
        )
        gain = own + slowed
        # A token must add at least this share of its own session's rate.
        worth = (ks < batch.k_max) & (gain > RATE_TOLERANCE * now / (overhead + verify))
        if not worth.any():
            break
        ks[int(np.argmax(np.where(worth, gain, -np.inf)))] += 1
    return _prefer_hand_off(batch, ks, hand_off_margin).tolist()


def _prefer_hand_off(batch: _Batch, ks: np.ndarray, margin: float) -> np.ndarray:
    """The ascent charges a session at k = 0 its round trip, so that a first drafted token is
    judged by what it adds, not by the round trip it brings. Sessions at k = 0 are in fact
    handed to the server, with no round trip at all, and then the drafters beside them are
    held for or miss passes (`_Batch.rate`). So the plan is judged as the service runs it,
    against the whole batch drafting (its sessions at 0 drafting one token, in lockstep with
    the rest) and the whole batch handed over (plain continuous batching), which wins ties and
    anything within `margin`. Sessions are not zeroed one by one: a session at 0 drafts
    nothing, so its acceptance estimate would stay wherever noise had left it (simulated, that
    cost up to 9% against the best fixed k)."""
    zeros = np.zeros_like(ks)
    candidates = [ks, np.maximum(ks, 1)] if ks.any() and batch.k_max > 0 else [ks]
    best = max(candidates, key=batch.rate)
    return zeros if batch.rate(zeros) >= batch.rate(best) * (1 - margin) else best


def cut_to_tokens(ks: Sequence[int], fill: Sequence[float], fixed: float, limit: float) -> list[int] | None:
    """`ks` with the longest drafts cut, one token at a time, until the batch's expected
    tokens (`fixed`, one per session, plus `fill` of each k) are at most `limit`; None where
    that would leave a drafting session with nothing to draft (a batch with some sessions cut
    to 0 beside the others is another plan, priced by `plan_batch`, not a smaller one)."""
    cut = list(ks)
    while fixed + float(np.dot(fill, cut)) > limit:
        longest = int(np.argmax(cut))
        if cut[longest] <= 1:
            return None
        cut[longest] -= 1
    return cut


def cut_plan(
    sessions: Sequence[SessionEstimate],
    ks: Sequence[int],
    cost: LoadModel,
    plain_sessions: int,
    plain_round_trip_s: float,
    plain_cost: LoadModel,
    limit: float,
    margin: float,
) -> list[int] | None:
    """The plan `ks` cut to at most `limit` expected tokens (`cut_to_tokens`), or None where
    no cut keeps every drafter drafting or the cut plan no longer beats handing the batch over
    by `margin` (the test of `_prefer_hand_off`)."""
    if not any(ks):
        return list(ks)
    cut = cut_to_tokens(ks, [s.fill for s in sessions], len(ks) + plain_sessions, limit)
    if cut is None or cut == list(ks):
        return cut
    batch = _Batch(sessions, cost, max(cut), plain_sessions, plain_round_trip_s, plain_cost)
    handed_over = batch.rate(np.zeros(len(cut), dtype=int))
    return cut if handed_over < batch.rate(np.array(cut)) * (1 - margin) else None


def round_trip_s(
    verdict_sent_at: float | None,
    draft_received_at: float,
    drafted: int,
    draft_ms: float,
    catch_up_ms: float = 0.0,
) -> float | None:
    """Time the board's round took beyond drafting, as the server sees it: from publishing a
    verdict to receiving the next draft, minus the drafting the board reports and the one-off
    catching up of its draft cache (a new session's context: counted, it would pass for a slow
    link and hand the session to the server for good). None before the session's first
    verdict."""
    if verdict_sent_at is None:
        return None
    board_s = (drafted * draft_ms + catch_up_ms) / 1000
    return max(0.0, draft_received_at - verdict_sent_at - board_s)


# --- what the service holds ----------------------------------------------------------------------
class SpeculationPolicy:
    """Adaptive k: per-session estimators, one load model, and one plan per batch.

    The plan is made at the first `next_k` after a batch was observed, from every session's
    latest estimates, so the service should report all verdicts of a batch before asking for
    the first k (see docs/speculation.md for the wiring). Every verdict also feeds an estimator
    per board and one for the whole fleet: a new session starts from its board's (a board
    not seen yet from the fleet's), so that its very first verdict already suggests a k fitted
    to the board's pace and the pair's acceptance, not to a generic prior."""

    def __init__(
        self, k_max: int, prior_load: LoadModel = PRIOR_LOAD, decay: float = DEFAULT_DECAY
    ) -> None:
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.k_max = k_max
        self.decay = decay
        self.load = LoadEstimator(prior_load)
        self.realized = RealizedRates()
        self._sessions: dict[str, SessionEstimator] = {}
        self._boards: dict[str, SessionEstimator] = {}
        self._fleet = SessionEstimator(k_max, decay)
        self._suggested: dict[str, int] = {}  # the last k each session was told
        # Probing the kind of pass the plan is not choosing (see _probe): the kind probed
        # (None: no probe), plans left in it, the kind chosen before it, and the interval.
        self._probe_drafts: bool | None = None
        self._probe_left = 0
        self._chosen_before_probe = False
        self._probe_every = PROBE_FIRST
        self._probe_load: int | None = None  # the open sessions the interval was set at
        self._intervals: dict[int, int] = {}  # the interval each load left when it moved
        self._load_moved_at = 0  # `load.passes` when the load last moved (see _probe)
        self._drafting_in = 0  # plain passes left before the next drafting probe (0: drafting)
        # Handed over because plain rounds delivered at least as much (see _probe): held so
        # until a drafting probe has measured drafting again.
        self._outdone = False
        self._plan: dict[str, int] = {}
        self._may_draft: dict[str, int] = {}  # each session's k in the last drafting-probe plan
        self._planned_for = 0  # the pending_sessions the plan was made for
        self._drafting = False  # whether the plan of the last pass had any session draft
        self.log = get_logger(component="speculation")

    def observe_batch(
        self,
        total_tokens: int,
        verify_s: float,
        drafted: int,
        committed: int = 0,
        sessions: int = 0,
        at: float | None = None,
        prefill_s: float = 0.0,
    ) -> None:
        """One forward pass: `total_tokens` = sum over its sessions of (drafted + 1), of which
        `drafted` were drafted tokens; it committed `committed` tokens with `sessions` open,
        and ended `at` (monotonic seconds; now when None); since the previous pass the server
        spent `prefill_s` prefilling the contexts of sessions opened."""
        self.load.observe(total_tokens, verify_s, drafted > 0)
        # What rounds delivered is judged by the plan this pass was asked for, not by its
        # content (see RealizedRates), nor by the last k each session was told: a session
        # whose draft missed the passes since still holds a k of an older plan, and counted so,
        # the three passes of a plain probe among 16 sessions out of step all passed for
        # drafting ones, and plain rounds were never measured at that load.
        ended = time.monotonic() if at is None else at
        self._drafting = any(self._plan.values())
        self.realized.observe(self._drafting, committed, sessions, ended, prefill_s)
        self._plan = {}

    def observe_verdict(
        self,
        session_key: str,
        board: str,
        drafted: int,
        accepted: int,
        draft_ms: float,
        rtt_s: float | None,
    ) -> None:
        """One verdict of the session `session_key`, which `board` drafts."""
        history = self._boards.get(board)
        if history is None:
            history = self._boards[board] = self._fleet.seeded()
        if session_key not in self._sessions:
            self._sessions[session_key] = history.seeded()
        suggested = self._suggested.get(session_key)
        for estimator in (self._sessions[session_key], history, self._fleet):
            estimator.observe(drafted, accepted, draft_ms, rtt_s, suggested)

    def next_k(self, session_key: str, pending_sessions: int) -> int:
        """The k to suggest in this session's verdict. `pending_sessions` is the number of
        sessions expected in the next batch (the server's open sessions, this one included);
        those the policy has no estimates for count as plain decoding."""
        k = self._suggest(session_key, pending_sessions)
        self._suggested[session_key] = k
        return k

    def _suggest(self, session_key: str, pending_sessions: int) -> int:
        self._session(session_key)
        if session_key not in self._plan or pending_sessions != self._planned_for:
            keys = list(self._sessions)
            estimates = [self._sessions[key].estimate() for key in keys]
            plain = max(0, pending_sessions - len(keys))
            # Sessions not known yet are most likely boards like the others: their round trip.
            typical = float(np.mean([e.round_trip_s for e in estimates]))
            cost, plain_cost = self.load.costs()
            # Starting to draft must pay for the switch; once drafting, any gain keeps it on.
            margin = RATE_TOLERANCE if self._drafting else SWITCH_MARGIN
            ks = plan_batch(estimates, cost, self.k_max, plain, typical, plain_cost, hand_off_margin=margin)
            limit = self.load.supported_tokens()
            cut = cut_plan(estimates, ks, cost, plain, typical, plain_cost, limit, margin)
            drafting, plain_rounds = (self.realized.estimate(kind, pending_sessions) for kind in (True, False))
            outdone = plain_delivers_more(drafting, plain_rounds)
            # Drafting as the plan would choose it if both kinds cost the same: what a drafting
            # probe drafts, and which boards may be asked to draft soon (`keep_up`).
            optimistic = plan_batch(estimates, plain_cost, self.k_max, plain, typical, hand_off_margin=SWITCH_MARGIN)
            self._may_draft = dict(zip(keys, optimistic, strict=True))
            ks = self._probe(
                ks,
                cut,
                optimistic,
                outdone,
                plain_unmeasured=plain_rounds is None and drafting is not None,
                delivered={True: drafting, False: plain_rounds},
                load=pending_sessions,
            )
            self._plan = dict(zip(keys, ks, strict=True))
            self._planned_for = pending_sessions
            self.log.debug(
                "batch_planned", sessions=len(keys), plain=plain, drafted=sum(ks), k_top=max(ks, default=0),
                probe=self._probe_drafts, realized_drafting=drafting, realized_plain=plain_rounds,
                outdone=outdone, drafting_cost=cost, plain_cost=plain_cost,
                measured_tokens=limit,
            )
        return self._plan[session_key]

    def _probe(
        self,
        ks: list[int],
        measured: list[int] | None,
        drafting: list[int],
        outdone: bool,
        plain_unmeasured: bool,
        delivered: dict[bool, Delivered | None],
        load: int,
    ) -> list[int]:
        """The plan, or for `PROBE_PASSES` passes the other kind of round: plain decoding
        (every session handed over) after drafting, and after plain passes, drafting as the
        plan would choose it if both kinds cost the same (`drafting`; none if even then it does
        not gain `SWITCH_MARGIN`). Each kind's scale is measured only while the plan chooses
        it: without a fresh look, one taken under passing load (a burst of session opens,
        boards catching their caches up) would keep the plan on the other kind for ever. A probe comes after
        `PROBE_FIRST` passes of one kind; each probe that leaves the choice as it was doubles
        that (up to `PROBE_MAX`), one that changes it starts again from `PROBE_FIRST`: quick to
        find the better kind, then rarely paying for a look at the worse. A probe whose kind
        delivered far less than the chosen one (`delivers_far_more`, of what each kind delivered
        at this load: `delivered`, drafting True) sets it to `PROBE_MAX`
        at once, and a load that moves (`load`, the open sessions, no longer `same_load` as
        where the interval was set) sets it to what it was when that load last moved
        (`PROBE_FIRST` at a load not seen before), counted from the move, and drops a probe
        under way: what one load showed says little of another's, but much of the same load
        later (at 4 boards, requests ending two at a time dipped the load to 2 and back every
        few seconds, and each return started probing again from `PROBE_FIRST`). Until a drafting
        pass has been measured, the plan decodes plain: speculation must first show that it
        pays on this server (a fresh server's first passes are plain anyway: boards open
        their sessions without a draft). And where drafting rounds have recently delivered
        less per session than plain ones (`outdone`: what each kind delivered at the present
        load, beyond noise: `plain_delivers_more`), the batch is handed over whatever the
        model says: the model assumes lockstep rounds that a real fleet may not keep. It stays
        handed over until a drafting probe has measured drafting again: judged afresh at every
        plan, two kinds that deliver about the same swapped places pass after pass
        (measured: 4 boards alternating drafting and plain plans for a whole window, each
        switch costing the boards a catch-up). A plan that drafts at a load where plain rounds
        have not been measured (`plain_unmeasured`: a new number of sessions; drafting has
        its `REALIZED_MIN` passes there) probes plain at once rather than after
        `PROBE_FIRST` passes: speculation must show that it beats the server alone, and at
        16 boards in float32, at 2-3 s a pass, 8 passes of a drafting plan that delivered less
        than plain decoding were most of a window. Plain decoding is never probed early: it is
        what the server alone does. A plan that would draft a batch larger than the load fit has
        measured (`LoadEstimator.supported_tokens`) drafts `measured` instead: its longest
        drafts cut to that size (`cut_to_tokens`), where every drafting session keeps a token
        and the model still prefers that to plain decoding. Each pass at the cut size measures
        a larger one, so a lone session's k climbs to the plan's within a few passes, instead
        of decoding plain until the next probe because its last drafts were a token shorter
        than the plan. Where no such cut exists (`measured` None: a fleet of sessions that
        would all draft, at a size that only plain passes of one token each have measured)
        the plan decodes plain, and its drafting probe comes after `PROBE_FIRST` passes
        whatever the interval has grown to: the probe measures passes of about that size, and
        a price extrapolated from smaller ones does not send a whole fleet drafting."""
        if self._probe_load is None:
            self._probe_load = load
        elif not same_load(load, self._probe_load):
            self._intervals[self._probe_load] = self._probe_every
            self._probe_every, self._probe_load = self._intervals.get(load, PROBE_FIRST), load
            self._load_moved_at = self.load.passes
            self._probe_drafts, self._probe_left = None, 0  # it measured another load
        if self._probe_drafts and not self._probe_left:
            # The first plan after a drafting probe judges afresh, unless the probe's rounds
            # delivered less than plain ones at this load (`drafting_delivers_less`).
            self._outdone = drafting_delivers_less(delivered[True], delivered[False])
        if outdone:
            self._outdone = True
        if not self.load.measured(drafted=True) or self._outdone:
            ks = [0] * len(ks)
        wanted = any(ks)
        if wanted:
            ks = [0] * len(ks) if measured is None else measured
        unmeasured = wanted and not any(ks)
        chosen = any(ks)
        if self._probe_left:
            self._probe_left -= 1
            return drafting if self._probe_drafts else [0] * len(ks)
        if self._probe_drafts is not None:  # the first plan after a probe
            # Against what the plan wants now: a drafting probe that found a plain plan's
            # batch worth drafting has changed the choice, even while the batch is still
            # larger than the probe measured.
            kept = wanted == self._chosen_before_probe
            if not kept:
                self._probe_every = PROBE_FIRST
            else:
                probed = self._probe_drafts
                far = delivers_far_more(delivered[not probed], delivered[probed])
                grown = PROBE_MAX if far else 2 * self._probe_every
                self._probe_every = min(PROBE_MAX, grown)
            self._probe_load = load
            self._probe_drafts = None
        early = chosen and plain_unmeasured
        every = PROBE_FIRST if unmeasured else self._probe_every
        since = min(self.load.passes_since(not chosen), self.load.passes - self._load_moved_at)
        self._drafting_in = 0 if chosen else max(0, every - since)
        if since < every and not early:
            return ks
        self._probe_drafts, self._chosen_before_probe = not chosen, chosen
        self._probe_left = PROBE_PASSES - 1
        return drafting if self._probe_drafts else [0] * len(ks)

    def keep_up(self, session_key: str) -> bool:
        """Whether this session's board should keep its draft cache fed while no draft is out
        (asked after `next_k`, for the same verdict): while it drafts, and while a drafting
        probe would have it draft (priced as plain passes: `_may_draft`) and that probe is
        under way or at most `KEEP_UP_AHEAD` passes off. Fed all along, the boards' ONNX passes
        ran beside every pass of a fleet handed over for good; never fed, a board met the next
        drafting plan with its whole backlog and its draft came out of step
        (docs/speculation.md, "Keeping draft caches up")."""
        if self._suggested.get(session_key):
            return True
        near = self._probe_drafts is not None or self._drafting_in <= KEEP_UP_AHEAD
        return near and bool(self._may_draft.get(session_key))

    def draft_due_s(self, session_key: str) -> float | None:
        """Seconds from this session's last verdict to its next draft reaching the server, as
        estimated (the board drafts `fill` of the suggested k at its step time, plus the round
        trip); None when it is not expected to draft (suggested 0) or nothing is known."""
        session, k = self._sessions.get(session_key), self._suggested.get(session_key)
        if session is None or not k:
            return None
        # The timings alone: the scheduler asks this for every waiting session while it
        # collects a batch, and the per-position acceptance `estimate()` builds is not needed.
        return session.fill * k * session.step_s + session.trip_s

    def forget(self, session_key: str) -> None:
        """The session ended; its board's and the fleet's estimators keep what it showed."""
        self._sessions.pop(session_key, None)
        self._plan.pop(session_key, None)
        self._may_draft.pop(session_key, None)
        self._suggested.pop(session_key, None)

    def alpha(self, session_key: str) -> float | None:
        """The session's estimated acceptance rate (for logs and status); None if unknown."""
        session = self._sessions.get(session_key)
        return None if session is None else session.alpha

    def _session(self, session_key: str) -> SessionEstimator:
        session = self._sessions.get(session_key)
        if session is None:
            session = self._sessions[session_key] = self._fleet.seeded()
        return session


class FixedSpeculation(SpeculationPolicy):
    """Always k_max (the boards' threshold still stops early): the comparison baseline. It
    keeps the estimates all the same, so logs and benchmarks show the same figures."""

    def _suggest(self, session_key: str, pending_sessions: int) -> int:
        return self.k_max

    def keep_up(self, session_key: str) -> bool:
        return True  # it always drafts


class NoSpeculation(SpeculationPolicy):
    """Always 0: the server decodes every session itself, boards draft nothing (an operator's
    switch for a fleet whose boards are too slow or whose server is saturated)."""

    def _suggest(self, session_key: str, pending_sessions: int) -> int:
        return 0

    def keep_up(self, session_key: str) -> bool:
        return False  # no draft will follow


def make_policy(kind: PolicyKind, k_max: int) -> SpeculationPolicy:
    """The policy `ServerSettings.speculation` names."""
    policies: dict[str, type[SpeculationPolicy]] = {
        "adaptive": SpeculationPolicy, "fixed": FixedSpeculation, "off": NoSpeculation,
    }
    if kind not in policies:
        raise ValueError(f"unknown speculation policy {kind!r}; expected one of {', '.join(policies)}")
    return policies[kind](k_max)
