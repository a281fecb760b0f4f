"""The board agent: serves generation requests from IoT apps by drafting locally and having
a verification server commit tokens, streaming the text back as it is committed.

Threads: paho's network thread routes messages (requests to the worker pool, verdicts and
server status to the waiting generation); each generation runs in a worker thread, one
draft -> verdict round at a time.
"""

import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.drafter import DraftBatch, Drafter
from device.runner import DraftRunner
from fleet import __version__
from fleet.config import Settings
from fleet.logging import get_logger
from fleet.metrics import DeviceMetrics
from fleet.mqtt import Will, make_client
from fleet.protocol import (
    DeviceStatus,
    DraftMessage,
    GenerationRequest,
    GenerationResponse,
    ProtocolError,
    ResponseStats,
    ServerStatus,
    Topics,
    VerdictMessage,
    decode_json,
    decode_verdict,
    encode,
)

STATUS_PERIOD_S = 5.0
OPEN_RETRIES = 5
RESYNC_LIMIT = 8


class ServerGone(Exception):
    """The session's server vanished (its will fired, it evicted us, or it went silent)."""


class GenerationFailed(Exception):
    """The request cannot be completed; the message goes back to the app."""


@dataclass
class Reply:
    """Where responses for one request go."""

    topic: str
    correlation: bytes | None


@dataclass
class LiveSession:
    """A session in flight: its verdict mailbox and the server that owns it."""

    session: str
    verdicts: "queue.Queue[tuple[VerdictMessage, int] | None]" = field(default_factory=queue.Queue)
    server: str | None = None


class BoardAgent:
    """One board on the broker; `run()` blocks until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        draft_dir: Path,
        runner_factory: Callable[[], DraftRunner] | None = None,
        metrics: DeviceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device.device_id
        self.topics = Topics(settings.topic_root)
        self.draft_dir = Path(draft_dir)
        probe = (
            runner_factory()
            if runner_factory is not None
            else DraftRunner(self.draft_dir, intra_op_threads=settings.device.draft_threads)
        )
        self._new_runner = runner_factory or probe.fork
        self.tokenizer = probe.tokenizer
        self.draft_name = probe.manifest.name
        self._idle_runners: queue.SimpleQueue[DraftRunner] = queue.SimpleQueue()
        self._idle_runners.put(probe)
        self.log = get_logger(device=self.device_id)
        self.live: dict[str, LiveSession] = {}
        self._lock = threading.Lock()
        self._active = 0
        # Always recorded (cheap); served only when `fleet device --metrics-port` asks.
        self.metrics = metrics or DeviceMetrics()
        self.metrics.track_active(lambda: self._active)
        self._committed_total = 0
        # The k the last verdict suggested to this board. Until a server has suggested one, a
        # session opens without a draft: k_max drafted blind is what an overloaded server can
        # least afford, and the opening verdict already carries the server's k.
        self.last_next_k: int | None = 0
        # Whether the last verdict asked this board to keep its draft cache fed while it waits
        # with no draft out (a new session's open included): no for most of a long hand-over.
        self.last_keep_up = True
        self._started = time.monotonic()
        self._stopping = threading.Event()
        self.pool = ThreadPoolExecutor(
            max_workers=settings.device.max_concurrent_requests, thread_name_prefix="generation",
            initializer=_hold_to_cpus, initargs=(settings.device.draft_cpus,),
        )
        self.client = make_client(
            f"device-{self.device_id}",
            settings.broker,
            will=Will(
                topic=self.topics.device_status(self.device_id),
                # Who this board is survives its death; `ts` stays 0: the time of death is unknown.
                payload=encode(DeviceStatus(
                    id=self.device_id, online=False, draft_model=self.draft_name,
                    hardware=settings.device.hardware, version=__version__,
                ), binary=False),
            ),
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # --- network thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, properties: object) -> None:
        client.subscribe(
            [
                (self.topics.requests(self.device_id), 1),
                (self.topics.device_verdicts(self.device_id), 1),
                (self.topics.all_server_status(), 1),
            ]
        )
        self._publish_status()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            if message.topic == self.topics.requests(self.device_id):
                self._accept_request(message)
            elif message.topic.endswith("/verdict"):
                self._route_verdict(bytes(message.payload))
            elif message.topic.startswith(f"{self.topics.root}/servers/"):
                self._watch_server(bytes(message.payload))
        except Exception:  # an exception here would kill paho's network thread
            self.log.exception("message_handling_failed", topic=message.topic)

    def _accept_request(self, message: mqtt.MQTTMessage) -> None:
        reply = self._reply_for(message)
        try:
            request = decode_json(GenerationRequest, bytes(message.payload))
        except ProtocolError as exc:
            self.log.warning("request_rejected", code=exc.code, reason=exc.detail)
            self.metrics.record_error("request_invalid")
            self._respond(reply, GenerationResponse(
                request_id=_request_id_of(message.payload), seq=0, done=True, reason="error",
                error=f"{exc.code}: {exc.detail}",
            ))
            return
        if reply.topic == self.topics.responses_prefix(self.device_id) + "error":
            reply = Reply(self.topics.response(self.device_id, request.request_id), reply.correlation)
        with self._lock:
            if self._active >= self.settings.device.max_concurrent_requests:
                busy = True
            else:
                busy = False
                self._active += 1
        if busy:
            self.metrics.record_error("busy")
            self._respond(reply, GenerationResponse(
                request_id=request.request_id, seq=0, done=True, reason="error", error="busy: board at capacity"
            ))
            return
        self.pool.submit(self._serve, request, reply)

    def _reply_for(self, message: mqtt.MQTTMessage) -> Reply:
        """The MQTT v5 ResponseTopic when it lies where this board may write, else the
        default response topic (finalised once the request id is known)."""
        props = message.properties
        correlation = getattr(props, "CorrelationData", None) if props else None
        wanted = getattr(props, "ResponseTopic", None) if props else None
        prefix = self.topics.responses_prefix(self.device_id)
        if wanted and wanted.startswith(prefix) and not any(c in wanted for c in "+#"):
            return Reply(wanted, correlation)
        return Reply(prefix + "error", correlation)

    def _route_verdict(self, payload: bytes) -> None:
        try:
            verdict = decode_verdict(payload)
        except ProtocolError as exc:
            self.log.warning("verdict_rejected", code=exc.code, reason=exc.detail)
            return
        live = self.live.get(verdict.session)
        if live is not None:
            live.verdicts.put((verdict, len(payload)))

    def _watch_server(self, payload: bytes) -> None:
        try:
            status = decode_json(ServerStatus, payload)
        except ProtocolError:
            return
        if status.online:
            return
        for live in list(self.live.values()):
            if live.server == status.id:
                live.verdicts.put(None)  # wakes the generation: its server is gone

    # --- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        self.client.connect_and_wait()
        self.log.info("device_started", draft=self.draft_name)
        try:
            while not self._stopping.wait(STATUS_PERIOD_S):
                self._publish_status()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._publish_status(online=False)
            self.client.disconnect()
            self.client.loop_stop()
            self.log.info("device_stopped")

    def stop(self) -> None:
        self._stopping.set()

    def _publish_status(self, online: bool = True) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        status = DeviceStatus(
            id=self.device_id,
            online=online,
            draft_model=self.draft_name,
            hardware=self.settings.device.hardware,
            version=__version__,
            active_requests=self._active,
            tokens_per_s=self._committed_total / elapsed,
            ts=time.time(),
        )
        self.client.publish(self.topics.device_status(self.device_id), encode(status, binary=False), qos=1, retain=True)

    # --- one generation (worker thread) ----------------------------------------------------
    def _serve(self, request: GenerationRequest, reply: Reply) -> None:
        runner = self._take_runner()
        try:
            with structlog.contextvars.bound_contextvars(device=self.device_id, request=request.request_id):
                Generation(self, request, reply, runner).run()
        except Exception:
            self.log.exception("generation_crashed", request=request.request_id)
            self.metrics.record_error("crashed")
            self._respond(reply, GenerationResponse(
                request_id=request.request_id, seq=0, done=True, reason="error", error="internal error on the board"
            ))
        finally:
            self._idle_runners.put(runner)
            with self._lock:
                self._active -= 1

    def _take_runner(self) -> DraftRunner:
        try:
            return self._idle_runners.get_nowait()
        except queue.Empty:
            return self._new_runner()

    def _respond(self, reply: Reply, response: GenerationResponse) -> None:
        props = None
        if reply.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = reply.correlation
        self.client.publish(reply.topic, encode(response, binary=False), qos=1, properties=props)


class Generation:
    """One request: draft, send, apply the verdict, stream the new text; resync on loss."""

    def __init__(self, agent: BoardAgent, request: GenerationRequest, reply: Reply, runner: DraftRunner) -> None:
        self.agent = agent
        self.request = request
        self.reply = reply
        self.params = request.sampling()
        cfg = agent.settings.device
        self.drafter = Drafter(runner, k_max=cfg.k_max, threshold=cfg.threshold, top_k=cfg.top_k)
        self.rng = np.random.default_rng(self.params.seed)
        self.log = agent.log.bind(request=request.request_id)
        self.prompt = agent.tokenizer.encode(request.prompt).ids
        self.generated: list[int] = []
        self.sent_text = ""
        self.seq_out = 0
        self.drafted = self.accepted = self.verifications = 0
        self.bytes_out = self.bytes_in = 0
        self.round_trip_s = 0.0
        self.round_trips = 0
        # A new session's first draft follows the servers' latest suggestion to this board.
        self.next_k: int | None = agent.last_next_k
        self.keep_up = agent.last_keep_up
        self.draft_ms = 0.0
        self.catch_up_ms = 0.0

    def run(self) -> None:
        started = time.monotonic()
        if not self.prompt:
            raise GenerationFailed("prompt encodes to no tokens")
        if not self.agent.settings.device.server_decodes:
            self.drafter.start(self.prompt)
        resyncs = 0
        reason: str | None = None
        try:
            while reason is None:
                try:
                    reason = self._session_rounds()
                except ServerGone as gone:
                    resyncs += 1
                    self.agent.metrics.record_error("resync")
                    self.log.warning("session_resync", reason=str(gone), committed=len(self.generated))
                    if resyncs > RESYNC_LIMIT:
                        raise GenerationFailed(f"no server kept the session: {gone}") from gone
        except GenerationFailed as exc:
            self._emit(done=True, reason="error", error=str(exc))
            self.agent.metrics.record_error("failed")
            self.log.warning("request_failed", reason=str(exc))
            return
        elapsed = time.monotonic() - started
        stats = ResponseStats(
            tokens=len(self.generated),
            drafted=self.drafted,
            accepted=self.accepted,
            verifications=self.verifications,
            acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
            mean_accepted=self.accepted / self.verifications if self.verifications else 0.0,
            tokens_per_s=len(self.generated) / elapsed if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
            bytes_out=self.bytes_out,
            bytes_in=self.bytes_in,
            round_trip_ms=1000 * self.round_trip_s / self.round_trips if self.round_trips else 0.0,
            round_trips=self.round_trips,
        )
        self._emit(done=True, reason=reason, stats=stats, tokens=list(self.generated))
        self.log.info(
            "request_done", reason=reason, tokens=len(self.generated),
            acceptance=round(stats.acceptance_rate, 3), pipelined=self.drafter.carried_total,
        )

    def _session_rounds(self) -> str:
        """Open a fresh session with the whole committed context and run draft/verdict
        rounds until the generation finishes; raises ServerGone to resync."""
        live = LiveSession(session=uuid.uuid4().hex[:16])
        self.agent.live[live.session] = live
        try:
            with structlog.contextvars.bound_contextvars(session=live.session):
                return self._rounds(live)
        except ServerGone:
            self._abandon(live)
            raise
        finally:
            self.agent.live.pop(live.session, None)

    def _abandon(self, live: LiveSession) -> None:
        """Tell a server that may still hold the session to drop it: a slow but living server
        must not keep verifying (and holding memory for) a session the board has left."""
        close = DraftMessage(session=live.session, seq=2**31, committed_len=0, close=True)
        self.agent.client.publish(self.agent.topics.draft(self.agent.device_id, live.session), encode(close, binary=True), qos=1)

    def _rounds(self, live: LiveSession) -> str:
        if self.agent.settings.device.server_decodes:
            return self._server_decoded_rounds(live)
        seq = 0
        while True:
            batch = self._draft()
            try:
                verdict = self._exchange(live, seq, self._message(live, seq, batch))
            except BaseException:
                self.drafter.discard()
                raise
            live.server = verdict.server
            self._apply(batch, verdict)
            while not verdict.finished and verdict.next_k == 0:
                # Speculation does not pay at the server's load: it decodes the next token
                # itself and pushes the verdict, until it suggests drafting again.
                seq += 1
                verdict = self._pushed(live, seq)
            if verdict.finished:
                return verdict.reason or "eos"
            seq += 1

    def _server_decoded_rounds(self, live: LiveSession) -> str:
        """No drafting: the server decodes every token and sends one verdict per step."""
        opening = DraftMessage(
            session=live.session,
            seq=0,
            committed_len=len(self.prompt) + len(self.generated),
            context=self.prompt + self.generated,
            generated=len(self.generated),
            params=self.params,
            server_decodes=True,
        )
        verdict = self._exchange(live, 0, opening)
        live.server = verdict.server
        self._apply(None, verdict)
        seq = 0
        while not verdict.finished:
            seq += 1
            verdict = self._pushed(live, seq)
        return verdict.reason or "eos"

    def _pushed(self, live: LiveSession, seq: int) -> VerdictMessage:
        """Apply the verdict the server sends unasked for a token it decoded itself."""
        verdict = self._await(live, seq)
        if verdict.error_code is not None:
            raise ServerGone(f"{verdict.error_code}: {verdict.error}")
        live.server = verdict.server
        self._apply(None, verdict)
        return verdict

    def _message(self, live: LiveSession, seq: int, batch: DraftBatch) -> DraftMessage:
        """seq 0 opens the session and carries the whole committed context."""
        opening = seq == 0
        return DraftMessage(
            session=live.session,
            seq=seq,
            committed_len=len(self.prompt) + len(self.generated),
            context=self.prompt + self.generated if opening else [],
            generated=len(self.generated) if opening else 0,
            params=self.params if opening else None,
            tokens=list(batch.tokens),
            q=list(batch.q) if batch.q is not None else None,
            draft_ms=self.draft_ms,
            catch_up_ms=self.catch_up_ms,
        )

    def _exchange(self, live: LiveSession, seq: int, message: DraftMessage) -> VerdictMessage:
        """Publish and wait for the verdict. A busy answer to an open is retried with
        back-off (another server, or a freed slot, may take it); other errors resync."""
        topics, device = self.agent.topics, self.agent.device_id
        topic = topics.open(device, live.session) if seq == 0 else topics.draft(device, live.session)
        payload = encode(message, binary=True)
        for attempt in range(1, OPEN_RETRIES + 1):
            sent = time.perf_counter()
            self.agent.client.publish(topic, payload, qos=1)
            self.bytes_out += len(payload)
            verdict = self._await(live, seq)
            round_trip_s = time.perf_counter() - sent
            self.round_trip_s += round_trip_s
            self.round_trips += 1
            self.agent.metrics.record_round_trip(round_trip_s)
            if verdict.error_code != "busy" or seq != 0:
                break
            time.sleep(0.5 * attempt)
        else:
            raise GenerationFailed("busy: every verification server is at capacity")
        if verdict.error_code is not None:
            raise ServerGone(f"{verdict.error_code}: {verdict.error}")
        return verdict

    def _draft(self) -> DraftBatch:
        """Draft, then, when emulating a board slower than this machine, wait out the rest of
        the emulated step time so the server sees the board's real pace. Tokens drafted
        ahead (pipelining) were paced while they were drafted. Catching the draft cache up
        (a new session's context, tokens the server decoded alone) comes first and is not
        timed: `draft_ms` tells the server the cost of a drafted token, not of a one-off."""
        started = time.perf_counter()
        if self.next_k != 0:
            self.drafter.catch_up()
        self.catch_up_ms = 1000 * (time.perf_counter() - started)
        started = time.perf_counter()
        batch = self.drafter.draft(self.next_k, self.params, self.rng)
        time.sleep(self._emulated_left(started, batch.fresh))
        if batch.fresh:
            self.draft_ms = 1000 * (time.perf_counter() - started) / batch.fresh
        return batch

    def _emulated_left(self, started: float, tokens: int) -> float:
        """Seconds an emulated board still needs for `tokens` drafted since `started` (0 when
        drafting at this machine's speed)."""
        emulated_ms = self.agent.settings.device.emulated_step_ms
        if emulated_ms is None:
            return 0.0
        return max(0.0, emulated_ms * tokens / 1000 - (time.perf_counter() - started))

    def _await(self, live: LiveSession, seq: int) -> VerdictMessage:
        """The verdict for round `seq`; with pipelining, drafting ahead while it is in flight."""
        device = self.agent.settings.device
        deadline = time.monotonic() + device.verdict_timeout_s
        ahead = device.pipeline and not device.server_decodes
        if self.keep_up:
            self.drafter.keep_up()  # with no draft out, the wait is the cheapest time for it
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerGone("no verdict within the timeout")
            wait, drafting = remaining, False
            started = time.perf_counter()
            if ahead and self.drafter.draft_ahead(self.params, self.rng):
                wait, drafting = min(remaining, self._emulated_left(started, 1)), True
            try:
                item = live.verdicts.get(timeout=wait) if wait > 0 else live.verdicts.get_nowait()
            except queue.Empty:
                continue
            if drafting and wait > 0:
                self.drafter.drop_last_ahead()  # the emulated board had not finished that token
            if item is None:
                raise ServerGone(f"server {live.server} went offline")
            verdict, size = item
            self.bytes_in += size
            if verdict.seq == seq or (verdict.seq == -1 and verdict.error_code is not None):
                return verdict
            # A repeated verdict of an earlier round (QoS 1 redelivery): already applied.

    def _apply(self, batch: DraftBatch | None, verdict: VerdictMessage) -> None:
        drafted = len(batch.tokens) if batch is not None else 0
        self.verifications += 1
        self.drafted += drafted
        self.accepted += verdict.accepted
        self.agent.metrics.record_verdict(
            drafted, verdict.accepted, len(verdict.tokens), drafted - batch.fresh if batch is not None else 0
        )
        self.next_k = self.agent.last_next_k = verdict.next_k
        self.keep_up = self.agent.last_keep_up = verdict.keep_up
        self.generated.extend(verdict.tokens)
        with self.agent._lock:
            self.agent._committed_total += len(verdict.tokens)
        if not verdict.finished and verdict.tokens and not self.agent.settings.device.server_decodes:
            if batch is None:
                self.drafter.follow(verdict.tokens)
            else:
                self.drafter.commit(verdict.accepted, verdict.tokens[-1])
        self._stream()

    def _stream(self) -> None:
        text = self.agent.tokenizer.decode(self.generated)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is still incomplete: send it when it is whole
        delta = text[len(self.sent_text):]
        if delta:
            self.sent_text = text
            self._emit(delta=delta)

    def _emit(self, **fields: object) -> None:
        if fields.get("done"):
            text = self.agent.tokenizer.decode(self.generated)
            fields.setdefault("delta", text[len(self.sent_text):])
        self.agent._respond(self.reply, GenerationResponse(request_id=self.request.request_id, seq=self.seq_out, **fields))
        self.seq_out += 1


def _hold_to_cpus(cpus: list[int] | None) -> None:
    """Hold the calling thread (a generation worker, which drafts) to `cpus`. On Linux the CPU
    set belongs to the thread, so the board's MQTT thread keeps the process's."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _request_id_of(payload: bytes) -> str | None:
    """Best effort: the request id of a request that failed validation, for the app's sake."""
    try:
        value = json.loads(payload).get("request_id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and len(value) <= 64 else None
