"""What the fault, isolation, fuzz and overload tests share: a fleet with short timeouts,
requests run concurrently, and the crash of a component as the broker sees it.

Timeouts are seconds, not the production tens of seconds, so that a lost message costs a
test little; every fault must still end in outputs identical to the target alone.
"""

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fleet.config import DeviceSettings, ServerSettings
from fleet.local import FleetModels, LocalFleet
from fleet.mqtt import FleetClient
from fleet.protocol import GenerationRequest, GenerationResponse
from server.service import VerificationService
from tests.conftest import NEW_TOKENS

VERDICT_TIMEOUT_S = 2.0
_request_ids = itertools.count()
# Slow enough that a 64-token generation lasts a couple of seconds, so a fault lands inside it.
SLOW_STEP_MS = 20.0


def fleet(
    models: FleetModels,
    tmp_path: Path,
    devices: list[str],
    *,
    servers: list[str] | None = None,
    server: dict[str, object] | None = None,
    device: dict[str, object] | None = None,
) -> LocalFleet:
    """A LocalFleet with the end-to-end test knobs and second-scale fault timeouts;
    `server`/`device` override single settings."""
    return LocalFleet(
        models=models,
        workdir=tmp_path,
        devices=devices,
        servers=servers or ["server-1"],
        # Fixed k: the tiny target verifies in milliseconds, so adaptive k would rightly hand
        # every session to the server (k = 0), and these tests are about boards that draft.
        server=ServerSettings(**{
            "k_max": 8, "batch_window_ms": 20, "max_sessions": 32, "speculation": "fixed", **(server or {}),
        }),
        device=DeviceSettings(**{
            "k_max": 6,
            "threshold": 0.2,
            "max_concurrent_requests": 4,
            "verdict_timeout_s": VERDICT_TIMEOUT_S,
            **(device or {}),
        }),
    )


class Requests:
    """Generations run concurrently in the background; `started` is set for a request once
    its first text arrived, so a test can inject a fault while every one is mid-flight."""

    def __init__(self, local: LocalFleet, jobs: Iterable[tuple[str, str]], timeout_s: float = 120.0) -> None:
        self.jobs = list(jobs)
        self.started = {index: threading.Event() for index in range(len(self.jobs))}
        self._pool = ThreadPoolExecutor(max(1, len(self.jobs)), thread_name_prefix="app-request")
        self._futures = [
            self._pool.submit(self._one, local, index, device, prompt, timeout_s)
            for index, (device, prompt) in enumerate(self.jobs)
        ]

    def _one(self, local: LocalFleet, index: int, device: str, prompt: str, timeout_s: float) -> GenerationResponse:
        # Unique across every batch: the app routes responses by request id.
        request = GenerationRequest(request_id=f"req-{next(_request_ids)}", prompt=prompt, max_new_tokens=NEW_TOKENS)
        return local.app.generate(device, request, on_delta=lambda _: self.started[index].set(), timeout_s=timeout_s)

    def wait_started(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for index, event in self.started.items():
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"request {index} {self.jobs[index]} streamed nothing in {timeout_s} s")
        unfinished = [f for f in self._futures if not f.done()]
        assert len(unfinished) == len(self._futures), "a request finished before the fault: make it slower"

    def results(self) -> list[GenerationResponse]:
        try:
            return [future.result() for future in self._futures]
        finally:
            self._pool.shutdown()


def assert_lossless(
    jobs: list[tuple[str, str]], responses: list[GenerationResponse], references: dict[str, list[int]]
) -> None:
    """Every request completed, each with exactly the target-alone tokens (none lost or repeated)."""
    for (device, prompt), response in zip(jobs, responses, strict=True):
        assert response.error is None, f"{device} {prompt!r}: {response.error}"
        assert response.reason == "length"
        assert response.tokens == references[prompt], f"{device} {prompt!r} differs from the target alone"


def sever(client: FleetClient) -> None:
    """What a crash does to a component's MQTT connection: the socket closes without a
    DISCONNECT, so the broker publishes the last will, and nothing more goes in or out.

    paho offers no public way to drop a connection without DISCONNECT; `_sock_close` is it."""
    client.loop_stop()
    client._sock_close()


def crash_server(local: LocalFleet, server_id: str) -> VerificationService:
    """Kill one in-process server as a crash would: connection gone (will fires), scheduler
    stopped; its final offline status goes nowhere since the socket is already closed."""
    service = local.services[server_id]
    sever(service.client)
    service.stop()
    return service


def retire_agent(local: LocalFleet, device_id: str) -> None:
    """Stop the fleet's in-process agent of `device_id` and wait until it is gone (its offline
    status published), so that its identity can be used by a raw client or a board process."""
    local.agents[device_id].stop()
    thread = next(t for t in local._threads if t.name == f"device-{device_id}")
    thread.join(timeout=10)
    assert not thread.is_alive(), f"{device_id}'s agent did not stop"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition`; returns the seconds it took, fails naming `what` on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def spawn_board(
    local: LocalFleet, device_id: str, credentials: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`fleet device` as its own process, with `device_id`'s broker identity (which the
    fleet provisioned); the test may SIGKILL it like a board losing power."""
    local.broker.credentials.write(credentials)
    command = [
        str(Path(sys.executable).parent / "fleet"), "device",
        "--credentials", str(credentials), "--username", device_id,
        "--draft", str(local.models.draft_dir), "--log-format", "json",
    ]
    settings = {
        "FLEET_HOME": str(local.workdir / "home"),
        "FLEET_TOPIC_ROOT": local.broker.credentials.topic_root,
        "FLEET_DEVICE__VERDICT_TIMEOUT_S": str(VERDICT_TIMEOUT_S),
        "FLEET_DEVICE__K_MAX": "6",
        "FLEET_DEVICE__THRESHOLD": "0.2",
        **(env or {}),
    }
    log = (local.workdir / f"{device_id}.log").open("wb")
    return subprocess.Popen(command, env={**os.environ, **settings}, stdout=log, stderr=subprocess.STDOUT)
