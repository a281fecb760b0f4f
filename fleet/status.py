"""`fleet status`: the fleet at a glance, read from the retained status topics.

Every server and board keeps one retained status message on the broker (refreshed every few
seconds, replaced by its last will when it vanishes), so a reader needs no registry and no
call to any component: subscribe, let the broker hand over what it retains, and render it.

An `online` flag alone can lie: a process whose scheduler hangs keeps its MQTT keepalive going,
so its will never fires while its status stops being refreshed. Rows therefore carry the age of
their status, and an online row older than `stale_after_s` counts as stale, not online.
"""

import json
import threading
import time
import uuid
from types import TracebackType
from typing import Annotated, Any, Self

import paho.mqtt.client as mqtt
import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from fleet.cli_options import (
    BrokerOpt,
    CaOpt,
    ConfigOpt,
    CredsOpt,
    LevelOpt,
    PasswordOpt,
    UserOpt,
    settings_from_cli,
)
from fleet.config import BrokerSettings
from fleet.logging import get_logger
from fleet.mqtt import BrokerConnectError, make_client
from fleet.protocol import DeviceStatus, ProtocolError, ServerStatus, Topics, decode_json

# Components re-publish every 5 s; six missed refreshes is no scheduling hiccup.
STALE_AFTER_S = 30.0
# Mosquitto sends every retained message right after the SUBACK; once nothing new has arrived
# for this long, the picture is complete (also on a broker a few network hops away).
QUIET_S = 0.25

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_BROKER_UNREACHABLE = 3
EXIT_NO_SERVER = 4
CLICK_USAGE_STATUS = 2


class ServerRow(ServerStatus):
    """A server's retained status, with how old it is as seen by this reader."""

    age_s: float | None = None  # None: the status carries no time (a last will)
    stale: bool = False


class DeviceRow(DeviceStatus):
    """A board's retained status, with how old it is as seen by this reader."""

    age_s: float | None = None
    stale: bool = False


class FleetStatus(BaseModel):
    """Everything the broker retains about the fleet, sorted by id."""

    servers: list[ServerRow]
    devices: list[DeviceRow]

    @property
    def servers_up(self) -> int:
        """Servers that say they are online and said so recently."""
        return sum(1 for s in self.servers if s.online and not s.stale)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.servers_up else EXIT_NO_SERVER


class StatusWatcher:
    """Holds the newest status of every server and board for as long as it is connected.

    `collect_status` uses it once; `fleet status --watch` keeps one open and renders a snapshot
    every few seconds, so changes (a will firing) show without reconnecting.
    """

    def __init__(self, broker: BrokerSettings, topics: Topics, stale_after_s: float = STALE_AFTER_S) -> None:
        self.topics = topics
        self.stale_after_s = stale_after_s
        self.log = get_logger(component="status")
        self._latest: dict[str, ServerStatus | DeviceStatus] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._last_change = time.monotonic()
        self.client = make_client(f"status-{uuid.uuid4().hex[:12]}", broker)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # --- network thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, properties: object) -> None:
        client.subscribe([(self.topics.all_server_status(), 1), (self.topics.all_device_status(), 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: object, properties: object) -> None:
        self._last_change = time.monotonic()
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._record(message.topic, bytes(message.payload))
        except Exception:  # an exception here would kill paho's network thread
            self.log.exception("status_handling_failed", topic=message.topic)

    def _record(self, topic: str, payload: bytes) -> None:
        is_server = topic.startswith(f"{self.topics.root}/servers/")
        topic_id = topic.split("/")[-2]
        key = f"{'server' if is_server else 'device'}:{topic_id}"
        self._last_change = time.monotonic()
        if not payload:  # an operator cleared the retained message: the component is gone
            with self._lock:
                self._latest.pop(key, None)
            return
        try:
            status = decode_json(ServerStatus if is_server else DeviceStatus, payload)
        except ProtocolError as exc:
            self.log.warning("status_unreadable", topic=topic, code=exc.code, reason=exc.detail)
            return
        if status.id != topic_id:
            # The ACL lets a board write only its own topic, so this is a misconfigured component.
            self.log.warning("status_id_mismatch", topic=topic, id=status.id)
            return
        with self._lock:
            self._latest[key] = status

    # --- caller's thread -----------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; raises BrokerConnectError when the broker cannot be used."""
        self.client.connect_and_wait(timeout_s)
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise BrokerConnectError(f"no SUBACK from the broker within {timeout_s:.0f} s")

    def settle(self, max_s: float) -> None:
        """Wait until the retained messages have stopped arriving (at most `max_s`)."""
        deadline = time.monotonic() + max_s
        while (now := time.monotonic()) < deadline and now - self._last_change < QUIET_S:
            time.sleep(min(QUIET_S / 5, deadline - now))

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def snapshot(self) -> FleetStatus:
        now = time.time()
        with self._lock:
            latest = list(self._latest.values())
        servers = [ServerRow(**s.model_dump(), **self._age(s, now)) for s in latest if isinstance(s, ServerStatus)]
        devices = [DeviceRow(**d.model_dump(), **self._age(d, now)) for d in latest if isinstance(d, DeviceStatus)]
        return FleetStatus(
            servers=sorted(servers, key=lambda row: row.id),
            devices=sorted(devices, key=lambda row: row.id),
        )

    def _age(self, status: ServerStatus | DeviceStatus, now: float) -> dict[str, Any]:
        age = max(0.0, now - status.ts) if status.ts > 0 else None
        stale = bool(status.online and self.stale_after_s > 0 and (age is None or age > self.stale_after_s))
        return {"age_s": age, "stale": stale}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()


def collect_status(
    broker: BrokerSettings, topics: Topics, wait_s: float = 2.0, stale_after_s: float = STALE_AFTER_S
) -> FleetStatus:
    """The fleet's retained status as of now. `broker` needs an identity allowed to read the
    status topics (an observer, an app or a server; a board sees only server status)."""
    with StatusWatcher(broker, topics, stale_after_s) as watcher:
        watcher.settle(wait_s)
        return watcher.snapshot()


# --- rendering ---------------------------------------------------------------------------
def format_age(age_s: float | None) -> str:
    if age_s is None:
        return "-"
    if age_s < 120:
        return f"{age_s:.0f}s ago"
    if age_s < 7200:
        return f"{age_s / 60:.0f}m ago"
    if age_s < 172800:
        return f"{age_s / 3600:.0f}h ago"
    return f"{age_s / 86400:.0f}d ago"


def _state(row: ServerRow | DeviceRow) -> Text:
    if row.stale:
        return Text("stale", style="yellow")
    return Text("online", style="green") if row.online else Text("offline", style="red")


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A compact table that fits an 80-column terminal: ids never wrap, names fold."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header, justify in columns:
        folds = header in ("target", "hardware", "draft")
        table.add_column(header, justify=justify, no_wrap=not folds, overflow="fold" if folds else "ellipsis", min_width=10 if folds else None)
    return table


def render_tables(status: FleetStatus) -> Group:
    """Servers, then boards; `seen` is the age of each component's last status."""
    servers = _table(f"Servers: {status.servers_up} of {len(status.servers)} online", [
        ("server", "left"), ("state", "left"), ("target", "left"), ("sessions", "right"), ("batch", "right"),
        ("verify ms", "right"), ("accept", "right"), ("tok/s", "right"), ("seen", "right"),
    ])
    for s in status.servers:
        servers.add_row(
            s.id, _state(s), s.target_model or "-", f"{s.sessions}/{s.capacity}", f"{s.batch_size_avg:.1f}",
            f"{s.verify_ms_avg:.1f}", f"{s.acceptance_rate:.2f}", f"{s.committed_tokens_per_s:.1f}", format_age(s.age_s),
        )
    devices_up = sum(1 for d in status.devices if d.online and not d.stale)
    devices = _table(f"Boards: {devices_up} of {len(status.devices)} online", [
        ("board", "left"), ("state", "left"), ("hardware", "left"), ("draft", "left"), ("active", "right"),
        ("tok/s", "right"), ("seen", "right"),
    ])
    for d in status.devices:
        devices.add_row(
            d.id, _state(d), d.hardware or "-", d.draft_model or "-", str(d.active_requests),
            f"{d.tokens_per_s:.1f}", format_age(d.age_s),
        )
    return Group(servers, devices)


def status_json(status: FleetStatus) -> str:
    return json.dumps(status.model_dump(mode="json"))


# --- the command -------------------------------------------------------------------------
class UsageErrorsExitOne(TyperCommand):
    """Click reports usage errors (unknown option, bad value, `typer.BadParameter`) with
    status 2; `fleet status` promises 1 (3 and 4 are taken by the broker and the fleet), so a
    script can tell a typo from a dead fleet. Register with `app.command(cls=...)`."""

    def make_context(self, *args: Any, **kwargs: Any) -> typer.Context:
        try:
            return super().make_context(*args, **kwargs)
        except typer.TyperException as exc:
            _usage_exits_one(exc)
            raise

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as exc:
            _usage_exits_one(exc)
            raise


def _usage_exits_one(exc: typer.TyperException) -> None:
    # typer vendors click, so its UsageError is not importable by a public name; every click
    # exception carries `exit_code`, and 2 is click's status for usage errors.
    if getattr(exc, "exit_code", None) == CLICK_USAGE_STATUS:
        exc.exit_code = EXIT_USAGE


def status_command(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    credentials: CredsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"servers": [...], "devices": [...]} (one line per refresh with --watch).')] = False,
    watch: Annotated[float | None, typer.Option("--watch", help="Refresh every this many seconds until Ctrl-C.")] = None,
    count: Annotated[int, typer.Option("--count", help="With --watch: stop after this many refreshes (0: until Ctrl-C).")] = 0,
    wait: Annotated[float, typer.Option("--wait", help="Seconds at most to gather the retained status.")] = 2.0,
    stale_after: Annotated[float, typer.Option("--stale-after", help="An online status older than this many seconds counts as stale (0: never).")] = STALE_AFTER_S,
    log_level: LevelOpt = None,
) -> None:
    """Show servers and boards from their retained status. Exit 0 when at least one server is
    online, 1 on a usage error, 3 when the broker cannot be reached, 4 when no server is online."""

    err = Console(stderr=True)
    if watch is not None and watch <= 0:
        raise typer.BadParameter("--watch needs a positive number of seconds")
    if count < 0 or wait <= 0 or stale_after < 0:
        raise typer.BadParameter("--count must be >= 0, --wait > 0 and --stale-after >= 0")
    settings = settings_from_cli(config, broker, username, password, ca_file, credentials, log_level or "warning")
    watcher = StatusWatcher(settings.broker, Topics(settings.topic_root), stale_after)
    try:
        watcher.start()
    except BrokerConnectError as exc:
        err.print(f"fleet status: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BROKER_UNREACHABLE) from exc
    try:
        watcher.settle(wait)
        status = _show_once(watcher, as_json) if watch is None else _show_every(watcher, as_json, watch, count)
    finally:
        watcher.close()
    if not status.servers_up:
        who = settings.broker.username or "anonymous"
        err.print(
            f"fleet status: no server online ({len(status.servers)} known to the broker; "
            f"identity {who!r} must be allowed to read the status topics)",
            markup=False, highlight=False,
        )
    raise typer.Exit(status.exit_code)


def _show_once(watcher: StatusWatcher, as_json: bool) -> FleetStatus:
    status = watcher.snapshot()
    if as_json:
        typer.echo(status_json(status))
    else:
        Console().print(render_tables(status))
    return status


def _show_every(watcher: StatusWatcher, as_json: bool, every_s: float, count: int) -> FleetStatus:
    """Refresh until Ctrl-C (or `count` refreshes); the exit code follows the last picture."""
    status = FleetStatus(servers=[], devices=[])
    shown = 0
    live = None if as_json else Live(console=Console(), auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while True:
            status = watcher.snapshot()
            if live is None:
                typer.echo(status_json(status))
            else:
                caption = "" if watcher.connected else "  (broker connection lost; reconnecting)"
                live.update(Group(render_tables(status), Text(f"refreshed {time.strftime('%H:%M:%S')}{caption}", style="dim")), refresh=True)
            shown += 1
            if count and shown >= count:
                return status
            time.sleep(every_s)
    except KeyboardInterrupt:
        return status
    finally:
        if live is not None:
            live.stop()
