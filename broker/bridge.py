"""Bridged brokers: a fleet over several sites.

Each site runs its own Mosquitto for its boards (they keep a short, local link: drafts and
verdicts are latency-bound), and the site broker opens one bridge to the central broker where
the verification servers and the apps are. The bridge carries exactly the fleet's topics of the
site's boards (docs/scaling.md):

    site -> central (out)   R/devices/D/status, .../sessions/+/open, .../sessions/+/draft,
                            R/devices/D/responses/#
    central -> site (in)    R/devices/D/sessions/+/verdict, R/devices/D/requests,
                            R/servers/+/status

and logs in to the central broker as its own identity (role "bridge"), whose ACL there allows
exactly those topics, in those directions, for those boards. Servers keep claiming opens with
their shared subscription on the central broker: a bridged open is an ordinary publish there.
No topic goes both ways, so no message can loop between the brokers.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.config import BridgeSpec, BridgeTopic
from broker.process import LocalBroker, prepare_local_broker
from fleet.protocol.topics import check_id

ANY_DEVICE = "+"
# Per board, what leaves the site and what comes back to it.
SITE_TO_CENTRAL = ("status", "sessions/+/open", "sessions/+/draft", "responses/#")
CENTRAL_TO_SITE = ("sessions/+/verdict", "requests")


def fleet_bridge_topics(topic_root: str, devices: Sequence[str] = ()) -> list[BridgeTopic]:
    """The topics a site with these boards exchanges with the central broker, QoS 1 as on the
    hot path. No devices: any board (`+`), so boards can be added at the site alone, at the
    price that the site's bridge may then act for any board of the fleet."""
    levels = [check_id("device", device) for device in devices] or [ANY_DEVICE]
    topics = [
        BridgeTopic(pattern=f"{topic_root}/devices/{level}/{suffix}", direction=direction)
        for level in levels
        for direction, suffixes in (("out", SITE_TO_CENTRAL), ("in", CENTRAL_TO_SITE))
        for suffix in suffixes
    ]
    return [*topics, BridgeTopic(pattern=f"{topic_root}/servers/+/status", direction="in")]


def bridge_identity(site: str) -> str:
    """The site bridge's username (and client id) on the central broker."""
    return f"bridge-{check_id('site', site)}"


@dataclass
class BridgedBrokers:
    """A central broker (servers, apps, observers) and one site broker (boards) bridged to it.

    Used as a context manager it starts the central broker first, so the site's bridge finds
    it at once instead of waiting out its reconnect delay."""

    central: LocalBroker
    site: LocalBroker

    def __enter__(self) -> Self:
        self.central.process.start()
        try:
            self.site.process.start()
        except BaseException:
            self.central.process.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.site.process.stop()
        self.central.process.stop()


def prepare_bridged_brokers(
    directory: Path,
    *,
    site: str = "site-1",
    devices: Sequence[str],
    servers: Sequence[str] = (),
    apps: Sequence[str] = (),
    observers: Sequence[str] = (),
    tls: bool = True,
    topic_root: str = "sled/v1",
    any_device: bool = False,
) -> BridgedBrokers:
    """Render both brokers into `directory/central` and `directory/site` (not started).

    The central broker gets the bridge identity with a random password and the ACL for this
    site's boards (any board with `any_device`); the site broker gets the boards' identities
    and the bridge to the central broker (over TLS, checked against the central CA, when
    `tls`)."""
    topics = fleet_bridge_topics(topic_root, () if any_device else devices)
    name = bridge_identity(site)
    central = prepare_local_broker(
        directory / "central",
        servers=servers,
        apps=apps,
        observers=observers,
        tls=tls,
        topic_root=topic_root,
        bridge_topics={name: topics},
    )
    link = BridgeSpec(
        name=name,
        host=central.credentials.host,
        port=central.credentials.port,
        password=central.credentials.identity(name).password,
        ca_file=central.credentials.ca_file,
        topics=topics,
    )
    site_broker = prepare_local_broker(
        directory / "site", devices=devices, tls=tls, topic_root=topic_root, bridges=[link]
    )
    return BridgedBrokers(central=central, site=site_broker)
