"""Soak (on demand: `pytest -m slow tests/test_soak.py`): 16 sessions for 10 minutes.

A real fleet of separate processes (TLS broker, `fleet serve`, four `fleet device` boards of
four concurrent requests each) serves an app that keeps 16 requests in flight for
`SOAK_SECONDS` (600 by default). Proves: no request is lost or fails, every output equals the
target alone, and resident memory of the server and of each board stays flat after warm-up.
The figures go to `SOAK_REPORT` (JSON; default the test's temporary directory) and to
docs/reliability.md by hand.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from rich.progress import Progress

from broker.process import prepare_local_broker
from fleet.app import AppClient, GenerationTimeout
from fleet.config import BrokerSettings
from fleet.local import FleetModels
from fleet.mqtt import make_client
from fleet.protocol import GenerationRequest, Topics
from fleet.status import StatusWatcher
from tests.conftest import NEW_TOKENS, PROMPTS

BOARDS = [f"board-{i}" for i in range(1, 5)]
PER_BOARD = 4
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
WARM_UP_S = min(60.0, SOAK_SECONDS / 5)
SAMPLE_S = 10.0
# Allowed growth of resident memory from the end of warm-up to the end of the soak, in all
# and per completed request (a leak of 40 KB a request once went unnoticed in a slow soak).
MAX_RSS_GROWTH_MB = 32.0
MAX_RSS_GROWTH_KB_PER_REQUEST = 10.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 600)]


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_soak_sixteen_sessions(fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path) -> None:
    fleet_cli = str(Path(sys.executable).parent / "fleet")
    broker = prepare_local_broker(
        tmp_path / "broker", devices=BOARDS, servers=["server-1"], apps=["app-1"], observers=["ops"], tls=True
    )
    credentials = tmp_path / "credentials.json"
    broker.credentials.write(credentials)
    common = {"FLEET_HOME": str(tmp_path / "home"), "FLEET_LOG_LEVEL": "warning"}
    with broker:
        server = _spawn(
            [fleet_cli, "serve", "--credentials", str(credentials), "--username", "server-1",
             "--model", str(fleet_models.target_dir)],
            tmp_path / "server.log",
            {**common, "FLEET_SERVER__K_MAX": "8", "FLEET_SERVER__BATCH_WINDOW_MS": "20",
             "FLEET_SERVER__MAX_SESSIONS": "32"},
        )
        boards = {
            device: _spawn(
                [fleet_cli, "device", "--credentials", str(credentials), "--username", device,
                 "--draft", str(fleet_models.draft_dir)],
                tmp_path / f"{device}.log",
                {**common, "FLEET_DEVICE__K_MAX": "6", "FLEET_DEVICE__THRESHOLD": "0.2",
                 "FLEET_DEVICE__MAX_CONCURRENT_REQUESTS": str(PER_BOARD),
                 "FLEET_DEVICE__VERDICT_TIMEOUT_S": "10"},
            )
            for device in BOARDS
        }
        processes = {"server": server, **boards}
        _wait_online(broker.settings("ops"), Topics(broker.credentials.topic_root), processes)
        client = make_client("soak-app", broker.settings("app-1"))
        client.connect_and_wait()
        app = AppClient(client, Topics(broker.credentials.topic_root))
        try:
            report = _soak(app, processes, references)
        finally:
            client.disconnect()
            client.loop_stop()
            for process in processes.values():
                process.send_signal(signal.SIGTERM)
            for process in processes.values():
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
    out = Path(os.environ.get("SOAK_REPORT", tmp_path / "soak.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    assert report["lost"] == 0 and report["failed"] == 0 and report["wrong"] == 0, report
    assert report["completed"] > 0
    for name, growth in report["rss_growth_mb"].items():
        assert growth < MAX_RSS_GROWTH_MB, f"{name} grew {growth:.1f} MB after warm-up"
        per_request = 1024 * growth / report["completed"]
        assert per_request < MAX_RSS_GROWTH_KB_PER_REQUEST, f"{name} grew {per_request:.1f} KB a request"


def _wait_online(ops: BrokerSettings, topics: Topics, processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until the server and every board have published an online status (loading the models
    takes a while under load)."""
    with StatusWatcher(ops, topics) as watcher:
        deadline = time.monotonic() + 180
        while True:
            status = watcher.snapshot()
            up = {row.id for row in [*status.servers, *status.devices] if row.online}
            if {"server-1", *BOARDS} <= up:
                return
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited with {process.returncode} while starting"
            assert time.monotonic() < deadline, f"not online after 180 s: {sorted({'server-1', *BOARDS} - up)}"
            time.sleep(0.5)


def _soak(app: AppClient, processes: dict[str, subprocess.Popen[bytes]], references: dict[str, list[int]]) -> dict:
    """Keep PER_BOARD requests in flight on every board until SOAK_SECONDS have passed."""
    stop_at = time.monotonic() + SOAK_SECONDS
    counts = {"completed": 0, "failed": 0, "lost": 0, "wrong": 0, "tokens": 0}
    errors: list[str] = []
    lock = threading.Lock()
    rss: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}

    def worker(slot: int) -> None:
        device = BOARDS[slot % len(BOARDS)]
        n = 0
        while time.monotonic() < stop_at:
            prompt = PROMPTS[(slot + n) % len(PROMPTS)]
            request = GenerationRequest(request_id=f"soak-{slot}-{n}", prompt=prompt, max_new_tokens=NEW_TOKENS)
            n += 1
            try:
                response = app.generate(device, request, timeout_s=120)
            except GenerationTimeout as exc:
                with lock:
                    counts["lost"] += 1
                    errors.append(f"{request.request_id}: {exc}")
                continue
            with lock:
                if response.error is not None:
                    counts["failed"] += 1
                    errors.append(f"{request.request_id}: {response.error}")
                elif response.tokens != references[prompt]:
                    counts["wrong"] += 1
                    errors.append(f"{request.request_id}: output differs from the target alone")
                else:
                    counts["completed"] += 1
                    counts["tokens"] += len(response.tokens or [])

    started = time.monotonic()
    with ThreadPoolExecutor(len(BOARDS) * PER_BOARD) as pool, Progress(transient=True) as progress:
        task = progress.add_task("soak", total=SOAK_SECONDS)
        futures = [pool.submit(worker, slot) for slot in range(len(BOARDS) * PER_BOARD)]
        while not all(f.done() for f in futures):
            elapsed = time.monotonic() - started
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited with {process.returncode}"
                rss[name].append((elapsed, _rss_mb(process.pid)))
            progress.update(task, completed=min(elapsed, SOAK_SECONDS))
            time.sleep(SAMPLE_S)
        for future in futures:
            future.result()
    elapsed = time.monotonic() - started
    growth = {}
    for name, samples in rss.items():
        warm = [mb for at, mb in samples if at >= WARM_UP_S] or [mb for _, mb in samples]
        growth[name] = round(warm[-1] - warm[0], 1)
    return {
        **counts,
        "seconds": round(elapsed, 1),
        "sessions": len(BOARDS) * PER_BOARD,
        "committed_tokens_per_s": round(counts["tokens"] / elapsed, 1),
        "rss_mb_after_warm_up": {n: round(next((mb for at, mb in s if at >= WARM_UP_S), s[0][1]), 1) for n, s in rss.items()},
        "rss_mb_end": {n: round(s[-1][1], 1) for n, s in rss.items()},
        "rss_growth_mb": growth,
        # One sample a minute, to tell a leak (steady climb) from settling (a plateau).
        "rss_mb_per_minute": {n: [round(mb, 1) for at, mb in s if int(at) % 60 < SAMPLE_S] for n, s in rss.items()},
        "errors": errors[:20],
    }
