"""The verification engine: sessions in, verdicts out, one batched forward pass per step.

The MQTT service calls only this module: `open` a session (prefill its context), `verify` the
drafts of many sessions at once, `close` or `evict_idle`. Bad input for one session becomes an
error verdict for that session alone; the others in the same batch are verified as if it were
not there. Memory is admitted up front (see `server.kv`), so an open that does not fit is a
clean "busy" and never disturbs sessions already running.
"""

import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fleet.config import DEFAULT_LINEAR_KERNEL, LinearKernel
from fleet.logging import get_logger
from fleet.sampling import SamplingParams, SparseDist
from server.runner import Segment, TargetRunner
from server.sessions import FinishReason, Session, StopStrings
from server.verifier import (
    greedy_accept,
    logits_warpers,
    pack_sparse,
    rejection_verify,
    step_generator,
    target_probs,
)

DEFAULT_MEMORY_BUDGET_BYTES = 4 << 30

VerifyErrorCode = Literal[
    "unknown_session", "duplicate", "finished", "too_long", "bad_token", "bad_q", "internal"
]
OpenErrorCode = Literal[
    "empty_context", "bad_token", "context_overflow", "bad_request", "bad_params", "internal"
]


class OpenResult(BaseModel):
    """Outcome of `Engine.open`: "busy" is a capacity refusal (try another server or later),
    "error" a request that can never succeed as sent (`error_code` says which check failed)."""

    model_config = ConfigDict(frozen=True)

    status: Literal["ok", "busy", "error"]
    reason: str | None = None
    committed_len: int = 0
    error_code: OpenErrorCode | None = None


class DraftProposal(BaseModel):
    """One session's draft: 0..k_max tokens, and for a sampling session the sparse q each
    token was drawn from (one per token). A greedy session's q is ignored.

    Constructing one validates each q (non-negative, normalised, one probability per id:
    SparseDist's own checks); what depends on the target (vocabulary, k_max, the session's
    mode) the engine checks per session in `verify`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_id: str
    tokens: list[int] = Field(default_factory=list)
    q: list[SparseDist] | None = None


class Verdict(BaseModel):
    """What the target made of one draft. `tokens` are the newly committed ones: the first
    `accepted` are the draft's own, then the target's correction or bonus token, unless a stop
    condition ended the session inside the accepted drafts."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    accepted: int = 0
    tokens: list[int] = Field(default_factory=list)
    committed_len: int = 0
    finished: bool = False
    reason: FinishReason | None = None
    error: str | None = None
    error_code: VerifyErrorCode | None = None


class SessionInfo(BaseModel):
    """A read-only snapshot of one session, for status reports."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    committed_len: int
    finished: bool
    reason: FinishReason | None
    kv_bytes: int
    idle_s: float


class _Step:
    """A validated draft of one session, ready for the forward pass."""

    __slots__ = ("draft", "index", "q", "session")

    def __init__(self, index: int, session: Session, draft: list[int], q: list[SparseDist] | None):
        self.index, self.session, self.draft, self.q = index, session, draft, q


class Engine:
    """Verifies drafts of many sessions against one target model. Thread-safe (one lock)."""

    def __init__(
        self,
        model_dir_or_model: str | Path | PreTrainedModel,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL,
        k_max: int = 8,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        max_sessions: int = 64,
        tokenizer: PreTrainedTokenizerBase | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        """`eos_token_ids` None takes the model's (generation config first, as `generate()`
        does); pass others for chat templates with extra end ids, or none to ignore EOS."""
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        self._runner = TargetRunner(
            model_dir_or_model, dtype=dtype, device=device, linear_kernel=linear_kernel
        )
        self.linear_kernel = self._runner.linear_kernel
        self.k_max = k_max
        self.memory_budget_bytes = memory_budget_bytes
        self.max_sessions = max_sessions
        self.vocab_size = self._runner.vocab_size
        self.max_context = self._runner.max_context
        self.eos_token_ids = (
            self._runner.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids)
        )
        self.kv_bytes_per_token = self._runner.kv_shape.bytes_per_token
        self.tokenizer = (
            tokenizer if tokenizer is not None else _tokenizer_beside(model_dir_or_model)
        )
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()
        self.log = get_logger(component="engine")

    # ---------------------------------------------------------------- sessions

    def open(
        self, session_id: str, context_ids: list[int], params: SamplingParams, generated: int = 0
    ) -> OpenResult:
        """Prefill a session with its context (the prompt, or prompt + generated tokens on a
        resync: the last `generated` count toward max_new_tokens). Re-opening an existing id
        replaces that session, but only once the new one has been admitted."""
        with self._lock:
            refusal = self._check_open(context_ids, params, generated)
            if refusal is not None:
                code, reason = refusal
                return OpenResult(status="error", error_code=code, reason=reason)
            new_tokens = min(params.max_new_tokens - generated, self.max_context - len(context_ids))
            capacity = len(context_ids) + new_tokens - 1
            busy = self._check_capacity(session_id, capacity)
            if busy is not None:
                self.log.debug("session_busy", session=session_id, reason=busy)
                return OpenResult(status="busy", reason=busy)
            self.close(session_id)
            try:
                kv = self._runner.new_kv(capacity)
                if len(context_ids) > 1:
                    self._runner.forward([Segment(kv, context_ids[:-1])], logits=False)
                kv.set_length(len(context_ids) - 1)
            except (RuntimeError, MemoryError) as exc:
                self.log.exception("prefill_failed", session=session_id)
                return OpenResult(
                    status="error", error_code="internal", reason=f"prefill failed: {exc}"
                )
            stop = StopStrings(params.stop, self._decode) if params.stop else None
            self._sessions[session_id] = Session(
                session_id=session_id,
                params=params,
                committed=list(context_ids),
                generated_from=len(context_ids) - generated,
                limit=len(context_ids) + new_tokens,
                kv=kv,
                warpers=logits_warpers(params),
                stop_strings=stop,
            )
            self.log.debug(
                "session_opened", session=session_id, context=len(context_ids), kv_bytes=kv.nbytes
            )
            return OpenResult(status="ok", committed_len=len(context_ids))

    def close(self, session_id: str) -> bool:
        """Forget a session and free its KV cache; False if there was none."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def evict_idle(self, idle_s: float) -> list[str]:
        """Close every session untouched for more than `idle_s` seconds; return their ids."""
        with self._lock:
            cutoff = time.monotonic() - idle_s
            idle = [sid for sid, session in self._sessions.items() if session.last_used < cutoff]
            for session_id in idle:
                del self._sessions[session_id]
            if idle:
                self.log.info("sessions_evicted", count=len(idle))
            return idle

    def session_bytes(self, session_id: str) -> int:
        """KV bytes reserved by one session (0 once it has finished)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise KeyError(f"unknown session {session_id!r}")
            return session.kv_bytes

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(session.kv_bytes for session in self._sessions.values())

    @property
    def sessions(self) -> dict[str, SessionInfo]:
        with self._lock:
            now = time.monotonic()
            return {
                sid: SessionInfo(
                    session_id=sid,
                    committed_len=s.committed_len,
                    finished=s.finished,
                    reason=s.reason,
                    kv_bytes=s.kv_bytes,
                    idle_s=now - s.last_used,
                )
                for sid, s in self._sessions.items()
            }

    # ---------------------------------------------------------------- verify

    def verify(self, drafts: Sequence[DraftProposal]) -> list[Verdict]:
        """Verify every draft in ONE forward pass; verdicts come back in the drafts' order."""
        with self._lock:
            verdicts: dict[int, Verdict] = {}
            steps: list[_Step] = []
            seen: set[str] = set()
            for index, proposal in enumerate(drafts):
                session = self._sessions.get(proposal.session_id)
                refusal = self._check_draft(proposal, session, seen)
                seen.add(proposal.session_id)
                if refusal is not None:
                    code, reason = refusal
                    verdicts[index] = Verdict(
                        session_id=proposal.session_id,
                        committed_len=session.committed_len if session else 0,
                        error_code=code,
                        error=reason,
                    )
                    continue
                # Drafted tokens past the session's end would be discarded anyway: don't score them.
                k = min(len(proposal.tokens), session.remaining - 1)
                q = None if session.params.greedy else list(proposal.q or [])[:k]
                steps.append(_Step(index, session, list(proposal.tokens[:k]), q))
            if steps:
                verdicts.update(self._run(steps))
            return [verdicts[index] for index in range(len(drafts))]

    def _run(self, steps: list[_Step]) -> dict[int, Verdict]:
        segments = [Segment(step.session.kv, [step.session.pending, *step.draft]) for step in steps]
        try:
            logits = self._runner.forward(segments)
        except (RuntimeError, MemoryError) as exc:
            # Nothing was committed and each KV length is unchanged, so every session can retry.
            self.log.exception("verify_failed", sessions=len(steps))
            return {
                step.index: Verdict(
                    session_id=step.session.session_id,
                    committed_len=step.session.committed_len,
                    error_code="internal",
                    error=f"verification failed: {exc}",
                )
                for step in steps
            }
        greedy_rows = (
            logits.argmax(dim=-1).tolist() if any(s.session.params.greedy for s in steps) else []
        )
        # A NaN or inf row (a numerical fault of the target) would be taken for a token by
        # argmax or poison sampling: refuse that session's round, commit nothing.
        finite_rows = torch.isfinite(logits).all(dim=-1).tolist()
        verdicts = {}
        row = 0
        for step in steps:
            rows = slice(row, row + len(step.draft) + 1)
            row = rows.stop
            if not all(finite_rows[rows]):
                self.log.error("non_finite_logits", session=step.session.session_id)
                verdicts[step.index] = Verdict(
                    session_id=step.session.session_id,
                    committed_len=step.session.committed_len,
                    error_code="internal",
                    error="the target produced non-finite logits",
                )
                continue
            if step.session.params.greedy:
                accepted, emitted = greedy_accept(step.draft, greedy_rows[rows])
            else:
                accepted, emitted = self._sample(step, logits[rows])
            verdicts[step.index] = self._commit(step.session, accepted, emitted)
        return verdicts

    def _sample(self, step: _Step, logits: torch.Tensor) -> tuple[int, list[int]]:
        session = step.session
        # The draws happen on the CPU whatever the target's device, so a seeded session's
        # random stream does not depend on which server (CPU or GPU) verifies it.
        p = target_probs(logits, session.warpers).cpu()
        q_ids, q_probs = pack_sparse(step.q)
        accepted, token = rejection_verify(
            p[None],
            torch.tensor([step.draft], dtype=torch.int64),
            q_ids[None],
            q_probs[None],
            step_generator(session.params.seed, session.committed_len),
        )
        count = int(accepted[0])
        return count, [*step.draft[:count], int(token[0])]

    def _commit(self, session: Session, accepted: int, emitted: list[int]) -> Verdict:
        kept = session.commit(emitted, self.eos_token_ids)
        return Verdict(
            session_id=session.session_id,
            accepted=min(accepted, len(kept)),
            tokens=kept,
            committed_len=session.committed_len,
            finished=session.finished,
            reason=session.reason,
        )

    # ---------------------------------------------------------------- checks

    def _check_open(
        self, context_ids: list[int], params: SamplingParams, generated: int
    ) -> tuple[OpenErrorCode, str] | None:
        if not context_ids:
            return "empty_context", "the context is empty: a session needs at least one token"
        bad = next((t for t in context_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return (
                "bad_token",
                f"context token {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
            )
        if len(context_ids) >= self.max_context:
            return "context_overflow", (
                f"context of {len(context_ids)} tokens leaves no room in the model's {self.max_context}"
            )
        if not 0 <= generated <= len(context_ids):
            return (
                "bad_request",
                f"generated={generated} is not within the {len(context_ids)}-token context",
            )
        if generated >= params.max_new_tokens:
            return (
                "bad_request",
                f"{generated} tokens already generated of max_new_tokens={params.max_new_tokens}",
            )
        if params.stop and self.tokenizer is None:
            return "bad_params", "stop strings need a tokenizer, and this target has none"
        return None

    def _check_capacity(self, session_id: str, capacity: int) -> str | None:
        others = [s for sid, s in self._sessions.items() if sid != session_id]
        active = sum(not s.finished for s in others)
        if active >= self.max_sessions:
            return f"{active} active sessions, the most this server takes is {self.max_sessions}"
        need = capacity * self.kv_bytes_per_token
        held = sum(s.kv_bytes for s in others)
        if held + need > self.memory_budget_bytes:
            return (
                f"KV cache needs {need} bytes, {self.memory_budget_bytes - held} of the "
                f"{self.memory_budget_bytes}-byte budget are free"
            )
        return None

    def _check_draft(
        self, proposal: DraftProposal, session: Session | None, seen: set[str]
    ) -> tuple[VerifyErrorCode, str] | None:
        if session is None:
            return "unknown_session", f"no open session {proposal.session_id!r} on this server"
        if proposal.session_id in seen:
            return (
                "duplicate",
                "the session has two drafts in one batch; only the first is verified",
            )
        if session.finished:
            return "finished", f"the session has finished ({session.reason})"
        tokens = proposal.tokens
        if len(tokens) > self.k_max:
            return "too_long", f"{len(tokens)} drafted tokens, at most k_max={self.k_max}"
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            return (
                "bad_token",
                f"drafted token {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
            )
        if session.params.greedy:
            return None
        return self._check_q(tokens, proposal.q)

    def _check_q(
        self, tokens: list[int], q: list[SparseDist] | None
    ) -> tuple[VerifyErrorCode, str] | None:
        if q is None:
            return (
                ("bad_q", "a sampling session needs q for each drafted token") if tokens else None
            )
        if len(q) != len(tokens):
            return "bad_q", f"q has {len(q)} positions for {len(tokens)} drafted tokens"
        for position, (token, dist) in enumerate(zip(tokens, q)):
            bad = next((i for i in dist.ids if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                return (
                    "bad_q",
                    f"q at position {position} names token {bad}, outside the vocabulary",
                )
            if dict(zip(dist.ids, dist.probs)).get(token, 0.0) <= 0.0:
                return (
                    "bad_q",
                    f"drafted token {token} at position {position} has q = 0: it was not drawn from q",
                )
        return None

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def _tokenizer_beside(
    model_dir_or_model: str | Path | PreTrainedModel,
) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model directory, if any: only stop strings need it."""
    if isinstance(model_dir_or_model, PreTrainedModel):
        return None
    path = Path(model_dir_or_model)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)
