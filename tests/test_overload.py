"""More work than capacity: sessions past the server's limit are refused "busy" (the board
backs off, retries, then fails the request with a busy error) while the running ones keep
their rate; a flood of messages and a broker outage hit bounded queues, not memory."""

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog

import device.agent
from broker.process import LocalBroker
from fleet.local import FleetModels
from fleet.mqtt import MAX_INFLIGHT_MESSAGES, MAX_QUEUED_MESSAGES, make_client
from fleet.protocol import Topics
from server.service import INBOX_LIMIT
from tests.conftest import PROMPTS, MqttClientFactory
from tests.fleet_helpers import Requests, assert_lossless, fleet, retire_agent, wait_until

T = Topics()


def test_past_capacity_new_sessions_are_busy_and_running_ones_keep_their_rate(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server of two sessions: two generations run alone first (their rate is the
    baseline), then again while two more requests arrive. Those are refused "busy", retried
    with back-off and failed with a busy error; the two running ones finish at the baseline
    rate with the target-alone output, and the server then takes new work again."""
    monkeypatch.setattr(device.agent, "OPEN_RETRIES", 2)  # 0.5 s + 1 s of back-off
    running = [("board-1", PROMPTS[0]), ("board-1", PROMPTS[1])]
    extra = [("board-2", PROMPTS[2]), ("board-2", PROMPTS[3])]
    with structlog.testing.capture_logs() as logs, fleet(
        fleet_models, tmp_path, ["board-1", "board-2"],
        # Fixed k keeps the running generations long enough (~9 s) to outlast the back-off.
        server={"max_sessions": 2, "speculation": "fixed"}, device={"emulated_step_ms": 40}
    ) as local:
        baseline = Requests(local, running).results()
        loaded = Requests(local, running)
        loaded.wait_started()
        refused = Requests(local, extra).results()
        under_load = loaded.results()
        after = Requests(local, extra).results()
    assert_lossless(running, baseline, references)
    assert_lossless(running, under_load, references)
    assert_lossless(extra, after, references)
    for response in refused:
        assert response.reason == "error" and response.error is not None and response.error.startswith("busy"), response
    busy = [e for e in logs if e["event"] == "draft_rejected" and e.get("code") == "busy"]
    assert len(busy) == 2 * len(extra), "each refused request should have been tried twice"
    for alone, loaded_ in zip(baseline, under_load, strict=True):
        assert alone.stats is not None and loaded_.stats is not None
        assert loaded_.stats.tokens_per_s >= 0.6 * alone.stats.tokens_per_s, (alone.stats, loaded_.stats)


def test_a_flood_finds_the_server_inbox_bounded(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """While the scheduler is stuck in a slow forward pass (injected: 3 s), board-f floods
    its open topic with three times the inbox's worth of junk. The inbox never holds more
    than its limit; the excess is dropped and logged, the rest refused one by one; the honest
    generation caught in the stall re-opens and finishes with the target-alone output."""
    flood = 3 * INBOX_LIMIT
    jobs = [("board-1", PROMPTS[6])]
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs, fleet(
        fleet_models, tmp_path, ["board-1", "board-f"], device={"emulated_step_ms": 20}
    ) as local:
        retire_agent(local, "board-f")
        service = local.services["server-1"]
        verify = service.engine.verify
        stalled = threading.Event()

        def slow_once(*args: object, **kwargs: object) -> object:
            if not stalled.is_set():
                stalled.set()
                time.sleep(3.0)
            return verify(*args, **kwargs)

        service.engine.verify = slow_once
        flooder = make_client("flooder", local.broker.settings("board-f"))
        flooder.connect_and_wait()
        requests = Requests(local, jobs)
        assert stalled.wait(30), "no verification started"
        peak = 0
        for n in range(flood):
            flooder.publish(T.open("board-f", f"flood-{n}"), b"\xc1", qos=0)
            peak = max(peak, service.inbox.qsize())
        responses = requests.results()

        def accounted() -> int:
            return sum(1 for e in logs if (e["event"] == "message_dropped" and "/flood-" in e["topic"])
                       or (e["event"] == "draft_rejected" and str(e.get("session", "")).startswith("flood-")))

        wait_until(lambda: accounted() >= flood, 60, "every flood message to be refused or dropped")
        assert accounted() == flood
        flooder.disconnect()
        flooder.loop_stop()
    dropped = [e for e in logs if e["event"] == "message_dropped"]
    assert peak <= INBOX_LIMIT
    assert dropped and all("inbox full" in e["reason"] for e in dropped)
    assert_lossless(jobs, responses, references)


def test_client_queue_is_bounded_while_the_broker_is_away(
    mosquitto_persistent: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    """With the broker down, a client keeps at most MAX_QUEUED_MESSAGES QoS 1 messages; the
    rest are refused at once (MQTT_ERR_QUEUE_SIZE) and logged. Once the broker is back, the
    queued ones are delivered, exactly those."""
    topic = T.requests("board-a")
    _, inbox = mqtt_client(
        mosquitto_persistent.settings("board-a"), subscribe=[topic], clean_start=False, session_expiry_s=300
    )
    app, _ = mqtt_client(mosquitto_persistent.settings("app-1"))
    assert (app.max_inflight_messages, app.max_queued_messages) == (MAX_INFLIGHT_MESSAGES, MAX_QUEUED_MESSAGES)
    mosquitto_persistent.process.stop()
    wait_until(lambda: not app.is_connected(), 10, "the client to notice the broker is gone")
    with structlog.testing.capture_logs() as logs:
        codes = [app.publish(topic, str(n).encode(), qos=1).rc for n in range(MAX_QUEUED_MESSAGES + 500)]
    kept = [n for n, rc in enumerate(codes) if rc != mqtt.MQTT_ERR_QUEUE_SIZE]
    assert kept == list(range(MAX_QUEUED_MESSAGES))
    assert sum(e["event"] == "publish_dropped" for e in logs) == 500
    mosquitto_persistent.process.start()
    wait_until(lambda: len(inbox.messages) >= MAX_QUEUED_MESSAGES, 30, "the queued messages to arrive")
    time.sleep(0.5)
    assert sorted(int(m.payload) for m in inbox.messages) == kept
