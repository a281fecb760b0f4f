"""Message schemas with hard limits. Every inbound message is validated against these before
anything acts on it, so a malformed or hostile payload is refused at the edge.

Hot-path messages (draft, verdict) travel as msgpack; status, requests and responses as JSON so
any IoT app can speak them without project code.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.protocol.topics import ID_PATTERN
from fleet.sampling import SamplingParams, SparseDist

PROTOCOL_VERSION = 1

MAX_PAYLOAD_BYTES = 1 << 20  # 1 MiB: a 32k-token context plus drafts fits with room to spare
MAX_DRAFT_TOKENS = 64
MAX_CONTEXT_TOKENS = 32768
MAX_TOKEN_ID = 1 << 24
MAX_PROMPT_CHARS = 64_000
# Sampling below this temperature overflows the scaled logits (float32) into NaN
# probabilities; like vLLM's epsilon, anything smaller must be asked for as greedy (0).
MIN_TEMPERATURE = 1e-5

TokenId = int
Identifier = str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_temperature(temperature: float) -> float:
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature:g} is neither 0 (greedy) nor at least {MIN_TEMPERATURE:g}")
    return temperature


class DraftMessage(_Message):
    """Board -> server. One message type serves three purposes:

    - open (on the `open` topic, `context` holds the prompt, or prompt + committed tokens on a
      resync, with `params`): claims a server and carries the first draft, saving a round trip;
    - draft (on the session's `draft` topic): the next drafted tokens after the last verdict;
    - close (`close` true): the board gives the session up early (cancelled request).

    An open with `server_decodes` asks the server to decode every token itself (no drafts):
    the server-alone baseline, and the fallback for a board without a draft model.
    """

    v: Literal[1] = PROTOCOL_VERSION
    session: str = Field(pattern=ID_PATTERN.pattern)
    seq: int = Field(ge=0, le=2**31)
    committed_len: int = Field(ge=0, le=MAX_CONTEXT_TOKENS)
    context: list[TokenId] = Field(default_factory=list, max_length=MAX_CONTEXT_TOKENS)
    generated: int = Field(0, ge=0, le=MAX_CONTEXT_TOKENS)
    params: SamplingParams | None = None
    tokens: list[TokenId] = Field(default_factory=list, max_length=MAX_DRAFT_TOKENS)
    q: list[SparseDist] | None = Field(None, max_length=MAX_DRAFT_TOKENS)
    draft_ms: float = Field(0.0, ge=0.0, le=1e6)
    catch_up_ms: float = Field(0.0, ge=0.0, le=1e6)
    server_decodes: bool = False
    close: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "DraftMessage":
        ids = self.context + self.tokens
        if any(not (0 <= t < MAX_TOKEN_ID) for t in ids):
            raise ValueError("token id out of range")
        if self.q is not None and len(self.q) != len(self.tokens):
            raise ValueError(f"q has {len(self.q)} positions for {len(self.tokens)} drafted tokens")
        if self.context and self.params is None:
            raise ValueError("an open (context given) needs sampling params")
        if self.params is not None:
            _check_temperature(self.params.temperature)
        if self.server_decodes and (not self.context or self.tokens):
            raise ValueError("server_decodes is only valid on an open, without drafted tokens")
        if self.generated > len(self.context):
            raise ValueError("generated exceeds the context length")
        return self

    @property
    def is_open(self) -> bool:
        return bool(self.context)


class VerdictMessage(_Message):
    """Server -> board: what the target made of one draft (or why it refused it)."""

    v: Literal[1] = PROTOCOL_VERSION
    session: str
    seq: int
    server: str
    accepted: int = 0
    tokens: list[TokenId] = Field(default_factory=list)
    committed_len: int = 0
    finished: bool = False
    reason: Literal["eos", "length", "stop"] | None = None
    next_k: int | None = None
    keep_up: bool = True
    error_code: str | None = None
    error: str | None = None


class GenerationRequest(_Message):
    """App -> board (JSON on `R/devices/{device}/requests`)."""

    request_id: str = Field(pattern=ID_PATTERN.pattern)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)

    @field_validator("temperature")
    @classmethod
    def _temperature_is_usable(cls, value: float) -> float:
        return _check_temperature(value)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            stop=tuple(self.stop),
        )


class ResponseStats(_Message):
    tokens: int
    drafted: int
    accepted: int
    verifications: int
    acceptance_rate: float
    mean_accepted: float
    tokens_per_s: float
    elapsed_s: float
    bytes_out: int = 0
    bytes_in: int = 0
    round_trip_ms: float = 0.0  # mean over the round trips: drafts sent that got a verdict
    round_trips: int = 0


class GenerationResponse(_Message):
    """Board -> app: a text delta; the last one has `done` and the stats, or an error."""

    request_id: str | None = None
    seq: int
    delta: str = ""
    done: bool = False
    reason: Literal["eos", "length", "stop", "error"] | None = None
    error: str | None = None
    stats: ResponseStats | None = None
    tokens: list[TokenId] | None = None


class DeviceStatus(_Message):
    """Retained on `R/devices/{device}/status`; the last will sets online false."""

    kind: Literal["device"] = "device"
    id: str
    online: bool
    draft_model: str | None = None
    hardware: str | None = None
    version: str | None = None
    active_requests: int = 0
    tokens_per_s: float = 0.0
    ts: float = 0.0


class ServerStatus(_Message):
    """Retained on `R/servers/{server}/status`; the last will sets online false."""

    kind: Literal["server"] = "server"
    id: str
    online: bool
    target_model: str | None = None
    capacity: int = 0
    sessions: int = 0
    batch_size_avg: float = 0.0
    verify_ms_avg: float = 0.0
    acceptance_rate: float = 0.0
    committed_tokens_per_s: float = 0.0
    version: str | None = None
    ts: float = 0.0
