"""End to end over a real Mosquitto: boards draft with ONNX Runtime, one server verifies with
transformers, apps ask over MQTT. Tiny seeded models, float32, greedy unless said."""

import json
import os
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.drafter import Drafter
from fleet.config import DeviceSettings, ServerSettings
from fleet.local import APP_ID, FleetModels, LocalFleet
from fleet.protocol import DraftMessage, GenerationRequest, Topics, decode_verdict, encode
from tests.conftest import NEW_TOKENS, PROMPTS


def _fleet(
    models: FleetModels, tmp_path: Path, devices: list[str], device_update: dict[str, object] | None = None,
    **kwargs: object,
) -> LocalFleet:
    return LocalFleet(
        models=models,
        workdir=tmp_path,
        devices=devices,
        # Fixed k: adaptive k would hand every session to the milliseconds-fast tiny target.
        server=ServerSettings(k_max=8, batch_window_ms=20, max_sessions=32, speculation="fixed"),
        device=DeviceSettings(k_max=6, threshold=0.2, max_concurrent_requests=4, **(device_update or {})),
        **kwargs,
    )


def test_four_boards_three_requests_each_equal_target_alone(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    devices = ["board-1", "board-2", "board-3", "board-4"]
    jobs = [(devices[i % 4], prompt) for i, prompt in enumerate(PROMPTS)]
    with structlog.testing.capture_logs() as logs, _fleet(fleet_models, tmp_path, devices) as fleet:
        def run(job: tuple[str, str]) -> list[int]:
            device, prompt = job
            request = GenerationRequest(request_id=f"r{PROMPTS.index(prompt)}", prompt=prompt, max_new_tokens=NEW_TOKENS)
            response = fleet.app.generate(device, request, timeout_s=120)
            assert response.error is None, response.error
            assert response.stats is not None and response.stats.verifications > 0
            return response.tokens or []

        with ThreadPoolExecutor(len(jobs)) as pool:
            outputs = list(pool.map(run, jobs))
    for (_, prompt), tokens in zip(jobs, outputs, strict=True):
        assert len(tokens) == NEW_TOKENS
        assert tokens == references[prompt], f"output differs from the target alone for {prompt!r}"
    batch_sizes = [entry["sessions"] for entry in logs if entry["event"] == "batch_verified"]
    assert max(batch_sizes) > 1, "the server never verified more than one session in a batch"


def test_external_paho_client_without_project_code(fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path) -> None:
    prompt = PROMPTS[0]
    with _fleet(fleet_models, tmp_path, ["board-1"]) as fleet:
        creds = fleet.broker.credentials
        done = threading.Event()
        responses: list[dict] = []

        def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            body = json.loads(message.payload)
            assert message.properties.CorrelationData == b"corr-42"
            responses.append(body)
            if body["done"]:
                done.set()

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="external-app", protocol=mqtt.MQTTv5)
        client.username_pw_set(APP_ID, creds.identity(APP_ID).password.get_secret_value())
        client.tls_set(ca_certs=str(creds.ca_file), cert_reqs=ssl.CERT_REQUIRED)
        client.on_message = on_message
        client.connect(creds.host, creds.port)
        client.loop_start()
        try:
            client.subscribe("sled/v1/devices/board-1/responses/#", qos=1)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "sled/v1/devices/board-1/responses/ext-1"
            props.CorrelationData = b"corr-42"
            time.sleep(0.2)
            body = {"request_id": "ext-1", "prompt": prompt, "max_new_tokens": NEW_TOKENS}
            client.publish("sled/v1/devices/board-1/requests", json.dumps(body), qos=1, properties=props)
            assert done.wait(60), "no final response"
        finally:
            client.loop_stop()
            client.disconnect()
    final = responses[-1]
    assert final["reason"] == "length" and final["tokens"] == references[prompt]
    assert "".join(r["delta"] for r in responses) != ""


def test_mosquitto_clients_get_a_generation(fleet_models: FleetModels, tmp_path: Path) -> None:
    with _fleet(fleet_models, tmp_path, ["board-1"]) as fleet:
        creds = fleet.broker.credentials
        auth = ["-h", creds.host, "-p", str(creds.port), "--cafile", str(creds.ca_file),
                "-u", APP_ID, "-P", creds.identity(APP_ID).password.get_secret_value(), "-V", "mqttv5"]
        sub = subprocess.Popen(
            ["mosquitto_sub", *auth, "-q", "1", "-t", "sled/v1/devices/board-1/responses/cli-1", "-W", "60"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            time.sleep(0.5)
            request = json.dumps({"request_id": "cli-1", "prompt": PROMPTS[1], "max_new_tokens": 16})
            subprocess.run(["mosquitto_pub", *auth, "-q", "1", "-t", "sled/v1/devices/board-1/requests", "-m", request], check=True)
            lines = []
            for line in sub.stdout:
                lines.append(json.loads(line))
                if lines[-1]["done"]:
                    break
        finally:
            sub.kill()
    assert lines[-1]["reason"] == "length" and lines[-1]["stats"]["tokens"] == 16


def test_bad_input_gets_errors_and_disturbs_no_one(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    prompt = PROMPTS[2]
    with _fleet(fleet_models, tmp_path, ["board-1", "board-2"]) as fleet:
        result: dict[str, object] = {}
        honest = threading.Thread(target=lambda: result.update(
            r=fleet.app.generate("board-1", GenerationRequest(request_id="honest", prompt=prompt, max_new_tokens=NEW_TOKENS))
        ))
        honest.start()
        # A malformed request JSON: an error response on the response topic.
        bad = fleet.app.exchange("board-1", "bad-1", b'{"request_id": "bad-1", "prompt": 7')
        assert bad.done and bad.reason == "error" and "malformed" in (bad.error or "")
        missing = fleet.app.exchange("board-1", "bad-2", b'{"request_id": "bad-2"}')
        assert missing.reason == "error" and "prompt" in (missing.error or "")
        # Malformed and invalid drafts from board-2 (its own topics): error verdicts, nothing else.
        board = fleet.broker.settings("board-2")
        from fleet.mqtt import make_client

        raw = make_client("raw-board-2", board)
        verdicts: list[bytes] = []
        raw.on_message = lambda c, u, m: verdicts.append(bytes(m.payload))
        raw.connect_and_wait()
        topics = Topics()
        raw.subscribe(topics.device_verdicts("board-2"), qos=1)
        time.sleep(0.2)
        raw.publish_confirmed(topics.open("board-2", "s-bad"), b"\xc1\xff garbage")
        too_long = DraftMessage(session="s-long", seq=0, committed_len=2, context=[1, 2],
                                params=GenerationRequest(request_id="x", prompt="x").sampling(), tokens=[1] * 20)
        raw.publish_confirmed(topics.open("board-2", "s-long"), encode(too_long, binary=True))
        # A draft (no context) for a session nobody opened, sent where servers listen.
        raw.publish_confirmed(topics.open("board-2", "s-none"), encode(DraftMessage(session="s-none", seq=3, committed_len=2, tokens=[1]), binary=True))
        deadline = time.monotonic() + 10
        while len(verdicts) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        raw.disconnect()
        raw.loop_stop()
        honest.join(60)
    codes = sorted(decode_verdict(v).error_code for v in verdicts)
    assert codes == ["malformed", "too_long", "unknown_session"]
    assert result["r"].tokens == references[prompt]


def test_k_zero_hands_decoding_to_the_server_and_back(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict suggesting k = 0 makes the server decode on its own (pushed verdicts, no
    drafts); the output is still the target's. With `speculation = "off"` it never hands back,
    and its verdicts tell the board not to keep its draft cache up: only the first open, before
    any verdict, feeds it."""
    feeds: list[int] = []
    keep_up = Drafter.keep_up

    def counted(drafter: Drafter) -> None:
        feeds.append(drafter.committed_length)
        keep_up(drafter)

    monkeypatch.setattr(Drafter, "keep_up", counted)
    fleet = LocalFleet(
        models=fleet_models, workdir=tmp_path, devices=["board-1"],
        server=ServerSettings(k_max=8, speculation="off"),
        device=DeviceSettings(k_max=6, threshold=0.2, pipeline=True),
    )
    with fleet, structlog.testing.capture_logs() as logs:
        for index, prompt in enumerate(PROMPTS[:2]):
            request = GenerationRequest(request_id=f"k0-{index}", prompt=prompt, max_new_tokens=NEW_TOKENS)
            response = fleet.app.generate("board-1", request, timeout_s=120)
            assert response.error is None, response.error
            assert response.tokens == references[prompt]
            assert response.stats is not None
            # Only the first request drafts (its open); the next opens as the last verdict said.
            assert response.stats.drafted == (0 if index else response.stats.drafted) <= 6
            assert response.stats.verifications == NEW_TOKENS - response.stats.accepted
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    assert len(feeds) == 1, feeds


def test_draft_cpus_hold_only_the_threads_that_draft(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """`fleet bench --board-cpus` keeps emulated boards' drafting off the server's CPUs; the
    board's MQTT thread and the server keep every CPU of the process."""
    everything = os.sched_getaffinity(0)
    board_cpu = max(everything)
    prompt = PROMPTS[0]
    with _fleet(fleet_models, tmp_path, ["board-1"], device_update={"draft_cpus": [board_cpu]}) as fleet:
        request = GenerationRequest(request_id="pinned", prompt=prompt, max_new_tokens=NEW_TOKENS)
        response = fleet.app.generate("board-1", request, timeout_s=120)
        assert response.stats is not None and response.stats.drafted > 0
        cpus = {t.name: os.sched_getaffinity(t.native_id) for t in threading.enumerate()}
    assert response.tokens == references[prompt]
    generation = [held for name, held in cpus.items() if name.startswith("generation")]
    assert generation and all(held == {board_cpu} for held in generation), cpus
    others = [held for name, held in cpus.items() if not name.startswith("generation")]
    assert others and all(held == everything for held in others), cpus


def test_draft_cpus_the_machine_lacks_are_refused(fleet_models: FleetModels, tmp_path: Path) -> None:
    missing = (os.cpu_count() or 1) + 3
    with (
        pytest.raises(ValueError, match=f"draft_cpus \\[{missing}\\]"),
        _fleet(fleet_models, tmp_path, ["board-1"], device_update={"draft_cpus": [missing]}),
    ):
        pass
