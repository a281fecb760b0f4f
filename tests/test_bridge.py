"""Two real Mosquitto brokers bridged, the topology for a fleet over several sites: boards on
a site broker, servers and apps on a central one, and one bridge between them that carries
exactly the fleet's topics of the site's boards, logged in to the central broker as its own
identity. Tiny seeded models; outputs must equal the target alone."""

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from broker.bridge import (
    BridgedBrokers,
    bridge_identity,
    fleet_bridge_topics,
    prepare_bridged_brokers,
)
from broker.config import BrokerIdentity, BrokerSpec
from broker.process import LocalBroker
from fleet.config import DeviceSettings, ServerSettings, Settings
from fleet.local import APP_ID, OBSERVER_ID, FleetModels, LocalFleet
from fleet.mqtt import PublishDenied
from fleet.protocol import GenerationResponse, Topics, decode_json
from tests.conftest import NEW_TOKENS, PROMPTS, MqttClientFactory
from tests.fleet_helpers import Requests, assert_lossless, wait_until

BOARDS = ["board-1", "board-2"]
SERVERS = ["server-1", "server-2"]
TOPICS = Topics()


@dataclass
class BridgedFleet(LocalFleet):
    """A LocalFleet whose boards connect to a site broker bridged to the central broker
    (`self.broker`), where the servers, the app and the observer connect."""

    brokers: BridgedBrokers = field(init=False)

    def _start_broker(self) -> LocalBroker:
        """Both brokers, bridged; the components then wait until every board's status has
        reached the central broker."""
        self.brokers = prepare_bridged_brokers(
            self.workdir / "brokers", tls=self.tls, **self.identities()
        ).__enter__()
        return self.brokers.central

    def settings(self, identity: str, **sections: object) -> Settings:
        broker = self.brokers.site if identity in self.devices else self.brokers.central
        return Settings(
            home=self.workdir / "home",
            topic_root=broker.credentials.topic_root,
            broker=broker.settings(identity),
            **sections,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, traceback)  # components, then the central broker
        finally:
            self.brokers.site.process.stop()


def _bridged_fleet(
    models: FleetModels, tmp_path: Path, devices: list[str], servers: list[str]
) -> BridgedFleet:
    return BridgedFleet(
        models=models,
        workdir=tmp_path,
        devices=devices,
        servers=servers,
        server=ServerSettings(k_max=8, batch_window_ms=20, max_sessions=32, speculation="fixed"),
        device=DeviceSettings(k_max=6, threshold=0.2, max_concurrent_requests=4),
    )


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[BridgedBrokers]:
    """Both brokers running and bridged; no fleet components."""
    with prepare_bridged_brokers(
        tmp_path / "brokers",
        devices=BOARDS,
        servers=SERVERS,
        apps=[APP_ID],
        observers=[OBSERVER_ID],
    ) as brokers:
        yield brokers


def test_the_bridge_carries_each_topic_one_way_only() -> None:
    topics = fleet_bridge_topics("sled/v1", ["board-1"])
    out = {t.pattern for t in topics if t.direction == "out"}
    back = {t.pattern for t in topics if t.direction == "in"}
    assert out == {
        "sled/v1/devices/board-1/status",
        "sled/v1/devices/board-1/sessions/+/open",
        "sled/v1/devices/board-1/sessions/+/draft",
        "sled/v1/devices/board-1/responses/#",
    }
    assert back == {
        "sled/v1/devices/board-1/sessions/+/verdict",
        "sled/v1/devices/board-1/requests",
        "sled/v1/servers/+/status",
    }
    assert all(t.qos == 1 for t in topics)
    assert {t.pattern for t in fleet_bridge_topics("sled/v1")} >= {
        "sled/v1/devices/+/sessions/+/open"
    }
    with pytest.raises(ValueError, match="device id"):
        fleet_bridge_topics("sled/v1", ["board/#"])


def test_bridge_identities_and_their_topics_go_together() -> None:
    bridge = BrokerIdentity(name="bridge-x", role="bridge", password=SecretStr("secret"))
    with pytest.raises(ValueError, match="bridge_topics"):
        BrokerSpec(port=1883, identities=[bridge])
    with pytest.raises(ValueError, match="bridge_topics"):
        BrokerSpec(port=1883, identities=[bridge], bridge_topics={"bridge-y": []})


def test_the_config_holding_the_bridge_password_is_private(bridged: BridgedBrokers) -> None:
    password = bridged.central.credentials.identity(bridge_identity("site-1")).password
    site_config = bridged.site.process.config_file
    assert password.get_secret_value() in site_config.read_text()
    assert stat.S_IMODE(site_config.stat().st_mode) == 0o600


def test_generation_across_bridged_brokers(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Boards on the site broker, two servers on the central one: every bridged open is
    claimed exactly once through the servers' shared subscription, every output is the
    target's own."""
    jobs = [(BOARDS[i % 2], PROMPTS[i]) for i in range(4)]
    with (
        structlog.testing.capture_logs() as logs,
        _bridged_fleet(fleet_models, tmp_path, BOARDS, SERVERS) as local,
    ):
        for board in BOARDS:
            assert local.agents[board].settings.broker.port == local.brokers.site.credentials.port
        responses = Requests(local, jobs).results()
    assert_lossless(jobs, responses, references)
    opened = [entry["server"] for entry in logs if entry["event"] == "session_opened"]
    assert len(opened) == len(jobs), opened


def test_request_properties_cross_the_bridge(
    fleet_models: FleetModels,
    references: dict[str, list[int]],
    tmp_path: Path,
    mqtt_client: MqttClientFactory,
) -> None:
    """An app on the central broker asks a board on the site broker with MQTT v5 properties:
    the board answers on the ResponseTopic the app chose, with its CorrelationData."""
    prompt = PROMPTS[5]
    reply_to = TOPICS.response("board-1", "custom-reply")
    with _bridged_fleet(fleet_models, tmp_path, ["board-1"], ["server-1"]) as local:
        app, inbox = mqtt_client(
            local.broker.settings(APP_ID), subscribe=[reply_to], client_id="raw-app"
        )
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        props.CorrelationData = b"corr-bridge"
        request = {"request_id": "bridged-1", "prompt": prompt, "max_new_tokens": NEW_TOKENS}
        app.publish_confirmed(TOPICS.requests("board-1"), json.dumps(request), properties=props)
        wait_until(
            lambda: any(
                decode_json(GenerationResponse, m.payload).done for m in inbox.on(reply_to)
            ),
            60,
            "the final response across the bridge",
        )
    responses = inbox.on(reply_to)
    assert all(m.properties.CorrelationData == b"corr-bridge" for m in responses)
    final = decode_json(GenerationResponse, responses[-1].payload)
    assert final.tokens == references[prompt]


def test_the_bridge_identity_may_carry_only_its_sites_topics(
    bridged: BridgedBrokers, mqtt_client: MqttClientFactory
) -> None:
    """On the central broker the bridge's identity writes only what leaves its site and reads
    only what goes back to it: it cannot forge a verdict, a request, a server's status, or any
    message of a board that is not behind it."""
    central = bridged.central
    probe, inbox = mqtt_client(
        central.settings(bridge_identity("site-1")),
        subscribe=["sled/v1/#"],
        client_id="bridge-probe",
    )
    probe.publish_confirmed(TOPICS.open("board-1", "s1"), b"carried")
    probe.publish_confirmed(TOPICS.device_status("board-2"), b"carried")
    for topic in (
        TOPICS.open("board-9", "s1"),  # a board of another site
        TOPICS.verdict("board-1", "s1"),
        TOPICS.requests("board-1"),
        TOPICS.server_status("server-1"),
    ):
        with pytest.raises(PublishDenied):
            probe.publish_confirmed(topic, b"forged")
    server, _ = mqtt_client(central.settings("server-1"), client_id="server-probe")
    server.publish_confirmed(TOPICS.verdict("board-9", "s1"), b"not for this site")
    server.publish_confirmed(TOPICS.verdict("board-1", "s1"), b"for this site")
    assert inbox.wait_for(TOPICS.verdict("board-1", "s1")).payload == b"for this site"
    assert not inbox.on(TOPICS.verdict("board-9", "s1")), "the bridge read another site's verdict"


def test_the_central_broker_sees_the_site_link(
    bridged: BridgedBrokers, mqtt_client: MqttClientFactory
) -> None:
    """The link's state is retained on the central broker, and its will there says when the
    site broker is gone (its boards' own wills cannot cross a dead link)."""
    state = f"{TOPICS.root}/bridges/{bridge_identity('site-1')}/state"
    _, inbox = mqtt_client(bridged.central.settings(OBSERVER_ID), subscribe=[state])
    assert inbox.wait_for(state).payload == b"1"
    bridged.site.process.kill()
    wait_until(lambda: any(m.payload == b"0" for m in inbox.on(state)), 10, "the site link's will")
