"""Prometheus endpoints of a real local fleet (tiny models), scraped over HTTP as Prometheus
would: during a generation and after it, where every counter must equal the generation's own
statistics; refused drafts and requests show up as errors by reason."""

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fleet.config import DeviceSettings, ServerSettings
from fleet.local import FleetModels, LocalFleet
from fleet.metrics import ServerMetrics, serve_metrics
from fleet.protocol import GenerationRequest, Topics
from tests.conftest import MqttClientFactory

T = Topics()
NEW_TOKENS = 48
# Drafting paced like a slow board, so the generation lasts over a second and a scrape lands
# in the middle of it.
STEP_MS = 25.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when(url: str, settled: Callable[[Samples], bool], timeout_s: float = 5.0) -> Samples:
    """Scrape until `settled` holds (or the time is up): a component finishes its bookkeeping
    (closing a session, freeing a request slot) just after the answer that ends a request."""
    deadline = time.monotonic() + timeout_s
    while not settled(samples := scrape(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


def test_scrape_during_and_after_a_generation(fleet_models: FleetModels, tmp_path: Path) -> None:
    fleet = LocalFleet(
        models=fleet_models,
        workdir=tmp_path,
        devices=["board-1"],
        server=ServerSettings(k_max=6, batch_window_ms=5, speculation="fixed"),  # boards draft
        device=DeviceSettings(k_max=4, threshold=0.2, emulated_step_ms=STEP_MS),
        metrics=True,
    )
    with fleet:
        server_url = fleet.metrics_servers["server-1"].url
        board_url = fleet.metrics_servers["board-1"].url
        streaming = threading.Event()
        result: dict[str, object] = {}
        request = GenerationRequest(request_id="m1", prompt="def add(a, b):", max_new_tokens=NEW_TOKENS)
        worker = threading.Thread(target=lambda: result.update(
            response=fleet.app.generate("board-1", request, on_delta=lambda _: streaming.set(), timeout_s=60)
        ))
        worker.start()
        assert streaming.wait(30), "no text streamed"
        server_during, board_during = scrape(server_url), scrape(board_url)
        worker.join(60)
        server_after = scrape_when(server_url, lambda s: value(s, "fleet_server_sessions") == 0)
        board_after = scrape_when(board_url, lambda s: value(s, "fleet_device_active_requests") == 0)

    assert "response" in result, "the generation did not finish"
    stats = result["response"].stats
    assert stats is not None and stats.tokens == NEW_TOKENS
    # During: tokens already committed, the request and its session still open.
    assert 0 < value(server_during, "fleet_server_committed_tokens_total") < NEW_TOKENS
    assert 0 < value(board_during, "fleet_device_committed_tokens_total") < NEW_TOKENS
    assert value(board_during, "fleet_device_active_requests") == 1
    assert value(server_during, "fleet_server_sessions") == 1
    # After: the counters are the generation's own statistics, on both sides of the broker.
    assert value(server_after, "fleet_server_committed_tokens_total") == NEW_TOKENS
    assert value(server_after, "fleet_server_drafted_tokens_total") == stats.drafted
    assert value(server_after, "fleet_server_accepted_length_sum") == stats.accepted
    assert value(server_after, "fleet_server_accepted_length_count") == stats.verifications
    assert value(server_after, "fleet_server_batch_size_count") == stats.verifications  # one session: one per batch
    assert value(server_after, "fleet_server_verify_seconds_count") == stats.verifications
    assert value(server_after, "fleet_server_verify_seconds_sum") > 0
    assert value(server_after, "fleet_server_sessions") == 0
    assert value(board_after, "fleet_device_committed_tokens_total") == NEW_TOKENS
    assert value(board_after, "fleet_device_drafted_tokens_total") == stats.drafted
    assert value(board_after, "fleet_device_accepted_tokens_total") == stats.accepted
    assert value(board_after, "fleet_device_round_trip_seconds_count") == stats.verifications
    assert value(board_after, "fleet_device_active_requests") == 0
    assert not any(name.endswith("errors_total") for name, _ in server_after | board_after)


def test_refused_drafts_and_requests_count_as_errors_by_reason(
    fleet_models: FleetModels, tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    with LocalFleet(models=fleet_models, workdir=tmp_path, devices=["board-1"], metrics=True) as fleet:
        raw, _ = mqtt_client(fleet.broker.settings("board-1"))
        raw.publish_confirmed(T.open("board-1", "s-bad"), b"\xc1 not msgpack")
        bad = fleet.app.exchange("board-1", "bad-1", b'{"request_id": "bad-1"}')
        assert bad.reason == "error"
        # The server answers the bad open from its scheduler thread, in its own time.
        server = scrape_when(
            fleet.metrics_servers["server-1"].url, lambda s: value(s, "fleet_server_errors_total", reason="malformed") > 0
        )
        board = scrape(fleet.metrics_servers["board-1"].url)
    assert value(server, "fleet_server_errors_total", reason="malformed") == 1
    assert value(board, "fleet_device_errors_total", reason="request_invalid") == 1


def test_a_closed_endpoint_frees_its_port() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    metrics.record_verdict(drafted=4, accepted=3, committed=4)
    endpoint = serve_metrics(0, metrics.registry, host="127.0.0.1")
    assert value(scrape(endpoint.url), "fleet_server_committed_tokens_total") == 4
    endpoint.close()
    with pytest.raises(urllib.error.URLError):
        scrape(endpoint.url)
