"""The one place that builds MQTT clients: paho-mqtt 2.x, callback API v2, MQTT v5.

Two things paho leaves to the caller are done here once:
- connecting *and knowing the outcome*: an unreachable broker, a failed TLS handshake and
  refused credentials raise distinct exceptions, so a CLI can map them to exit codes;
- knowing whether a QoS 1 publish was *accepted*: mosquitto answers a publish its ACL denies
  with a PUBACK carrying "not authorized", which paho reports as published. `FleetClient`
  records every PUBACK reason code so `publish_confirmed` can tell.
"""

import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, Field

from fleet.config import BrokerSettings
from fleet.logging import get_logger

# paho keeps every QoS 1 message in memory until its PUBACK; while the broker is away nothing
# is acknowledged, so without a bound a long outage (or a server decoding for its sessions)
# grows the queue without limit. Beyond it, publish() reports MQTT_ERR_QUEUE_SIZE and the
# message is dropped and logged: boards and servers recover from a lost message by resync.
MAX_QUEUED_MESSAGES = 1000
# Mosquitto's default ReceiveMaximum (`max_inflight_messages 20`): more in flight would only
# wait in the broker.
MAX_INFLIGHT_MESSAGES = 20


class MqttError(Exception):
    """Base of every error raised here."""


class BrokerConnectError(MqttError):
    """The client could not get a session with the broker."""


class BrokerUnreachable(BrokerConnectError):
    """Nothing answered at the broker's address (refused, timed out, no CONNACK)."""


class BrokerTlsError(BrokerConnectError):
    """The TLS handshake failed: unknown CA, wrong host name, or no client certificate."""


class BrokerRefused(BrokerConnectError):
    """The broker answered CONNACK with a failure (bad username or password, not authorized)."""

    def __init__(self, reason: ReasonCode) -> None:
        super().__init__(f"broker refused the connection: {reason}")
        self.reason = reason


class PublishDenied(MqttError):
    """The broker acknowledged a publish with a failure reason (typically the ACL)."""

    def __init__(self, topic: str, reason: ReasonCode) -> None:
        super().__init__(f"publish to {topic!r} refused by the broker: {reason}")
        self.topic = topic
        self.reason = reason


class PublishUnconfirmed(MqttError):
    """No PUBACK: not connected, client queue full, or none within the allowed time."""


class Will(BaseModel):
    """Last will: what the broker publishes for us when we vanish."""

    topic: str
    payload: bytes
    qos: int = Field(1, ge=0, le=2)
    retain: bool = True


class FleetClient(mqtt.Client):
    """A paho client that remembers the failed PUBACKs.

    Do not replace `on_publish`: it is how `publish_confirmed` learns the outcome. Only failure
    reason codes are kept, per message id, and a successful PUBACK clears its id: keeping every
    one (paho makes a ~1 KB object per PUBACK) grew a busy client by up to 70 MB before the
    message ids wrapped.
    """

    def __init__(self, client_id: str) -> None:
        super().__init__(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._puback_reasons: dict[int, ReasonCode] = {}
        self.on_publish = self._record_puback
        self.on_socket_open = _no_delay
        self._log = get_logger(component="mqtt", client=client_id)

    def publish(
        self,
        topic: str,
        payload: mqtt.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """paho's publish; a message refused because the outgoing queue is full is logged
        here, the one place every publish passes."""
        info = super().publish(topic, payload, qos, retain, properties)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._log.warning(
                "publish_dropped", topic=topic, reason=f"{self.max_queued_messages} messages wait for the broker"
            )
        return info

    def _record_puback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason.is_failure:
            self._puback_reasons[mid] = reason
        else:
            self._puback_reasons.pop(mid, None)  # an earlier use of this id

    def connect_and_wait(self, timeout_s: float = 10.0) -> None:
        """Open the connection configured by `make_client`, start the network thread and wait
        for the CONNACK. Later drops are reconnected by paho; `on_connect` fires each time."""
        answered = threading.Event()
        outcome: list[ReasonCode | None] = []  # None: closed before any CONNACK
        user_on_connect, user_on_disconnect = self.on_connect, self.on_disconnect

        def settle(result: ReasonCode | None) -> None:
            self.on_connect, self.on_disconnect = user_on_connect, user_on_disconnect
            if result is None or result.is_failure:
                self.disconnect()  # stops paho from retrying, so loop_stop() returns at once
            outcome.append(result)
            answered.set()

        def first_connack(
            client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
        ) -> None:
            # The caller's on_connect (its subscriptions) runs before connect_and_wait returns.
            try:
                if user_on_connect is not None:
                    user_on_connect(client, userdata, flags, reason, properties)
            finally:
                settle(reason)

        def closed_before_connack(
            client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
        ) -> None:
            settle(None)

        self.on_connect, self.on_disconnect = first_connack, closed_before_connack
        where = f"{self.host}:{self.port}"
        try:
            self.reconnect()
        except ssl.SSLError as exc:
            self.on_connect, self.on_disconnect = user_on_connect, user_on_disconnect
            raise BrokerTlsError(f"TLS handshake with {where} failed: {exc}") from exc
        except OSError as exc:
            self.on_connect, self.on_disconnect = user_on_connect, user_on_disconnect
            raise BrokerUnreachable(f"cannot reach the broker at {where}: {exc}") from exc
        self.loop_start()
        if not answered.wait(timeout_s):
            self.loop_stop()
            self.on_connect, self.on_disconnect = user_on_connect, user_on_disconnect
            raise BrokerUnreachable(f"no CONNACK from {where} within {timeout_s:.0f} s")
        result = outcome[0]
        if result is None or result.is_failure:
            self.loop_stop()
        if result is None:
            raise BrokerUnreachable(
                f"{where} closed the connection before answering; does the client's TLS setting "
                "match the listener, and does the listener require a client certificate?"
            )
        if result.is_failure:
            raise BrokerRefused(result)

    def publish_confirmed(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        properties: Properties | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """QoS 1 publish that returns only once the broker accepted it; raises PublishDenied
        when the PUBACK carries a failure. Not for use inside callbacks: the PUBACK is read by
        the very network thread a callback runs on."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "publish_confirmed would deadlock inside a paho callback; use publish()"
            )
        # paho fails a publish made while disconnected at once, even though it would resend it
        # after reconnecting: wait out a reconnection (a broker restart) within the same budget.
        deadline = time.monotonic() + timeout_s
        while not self.is_connected():
            if time.monotonic() > deadline:
                raise PublishUnconfirmed(
                    f"publish to {topic!r}: not connected for {timeout_s:.0f} s"
                )
            time.sleep(0.05)
        info = self.publish(topic, payload, qos=1, retain=retain, properties=properties)
        try:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
        except (ValueError, RuntimeError) as exc:
            raise PublishUnconfirmed(f"publish to {topic!r} not sent: {exc}") from exc
        if not info.is_published():
            raise PublishUnconfirmed(f"no PUBACK for {topic!r} within {timeout_s:.0f} s")
        reason = self._puback_reasons.pop(info.mid, None)
        if reason is not None:
            raise PublishDenied(topic, reason)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Drafts and verdicts are small, latency-bound packets: Nagle's algorithm would hold each
    one back for the previous packet's ACK (~40 ms a hop with delayed ACKs)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(
    client_id: str,
    broker: BrokerSettings,
    *,
    will: Will | None = None,
    clean_start: bool = True,
    session_expiry_s: int = 0,
) -> FleetClient:
    """A configured, not yet connected client; call `connect_and_wait()` next.

    `session_expiry_s > 0` with `clean_start=False` makes a durable session: the broker keeps
    its subscriptions and queued QoS 1 messages across a disconnect for that long (MQTT v5
    drops the session at disconnect when the interval is 0).
    """
    client = FleetClient(client_id)
    if broker.username is not None:
        password = broker.password.get_secret_value() if broker.password is not None else None
        client.username_pw_set(broker.username, password)
    if broker.tls:
        client.tls_set(
            ca_certs=str(broker.ca_file) if broker.ca_file else None,
            certfile=str(broker.cert_file) if broker.cert_file else None,
            keyfile=str(broker.key_file) if broker.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    # Broker restarts are a normal day: retry quickly instead of paho's 2-minute ceiling.
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.max_inflight_messages_set(MAX_INFLIGHT_MESSAGES)
    client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry_s
    client.connect_async(
        broker.host,
        broker.port,
        keepalive=broker.keepalive_s,
        clean_start=clean_start,
        properties=properties,
    )
    return client
