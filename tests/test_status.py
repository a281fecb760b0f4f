"""`fleet status` against a real Mosquitto: a running local fleet (tiny models) for the figures
and a crashed board, and a bare broker with hand-published retained status for the exit codes.

The command runs through typer's CliRunner on an app built here around `status_command`, with
the same options an operator passes (a credentials file and the observer identity)."""

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import typer
from typer.testing import CliRunner, Result

from broker.process import LocalBroker, free_port
from fleet import __version__
from fleet.config import BrokerSettings, DeviceSettings, ServerSettings
from fleet.local import FleetModels, LocalFleet
from fleet.mqtt import make_client
from fleet.protocol import (
    DeviceStatus,
    DraftMessage,
    GenerationRequest,
    ServerStatus,
    Topics,
    decode_verdict,
    encode,
)
from fleet.status import (
    EXIT_BROKER_UNREACHABLE,
    EXIT_NO_SERVER,
    EXIT_OK,
    EXIT_USAGE,
    FleetStatus,
    StatusWatcher,
    UsageErrorsExitOne,
    collect_status,
    status_command,
)
from tests.conftest import MqttClientFactory

T = Topics()
BOARDS = ["board-1", "board-2"]
CAPACITY = 7
HARDWARE = "test-bench"
# Components refresh their status every 5 s; give one refresh plus slack.
REFRESH_S = 12.0


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """fleet"""

    app.command("status", cls=UsageErrorsExitOne)(status_command)
    return app


def invoke(*args: str) -> Result:
    """`fleet status ARGS`. The command configures logging onto CliRunner's stderr, which is
    closed afterwards; the fleet's threads keep logging, so the previous set-up is put back."""
    saved = structlog.get_config()
    try:
        return CliRunner().invoke(cli(), ["status", *args])
    finally:
        structlog.configure(**saved)


def run_status(credentials: Path, *args: str) -> Result:
    return invoke("--credentials", str(credentials), "--username", "ops", *args)


def wait_for(broker: BrokerSettings, ready: Callable[[FleetStatus], bool], timeout_s: float = REFRESH_S) -> FleetStatus:
    """The first status picture that satisfies `ready`; one connection, polled."""
    with StatusWatcher(broker, T) as watcher:
        watcher.settle(2.0)
        deadline = time.monotonic() + timeout_s
        while True:
            status = watcher.snapshot()
            if ready(status):
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"status never got there within {timeout_s} s; last: {status.model_dump_json()}")
            time.sleep(0.1)


def local_fleet(models: FleetModels, tmp_path: Path) -> LocalFleet:
    return LocalFleet(
        models=models,
        workdir=tmp_path,
        devices=BOARDS,
        server=ServerSettings(k_max=6, batch_window_ms=5, max_sessions=CAPACITY, speculation="fixed"),
        device=DeviceSettings(k_max=4, threshold=0.2, hardware=HARDWARE),
    )


def open_idle_session(fleet: LocalFleet, mqtt_client: MqttClientFactory, device: str, session: str) -> None:
    """Open a session the way a board does (its own identity, an empty first draft) and leave
    it open, so the server has a session to count until its idle timeout."""
    raw, inbox = mqtt_client(fleet.broker.settings(device), subscribe=[T.device_verdicts(device)])
    message = DraftMessage(
        session=session, seq=0, committed_len=3, context=[5, 6, 7],
        params=GenerationRequest(request_id="x", prompt="x").sampling(),
    )
    raw.publish_confirmed(T.open(device, session), encode(message, binary=True))
    verdict = decode_verdict(bytes(inbox.wait_for(T.verdict(device, session), timeout_s=10).payload))
    assert verdict.error_code is None and len(verdict.tokens) == 1


def crash(fleet: LocalFleet, device: str) -> None:
    """Kill a board's MQTT connection the way a power cut does: no DISCONNECT packet, the socket
    just goes. The network thread is stopped first so paho does not reconnect."""
    client = fleet.agents[device].client
    client.loop_stop()
    sock = client.socket()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_status_shows_the_server_and_two_boards_with_their_figures(
    fleet_models: FleetModels, tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    with local_fleet(fleet_models, tmp_path) as fleet:
        ops = fleet.broker.settings("ops")
        before = collect_status(ops, T)
        assert [s.id for s in before.servers] == ["server-1"] and [d.id for d in before.devices] == BOARDS
        server = before.servers[0]
        assert server.online and not server.stale and server.target_model == "tiny"
        assert (server.sessions, server.capacity, server.version) == (0, CAPACITY, __version__)
        for board in before.devices:
            assert board.online and board.hardware == HARDWARE and board.version == __version__
            assert board.draft_model == fleet.agents[board.id].draft_name
            assert board.active_requests == 0 and board.age_s is not None and board.age_s < REFRESH_S

        response = fleet.app.generate(
            "board-1", GenerationRequest(request_id="r1", prompt="def add(a, b):", max_new_tokens=48), timeout_s=60
        )
        assert response.stats is not None and response.stats.tokens == 48
        open_idle_session(fleet, mqtt_client, "board-2", "idle-1")
        after = wait_for(
            ops,
            lambda s: s.servers[0].sessions == 1 and s.servers[0].committed_tokens_per_s > 0
            and s.devices[0].tokens_per_s > 0,
        )
        server, board_1, board_2 = after.servers[0], *after.devices
        # One generation (plus an empty opening draft) went through the server since it started,
        # so its rolling acceptance rate is exactly the board's own count.
        assert 0.0 <= server.acceptance_rate <= 1.0
        assert server.acceptance_rate == pytest.approx(response.stats.acceptance_rate)
        assert server.batch_size_avg == 1.0 and server.verify_ms_avg > 0
        assert board_1.tokens_per_s > 0 and board_2.tokens_per_s == 0.0
        assert board_1.active_requests == 0

        credentials = tmp_path / "credentials.json"
        fleet.broker.credentials.write(credentials)
        as_json = run_status(credentials, "--json")
        table = run_status(credentials)
    assert as_json.exit_code == EXIT_OK, as_json.output
    document = json.loads(as_json.stdout)
    assert set(document) == {"servers", "devices"}
    assert [(s["id"], s["online"], s["sessions"]) for s in document["servers"]] == [("server-1", True, 1)]
    assert [(d["id"], d["online"], d["hardware"]) for d in document["devices"]] == [(b, True, HARDWARE) for b in BOARDS]
    assert document["servers"][0]["acceptance_rate"] == pytest.approx(response.stats.acceptance_rate)
    assert table.exit_code == EXIT_OK, table.output
    assert "server-1" in table.stdout and "board-2" in table.stdout and "1 of 1 online" in table.stdout


def test_a_crashed_board_shows_offline(fleet_models: FleetModels, tmp_path: Path) -> None:
    with local_fleet(fleet_models, tmp_path) as fleet:
        ops = fleet.broker.settings("ops")
        assert all(d.online for d in collect_status(ops, T).devices)
        crash(fleet, "board-2")
        status = wait_for(ops, lambda s: not s.devices[1].online, timeout_s=5)
        credentials = tmp_path / "credentials.json"
        fleet.broker.credentials.write(credentials)
        result = run_status(credentials, "--json")
        table = run_status(credentials)
    assert [(d.id, d.online) for d in status.devices] == [("board-1", True), ("board-2", False)]
    assert status.servers[0].online
    # The will carries no time of death: the last-seen age is unknown rather than made up.
    assert status.devices[1].age_s is None and not status.devices[1].stale
    assert result.exit_code == EXIT_OK, result.output  # the server is still up
    assert [d["online"] for d in json.loads(result.stdout)["devices"]] == [True, False]
    rows = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines() if line.strip().startswith("board-")}
    assert rows == {"board-1": "online", "board-2": "offline"}


def test_an_unreachable_broker_exits_3() -> None:
    result = invoke("--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert result.exit_code == EXIT_BROKER_UNREACHABLE
    assert "cannot reach the broker" in result.stderr and result.stdout == ""


def _publish_retained(broker: LocalBroker, identity: str, topic: str, status: ServerStatus | DeviceStatus) -> None:
    client = make_client(f"pub-{identity}", broker.settings(identity))
    client.connect_and_wait()
    try:
        client.publish_confirmed(topic, encode(status, binary=False), retain=True)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize(
    "server_online, age_s, args, expected",
    [
        (None, 0, [], EXIT_NO_SERVER),
        (False, 0, [], EXIT_NO_SERVER),
        # Says online, but not refreshed for two minutes: its scheduler is stuck.
        (True, 120, [], EXIT_NO_SERVER),
        (True, 120, ["--stale-after", "0"], EXIT_OK),
        (True, 0, [], EXIT_OK),
    ],
    ids=["nothing-retained", "server-offline", "server-stale", "staleness-off", "server-online"],
)
def test_exit_code_follows_the_servers(
    mosquitto_auth: LocalBroker, tmp_path: Path, server_online: bool | None, age_s: float, args: list[str], expected: int
) -> None:
    now = time.time()
    _publish_retained(mosquitto_auth, "board-a", T.device_status("board-a"), DeviceStatus(id="board-a", online=True, ts=now))
    if server_online is not None:
        server = ServerStatus(id="server-1", online=server_online, ts=now - age_s)
        _publish_retained(mosquitto_auth, "server-1", T.server_status("server-1"), server)
    credentials = tmp_path / "credentials.json"
    mosquitto_auth.credentials.write(credentials)
    result = run_status(credentials, *args)
    assert result.exit_code == expected, result.output
    assert "board-a" in result.stdout
    assert ("no server online" in result.stderr) == (expected == EXIT_NO_SERVER)
    assert ("stale" in result.stdout) == (age_s > 0 and not args)


def test_watch_follows_changes_on_one_connection(mosquitto_auth: LocalBroker, tmp_path: Path) -> None:
    _publish_retained(mosquitto_auth, "server-1", T.server_status("server-1"), ServerStatus(id="server-1", online=True, ts=time.time()))
    credentials = tmp_path / "credentials.json"
    mosquitto_auth.credentials.write(credentials)
    # The server's will fires while the watch runs: later pictures show it offline.
    will = threading.Timer(1.0, _publish_retained, args=(
        mosquitto_auth, "server-1", T.server_status("server-1"), ServerStatus(id="server-1", online=False)
    ))
    will.start()
    try:
        result = run_status(credentials, "--watch", "0.3", "--count", "10", "--json")
    finally:
        will.join()
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 10
    assert lines[0]["servers"][0]["online"] is True and lines[-1]["servers"][0]["online"] is False
    assert result.exit_code == EXIT_NO_SERVER  # the last picture decides


def test_watch_redraws_the_tables(mosquitto_auth: LocalBroker, tmp_path: Path) -> None:
    _publish_retained(mosquitto_auth, "server-1", T.server_status("server-1"), ServerStatus(id="server-1", online=True, ts=time.time()))
    credentials = tmp_path / "credentials.json"
    mosquitto_auth.credentials.write(credentials)
    result = run_status(credentials, "--watch", "0.1", "--count", "2")
    assert result.exit_code == EXIT_OK, result.output
    assert "server-1" in result.stdout and "refreshed" in result.stdout


def test_retained_status_cleared_or_forged_is_not_shown(mosquitto_auth: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    _publish_retained(mosquitto_auth, "board-a", T.device_status("board-a"), DeviceStatus(id="board-a", online=True, ts=time.time()))
    # A server writing another id into its own topic (misconfiguration) is ignored, not trusted.
    _publish_retained(mosquitto_auth, "server-1", T.server_status("server-1"), ServerStatus(id="server-9", online=True, ts=time.time()))
    status = collect_status(mosquitto_auth.settings("ops"), T)
    assert [d.id for d in status.devices] == ["board-a"] and status.servers == []
    board, _ = mqtt_client(mosquitto_auth.settings("board-a"))
    board.publish_confirmed(T.device_status("board-a"), b"", retain=True)  # decommissioned
    assert collect_status(mosquitto_auth.settings("ops"), T).devices == []


@pytest.mark.parametrize(
    "args",
    [["--broker", "ftp://somewhere"], ["--watch", "0"], ["--no-such-option"], ["--credentials", "/nonexistent.json", "--username", "ops"]],
    ids=["bad-url", "bad-watch", "unknown-option", "missing-credentials"],
)
def test_usage_errors_exit_1(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stdout == "" and result.stderr
