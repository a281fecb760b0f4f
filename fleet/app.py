"""What any IoT app does to get a generation from a board: one JSON request, a stream of JSON
responses. Used by `fleet generate`, the demo and the benchmarks; nothing here is needed by a
real app, which can do the same with plain paho-mqtt or mosquitto_pub/sub."""

import queue
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.mqtt import FleetClient
from fleet.protocol import (
    GenerationRequest,
    GenerationResponse,
    ProtocolError,
    Topics,
    decode_json,
    encode,
)


class GenerationTimeout(TimeoutError):
    """The board did not finish the request in time."""


class AppClient:
    """Requests generations from boards over an already connected client.

    Subscribes once to every board's responses it asks (`R/devices/{device}/responses/#`) and
    routes responses to the waiting request by `request_id`; several requests may be in
    flight from several threads.
    """

    def __init__(self, client: FleetClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self._waiting: dict[str, queue.Queue[GenerationResponse]] = {}
        self._subscribed: set[str] = set()
        client.message_callback_add(f"{topics.root}/devices/+/responses/#", self._on_response)
        self._caller_on_connect = client.on_connect
        client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, properties: object) -> None:
        """After a reconnect (a broker restart loses clean sessions) subscribe again, or the
        responses of the requests in flight would reach no one."""
        if self._caller_on_connect is not None:
            self._caller_on_connect(client, userdata, flags, reason, properties)
        for device in list(self._subscribed):
            client.subscribe(self.topics.responses_prefix(device) + "#", qos=1)

    def _on_response(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            response = decode_json(GenerationResponse, bytes(message.payload))
        except ProtocolError:
            return
        # CorrelationData first: it identifies even a request the board could not parse.
        correlation = getattr(message.properties, "CorrelationData", None)
        key = correlation.decode(errors="replace") if correlation else response.request_id or ""
        mailbox = self._waiting.get(key)
        if mailbox is not None:
            mailbox.put(response)

    def generate(
        self,
        device: str,
        request: GenerationRequest,
        on_delta: Callable[[str], None] | None = None,
        timeout_s: float = 300.0,
    ) -> GenerationResponse:
        """Send `request` to `device`; return the final response (with stats or an error)."""
        return self.exchange(device, request.request_id, encode(request, binary=False), on_delta, timeout_s)

    def exchange(
        self,
        device: str,
        request_id: str,
        payload: bytes,
        on_delta: Callable[[str], None] | None = None,
        timeout_s: float = 300.0,
    ) -> GenerationResponse:
        """Publish a request payload as given (valid or not) with a ResponseTopic for
        `request_id`, and collect the responses until the final one."""
        if device not in self._subscribed:
            self.client.subscribe(self.topics.responses_prefix(device) + "#", qos=1)
            self._subscribed.add(device)
        mailbox: queue.Queue[GenerationResponse] = queue.Queue()
        self._waiting[request_id] = mailbox
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topics.response(device, request_id)
        props.CorrelationData = request_id.encode()
        try:
            self.client.publish_confirmed(self.topics.requests(device), payload, properties=props)
            while True:
                try:
                    response = mailbox.get(timeout=timeout_s)
                except queue.Empty as exc:
                    raise GenerationTimeout(f"no response from {device} within {timeout_s:.0f} s") from exc
                if response.delta and on_delta is not None:
                    on_delta(response.delta)
                if response.done:
                    return response
        finally:
            self._waiting.pop(request_id, None)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
