"""`fleet broker`: a local, secured Mosquitto for development and the demo.

Production brokers come from the Ansible `mosquitto` role; this command renders the same
templates on one machine, and leaves a credentials file that the other `fleet` commands read.
"""

from pathlib import Path
from typing import Annotated

import typer

from broker.config import CREDENTIALS_FILE, BrokerCredentials
from broker.process import BrokerStartError, prepare_local_broker
from fleet.config import load_settings


def broker_command(
    port: Annotated[
        int | None,
        typer.Option(
            help="Listener port (default: the previous run's, else 8883 with TLS, 1884 without)."
        ),
    ] = None,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="State directory (default: FLEET_HOME/broker).")
    ] = None,
    devices: Annotated[
        int, typer.Option("--devices", min=0, help="Provision boards board-1 .. board-N.")
    ] = 4,
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="Provision a board with this id (repeatable)."),
    ] = None,
    servers: Annotated[
        int, typer.Option("--servers", min=0, help="Provision servers server-1 .. server-N.")
    ] = 1,
    app_ids: Annotated[
        list[str] | None,
        typer.Option("--app", help="IoT app identity, repeatable (default: app-1)."),
    ] = None,
    observers: Annotated[
        list[str] | None,
        typer.Option("--observer", help="Read-only status identity, repeatable (default: ops)."),
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls/--no-tls", help="TLS listener with a generated fleet CA.")
    ] = True,
) -> None:
    """Start a local Mosquitto with per-identity passwords, the fleet ACL and TLS; runs until Ctrl-C."""
    state = directory or load_settings().home / "broker"
    credentials_file = state / CREDENTIALS_FILE
    boards = [f"board-{i}" for i in range(1, devices + 1)] + list(device or [])
    try:
        previous = BrokerCredentials.load(credentials_file) if credentials_file.exists() else None
        if port is None:
            port = previous.port if previous is not None else (8883 if tls else 1884)
        local = prepare_local_broker(
            state,
            devices=list(dict.fromkeys(boards)),
            servers=[f"server-{i}" for i in range(1, servers + 1)],
            apps=app_ids if app_ids is not None else ["app-1"],
            observers=observers if observers is not None else ["ops"],
            tls=tls,
            port=port,
            persistence=True,
            previous=previous,
        )
    except ValueError as exc:
        typer.echo(f"fleet broker: {exc}", err=True)
        raise typer.Exit(2) from exc
    local.credentials.write(credentials_file)
    # Said before the broker answers, so whoever connects has read it; Ctrl-C may come at any
    # point once the broker answers, even before start() returns.
    _explain(local.credentials, credentials_file, local.process.log_file)
    try:
        local.process.start()
        status = local.process.wait()
    except BrokerStartError as exc:
        typer.echo(f"fleet broker: {exc}\n(choose another port with --port)", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        local.process.stop()
        typer.echo("broker stopped")
        return
    if status == 0:  # Ctrl-C in a terminal reaches mosquitto too, which then exits cleanly
        typer.echo("broker stopped")
        return
    typer.echo(
        f"fleet broker: mosquitto exited with status {status}; log {local.process.log_file}",
        err=True,
    )
    raise typer.Exit(1)


def _explain(credentials: BrokerCredentials, credentials_file: Path, log_file: Path) -> None:
    scheme = "mqtts" if credentials.tls else "mqtt"
    roles = ", ".join(f"{identity.name} ({identity.role})" for identity in credentials.identities)
    typer.echo(f"broker: {scheme}://{credentials.host}:{credentials.port}  (log: {log_file})")
    typer.echo(f"identities: {roles}")
    typer.echo(f"credentials (mode 0600, read by the other fleet commands): {credentials_file}")
    if credentials.ca_file is not None:
        typer.echo(f"fleet CA certificate (give it to every client): {credentials.ca_file}")
    example = credentials.identities[0].name
    tls_args = f" --cafile {credentials.ca_file}" if credentials.ca_file else ""
    typer.echo(
        "try: mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "
        f"{credentials.port}{tls_args} -u {example} -P <password from the credentials file> "
        f"-t '{credentials.topic_root}/devices/{example}/requests'"
    )
    typer.echo("Ctrl-C stops the broker.")
