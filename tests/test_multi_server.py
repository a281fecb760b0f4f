"""More than one verification server on one real Mosquitto: sessions spread through the shared
subscription on the open topic, a full server stops claiming, a server that joins takes new
sessions at once, and a failed server's sessions move. Tiny seeded models; every output must
equal the target alone.

All servers of a LocalFleet get one copy of its ServerSettings, so they share one (secret)
share group, as every server of a production fleet must (docs/security.md).
"""

from pathlib import Path

import structlog

from fleet.local import FleetModels, LocalFleet
from fleet.protocol import (
    DraftMessage,
    GenerationRequest,
    GenerationResponse,
    Topics,
    decode_verdict,
    encode,
)
from fleet.sampling import SamplingParams
from tests.conftest import PROMPTS, MqttClientFactory
from tests.fleet_helpers import (
    SLOW_STEP_MS,
    Requests,
    assert_lossless,
    crash_server,
    fleet,
    wait_until,
)

SERVERS = ["server-1", "server-2"]


def _opened(logs: list[dict], server: str) -> int:
    return sum(
        1 for entry in logs if entry["event"] == "session_opened" and entry.get("server") == server
    )


def _busy(logs: list[dict]) -> list[dict]:
    return [
        entry
        for entry in logs
        if entry["event"] == "draft_rejected" and entry.get("code") == "busy"
    ]


def _generate(
    local: LocalFleet, device: str, prompt: str, tokens: int, request_id: str
) -> GenerationResponse:
    request = GenerationRequest(request_id=request_id, prompt=prompt, max_new_tokens=tokens)
    return local.app.generate(device, request, timeout_s=60)


def _assert_prefix(response: GenerationResponse, reference: list[int], tokens: int) -> None:
    assert response.error is None, response.error
    assert response.tokens == reference[:tokens]


def test_sessions_spread_over_two_servers(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    jobs = [(f"board-{i % 2 + 1}", PROMPTS[i]) for i in range(8)]
    with (
        structlog.testing.capture_logs() as logs,
        fleet(fleet_models, tmp_path, ["board-1", "board-2"], servers=SERVERS) as local,
    ):
        groups = {s.settings.server.share_group.get_secret_value() for s in local.services.values()}
        assert len(groups) == 1, "the servers of one fleet must share one share group"
        responses = Requests(local, jobs).results()
    assert_lossless(jobs, responses, references)
    opened = {server: _opened(logs, server) for server in SERVERS}
    assert sum(opened.values()) == len(jobs), opened  # each open claimed exactly once
    assert min(opened.values()) >= 2, f"the opens did not spread: {opened}"


def test_a_full_server_does_not_claim(
    fleet_models: FleetModels,
    references: dict[str, list[int]],
    tmp_path: Path,
    mqtt_client: MqttClientFactory,
) -> None:
    """One session per server at most. A board opens a session and holds it (no next draft):
    that server is full. A short generation takes the other server and ends. Mosquitto hands
    shared-subscription messages round robin, so the next open is the full server's turn: it
    must reach the free server, not come back "busy"."""
    with (
        structlog.testing.capture_logs() as logs,
        fleet(
            fleet_models,
            tmp_path,
            ["board-1", "board-2"],
            servers=SERVERS,
            server={"max_sessions": 1},
        ) as local,
    ):
        topics = Topics(local.broker.credentials.topic_root)
        holder, inbox = mqtt_client(
            local.broker.settings("board-1"),
            subscribe=[topics.device_verdicts("board-1")],
            client_id="holder-board-1",
        )
        held = DraftMessage(
            session="held", seq=0, committed_len=3, context=[1, 2, 3], params=SamplingParams()
        )
        holder.publish_confirmed(topics.open("board-1", "held"), encode(held, binary=True))
        full = decode_verdict(inbox.wait_for(topics.verdict("board-1", "held")).payload).server
        free = next(sid for sid in SERVERS if sid != full)
        short = _generate(local, "board-2", PROMPTS[1], 4, "short")
        wait_until(lambda: not local.services[free].routes, 5, f"{free} to close the short session")
        following = _generate(local, "board-2", PROMPTS[2], 8, "following")
        assert "board-1/held" in local.services[full].routes
    _assert_prefix(short, references[PROMPTS[1]], 4)
    _assert_prefix(following, references[PROMPTS[2]], 8)
    assert not _busy(logs), f"a full server claimed an open: {_busy(logs)}"
    assert (_opened(logs, full), _opened(logs, free)) == (1, 2)


def test_a_new_server_takes_new_sessions_at_once(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """server-2 leaves (a clean stop: offline status); every session goes to server-1. A fresh
    server-2 process joins: the very next opens are shared with it."""
    first = [("board-1", PROMPTS[3]), ("board-2", PROMPTS[4])]
    second = [
        ("board-1", PROMPTS[5]),
        ("board-2", PROMPTS[6]),
        ("board-1", PROMPTS[7]),
        ("board-2", PROMPTS[8]),
    ]
    with (
        structlog.testing.capture_logs() as logs,
        fleet(fleet_models, tmp_path, ["board-1", "board-2"], servers=SERVERS) as local,
    ):
        leaving = local.services["server-2"]
        leaving.stop()
        wait_until(lambda: not leaving.client.is_connected(), 10, "server-2 to leave")
        assert_lossless(first, Requests(local, first).results(), references)
        assert _opened(logs, "server-2") == 0
        local.start_server("server-2")
        local.wait_online({"server-2"}, set())
        assert_lossless(second, Requests(local, second).results(), references)
    assert _opened(logs, "server-2") >= 1, "the new server claimed none of the next opens"
    assert _opened(logs, "server-1") + _opened(logs, "server-2") == len(first) + len(second)


def test_a_failed_servers_sessions_move_to_the_other(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Both servers hold sessions when server-1 crashes (its will fires): its boards re-open on
    server-2, which finishes every generation; server-2's own sessions never notice."""
    jobs = [(f"board-{i % 2 + 1}", PROMPTS[i]) for i in range(9, 12)] + [("board-1", PROMPTS[0])]
    with (
        structlog.testing.capture_logs() as logs,
        fleet(
            fleet_models,
            tmp_path,
            ["board-1", "board-2"],
            servers=SERVERS,
            device={"emulated_step_ms": SLOW_STEP_MS},
        ) as local,
    ):
        requests = Requests(local, jobs)
        requests.wait_started()
        assert all(service.routes for service in local.services.values()), (
            "the sessions did not spread"
        )
        crash_server(local, "server-1")
        responses = requests.results()
    assert_lossless(jobs, responses, references)
    moved = [entry for entry in logs if entry["event"] == "session_resync"]
    assert moved and all("server-1 went offline" in entry["reason"] for entry in moved), moved
    assert _opened(logs, "server-2") == len(jobs) - _opened(logs, "server-1") + len(moved)
