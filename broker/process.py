"""A Mosquitto process owned by this program: tests, `fleet broker` and fault drills.

The broker is a real `mosquitto` started from a rendered config; readiness is "the process is
alive and its port accepts TCP", bounded in time, and every failure quotes the broker's own log.
"""

import secrets
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.certs import DEFAULT_HOSTS, broker_tls
from broker.config import (
    BridgeSpec,
    BridgeTopic,
    BrokerCredentials,
    BrokerIdentity,
    BrokerSpec,
    Role,
    find_tool,
    render,
)
from fleet.config import BrokerSettings
from fleet.logging import get_logger

LOG_FILE = "mosquitto.log"


class BrokerStartError(RuntimeError):
    """The broker did not come up; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def accepts_connections(host: str, port: int) -> bool:
    """Whether something listens on host:port (a TCP connect, closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """`mosquitto -c <dir>/mosquitto.conf`, logging to `<dir>/mosquitto.log`.

    `restart()` keeps the port and files, so clients can reconnect to the same address (with a
    persistence dir in the spec, retained messages and durable sessions survive it too).
    """

    def __init__(self, spec: BrokerSpec, directory: Path, start_timeout_s: float = 10.0) -> None:
        self.spec = spec
        self.directory = directory
        self.start_timeout_s = start_timeout_s
        self.config_file = render(spec, directory)
        self.log_file = directory / LOG_FILE
        self._process: subprocess.Popen[bytes] | None = None
        self._log = get_logger(component="broker", port=spec.port)

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.spec.bind_address in ("", "0.0.0.0") else self.spec.bind_address

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> Self:
        if self.running:
            return self
        if accepts_connections(self.host, self.port):
            raise BrokerStartError(
                f"port {self.port} on {self.host} is already in use by another process"
            )
        with self.log_file.open("ab") as log_out:
            log_start = log_out.tell()
            self._process = subprocess.Popen(
                [find_tool("mosquitto"), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not (self._reports_running(log_start) and accepts_connections(self.host, self.port)):
            if self._process.poll() is not None:
                raise BrokerStartError(
                    f"mosquitto exited with status {self._process.returncode} while starting "
                    f"on port {self.port}; log {self.log_file}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"mosquitto did not accept connections on port {self.port} within "
                    f"{self.start_timeout_s:.0f} s; log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self._log.info("broker started", pid=self._process.pid, tls=self.spec.tls is not None)
        return self

    def _reports_running(self, log_start: int) -> bool:
        """Whether this start's log says `mosquitto version ... running`.

        Mosquitto binds its listen sockets before it loads their TLS keys, so a port that
        accepts connections can still belong to a broker about to exit on a bad key; the
        `running` line comes only once every listener is set up.
        """
        with self.log_file.open("rb") as log_in:
            log_in.seek(log_start)
            return any(
                line.startswith(b"mosquitto version") and line.rstrip().endswith(b" running")
                for line in (entry.partition(b": ")[2] for entry in log_in)
            )

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (mosquitto saves persistence on the way out); SIGKILL if it lingers."""
        if not self.running:
            return
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.info("broker stopped")

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests (no persistence write, no clean goodbye)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        self._process.wait()
        self._log.info("broker killed")

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def wait(self) -> int:
        """Block until the broker exits (foreground `fleet broker`); returns its status."""
        if self._process is None:
            raise RuntimeError("the broker was never started")
        return self._process.wait()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return "(no log written)"
        with self.log_file.open(errors="replace") as log_in:
            return "".join(deque(log_in, maxlen=lines))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class LocalBroker:
    """A broker on this machine plus what each identity needs to reach it."""

    process: MosquittoProcess
    credentials: BrokerCredentials

    def settings(self, identity: str | None = None) -> BrokerSettings:
        """Client settings for `identity`, or anonymous ones (address and TLS only)."""
        if identity is not None:
            return self.credentials.settings_for(identity)
        return BrokerSettings(
            host=self.credentials.host,
            port=self.credentials.port,
            tls=self.credentials.tls,
            ca_file=self.credentials.ca_file,
        )

    def __enter__(self) -> Self:
        self.process.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.process.stop()


def prepare_local_broker(
    directory: Path,
    *,
    devices: Sequence[str] = (),
    servers: Sequence[str] = (),
    apps: Sequence[str] = (),
    observers: Sequence[str] = (),
    tls: bool = True,
    port: int | None = None,
    persistence: bool = False,
    topic_root: str = "sled/v1",
    previous: BrokerCredentials | None = None,
    bridges: Sequence[BridgeSpec] = (),
    bridge_topics: Mapping[str, Sequence[BridgeTopic]] | None = None,
) -> LocalBroker:
    """Render a local broker into `directory` (not started: use it as a context manager).

    Every named identity gets a random password, except that one already in `previous` keeps
    its password, so re-provisioning does not lock out clients configured earlier. With no
    names at all the broker is anonymous (tests and experiments only). `bridges` are links
    this broker opens; `bridge_topics` names the bridge identities it accepts and what each
    may carry (broker/bridge.py).
    """
    accepted = {name: list(topics) for name, topics in (bridge_topics or {}).items()}
    roles: dict[Role, Sequence[str]] = {
        "device": devices,
        "server": servers,
        "app": apps,
        "observer": observers,
        "bridge": list(accepted),
    }
    known = {identity.name: identity for identity in previous.identities} if previous else {}
    identities = [
        known[name]
        if name in known and known[name].role == role
        else BrokerIdentity(name=name, role=role, password=secrets.token_urlsafe(18))
        for role, names in roles.items()
        for name in names
    ]
    spec = BrokerSpec(
        port=port if port is not None else free_port(),
        tls=broker_tls(directory / "tls", hosts=DEFAULT_HOSTS) if tls else None,
        identities=identities,
        anonymous=not identities,
        topic_root=topic_root,
        persistence_dir=directory / "data" if persistence else None,
        bridges=list(bridges),
        bridge_topics=accepted,
    )
    credentials = BrokerCredentials(
        host="127.0.0.1",
        port=spec.port,
        tls=tls,
        ca_file=spec.tls.ca_file if spec.tls else None,
        topic_root=topic_root,
        identities=identities,
    )
    return LocalBroker(MosquittoProcess(spec, directory), credentials)
