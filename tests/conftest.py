"""Shared fixtures: real Mosquitto brokers on free ports, and the seeded tiny models.

Every broker fixture starts its own `mosquitto` from a generated config in the test's
temporary directory and stops it afterwards; the system broker on 1883 is never used.
"""

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker.process import LocalBroker, prepare_local_broker
from fleet.config import BrokerSettings
from fleet.logging import configure_logging
from fleet.models.tiny import write_tiny_models
from fleet.mqtt import FleetClient, make_client

if TYPE_CHECKING:  # fleet.local pulls in torch: import it only where a fleet is built
    from fleet.local import FleetModels

@pytest.fixture(autouse=True)
def _info_logging() -> None:
    """Every test starts from the services' default log level: CLI tests configure
    `warning`, which would otherwise hide the info events later tests capture."""
    configure_logging("info", "console")


# The identities every secured fixture provisions; tests refer to them by these names.
DEVICES = ("board-a", "board-b")
SERVERS = ("server-1",)
APPS = ("app-1",)
OBSERVERS = ("ops",)

# Prompts of the end-to-end and fault tests, and how many tokens each generates.
PROMPTS = [
    "def add(a, b):",
    "The quick brown fox",
    "MQTT is a lightweight",
    "for i in range(10):",
    "Temperature in the greenhouse",
    "class Sensor:",
    "Write a function that returns",
    "import json",
    "Edge boards draft tokens",
    "if value > threshold:",
    "The server verifies",
    "humidity is 60 percent",
]
NEW_TOKENS = 64


def _fleet_broker(directory: Path, tls: bool, persistence: bool = False) -> LocalBroker:
    return prepare_local_broker(
        directory,
        devices=DEVICES,
        servers=SERVERS,
        apps=APPS,
        observers=OBSERVERS,
        tls=tls,
        persistence=persistence,
    )


@pytest.fixture
def mosquitto_anon(tmp_path: Path) -> Iterator[LocalBroker]:
    """Anonymous plain-TCP broker: `broker.settings()` reaches it."""
    with prepare_local_broker(tmp_path / "broker", tls=False) as broker:
        yield broker


@pytest.fixture
def mosquitto_auth(tmp_path: Path) -> Iterator[LocalBroker]:
    """Plain-TCP broker with passwords and the fleet ACL: `broker.settings("board-a")` etc."""
    with _fleet_broker(tmp_path / "broker", tls=False) as broker:
        yield broker


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[LocalBroker]:
    """TLS-only broker (generated CA and server certificate) with passwords and the ACL."""
    with _fleet_broker(tmp_path / "broker", tls=True) as broker:
        yield broker


@pytest.fixture
def mosquitto_persistent(tmp_path: Path) -> Iterator[LocalBroker]:
    """Like `mosquitto_auth`, with a persistence dir: `broker.process.restart()` keeps retained
    messages and durable sessions (clean_start=False, session expiry > 0), as in production."""
    with _fleet_broker(tmp_path / "broker", tls=False, persistence=True) as broker:
        yield broker


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the seeded tiny Qwen2 pair, written once per test run."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def fleet_models(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> "FleetModels":
    from fleet.local import FleetModels
    from fleet.models.export import export_draft

    target, draft = tiny_models
    report = export_draft(draft, tmp_path_factory.mktemp("draft") / "onnx", "none")
    return FleetModels(target_name="tiny", target_dir=target, draft_dir=report.out)


@pytest.fixture(scope="session")
def references(fleet_models: "FleetModels") -> dict[str, list[int]]:
    """Target-alone greedy output of each prompt (`model.generate`, one prompt at a time)."""
    from tokenizers import Tokenizer

    from fleet.demo import reference_tokens

    tokenizer = Tokenizer.from_file(str(fleet_models.draft_dir / "tokenizer.json"))
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    return dict(zip(PROMPTS, reference_tokens(fleet_models.target_dir, ids, NEW_TOKENS), strict=True))


class Inbox:
    """Messages one test client received, with bounded waits instead of sleeps."""

    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._changed = threading.Condition()

    def on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, topic: str, timeout_s: float = 5.0) -> mqtt.MQTTMessage:
        """The first message on `topic`; fails the test if none arrives in time."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for message in self.messages:
                    if message.topic == topic:
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = sorted({message.topic for message in self.messages})
                    pytest.fail(f"no message on {topic!r} within {timeout_s} s; seen: {seen}")
                self._changed.wait(remaining)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._changed:
            return [message for message in self.messages if message.topic == topic]


MqttClientFactory = Callable[..., tuple[FleetClient, Inbox]]


@pytest.fixture
def mqtt_client() -> Iterator[MqttClientFactory]:
    """`mqtt_client(settings, subscribe=[...], **make_client_options)` -> (connected client,
    inbox); subscriptions are acknowledged before it returns, and every client is disconnected
    at teardown."""
    clients: list[FleetClient] = []
    ids = itertools.count()

    def connect(
        settings: BrokerSettings,
        subscribe: Sequence[str] = (),
        client_id: str | None = None,
        **options: Any,
    ) -> tuple[FleetClient, Inbox]:
        client = make_client(
            client_id or f"test-{settings.username or 'anon'}-{next(ids)}", settings, **options
        )
        inbox = Inbox()
        client.on_message = inbox.on_message
        acknowledged: dict[int, list[ReasonCode]] = {}
        suback = threading.Condition()

        def on_subscribe(
            c: mqtt.Client,
            userdata: object,
            mid: int,
            reasons: list[ReasonCode],
            properties: object,
        ) -> None:
            with suback:
                acknowledged[mid] = reasons
                suback.notify_all()

        client.on_subscribe = on_subscribe
        client.connect_and_wait()
        clients.append(client)
        for topic in subscribe:
            _, mid = client.subscribe(topic, qos=1)
            with suback:
                if not suback.wait_for(lambda mid=mid: mid in acknowledged, timeout=5.0):
                    pytest.fail(f"no SUBACK for {topic!r}")
        return client, inbox

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()
