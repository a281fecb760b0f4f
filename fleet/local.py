"""A whole fleet on this machine: broker, verification server(s) and boards, in one process.

The demo, the integration tests and the benchmarks all need the same thing: a real Mosquitto
with passwords and ACL, a server and N boards that talk only through it, and an app client.
Components run as threads (torch and onnxruntime release the GIL while they compute); each
connects to the broker with its own identity exactly as a separate process would.
"""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from broker.process import LocalBroker, prepare_local_broker
from device.agent import BoardAgent
from device.runner import DraftRunner
from fleet.app import AppClient
from fleet.config import DeviceSettings, ServerSettings, Settings
from fleet.metrics import (
    ComponentMetrics,
    DeviceMetrics,
    MetricsServer,
    ServerMetrics,
    serve_component_metrics,
)
from fleet.mqtt import FleetClient, make_client
from fleet.protocol import DeviceStatus, ProtocolError, ServerStatus, Topics, decode_json

if TYPE_CHECKING:  # torch is imported only when a server actually starts
    from fleet.bench.link import DelayedLink
    from server.service import VerificationService

APP_ID = "app"
OBSERVER_ID = "ops"


@dataclass(frozen=True)
class FleetModels:
    """The target checkpoint the server loads and the exported ONNX draft the boards load."""

    target_name: str
    target_dir: Path
    draft_dir: Path


@dataclass
class LocalFleet:
    """Start with `with LocalFleet(...) as fleet:`; `fleet.app` then requests generations."""

    models: FleetModels
    workdir: Path
    devices: list[str]
    servers: list[str] = field(default_factory=lambda: ["server-1"])
    server: ServerSettings = field(default_factory=ServerSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    tls: bool = True
    ready_timeout_s: float = 60.0
    # Each component serves Prometheus metrics on its own free port (127.0.0.1), found in
    # `metrics_servers[component id]`.
    metrics: bool = False
    # Boards reach the broker through a link with this round-trip time (fleet.bench.link);
    # servers and apps connect directly.
    board_rtt_ms: float = 0.0

    broker: LocalBroker = field(init=False)
    services: dict[str, "VerificationService"] = field(init=False, default_factory=dict)
    agents: dict[str, BoardAgent] = field(init=False, default_factory=dict)
    app: AppClient = field(init=False)
    _app_client: FleetClient = field(init=False)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    # One ONNX session for every board of this process (InferenceSession.run is thread-safe):
    # 32 boards would otherwise hold 32 copies of the draft's weights.
    _draft: DraftRunner | None = field(init=False, default=None)
    _link: "DelayedLink | None" = field(init=False, default=None)
    metrics_servers: dict[str, MetricsServer] = field(init=False, default_factory=dict)

    def __enter__(self) -> Self:
        self.broker = self._start_broker()
        try:
            if self.board_rtt_ms > 0:
                from fleet.bench.link import DelayedLink

                self._link = DelayedLink(self.broker.credentials.host, self.broker.credentials.port, self.board_rtt_ms)
                self._link.__enter__()
            self._start_components()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_broker(self) -> LocalBroker:
        """The broker servers, the app and the observer use (a topology with more brokers
        overrides this and `settings`)."""
        broker = prepare_local_broker(self.workdir / "broker", tls=self.tls, **self.identities())
        broker.process.start()
        return broker

    def identities(self) -> dict[str, list[str]]:
        """Everyone the broker(s) must let in, by role."""
        return {"devices": self.devices, "servers": self.servers, "apps": [APP_ID], "observers": [OBSERVER_ID]}

    def settings(self, identity: str, **sections: object) -> Settings:
        return Settings(
            home=self.workdir / "home",
            topic_root=self.broker.credentials.topic_root,
            broker=self.broker.settings(identity),
            **sections,
        )

    def _start_components(self) -> None:
        for server_id in self.servers:
            self.start_server(server_id)
        for device_id in self.devices:
            self.start_device(device_id)
        self._app_client = make_client(f"{APP_ID}-client", self.broker.settings(APP_ID))
        self._app_client.connect_and_wait()
        self.app = AppClient(self._app_client, Topics(self.broker.credentials.topic_root))
        self.wait_online(set(self.servers), set(self.devices))

    def start_server(self, server_id: str) -> "VerificationService":
        from server.engine import Engine
        from server.service import VerificationService

        server = self.server.model_copy(update={"server_id": server_id})
        engine = Engine(
            self.models.target_dir,
            dtype=server.dtype,
            device=server.device,
            linear_kernel=server.linear_kernel,
            k_max=server.k_max,
            memory_budget_bytes=int(server.memory_budget_mb * 2**20),
            max_sessions=server.max_sessions,
        )
        service = VerificationService(
            self.settings(server_id, server=server), engine, self.models.target_name,
            metrics=self._metrics(server_id, ServerMetrics),
        )
        self.services[server_id] = service
        self._spawn(service.run, f"server-{server_id}")
        return service

    def start_device(self, device_id: str) -> BoardAgent:
        device = self.device.model_copy(update={"device_id": device_id})
        if self._draft is None:
            self._draft = DraftRunner(self.models.draft_dir, intra_op_threads=device.draft_threads)
        settings = self.settings(device_id, device=device)
        if self._link is not None:
            settings.broker = settings.broker.model_copy(update={"port": self._link.port})
        agent = BoardAgent(
            settings, self.models.draft_dir,
            runner_factory=self._draft.fork,
            metrics=self._metrics(device_id, DeviceMetrics),
        )
        self.agents[device_id] = agent
        self._spawn(agent.run, f"device-{device_id}")
        return agent

    def _metrics(self, component: str, kind: type[ComponentMetrics]) -> ComponentMetrics | None:
        if not self.metrics:
            return None
        metrics, self.metrics_servers[component] = serve_component_metrics(kind, 0, host="127.0.0.1")
        return metrics

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait_online(self, servers: set[str], devices: set[str]) -> None:
        """Block until every named component has published an online status (so that its
        subscriptions are in place before the first request)."""
        observer = make_client(f"{OBSERVER_ID}-ready", self.broker.settings(OBSERVER_ID))
        online: set[str] = set()
        event = threading.Event()
        wanted = {f"server:{s}" for s in servers} | {f"device:{d}" for d in devices}

        def on_message(client: object, userdata: object, message: object) -> None:
            try:
                model = ServerStatus if "/servers/" in message.topic else DeviceStatus
                status = decode_json(model, bytes(message.payload))
            except ProtocolError:
                return
            if status.online:
                online.add(f"{status.kind}:{status.id}")
            if wanted <= online:
                event.set()

        topics = Topics(self.broker.credentials.topic_root)
        observer.on_message = on_message
        observer.connect_and_wait()
        observer.subscribe([(topics.all_server_status(), 1), (topics.all_device_status(), 1)])
        try:
            if not event.wait(self.ready_timeout_s):
                raise TimeoutError(f"not online after {self.ready_timeout_s:.0f} s: {sorted(wanted - online)}")
        finally:
            observer.disconnect()
            observer.loop_stop()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for agent in self.agents.values():
            agent.stop()
        for service in self.services.values():
            service.stop()
        deadline = time.monotonic() + 10
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if hasattr(self, "_app_client"):
            self._app_client.disconnect()
            self._app_client.loop_stop()
        for endpoint in self.metrics_servers.values():
            endpoint.close()
        if self._link is not None:
            self._link.__exit__(None, None, None)
        self.broker.process.stop()
