"""Hostile input on the wire: more than 10,000 generated payloads through the real broker to
the real server (open and draft topics) and a real board (request topic), while honest
boards generate. Nothing stops, the honest outputs stay the target-alone ones, and every
payload refused is accounted for by a log event that names the reason.

Payloads are generated in bulk with hypothesis (raw bytes, msgpack/JSON of arbitrary shapes,
messages with hostile field values, byte mutations of valid messages), then published in
chunks; each chunk ends with a fence the test waits for, so nothing is queued beyond what
the broker and the server hold by design.
"""

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fleet.local import FleetModels, LocalFleet
from fleet.mqtt import FleetClient, make_client
from fleet.protocol import (
    DraftMessage,
    GenerationRequest,
    GenerationResponse,
    ProtocolError,
    Topics,
    decode_draft,
    decode_json,
    encode,
)
from tests.conftest import PROMPTS
from tests.fleet_helpers import Requests, assert_lossless, fleet, retire_agent, wait_until

OPEN_PAYLOADS = 4500
DRAFT_PAYLOADS = 4500
REQUEST_PAYLOADS = 1500
FUZZ_SESSIONS = 8
CHUNK = 400
FUZZER = "board-f"
HONEST = ["board-1", "board-2"]
# One event per message the server or a board takes in (server side: bound to the session).
ADMISSION = {"draft_rejected", "draft_dropped", "draft_repeated", "session_closed_by_board", "session_opened"}
REFUSALS = {"draft_rejected", "draft_dropped", "draft_refused", "message_dropped", "request_rejected", "verdict_rejected"}

# --- payload strategies -----------------------------------------------------------------------
_ints = st.one_of(
    st.integers(-3, 1000), st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**31, 2**31 + 1, 2**24, 383, 384])
)
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 10) | st.sampled_from([0.0, 1e-45, 5e-324])
_text = st.text(max_size=24) | st.sampled_from(["", "s", "../x", "a/b", "+", "#", "$SYS", "x" * 65])
_scalars = st.none() | st.booleans() | _ints | _floats | _text | st.binary(max_size=16)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=12
)
_token_lists = st.lists(_ints, max_size=12) | st.lists(st.integers(0, 383), max_size=70)
_q = st.lists(
    st.fixed_dictionaries({"ids": st.lists(_ints, max_size=4), "probs": st.lists(_floats, max_size=4)}), max_size=6
) | _values
_params = st.fixed_dictionaries(
    {},
    optional={
        "temperature": _floats, "top_k": _ints, "top_p": _floats, "seed": _ints,
        "max_new_tokens": _ints, "stop": st.lists(_text, max_size=9), "bogus": _values,
    },
)


def _draft_fields(session: str) -> st.SearchStrategy[dict]:
    """DraftMessage-shaped maps: plausible keys, values from plausible to hostile."""
    return st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 1, 2, 0, "1"]),
            "session": st.sampled_from([session, session, "other", ""]) | _text,
            "seq": st.integers(0, 6) | _ints,
            "committed_len": st.integers(0, 40) | _ints,
            "context": _token_lists,
            "generated": st.integers(0, 5) | _ints,
            "params": _params | _values,
            "tokens": _token_lists,
            "q": _q,
            "draft_ms": _floats,
            "server_decodes": st.booleans(),
            "close": st.booleans(),
            "extra": _values,
        },
    )


@st.composite
def _schema_valid(draw: st.DrawFn, session: str) -> dict:
    """Maps that mostly pass the schema, with values at its edges (vocabulary, k_max, tiny
    temperatures, seq and committed length off by a little): they reach the session logic
    and the engine, where the hostile payloads that decode end up."""
    tokens = draw(st.lists(st.integers(0, 400), max_size=10))
    message: dict[str, object] = {
        "session": session,
        "seq": draw(st.integers(0, 4)),
        "committed_len": draw(st.integers(0, 12)),
        "draft_ms": draw(st.floats(0, 1e6)),
    }
    if draw(st.booleans()):  # an open
        message["context"] = draw(
            st.lists(st.integers(0, 383), min_size=1, max_size=12)
            | st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=12)
        )
        message["generated"] = draw(st.integers(0, 3))
        message["params"] = draw(st.fixed_dictionaries(
            {
                "max_new_tokens": st.integers(1, 48),
                "temperature": st.sampled_from([0.0, 1e-300, 1e-45, 1e-8, 0.7]) | st.floats(0, 10),
            },
            optional={"top_k": st.integers(0, 2000), "top_p": st.floats(1e-300, 1.0),
                      "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(max_size=4), max_size=3)},
        ))
        if draw(st.booleans()):
            message["server_decodes"], tokens = True, []
    message["tokens"] = tokens
    if draw(st.booleans()):  # q as a sampling board sends it: each drafted token drawn from it
        message["q"] = [
            {"ids": [token, *draw(st.lists(st.integers(0, 400).filter(lambda i, t=token: i != t), max_size=2, unique=True))],
             "probs": None}
            for token in tokens
        ]
        for dist in message["q"]:
            dist["probs"] = [1.0 / len(dist["ids"])] * len(dist["ids"])
    if draw(st.integers(0, 9)) == 0:
        message["close"] = True
    return message


def _packed(data: st.SearchStrategy[object]) -> st.SearchStrategy[bytes]:
    def pack(value: object) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return b"\xc1"  # never valid msgpack
    return data.map(pack)


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid message with bytes flipped, cut or appended."""
    edits = st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=4)

    def apply(args: tuple[list[tuple[int, int]], int, bytes]) -> bytes:
        changes, cut, tail = args
        out = bytearray(valid)
        for where, byte in changes:
            out[where] = byte
        return bytes(out[: max(1, cut)]) + tail
    return st.tuples(edits, st.integers(1, len(valid) + 1), st.binary(max_size=8)).map(apply)


def _draft_payloads(session: str, valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        _packed(_values),
        _packed(_draft_fields(session)),
        _packed(_schema_valid(session)),
        _packed(_schema_valid(session)),
        _mutated(valid),
    )


def _request_payloads(valid: bytes) -> st.SearchStrategy[bytes]:
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "request_id": st.sampled_from(["r1", "", "a/b", "x" * 65]) | _text,
            "prompt": st.sampled_from(["hi", ""]) | _text, "max_new_tokens": _ints,
            "temperature": _floats, "top_p": _floats, "top_k": _ints, "seed": _ints,
            "stop": st.lists(_text, max_size=9), "extra": _values,
        },
    )

    def as_json(value: object) -> bytes:
        return json.dumps(value, default=repr).encode()
    return st.one_of(st.binary(max_size=200), _values.map(as_json), shaped.map(as_json), _mutated(valid))


def generate(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    """`count` payloads drawn by hypothesis in one go (no shrinking: nothing fails here;
    a failure shows in the accounting, which names the payload)."""
    drawn: list[bytes] = []

    @settings(
        max_examples=count, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), derandomize=True,  # the same payloads every run
    )
    @given(strategy)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn


def _addressed(payload: bytes, session: str) -> bytes:
    """Each open goes to its own session topic (so that its answer can be told apart); a
    payload whose session field is the placeholder gets that session, or the server would
    refuse it for the mismatch alone and nothing deeper would be reached."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException):  # not msgpack: sent as generated
        return payload
    if isinstance(data, dict) and data.get("session") == "fz":
        return msgpack.packb({**data, "session": session}, use_bin_type=True)
    return payload


def _draft_code(payload: bytes) -> str | None:
    """What the server's decoder must say of this payload: a refusal code, or None."""
    try:
        decode_draft(payload)
    except ProtocolError as exc:
        return exc.code
    return None


def _request_code(payload: bytes) -> str | None:
    try:
        decode_json(GenerationRequest, payload)
    except ProtocolError as exc:
        return exc.code
    return None


# --- the test ---------------------------------------------------------------------------------
def test_ten_thousand_hostile_payloads(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs, fleet(
        fleet_models, tmp_path, [*HONEST, FUZZER], server={"max_sessions": 64, "idle_timeout_s": 600}
    ) as local:
        retire_agent(local, FUZZER)  # board-f's identity is the fuzzer's
        topics = Topics(local.broker.credentials.topic_root)
        context = local.agents[HONEST[0]].tokenizer.encode(PROMPTS[0]).ids
        params = GenerationRequest(request_id="x", prompt="x", max_new_tokens=1500).sampling()

        def valid_open(session: str) -> bytes:
            return encode(DraftMessage(session=session, seq=0, committed_len=len(context), context=context, params=params), binary=True)

        def valid_draft(session: str) -> bytes:
            return encode(DraftMessage(session=session, seq=1, committed_len=len(context) + 1, tokens=[5, 6]), binary=True)

        sessions = [f"fd-{j}" for j in range(FUZZ_SESSIONS)]
        opens = [_addressed(p, f"fz-{i}") for i, p in enumerate(generate(_draft_payloads("fz", valid_open("fz")), OPEN_PAYLOADS))]
        drafts = {s: generate(_draft_payloads(s, valid_draft(s)), DRAFT_PAYLOADS // FUZZ_SESSIONS) for s in sessions}
        requests = [p for p in generate(_request_payloads(encode(GenerationRequest(request_id="r1", prompt="hi"), binary=False)), REQUEST_PAYLOADS) if _request_code(p)]
        jobs: list[tuple[str, str, bytes]] = [(FUZZER, topics.open(FUZZER, f"fz-{i}"), p) for i, p in enumerate(opens)]
        for n in range(DRAFT_PAYLOADS // FUZZ_SESSIONS):  # interleaved over the sessions
            jobs += [(FUZZER, topics.draft(FUZZER, s), drafts[s][n]) for s in sessions if n < len(drafts[s])]
        jobs += [("app", topics.requests(HONEST[0]), p) for p in requests]
        assert len(jobs) >= 10_000, f"only {len(jobs)} payloads"

        clients = {name: make_client(f"fuzz-{name}", local.broker.settings(name)) for name in (FUZZER, "app")}
        for client in clients.values():
            client.connect_and_wait()
        honest = _HonestLoad(local)
        try:
            for session in sessions:
                clients[FUZZER].publish_confirmed(topics.open(FUZZER, session), valid_open(session))
            wait_until(lambda: _count(logs, "session_opened", lambda e: e.get("session", "").startswith("fd-")) == FUZZ_SESSIONS,
                       30, "the fuzz sessions to open")
            for start in range(0, len(jobs), CHUNK):
                _publish_chunk(clients, jobs[start:start + CHUNK], topics, logs, fence=start)
            outputs = honest.finish()
            # Still up: each honest board answers a fresh request with the target-alone output.
            after = Requests(local, [(device, PROMPTS[3]) for device in HONEST]).results()
        finally:
            honest.finish()
            for client in clients.values():
                client.disconnect()
                client.loop_stop()
        alive = {thread.name: thread.is_alive() for thread in local._threads}
    assert_lossless(honest.jobs, outputs, references)
    assert_lossless([(d, PROMPTS[3]) for d in HONEST], after, references)
    assert all(alive[name] for name in ("server-server-1", *(f"device-{d}" for d in HONEST))), alive
    _check_accounting(logs, opens, drafts, requests)


def _count(logs: list[dict], event: str, where: Callable[[dict], bool] = lambda e: True) -> int:
    return sum(1 for entry in list(logs) if entry["event"] == event and where(entry))


def _publish_chunk(
    clients: dict[str, FleetClient], chunk: list[tuple[str, str, bytes]], topics: Topics, logs: list[dict], fence: int
) -> None:
    """Publish one chunk, then wait until the server and the board have taken all of it in:
    the server answers a malformed open on a fence session after everything before it (one
    client's messages keep their order), and the board logs one refusal per request."""
    requests_before = _count(logs, "request_rejected")
    requests = 0
    for identity, topic, payload in chunk:
        clients[identity].publish(topic, payload, qos=1)
        requests += identity == "app"
    clients[FUZZER].publish_confirmed(topics.open(FUZZER, f"fence-{fence}"), b"\xc1", timeout_s=60)
    wait_until(lambda: _count(logs, "draft_rejected", lambda e: e.get("session") == f"fence-{fence}") == 1,
               120, f"the server to take in the chunk at {fence}")
    wait_until(lambda: _count(logs, "request_rejected") - requests_before == requests,
               120, f"the board to refuse the requests of the chunk at {fence}")


def _check_accounting(
    logs: list[dict], opens: list[bytes], drafts: dict[str, list[bytes]], requests: list[bytes]
) -> None:
    """Every payload is answered by exactly the event its content calls for."""
    errors = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert not errors, f"failures logged: {errors[:3]}"
    unexplained = [e for e in logs if e["event"] in REFUSALS and not e.get("reason")]
    assert not unexplained, f"refusals without a reason: {unexplained[:3]}"
    assert not _count(logs, "message_dropped"), "the server dropped messages"

    admitted: dict[str, list[dict]] = {}
    for entry in logs:
        if entry["event"] in ADMISSION:
            admitted.setdefault(entry.get("session", ""), []).append(entry)
    for i, payload in enumerate(opens):
        events = admitted.get(f"fz-{i}", [])
        assert len(events) == 1, f"open {i} {payload[:40]!r}: {[e['event'] for e in events]}"
        code = _draft_code(payload)
        if code is not None:
            assert (events[0]["event"], events[0].get("code")) == ("draft_rejected", code), (payload[:40], events)

    for session, payloads in drafts.items():
        ended = any(e["event"] in ("session_closed_by_board", "session_finished", "session_evicted")
                    and e.get("session") == session for e in logs)
        expected = Counter(code for code in map(_draft_code, payloads) if code)
        got = Counter(e.get("code") for e in admitted.get(session, []) if e["event"] == "draft_rejected")
        if ended:
            assert got["malformed"] <= expected["malformed"]
        else:
            assert len(admitted.get(session, [])) <= len(payloads) + 1  # + its honest open
            assert got["malformed"] == expected["malformed"], (session, got, expected)
            assert got["invalid"] >= expected["invalid"], (session, got, expected)

    refused = Counter(e.get("code") for e in logs if e["event"] == "request_rejected")
    assert refused == Counter(map(_request_code, requests))


class _HonestLoad:
    """Honest boards keep generating while the fuzz runs; `finish` returns their outputs."""

    def __init__(self, local: LocalFleet) -> None:
        self.jobs: list[tuple[str, str]] = []
        self._outputs: list[GenerationResponse] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(local,), daemon=True)
        self._thread.start()

    def _loop(self, local: LocalFleet) -> None:
        round_ = 0
        while not self._stop.is_set():
            jobs = [(device, PROMPTS[(round_ + i) % len(PROMPTS)]) for i, device in enumerate(HONEST)]
            self._outputs += Requests(local, jobs).results()
            self.jobs += jobs
            round_ += 1

    def finish(self) -> list[GenerationResponse]:
        self._stop.set()
        self._thread.join()
        return self._outputs
