"""Isolation between boards, over the real broker with the fleet's passwords and ACL.

The attacker is a compromised board: board-a's credentials in a raw MQTT client. Every
attempt is made while board-b generates, and board-b's output must stay the target-alone
one. What board-a can still do (take over a client id, join a share group whose name it
knows) is shown too, with its bound: docs/security.md.
"""

import time
from pathlib import Path

import pytest
import structlog

from broker.config import BrokerIdentity, BrokerSpec
from broker.process import MosquittoProcess, free_port
from fleet.config import BrokerSettings
from fleet.local import FleetModels, LocalFleet
from fleet.mqtt import BrokerRefused, PublishDenied, make_client
from fleet.protocol import (
    DeviceStatus,
    DraftMessage,
    GenerationRequest,
    GenerationResponse,
    ServerStatus,
    Topics,
    VerdictMessage,
    decode_verdict,
    encode,
)
from tests.conftest import NEW_TOKENS, PROMPTS, MqttClientFactory
from tests.fleet_helpers import SLOW_STEP_MS, Requests, assert_lossless, fleet, wait_until

SLOW = {"emulated_step_ms": SLOW_STEP_MS}


def _board_b_busy(local: LocalFleet, prompts: list[str]) -> Requests:
    """board-b generating `prompts`, each one already streaming."""
    requests = Requests(local, [("board-b", prompt) for prompt in prompts])
    requests.wait_started()
    return requests


def _forgeries(topics: Topics, live: str) -> list[tuple[str, str, bytes]]:
    """(what, topic, payload): well-formed messages board-a has no right to send."""
    params = GenerationRequest(request_id="x", prompt="x").sampling()
    return [
        ("open a session in board-b's name", topics.open("board-b", "forged"),
         encode(DraftMessage(session="forged", seq=0, committed_len=2, context=[5, 6], params=params), binary=True)),
        ("draft into board-b's live session", topics.draft("board-b", live),
         encode(DraftMessage(session=live, seq=1, committed_len=9, tokens=[1, 2, 3]), binary=True)),
        ("close board-b's live session", topics.draft("board-b", live),
         encode(DraftMessage(session=live, seq=99, committed_len=9, close=True), binary=True)),
        ("verdict to board-b (a server's right)", topics.verdict("board-b", live),
         encode(VerdictMessage(session=live, seq=1, server="server-1", tokens=[7], finished=True, reason="eos"), binary=True)),
        ("verdict to itself (a server's right)", topics.verdict("board-a", "own"),
         encode(VerdictMessage(session="own", seq=0, server="server-1", tokens=[7]), binary=True)),
        ("server status offline (would make board-b resync)", topics.server_status("server-1"),
         encode(ServerStatus(id="server-1", online=False), binary=False)),
        ("board-b's status", topics.device_status("board-b"),
         encode(DeviceStatus(id="board-b", online=False), binary=False)),
        ("request to board-b (an app's right)", topics.requests("board-b"),
         encode(GenerationRequest(request_id="evil", prompt="leak"), binary=False)),
        ("response in board-b's name", topics.response("board-b", "req-0"),
         encode(GenerationResponse(request_id="req-0", seq=99, done=True, reason="eos", tokens=[1]), binary=False)),
    ]


def test_board_a_cannot_touch_board_b(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    """Every write into board-b's session, request, verdict, response and status topics, and
    every write a server or app may make, is refused with PUBACK "not authorized"; a
    subscription to everything delivers only what board-a may read; board-b's password
    guessed wrong and anonymous access are refused. board-b never notices."""
    prompts = [PROMPTS[0], PROMPTS[1]]
    with structlog.testing.capture_logs() as logs, fleet(fleet_models, tmp_path, ["board-a", "board-b"], device=SLOW) as local:
        topics = Topics(local.broker.credentials.topic_root)
        attacker, seen = mqtt_client(local.broker.settings("board-a"), subscribe=["#", "$SYS/#"])
        requests = _board_b_busy(local, prompts)
        live = next(iter(local.agents["board-b"].live))
        allowed: list[str] = []
        for what, topic, payload in _forgeries(topics, live):
            try:
                attacker.publish_confirmed(topic, payload)
                allowed.append(what)
            except PublishDenied as denied:
                assert str(denied.reason) == "Not authorized"
        identity = local.broker.settings("board-b")
        for name, password in (("board-b", "guessed"), ("board-a", "guessed"), (None, None)):
            stranger = BrokerSettings(**{**identity.model_dump(), "username": name, "password": password})
            with pytest.raises(BrokerRefused):
                make_client(f"stranger-{name}", stranger).connect_and_wait()
        responses = requests.results()
    assert not allowed, f"board-a could: {allowed}"
    assert_lossless([("board-b", p) for p in prompts], responses, references)
    assert not [e for e in logs if e["event"] == "session_resync"], "board-b had to resync"
    readable = (f"{topics.root}/servers/", f"{topics.root}/devices/board-a/")
    leaked = sorted({m.topic for m in seen.messages if not m.topic.startswith(readable)})
    assert not leaked, f"board-a read {leaked}"


def test_unknown_share_group_swallows_nothing(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    """Mosquitto 2.0 accepts any SUBSCRIBE, shared ones too. board-a joins share groups by
    guessing names; the servers' group is a secret, so board-a is in none of them: every open
    of board-b reaches the server at once (no resync) and board-a reads none."""
    with structlog.testing.capture_logs() as logs, fleet(fleet_models, tmp_path, ["board-a", "board-b"]) as local:
        topics = Topics(local.broker.credentials.topic_root)
        guesses = ["verifiers", "servers", "server-1", "sled"]
        _, seen = mqtt_client(local.broker.settings("board-a"), subscribe=[topics.all_opens_shared(g) for g in guesses])
        jobs = [("board-b", prompt) for prompt in PROMPTS[2:6]]
        responses = Requests(local, jobs).results()
    assert_lossless(jobs, responses, references)
    assert not [e for e in logs if e["event"] == "session_resync"]
    assert not seen.messages


def test_known_share_group_costs_a_timeout_not_a_session(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    """Why the group name is secret: a board that knows it joins the servers' group, and the
    broker hands it some opens, then drops them because the board may not read them. The
    victim's open times out, it re-opens under a new session id, and the output is still the
    target-alone one; the intruder never reads an open."""
    with structlog.testing.capture_logs() as logs, fleet(
        fleet_models, tmp_path, ["board-a", "board-b"], server={"share_group": "leaked"}
    ) as local:
        topics = Topics(local.broker.credentials.topic_root)
        _, seen = mqtt_client(local.broker.settings("board-a"), subscribe=[topics.all_opens_shared("leaked")])
        jobs = [("board-b", prompt) for prompt in PROMPTS[6:8]]
        responses = Requests(local, jobs).results()
    assert_lossless(jobs, responses, references)
    swallowed = [e for e in logs if e["event"] == "session_resync"]
    assert swallowed and all(e["reason"] == "no verdict within the timeout" for e in swallowed)
    assert not seen.messages


def test_client_id_takeover_disconnects_but_reveals_nothing(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Mosquitto lets board-a connect with board-b's client id, which closes board-b's
    connection (a denial of service). board-a inherits no rights: it reads nothing of
    board-b's. board-b reconnects by itself and its generation finishes unchanged."""
    prompts = [PROMPTS[8]]
    with fleet(fleet_models, tmp_path, ["board-a", "board-b"], device=SLOW) as local:
        topics = Topics(local.broker.credentials.topic_root)
        requests = _board_b_busy(local, prompts)
        victim = local.agents["board-b"].client
        intruder = make_client(victim._client_id.decode(), local.broker.settings("board-a"))
        received: list[str] = []
        intruder.on_message = lambda c, u, m: received.append(m.topic)
        intruder.connect_and_wait()
        intruder.subscribe("#", qos=1)
        wait_until(lambda: not victim.is_connected(), 5, "board-b to be disconnected")
        time.sleep(0.3)
        intruder.disconnect()
        intruder.loop_stop()
        wait_until(victim.is_connected, 15, "board-b to reconnect")
        responses = requests.results()
    assert_lossless([("board-b", p) for p in prompts], responses, references)
    assert all(topic.startswith(f"{topics.root}/servers/") for topic in received), received


def test_username_as_client_id_stops_takeover(tmp_path: Path) -> None:
    """The hardening switch (`BrokerSpec.username_as_client_id`): the broker replaces every
    client id by the username, so board-a's attempt lands on its own id."""
    identities = [BrokerIdentity(name=n, role="device", password=f"pw-{n}") for n in ("board-a", "board-b")]
    spec = BrokerSpec(port=free_port(), identities=identities, username_as_client_id=True)
    with MosquittoProcess(spec, tmp_path / "broker") as broker:
        def settings(name: str) -> BrokerSettings:
            return BrokerSettings(port=broker.port, username=name, password=f"pw-{name}")

        victim = make_client("device-board-b", settings("board-b"))
        drops: list[object] = []
        victim.on_disconnect = lambda *args: drops.append(args)
        victim.connect_and_wait()
        intruder = make_client("device-board-b", settings("board-a"))
        intruder.connect_and_wait()
        time.sleep(0.5)
        connected, dropped = victim.is_connected(), list(drops)
        for client in (intruder, victim):
            client.disconnect()
            client.loop_stop()
        log = broker.log_tail(20)
    assert connected and not dropped
    assert "as board-a " in log and "as board-b " in log


def test_one_board_cannot_take_every_server_slot(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    """board-a opens sessions as fast as it can: past its quota it gets "busy", and board-b
    still finds room on the server."""
    with fleet(
        fleet_models, tmp_path, ["board-a", "board-b"], server={"max_sessions": 6, "max_sessions_per_device": 3}
    ) as local:
        topics = Topics(local.broker.credentials.topic_root)
        attacker, verdicts = mqtt_client(local.broker.settings("board-a"), subscribe=[topics.device_verdicts("board-a")])
        params = GenerationRequest(request_id="x", prompt="x", max_new_tokens=NEW_TOKENS).sampling()
        for n in range(6):
            hog = DraftMessage(session=f"hog-{n}", seq=0, committed_len=3, context=[5, 6, 7], params=params)
            attacker.publish_confirmed(topics.open("board-a", f"hog-{n}"), encode(hog, binary=True))
        wait_until(lambda: len(verdicts.messages) >= 6, 10, "an answer to every open")
        codes = sorted(str(decode_verdict(m.payload).error_code) for m in verdicts.messages)
        jobs = [("board-b", prompt) for prompt in PROMPTS[9:12]]
        responses = Requests(local, jobs).results()
    assert codes == ["None"] * 3 + ["busy"] * 3
    assert_lossless(jobs, responses, references)
