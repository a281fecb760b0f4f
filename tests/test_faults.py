"""Faults of a normal day, injected in the middle of generations over a real Mosquitto:
the broker restarts, a server crashes (with a second one running, and restarted), a board
loses power, drafts and verdicts arrive twice, late or out of order. Every request must end
with exactly the target-alone tokens."""

import contextlib
import signal
import threading
import time
from pathlib import Path

import structlog

from fleet.app import GenerationTimeout
from fleet.local import FleetModels
from fleet.mqtt import make_client
from fleet.protocol import (
    DraftMessage,
    GenerationRequest,
    Topics,
    decode_verdict,
    encode,
)
from fleet.status import collect_status
from tests.conftest import NEW_TOKENS, PROMPTS
from tests.fleet_helpers import (
    SLOW_STEP_MS,
    Requests,
    assert_lossless,
    crash_server,
    fleet,
    retire_agent,
    spawn_board,
    wait_until,
)

SLOW = {"emulated_step_ms": SLOW_STEP_MS}


def _resyncs(logs: list[dict]) -> list[str]:
    return [entry["reason"] for entry in logs if entry["event"] == "session_resync"]


def test_broker_restart_mid_generation(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """The broker crashes (SIGKILL: no persistence, every session and retained message gone)
    and comes back on the same port a second later while four sessions run: clients reconnect
    by themselves, server, boards and app renew their subscriptions, and what was in flight
    is either re-sent by paho (QoS 1, the server answers a repeat from its cache) or, if it
    was lost, recovered by the board's resync (a new session with the whole committed
    context) after the verdict timeout."""
    jobs = [("board-1", PROMPTS[0]), ("board-1", PROMPTS[1]), ("board-2", PROMPTS[2]), ("board-2", PROMPTS[3])]
    with fleet(fleet_models, tmp_path, ["board-1", "board-2"], device=SLOW) as local:
        requests = Requests(local, jobs)
        requests.wait_started()
        local.broker.process.kill()
        time.sleep(1.0)  # down long enough for reconnect attempts to fail and publishes to queue
        local.broker.process.start()
        responses = requests.results()
        after_restart = local.broker.process.log_file.read_text().rsplit("running", 1)[1]
    assert_lossless(jobs, responses, references)
    for client_id in ("server-server-1", "device-board-1", "device-board-2"):
        assert f"as {client_id} " in after_restart, f"{client_id} did not reconnect"


def test_server_crash_with_a_second_server_running(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Two servers share the opens; the one owning sessions crashes. Its will (status offline)
    makes each affected board re-open on the survivor, which finishes every generation."""
    jobs = [("board-1", PROMPTS[4]), ("board-1", PROMPTS[5]), ("board-2", PROMPTS[6]), ("board-2", PROMPTS[7])]
    with structlog.testing.capture_logs() as logs, fleet(
        fleet_models, tmp_path, ["board-1", "board-2"], servers=["server-1", "server-2"], device=SLOW
    ) as local:
        requests = Requests(local, jobs)
        requests.wait_started()
        victim = max(local.services, key=lambda sid: len(local.services[sid].routes))
        assert local.services[victim].routes, "no server owned a session"
        crash_server(local, victim)
        responses = requests.results()
        survivor = next(sid for sid in local.services if sid != victim)
        # The last verdict goes out just before the server closes the session.
        wait_until(lambda: not local.services[survivor].routes, 5, "the survivor to close every session")
    assert_lossless(jobs, responses, references)
    assert any("went offline" in reason for reason in _resyncs(logs)), _resyncs(logs)


def test_server_crash_and_restart(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """The only server crashes and a new process of it starts (empty engine): boards retry
    their opens until it is back, then finish with identical outputs."""
    jobs = [("board-1", PROMPTS[8]), ("board-1", PROMPTS[9]), ("board-2", PROMPTS[10])]
    with structlog.testing.capture_logs() as logs, fleet(fleet_models, tmp_path, ["board-1", "board-2"], device=SLOW) as local:
        requests = Requests(local, jobs)
        requests.wait_started()
        crash_server(local, "server-1")
        time.sleep(1.0)  # down for a while: opens sent now reach no server
        restarted = local.start_server("server-1")
        responses = requests.results()
        assert restarted.stats.batches, "the restarted server verified nothing"
    assert_lossless(jobs, responses, references)
    assert _resyncs(logs)


def test_killed_board_is_offline_and_its_session_freed(
    fleet_models: FleetModels, tmp_path: Path
) -> None:
    """A board process loses power mid-generation (SIGKILL). Its will marks it offline in the
    fleet status at once, and the server evicts the session within the idle timeout, giving
    back every KV byte the session held."""
    idle_timeout_s = 3.0
    with fleet(fleet_models, tmp_path, ["board-1", "board-9"], server={"idle_timeout_s": idle_timeout_s}) as local:
        # board-9 runs as its own process, so that it can be killed like a real board.
        retire_agent(local, "board-9")
        engine = local.services["server-1"].engine
        bytes_before, sessions_before = engine.total_bytes, len(engine.sessions)
        board = spawn_board(local, "board-9", tmp_path / "credentials.json", {"FLEET_DEVICE__EMULATED_STEP_MS": "200"})
        try:
            local.wait_online(set(), {"board-9"})
            request = GenerationRequest(request_id="doomed", prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS)

            def doomed() -> None:
                # The board dies with the request: the app gives up (the board would not).
                with contextlib.suppress(GenerationTimeout):
                    local.app.generate("board-9", request, timeout_s=5)

            asker = threading.Thread(target=doomed, daemon=True)
            asker.start()
            wait_until(lambda: len(engine.sessions) > sessions_before, 30, "the board's session to open")
            assert engine.total_bytes > bytes_before
        finally:
            board.send_signal(signal.SIGKILL)
            board.wait()
        killed = time.monotonic()
        status = collect_status(local.broker.settings("ops"), Topics(local.broker.credentials.topic_root))
        row = next(d for d in status.devices if d.id == "board-9")
        assert not row.online, "the killed board still shows online"
        wait_until(lambda: len(engine.sessions) == sessions_before, idle_timeout_s + 5, "the session to be evicted")
        freed_after = time.monotonic() - killed
        assert engine.total_bytes == bytes_before
        assert not local.services["server-1"].routes
        asker.join()
    assert freed_after <= idle_timeout_s + 2, f"freed after {freed_after:.1f} s"


def test_replayed_and_out_of_order_drafts_are_never_verified_twice(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """A raw board client walks a greedy session with empty drafts (each verdict commits the
    target's next token) and, at every step, also replays the draft (a QoS 1 redelivery),
    replays an older one, sends one from the future and one whose committed length differs
    from the server's. Replays get the cached verdict byte for byte, old seqs are dropped,
    future and astray ones refused, the engine verifies each seq once, and the committed
    tokens are exactly the target-alone ones."""
    prompt = PROMPTS[1]
    with structlog.testing.capture_logs() as logs, fleet(fleet_models, tmp_path, ["board-1", "board-r"]) as local:
        retire_agent(local, "board-r")
        topics = Topics(local.broker.credentials.topic_root)
        service = local.services["server-1"]
        verifications = _count_calls(service.engine, "verify")
        verdicts: list[bytes] = []
        arrived = threading.Condition()

        def on_message(client: object, userdata: object, message: object) -> None:
            with arrived:
                verdicts.append(bytes(message.payload))
                arrived.notify_all()

        raw = make_client("raw-board-r", local.broker.settings("board-r"))
        raw.on_message = on_message
        raw.connect_and_wait()
        raw.subscribe(topics.device_verdicts("board-r"), qos=1)
        time.sleep(0.2)

        def exchange(topic: str, messages: list[DraftMessage], replies: int) -> list[bytes]:
            """Publish in order (the broker and the server keep the order) and take the
            next `replies` verdicts."""
            with arrived:
                start = len(verdicts)
            for message in messages:
                raw.publish_confirmed(topic, encode(message, binary=True))
            with arrived:
                assert arrived.wait_for(lambda: len(verdicts) >= start + replies, timeout=10), "no verdict"
                return verdicts[start:start + replies]

        context = local.agents["board-1"].tokenizer.encode(prompt).ids
        params = GenerationRequest(request_id="x", prompt=prompt, max_new_tokens=NEW_TOKENS).sampling()
        session = "replayed"
        draft_topic = topics.draft("board-r", session)
        opening = DraftMessage(session=session, seq=0, committed_len=len(context), context=context, params=params)
        (first,) = exchange(topics.open("board-r", session), [opening], replies=1)
        committed = list(decode_verdict(first).tokens)
        older, seq = opening, 0
        while True:
            seq += 1
            step = DraftMessage(session=session, seq=seq, committed_len=len(context) + len(committed))
            # Exactly one verdict, for this seq: had the older draft below been answered, its
            # reply would have been taken here and failed the check.
            (payload,) = exchange(draft_topic, [step], replies=1)
            verdict = decode_verdict(payload)
            assert verdict.seq == seq and verdict.error_code is None, verdict
            committed += verdict.tokens
            if verdict.finished:
                break
            # Redelivery of this draft, an older one, one from the future, and the next one
            # drafted on another history (a committed length the server does not have).
            future = step.model_copy(update={"seq": seq + 5})
            astray = step.model_copy(update={"seq": seq + 1, "committed_len": step.committed_len - 1})
            replay, *refused = exchange(draft_topic, [step, older, future, astray], replies=3)
            assert replay == payload, "a repeated draft must get the cached verdict"
            assert [decode_verdict(r).error_code for r in refused] == ["out_of_order", "invalid"]
            older = step
        time.sleep(0.3)
        extra = verdicts[-1] != payload
        raw.disconnect()
        raw.loop_stop()
    assert not extra, "a verdict arrived after the session finished"
    assert committed == references[prompt]
    assert verifications.count == seq + 1, f"{verifications.count} verifications for {seq + 1} seqs"
    assert sum(entry["event"] == "draft_repeated" for entry in logs) == seq - 1
    assert sum(entry["event"] == "draft_dropped" for entry in logs) == seq - 1


class _CallCounter:
    def __init__(self) -> None:
        self.count = 0


def _count_calls(obj: object, name: str) -> _CallCounter:
    """Count the calls of one method (the real one still runs)."""
    counter = _CallCounter()
    real = getattr(obj, name)

    def counted(*args: object, **kwargs: object) -> object:
        counter.count += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return counter


def test_duplicated_and_late_verdicts_are_applied_once(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Every verdict the server sends reaches the board twice, the copy half a second late
    (QoS 1 redelivery after a lost PUBACK, a slow path): boards apply each one once and the
    outputs are the target-alone ones."""
    jobs = [("board-1", PROMPTS[2]), ("board-2", PROMPTS[3])]
    with fleet(fleet_models, tmp_path, ["board-1", "board-2"]) as local:
        service = local.services["server-1"]
        publish = service.client.publish
        copies: list[threading.Timer] = []

        def twice(topic: str, payload: bytes = b"", *args: object, **kwargs: object) -> object:
            info = publish(topic, payload, *args, **kwargs)
            if topic.endswith("/verdict"):
                publish(topic, payload, *args, **kwargs)
                late = threading.Timer(0.5, publish, (topic, payload, *args), kwargs)
                late.start()
                copies.append(late)
            return info

        service.client.publish = twice
        requests = Requests(local, jobs)
        responses = requests.results()
        for late in copies:
            late.join()
    assert_lossless(jobs, responses, references)
    assert copies, "no verdict was duplicated"
    for response in responses:
        assert response.stats is not None
        assert response.stats.tokens == NEW_TOKENS


def test_engine_failure_costs_the_batch_not_the_server(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """A failure inside the engine that it does not turn into error verdicts (an injected
    bug: verify raises twice) ends only the sessions of that batch: their boards get an
    `internal` error, re-open with their whole context and finish; the server keeps running."""
    jobs = [("board-1", PROMPTS[4]), ("board-2", PROMPTS[5])]
    with structlog.testing.capture_logs() as logs, fleet(fleet_models, tmp_path, ["board-1", "board-2"], device=SLOW) as local:
        engine = local.services["server-1"].engine
        verify = engine.verify
        failures = [RuntimeError("injected: verification blew up")] * 2

        def failing(*args: object, **kwargs: object) -> object:
            if failures and len(engine.sessions) == len(jobs):
                raise failures.pop()
            return verify(*args, **kwargs)

        engine.verify = failing
        responses = Requests(local, jobs).results()
        alive = local._threads[0].is_alive()
    assert_lossless(jobs, responses, references)
    assert not failures and alive
    assert sum(entry["event"] == "batch_failed" for entry in logs) == 2
    assert any("internal" in reason for reason in _resyncs(logs))
