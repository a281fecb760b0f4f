"""The `fleet` CLI as a user meets it: help, a board without torch, clear errors."""

import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from broker.process import free_port
from fleet.cli import app

COMMANDS = ("serve", "device", "generate", "demo", "broker", "status", "models", "bench")

_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    sys.argv = ["fleet", *sys.argv[1:]]
    from fleet.cli import app
    app()
    """
)


def _fleet_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command_with_a_description() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for command in COMMANDS:
        line = next((ln for ln in result.output.splitlines() if ln.strip("│ ").startswith(command + " ")), None)
        assert line is not None and len(line.split()) > 3, f"{command} missing or undescribed"


def test_a_board_without_torch_runs_the_cli() -> None:
    device_help = _fleet_without_torch("device", "--help")
    assert device_help.returncode == 0, device_help.stderr
    assert "--draft" in device_help.stdout
    bench = _fleet_without_torch("bench")
    assert bench.returncode == 2
    assert "needs the server extra" in bench.stdout + bench.stderr


def test_generate_against_an_unreachable_broker_exits_3() -> None:
    port = free_port()
    result = CliRunner().invoke(app, ["generate", "--broker", f"mqtt://127.0.0.1:{port}", "--device", "board-1", "hi"])
    assert result.exit_code == 3
    assert "cannot reach the broker" in result.output


def test_bad_arguments_are_refused() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "--devices", "0"]).exit_code == 2
    bad_url = runner.invoke(app, ["generate", "--broker", "http://x", "--device", "b", "hi"])
    assert bad_url.exit_code == 2 and "mqtt://HOST:PORT" in bad_url.output
    assert runner.invoke(app, ["device", "--draft", "/nonexistent/draft"]).exit_code == 2
