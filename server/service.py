"""The verification service: MQTT in, one batched verification, verdicts out.

Threads: paho's network thread only enqueues raw messages (a callback that raised would kill
it). One scheduler thread owns the engine: it drains everything pending, waits up to the batch
window for more while the batch is short, decodes and validates, opens new sessions, verifies
all ready drafts in one forward pass, and publishes the verdicts.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import structlog

from fleet import __version__
from fleet.config import Settings
from fleet.logging import get_logger
from fleet.metrics import ServerMetrics
from fleet.mqtt import Will, make_client
from fleet.protocol import (
    DraftMessage,
    ProtocolError,
    ServerStatus,
    Topics,
    VerdictMessage,
    decode_draft,
    decode_json,
    encode,
)
from server.engine import DraftProposal, Engine, Verdict
from server.speculation import make_policy, round_trip_s

STATUS_PERIOD_S = 5.0
# Messages received but not yet taken by the scheduler. Normally a batch's worth; a flood (a
# hostile board, a burst of resyncs after a fault) beyond this is dropped and logged rather
# than held in memory: the boards concerned time out and resync.
INBOX_LIMIT = 1024
# Holding a batch for drafts due soon (see `_due_by`): the median pass over the last
# HOLD_PASSES passes prices the hold; a due draft may be this much later than estimated.
HOLD_PASSES = 8
HOLD_SLACK = 0.1


@dataclass
class Inbound:
    topic: str
    payload: bytes
    received: float


@dataclass
class Route:
    """What the service knows of one session beyond the engine: where verdicts go, and the
    last verdict, which answers a repeated seq without verifying twice."""

    device: str
    session: str
    last_seq: int = -1
    last_verdict: bytes = b""
    committed_len: int = 0
    last_active: float = field(default_factory=time.monotonic)
    server_decodes: bool = False
    # The last verdict suggested k = 0: speculation does not pay at this load, so the server
    # decodes the session's next tokens itself (pushing verdicts, no round trip) until the
    # policy suggests drafting again.
    pushing: bool = False
    # Told to draft again after pushed verdicts: its first draft comes out of step with the
    # pace the policy knows (the board catches its cache up, and every board handed back
    # drafts at once), so it may be up to a pass later (`_due_by`).
    returning: bool = False
    # For the speculation policy's round-trip estimate (this server's monotonic clock).
    verdict_sent_at: float | None = None
    draft_received_at: float = 0.0

    @property
    def key(self) -> str:
        return session_key(self.device, self.session)

    @property
    def decoded_here(self) -> bool:
        """The server decodes the next token without waiting for a draft."""
        return self.server_decodes or self.pushing


def session_key(device: str, session: str) -> str:
    """Engine-wide session id: the device is part of it, so equal session ids from two
    boards never meet (the broker's ACL guarantees the device level of the topic)."""
    return f"{device}/{session}"


class ServiceStats:
    """Rolling figures for the status topic."""

    def __init__(self, window: int = 64) -> None:
        self.batches: deque[tuple[float, int, float, int, int, int]] = deque(maxlen=window)

    def record(self, batch_size: int, verify_s: float, drafted: int, accepted: int, committed: int) -> None:
        self.batches.append((time.monotonic(), batch_size, verify_s, drafted, accepted, committed))

    def summary(self) -> dict[str, float]:
        if not self.batches:
            return {"batch_size_avg": 0.0, "verify_ms_avg": 0.0, "acceptance_rate": 0.0, "committed_tokens_per_s": 0.0}
        n = len(self.batches)
        drafted = sum(b[3] for b in self.batches)
        span = max(self.batches[-1][0] - self.batches[0][0], sum(b[2] for b in self.batches), 1e-9)
        return {
            "batch_size_avg": sum(b[1] for b in self.batches) / n,
            "verify_ms_avg": 1000 * sum(b[2] for b in self.batches) / n,
            "acceptance_rate": sum(b[4] for b in self.batches) / drafted if drafted else 0.0,
            "committed_tokens_per_s": sum(b[5] for b in self.batches) / span,
        }


class VerificationService:
    """One verification server on the broker; `run()` blocks until `stop()`."""

    def __init__(
        self, settings: Settings, engine: Engine, target_name: str, metrics: ServerMetrics | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.target_name = target_name
        self.server_id = settings.server.server_id
        self.topics = Topics(settings.topic_root)
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=INBOX_LIMIT)
        self.routes: dict[str, Route] = {}
        self.stats = ServiceStats()
        self.speculation = make_policy(settings.server.speculation, engine.k_max)
        # Seconds spent prefilling opened sessions since the last pass (the k policy leaves
        # them out of what rounds delivered: every request pays them once).
        self._prefill_s = 0.0
        # Whether this server is in the shared subscription that claims opens (see
        # _update_claiming); read by the network thread on reconnect.
        self._claiming = True
        # Other servers that last said they are online with room for a session.
        self._peers_with_room: set[str] = set()
        # Always recorded (cheap); served only when `fleet serve --metrics-port` asks.
        self.metrics = metrics or ServerMetrics()
        self.metrics.track_load(sessions=lambda: len(self.routes), queue_depth=self.inbox.qsize)
        self.log = get_logger(server=self.server_id)
        self._stopping = threading.Event()
        self._last_status = 0.0
        self.client = make_client(
            f"server-{self.server_id}",
            settings.broker,
            will=Will(
                topic=self.topics.server_status(self.server_id),
                payload=encode(ServerStatus(
                    id=self.server_id, online=False, target_model=target_name,
                    capacity=settings.server.max_sessions, version=__version__,
                ), binary=False),
            ),
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # --- network thread: enqueue only ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, properties: object) -> None:
        """Subscriptions are renewed on every (re)connect: Mosquitto 2.0.11 does not restore
        shared subscriptions of a resumed session, and a clean start has none."""
        if self._claiming:
            client.subscribe(self._shared_opens, qos=1)
        client.subscribe(self.topics.all_server_status(), qos=1)
        for route in list(self.routes.values()):
            client.subscribe(self.topics.draft(route.device, route.session), qos=1)
        self._last_status = 0.0  # publish a fresh status from the scheduler soon

    @property
    def _shared_opens(self) -> str:
        return self.topics.all_opens_shared(self.settings.server.share_group.get_secret_value())

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self.inbox.put_nowait(Inbound(message.topic, bytes(message.payload), time.monotonic()))
        except queue.Full:
            self.log.warning("message_dropped", topic=message.topic, reason=f"inbox full ({INBOX_LIMIT} waiting)")

    # --- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        self.client.connect_and_wait()
        self.log.info("server_started", target=self.target_name, k_max=self.engine.k_max)
        if "share_group" not in self.settings.server.model_fields_set:
            self.log.info("share_group_generated", note="a multi-server fleet must set server.share_group on every server")
        try:
            while not self._stopping.is_set():
                decoding = [r for r in self.routes.values() if r.decoded_here]
                proposals = self._admit_all(self._collect(block=not decoding))
                self._add_server_decoding(proposals)
                if proposals:
                    self._verify(proposals)
                self._housekeeping()
        finally:
            self._publish_status(online=False)
            self.client.disconnect()
            self.client.loop_stop()
            self.log.info("server_stopped")

    def stop(self) -> None:
        self._stopping.set()

    # --- scheduler thread -------------------------------------------------------------------
    def _collect(self, block: bool) -> list[Inbound]:
        """Block briefly for the first message (unless sessions decoded by the server are
        waiting: then only as long as drafts are due soon, so that those sessions share the
        drafting sessions' pass), then take whatever else is pending; while drafting sessions
        are missing, wait up to the window for more, and longer for drafts due soon
        (`_due_by`)."""
        wait = 0.2 if block else self._due_by([]) - time.monotonic()
        try:
            batch = [self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()]
        except queue.Empty:
            return []
        window_ends = time.monotonic() + self.settings.server.batch_window_ms / 1000
        while True:
            try:
                batch.append(self.inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            drafting = sum(1 for route in self.routes.values() if not route.decoded_here)
            if len(batch) >= max(1, drafting):
                return batch
            remaining = max(window_ends, self._due_by(batch)) - time.monotonic()
            if remaining <= 0:
                return batch
            try:
                batch.append(self.inbox.get(timeout=remaining))
            except queue.Empty:
                return batch

    def _due_by(self, batch: list[Inbound]) -> float:
        """When the last draft worth holding the next pass for should arrive (0 if none).

        A draft that misses a pass waits for the whole pass to end and then needs a pass of its
        own: holding the pass for it instead costs the sessions already in hand only the wait.
        While passes cost about the same whatever their size (memory-bound), holding for w
        seconds costs each of the H sessions in hand w, and saves each of the J drafts due by
        then about 2V - w (V: the median recent pass: the rest of the pass it missed and a pass
        of its own), so the hold pays while H * w < J * (2V - w), i.e. w < 2V * J / (H + J):
        up to a whole pass when two equal cohorts would otherwise alternate passes, less for
        one late board among many. Where the server also decodes sessions alone, passes
        follow one another anyway and a late draft joins the next: it saves V - w. Taking
        the latest due draft that still pays keeps the sessions in one cohort, round after
        round. A draft later than expected by more than the window's slack is not waited for,
        except the first draft of a session handed back from the server's own decoding: once
        overdue, it is expected up to a pass later than its pace says. When 32 emulated boards
        were asked to draft again at once, their drafts came in over 2.3 s, and three
        one-session passes of about 0.6 s each went by before the rest of the cohort joined."""
        recent = [record[2] for record in list(self.stats.batches)[-HOLD_PASSES:]]
        if not recent:
            return 0.0
        now = time.monotonic()
        pass_s = sorted(recent)[len(recent) // 2]
        slack = self.settings.server.batch_window_ms / 1000
        arrived = {item.topic for item in batch}
        decoded_here = 0
        expected: list[float] = []
        for route in self.routes.values():
            if route.decoded_here:
                decoded_here += 1
                continue
            if route.verdict_sent_at is None:
                continue
            if self.topics.draft(route.device, route.session) in arrived:
                continue
            expected_in = self.speculation.draft_due_s(route.key)
            if expected_in is None:
                continue
            at = route.verdict_sent_at + expected_in * (1 + HOLD_SLACK) + slack
            if route.returning and at <= now:
                at += pass_s
            if at > now:
                expected.append(at)
        in_hand = len(batch) + decoded_here
        saved_s = pass_s * (1 if decoded_here else 2)
        due = 0.0
        for joining, at in enumerate(sorted(expected), start=1):
            if at - now < saved_s * joining / (in_hand + joining):
                due = at
        return due

    def _admit_all(self, batch: list[Inbound]) -> list[tuple[Route, DraftMessage]]:
        proposals: list[tuple[Route, DraftMessage]] = []
        for item in batch:
            if item.topic.startswith(f"{self.topics.root}/servers/"):
                self._note_peer(item.payload)
                continue
            try:
                device, session, kind = self.topics.parse_session_topic(item.topic)
            except ValueError:
                self.log.warning("message_dropped", topic=item.topic, reason="unexpected topic")
                continue
            with structlog.contextvars.bound_contextvars(device=device, session=session):
                try:
                    accepted = self._admit(device, session, kind, item)
                except Exception:  # a bug reached by one message must not stop the server
                    self.log.exception("draft_failed", kind=kind)
                    self._reject(device, session, -1, "internal", "the server failed on this message")
                    self._close(session_key(device, session))
                    continue
                if accepted is not None:
                    proposals.append(accepted)
        return proposals

    def _add_server_decoding(self, proposals: list[tuple[Route, DraftMessage]]) -> None:
        """Sessions the server decodes alone join every batch with an empty draft: plain
        decoding with continuous batching (the server-alone baseline, and drafting sessions
        while their suggested k is 0)."""
        present = {id(route) for route, _ in proposals}
        for route in list(self.routes.values()):
            if route.decoded_here and id(route) not in present:
                step = DraftMessage(session=route.session, seq=route.last_seq + 1, committed_len=0)
                proposals.append((route, step))

    def _admit(self, device: str, session: str, kind: str, item: Inbound) -> tuple[Route, DraftMessage] | None:
        """Decode, de-duplicate and open; returns the draft to verify, or None when the
        message was answered (error, repeat, close) or dropped."""
        key = session_key(device, session)
        try:
            message = decode_draft(item.payload)
        except ProtocolError as exc:
            self._reject(device, session, seq=-1, code=exc.code, detail=exc.detail)
            return None
        if message.session != session:
            self._reject(device, session, message.seq, "invalid", "session field differs from the topic")
            return None
        route = self.routes.get(key)
        if route is not None and message.seq <= route.last_seq:
            if message.seq == route.last_seq and route.last_verdict:
                self.log.info("draft_repeated", seq=message.seq)
                self.client.publish(self.topics.verdict(device, session), route.last_verdict, qos=1)
            else:
                self.log.warning("draft_dropped", seq=message.seq, last_seq=route.last_seq, reason="old seq")
            return None
        if message.close:
            self._close(key)
            self.log.info("session_closed_by_board", seq=message.seq)
            return None
        if message.is_open:
            if kind != "open":
                self._reject(device, session, message.seq, "invalid", "context is only accepted on the open topic")
                return None
            if route is not None:
                self._reject(device, session, message.seq, "invalid", "session is already open")
                return None
            return self._open(device, session, message)
        if route is None:
            self._reject(device, session, message.seq, "unknown_session", "no such session on this server")
            return None
        if message.seq != route.last_seq + 1:
            self._reject(device, session, message.seq, "out_of_order", f"expected seq {route.last_seq + 1}")
            return None
        if message.committed_len != route.committed_len:
            # The board drafted on another history (a verdict it never got, a second server
            # claiming the same open): verifying would commit tokens it does not have.
            self._reject(
                device, session, message.seq, "invalid",
                f"committed_len {message.committed_len} differs from the server's {route.committed_len}",
            )
            return None
        route.draft_received_at = item.received
        return route, message

    def _open(self, device: str, session: str, message: DraftMessage) -> tuple[Route, DraftMessage] | None:
        key = session_key(device, session)
        assert message.params is not None  # the schema requires params with a context
        held = sum(1 for route in self.routes.values() if route.device == device)
        quota = self.settings.server.max_sessions_per_device
        if held >= quota:
            # One board (a compromised one, or one stuck in a resync loop) must not take
            # every slot of the server from the others.
            self._reject(device, session, message.seq, "busy", f"{device} holds {held} sessions, the most one board may hold")
            return None
        started = time.perf_counter()
        result = self.engine.open(key, message.context, message.params, generated=message.generated)
        self._prefill_s += time.perf_counter() - started
        if result.status != "ok":
            code = "busy" if result.status == "busy" else "invalid"
            self._reject(device, session, message.seq, code, result.reason or code)
            return None
        route = Route(
            device=device,
            session=session,
            last_seq=message.seq - 1,
            committed_len=result.committed_len,
            server_decodes=message.server_decodes,
        )
        self.routes[key] = route
        self._update_claiming()
        # Subscribed before the first verdict goes out, so the board's next draft finds us.
        self.client.subscribe(self.topics.draft(device, session), qos=1)
        self.log.info("session_opened", context=len(message.context), generated=message.generated)
        return route, message

    def _verify(self, proposals: list[tuple[Route, DraftMessage]]) -> None:
        started = time.perf_counter()
        try:
            verdicts = self.engine.verify(
                [DraftProposal(session_id=route.key, tokens=m.tokens, q=m.q) for route, m in proposals]
            )
        except Exception:
            # A failure the engine did not turn into error verdicts (a bug some input reached)
            # leaves these sessions in an unknown state: close them, so that their boards
            # re-open with their whole context, and carry on with everyone else.
            self.log.exception("batch_failed", sessions=len(proposals))
            for route, message in proposals:
                with structlog.contextvars.bound_contextvars(device=route.device, session=route.session):
                    self._reject(route.device, route.session, message.seq, "internal", "the server failed to verify this batch")
                    self._close(route.key)
            return
        elapsed = time.perf_counter() - started
        self.metrics.record_batch(len(proposals), elapsed)
        self._observe_speculation(proposals, verdicts, elapsed)
        drafted = accepted = committed = 0
        # Every verdict of the batch is planned for the same batch: counted before any finished
        # session closes, or the last verdicts would be planned for a batch emptied by the first
        # (and hand a k meant for one or two sessions to boards that open their next one with it).
        pending = len(self.routes)
        for (route, message), verdict in zip(proposals, verdicts, strict=True):
            # Counted before it is published: whoever sees the verdict must find it counted.
            if verdict.error_code is None:
                drafted += len(message.tokens)
                accepted += verdict.accepted
                committed += len(verdict.tokens)
                self.metrics.record_verdict(len(message.tokens), verdict.accepted, len(verdict.tokens))
            else:
                self.metrics.record_error(verdict.error_code)
            with structlog.contextvars.bound_contextvars(device=route.device, session=route.session):
                self._publish_verdict(route, message, verdict, pending)
        self.stats.record(len(proposals), elapsed, drafted, accepted, committed)
        self.log.info(
            "batch_verified", sessions=len(proposals), seconds=round(elapsed, 4), drafted=drafted, committed=committed
        )

    def _observe_speculation(
        self, proposals: list[tuple[Route, DraftMessage]], verdicts: list[Verdict], verify_s: float
    ) -> None:
        """What the k policy learns from one batch. All of it is reported before the first
        verdict goes out: the plan for the next batch is made at the first next_k."""
        verified = [(r, m, v) for (r, m), v in zip(proposals, verdicts, strict=True) if v.error_code is None]
        drafted = sum(len(m.tokens) for _, m, _ in verified)
        committed = sum(len(v.tokens) for _, _, v in verified)
        self.speculation.observe_batch(
            drafted + len(verified), verify_s, drafted, committed, len(self.routes), prefill_s=self._prefill_s
        )
        self._prefill_s = 0.0
        for route, message, verdict in verified:
            if route.decoded_here:  # no draft, no round trip: nothing to learn about the board
                continue
            drafted = len(message.tokens)
            rtt = round_trip_s(
                route.verdict_sent_at, route.draft_received_at, drafted, message.draft_ms, message.catch_up_ms
            )
            self.speculation.observe_verdict(route.key, route.device, drafted, verdict.accepted, message.draft_ms, rtt)

    def _publish_verdict(self, route: Route, message: DraftMessage, verdict: Verdict, pending: int) -> None:
        next_k = None if route.server_decodes else self.speculation.next_k(route.key, pending)
        keep_up = next_k is not None and self.speculation.keep_up(route.key)
        route.returning = route.pushing and bool(next_k) and verdict.error_code is None
        route.pushing = next_k == 0 and verdict.error_code is None
        payload = encode(
            VerdictMessage(
                session=route.session,
                seq=message.seq,
                server=self.server_id,
                accepted=verdict.accepted,
                tokens=list(verdict.tokens),
                committed_len=verdict.committed_len,
                finished=verdict.finished,
                reason=verdict.reason,
                next_k=next_k,
                keep_up=keep_up,
                error_code=verdict.error_code,
                error=verdict.error,
            ),
            binary=True,
        )
        route.last_seq = message.seq
        route.last_verdict = payload
        route.committed_len = verdict.committed_len
        route.last_active = time.monotonic()
        self.client.publish(self.topics.verdict(route.device, route.session), payload, qos=1)
        route.verdict_sent_at = time.monotonic()
        if verdict.error_code is not None:
            self.log.warning("draft_refused", seq=message.seq, code=verdict.error_code, reason=verdict.error)
        if verdict.finished:
            self._close(route.key)
            self.log.info("session_finished", reason=verdict.reason, committed=verdict.committed_len)

    def _reject(self, device: str, session: str, seq: int, code: str, detail: str) -> None:
        """Refuse one inbound message: an error verdict to the board and exactly one log event
        naming the reason, so that every refusal can be accounted for."""
        self.log.warning("draft_rejected", seq=seq, code=code, reason=detail)
        self._send_error(device, session, seq, code, detail)

    def _send_error(self, device: str, session: str, seq: int, code: str, detail: str) -> None:
        self.metrics.record_error(code)
        payload = encode(
            VerdictMessage(session=session, seq=seq, server=self.server_id, error_code=code, error=detail),
            binary=True,
        )
        self.client.publish(self.topics.verdict(device, session), payload, qos=1)

    def _close(self, key: str) -> None:
        route = self.routes.pop(key, None)
        self.engine.close(key)
        if route is not None:
            self.client.unsubscribe(self.topics.draft(route.device, route.session))
        self.speculation.forget(key)
        self._update_claiming()

    def _note_peer(self, payload: bytes) -> None:
        try:
            status = decode_json(ServerStatus, payload)
        except ProtocolError:
            return
        if status.id == self.server_id:
            return
        if status.online and status.sessions < status.capacity:
            self._peers_with_room.add(status.id)
        else:
            self._peers_with_room.discard(status.id)
        self._update_claiming()

    def _update_claiming(self) -> None:
        """A full server leaves the shared subscription on the open topic while another
        server has room, so that the broker hands new sessions there instead of this one
        answering "busy"; it joins again as soon as a session ends. When no other server has
        room it keeps claiming and answers "busy", so boards learn it at once."""
        full = len(self.routes) >= self.settings.server.max_sessions
        claiming = not full or not self._peers_with_room
        if claiming == self._claiming:
            return
        self._claiming = claiming
        if claiming:
            self.client.subscribe(self._shared_opens, qos=1)
        else:
            self.client.unsubscribe(self._shared_opens)
        self.log.info("claiming_changed", claiming=claiming, sessions=len(self.routes))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        idle = [r for r in self.routes.values() if now - r.last_active > self.settings.server.idle_timeout_s]
        for route in idle:
            with structlog.contextvars.bound_contextvars(device=route.device, session=route.session):
                self._send_error(route.device, route.session, route.last_seq + 1, "evicted", "idle timeout")
                self._close(route.key)
                self.log.info("session_evicted", reason="idle")
        if now - self._last_status >= STATUS_PERIOD_S:
            self._publish_status(online=True)

    def _publish_status(self, online: bool) -> None:
        self._last_status = time.monotonic()
        status = ServerStatus(
            id=self.server_id,
            online=online,
            target_model=self.target_name,
            capacity=self.settings.server.max_sessions,
            sessions=len(self.routes),
            version=__version__,
            ts=time.time(),
            **self.stats.summary(),
        )
        self.client.publish(self.topics.server_status(self.server_id), encode(status, binary=False), qos=1, retain=True)
