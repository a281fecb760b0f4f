"""The `fleet` command line: one entry point for operators, boards, servers and apps.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands that need them, so
`fleet --help` is quick and a board without torch can run every command it needs.
"""

import json
import signal
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console

from fleet.config import BrokerSettings, Settings, load_settings
from fleet.logging import configure_logging

app = typer.Typer(
    help="Speculative LLM decoding for edge fleets over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML configuration file (also FLEET_CONFIG).")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.")]
UserOpt = Annotated[str | None, typer.Option("--username", help="Broker username (the device or server id for those roles).")]
PasswordOpt = Annotated[str | None, typer.Option("--password", envvar="FLEET_BROKER_PASSWORD", help="Broker password.")]
CaOpt = Annotated[Path | None, typer.Option("--ca-file", help="CA certificate for a TLS broker.")]
CredsOpt = Annotated[Path | None, typer.Option("--credentials", help="Credentials file written by `fleet broker`; with --username picks that identity.")]
LevelOpt = Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")]
FormatOpt = Annotated[str | None, typer.Option("--log-format", help="console (humans) or json (services).")]


def _settings(
    config: Path | None,
    broker: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    credentials: Path | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    default_format: str = "console",
    **sections: dict[str, object],
) -> Settings:
    """Settings from file and environment, then the command line on top; logging configured."""
    overrides: dict[str, object] = {k: v for k, v in sections.items() if v}
    try:
        settings = load_settings(config, **overrides)
        settings = settings.model_copy(
            update={"broker": _broker_settings(settings.broker, broker, username, password, ca_file, credentials)}
        )
        chosen = "log_format" in settings.model_fields_set
        fmt = log_format or (settings.log_format if chosen else default_format)
        configure_logging(log_level or settings.log_level, fmt)  # type: ignore[arg-type]
    except (ValueError, ValidationError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    return settings


def _broker_settings(
    base: BrokerSettings,
    url: str | None,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    credentials: Path | None,
) -> BrokerSettings:
    update: dict[str, object] = {}
    if credentials is not None:
        from broker.config import BrokerCredentials

        creds = BrokerCredentials.load(credentials)
        name = username or base.username
        if name is None:
            raise ValueError("--credentials needs --username to pick an identity")
        update.update(creds.settings_for(name).model_dump(exclude_unset=False))
    if url is not None:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError(f"--broker {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        update.update(host=parsed.hostname, tls=parsed.scheme == "mqtts", port=parsed.port or (8883 if parsed.scheme == "mqtts" else 1883))
    if username is not None:
        update["username"] = username
    if password is not None:
        update["password"] = SecretStr(password)
    if ca_file is not None:
        update.update(ca_file=ca_file, tls=True)
    return BrokerSettings.model_validate({**base.model_dump(), **update})


def _run_until_signal(component: object) -> None:
    """Run a service's blocking `run()`; SIGTERM and Ctrl-C stop it cleanly (status offline)."""
    def stop(signum: int, frame: object) -> None:
        component.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    component.run()


@app.command()
def serve(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    credentials: CredsOpt = None,
    server_id: Annotated[str | None, typer.Option("--id", help="Server id [default: the broker username].")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Target: catalog name or checkpoint directory.")] = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Run a verification server: batch the drafts of many boards through the target model."""
    settings = _settings(config, broker, username, password, ca_file, credentials, log_level, log_format, "json")
    server = settings.server.model_copy(update={k: v for k, v in {
        "server_id": server_id or settings.broker.username or settings.server.server_id,
        "target_model": model,
    }.items() if v})
    settings = settings.model_copy(update={"server": server})
    from fleet.models.store import ModelStore, ModelStoreError
    from server.engine import Engine
    from server.service import VerificationService

    try:
        target_dir = ModelStore(settings.home).resolve(server.target_model)
    except ModelStoreError as exc:
        console.print(f"fleet serve: {exc}")
        raise typer.Exit(2) from exc
    engine = Engine(
        target_dir, dtype=server.dtype, device=server.device, k_max=server.k_max,
        memory_budget_bytes=int(server.memory_budget_mb * 2**20), max_sessions=server.max_sessions,
    )
    _run_until_signal(VerificationService(settings, engine, server.target_model))


@app.command()
def device(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    credentials: CredsOpt = None,
    device_id: Annotated[str | None, typer.Option("--id", help="Device id [default: the broker username].")] = None,
    draft: Annotated[Path | None, typer.Option("--draft", help="Exported ONNX draft directory (fleet models export-draft).")] = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Run a board agent: draft with ONNX Runtime and serve generation requests over MQTT."""
    settings = _settings(config, broker, username, password, ca_file, credentials, log_level, log_format, "json")
    dev = settings.device.model_copy(update={"device_id": device_id or settings.broker.username or settings.device.device_id})
    settings = settings.model_copy(update={"device": dev})
    from device.agent import BoardAgent
    from device.manifest import DraftModelError

    draft_dir = draft or Path(settings.device.draft_model)
    try:
        agent = BoardAgent(settings, draft_dir)
    except DraftModelError as exc:
        console.print(f"fleet device: {exc}")
        raise typer.Exit(2) from exc
    _run_until_signal(agent)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    device_id: Annotated[str, typer.Option("--device", help="Board to ask.")],
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    credentials: CredsOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, max=10.0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the generation.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final response as JSON.")] = False,
    log_level: LevelOpt = None,
) -> None:
    """Ask a board for a generation through the broker, as any IoT app would; streams the text."""
    settings = _settings(config, broker, username, password, ca_file, credentials, log_level or "warning")
    from fleet.app import AppClient, GenerationTimeout, new_request_id
    from fleet.mqtt import BrokerConnectError, make_client
    from fleet.protocol import GenerationRequest, Topics

    try:
        request = GenerationRequest(
            request_id=new_request_id(), prompt=prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop or [],
        )
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    client = make_client(f"app-{request.request_id}", settings.broker)
    try:
        client.connect_and_wait()
    except BrokerConnectError as exc:
        console.print(f"fleet generate: {exc}")
        raise typer.Exit(3) from exc
    try:
        on_delta = None if as_json else (lambda d: (sys.stdout.write(d), sys.stdout.flush()))
        response = AppClient(client, Topics(settings.topic_root)).generate(device_id, request, on_delta, timeout)
    except GenerationTimeout as exc:
        console.print(f"fleet generate: {exc}")
        raise typer.Exit(1) from exc
    finally:
        client.disconnect()
        client.loop_stop()
    if as_json:
        typer.echo(response.model_dump_json())
    else:
        typer.echo("")
        if response.stats:
            s = response.stats
            console.print(f"[dim]{s.tokens} tokens, {s.tokens_per_s:.1f} tok/s, acceptance {s.acceptance_rate:.2f}[/dim]")
    if response.error:
        console.print(f"fleet generate: {response.error}")
        raise typer.Exit(1)


@app.command()
def demo(
    tiny: Annotated[bool, typer.Option("--tiny", help="Seeded tiny models instead of the Qwen pair.")] = False,
    devices: Annotated[int, typer.Option("--devices", min=1, max=32, help="Boards to start.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
    log_level: LevelOpt = None,
) -> None:
    """Start broker, server and boards here, generate from shipped prompts, check losslessness."""
    settings = _settings(config, log_level=log_level or "warning")
    from fleet.demo import run_demo, summary_table

    summary = run_demo(
        tiny=tiny, devices=devices, as_json=as_json, console=console, settings=settings,
        max_new_tokens=max_new_tokens or (64 if tiny else 48),
    )
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for out in summary["outputs"]:
            console.rule(f"{out['device']}: {out['prompt'][:60]!r}")
            console.print(out["text"], markup=False, highlight=False)
        console.print(summary_table(summary))
    if not summary["lossless"]:
        raise typer.Exit(1)


def _register_subcommands() -> None:
    from broker.cli import broker_command
    from fleet.models.cli import models_app

    app.command("broker")(broker_command)
    app.add_typer(models_app, name="models")


_register_subcommands()
