"""The `fleet` command line: one entry point for operators, boards, servers and apps.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands that need them, so
`fleet --help` is quick and a board without torch can run every command it needs.
"""

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console

from fleet.cli_options import (
    BrokerOpt,
    CaOpt,
    ConfigOpt,
    CredsOpt,
    FormatOpt,
    LevelOpt,
    MetricsPortOpt,
    PasswordOpt,
    UserOpt,
    settings_from_cli,
)

app = typer.Typer(
    help="Speculative LLM decoding for edge fleets over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)

def _metrics(kind: str, port: int | None) -> object | None:
    """The component's metrics, served on `port`; None (nothing served) without a port."""
    if port is None:
        return None
    from fleet.metrics import DeviceMetrics, ServerMetrics, serve_component_metrics

    try:
        metrics, _ = serve_component_metrics(ServerMetrics if kind == "serve" else DeviceMetrics, port)
    except OSError as exc:
        console.print(f"fleet {kind}: cannot serve metrics on port {port}: {exc}")
        raise typer.Exit(2) from exc
    return metrics


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
    speculation: Annotated[Literal["adaptive", "fixed", "off"] | None, typer.Option("--speculation", help="How next_k is chosen: adaptive (default), fixed (always k_max) or off (the server decodes every token).")] = None,
    metrics_port: MetricsPortOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Run a verification server: batch the drafts of many boards through the target model."""
    settings = settings_from_cli(config, broker, username, password, ca_file, credentials, log_level, log_format, "json")
    server = settings.server.model_copy(update={k: v for k, v in {
        "server_id": server_id or settings.broker.username or settings.server.server_id,
        "target_model": model,
        "speculation": speculation,
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
        target_dir, dtype=server.dtype, device=server.device, linear_kernel=server.linear_kernel,
        k_max=server.k_max,
        memory_budget_bytes=int(server.memory_budget_mb * 2**20), max_sessions=server.max_sessions,
    )
    _run_until_signal(VerificationService(settings, engine, server.target_model, metrics=_metrics("serve", metrics_port)))


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
    metrics_port: MetricsPortOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
) -> None:
    """Run a board agent: draft with ONNX Runtime and serve generation requests over MQTT."""
    settings = settings_from_cli(config, broker, username, password, ca_file, credentials, log_level, log_format, "json")
    dev = settings.device.model_copy(update={"device_id": device_id or settings.broker.username or settings.device.device_id})
    settings = settings.model_copy(update={"device": dev})
    from device.agent import BoardAgent
    from device.manifest import DraftModelError

    draft_dir = draft or Path(settings.device.draft_model)
    try:
        agent = BoardAgent(settings, draft_dir, metrics=_metrics("device", metrics_port))
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
    settings = settings_from_cli(config, broker, username, password, ca_file, credentials, log_level or "warning")
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
    max_new_tokens: Annotated[int | None, typer.Option(min=1, max=1024, help="Per prompt [default: 64 tiny, 48 Qwen].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
    log_level: LevelOpt = None,
) -> None:
    """Start broker, server and boards here, generate from shipped prompts, check losslessness."""
    settings = settings_from_cli(config, log_level=log_level or "warning")
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


def _server_only(name: str, exc: ImportError) -> typer.Typer:
    """Stands in for a command group whose modules need the `server` extra (torch), so that a
    board, which installs only the `device` extra, still has a working `fleet` CLI."""
    stub = typer.Typer(help=f"(needs the server extra: {exc.name} is not installed)", invoke_without_command=True)

    @stub.callback()
    def unavailable() -> None:
        console.print(f"fleet {name}: needs the server extra (pip install 'sled-fleet[server]'): {exc}")
        raise typer.Exit(2)

    return stub


def _register_subcommands() -> None:
    from broker.cli import broker_command
    from fleet.models.cli import models_app
    from fleet.status import UsageErrorsExitOne, status_command

    app.command("broker")(broker_command)
    app.command("status", cls=UsageErrorsExitOne)(status_command)
    try:
        from fleet.models.export import export_draft_command

        models_app.command("export-draft")(export_draft_command)
    except ImportError as exc:
        models_app.add_typer(_server_only("models export-draft", exc), name="export-draft")
    app.add_typer(models_app, name="models")
    try:
        from fleet.bench.cli import bench_app
    except ImportError as exc:
        bench_app = _server_only("bench", exc)
    app.add_typer(bench_app, name="bench")


_register_subcommands()
