"""`fleet bench verify`: the measurement runs end to end on the tiny target and reports what it
claims (timings are the bench's business, not asserted here beyond being measured)."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from server.bench import bench_verify, run_verify_bench


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_verify_bench_reports_each_batch_size():
    result = run_verify_bench(
        "tiny", batch_sizes=(1, 4), k=3, context_range=(16, 64), repeats=1, linear_kernel="default"
    )
    assert result["batch_sizes"] == [1, 4] and result["linear_kernel"] == "default"
    for key in ("batched_s", "sequential_s", "efficiency", "kv_bytes_per_session"):
        assert len(result[key]) == 2, key
    assert all(t > 0 for t in result["batched_s"] + result["sequential_s"])
    assert result["efficiency"] == [
        s / b for s, b in zip(result["sequential_s"], result["batched_s"])
    ]
    # Tiny target: 2 layers x 2 KV heads x 16 dims x (key, value) x 4 bytes.
    assert result["kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 4
    # Each session reserves its context (16..64) plus 2 x 8 steps x (k + 1) + 1 = 65 new
    # tokens, less the pending one.
    per_token = result["kv_bytes_per_token"]
    assert all(
        (16 + 64) * per_token <= b <= (64 + 64) * per_token for b in result["kv_bytes_per_session"]
    )


def test_run_verify_bench_refuses_nonsense():
    with pytest.raises(ValueError, match="at least 1"):
        run_verify_bench("tiny", batch_sizes=(0,))
    with pytest.raises(ValueError, match="context range"):
        run_verify_bench("tiny", context_range=(64, 16))


def test_bench_verify_command_prints_json_and_table():
    app = typer.Typer()
    app.command()(bench_verify)
    runner = CliRunner()
    result = runner.invoke(app, ["--json", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch_sizes"] == [1, 2, 4, 8, 16]
    assert {"batched_s", "sequential_s", "efficiency", "kv_bytes_per_session"} <= data.keys()
    table = runner.invoke(app, ["--repeats", "1", "--k", "2"])
    assert table.exit_code == 0, table.output
    assert "efficiency" in table.stdout and "KV bytes per token" in table.stdout


def test_bench_verify_command_names_a_kernel_it_cannot_run():
    app = typer.Typer()
    app.command()(bench_verify)
    for args, message in (
        (["--linear-kernel", "fast"], "unknown linear kernel 'fast'"),
        (["--dtype", "bfloat16", "--linear-kernel", "onednn"], "needs a CPU float32 target"),
    ):
        result = CliRunner().invoke(app, ["--repeats", "1", *args], terminal_width=200)
        assert result.exit_code == 2 and message in result.output, result.output


def test_run_verify_bench_times_plain_decoding():
    """k = 0 commits one token a step: the round must still end with every session open."""
    result = run_verify_bench("tiny", batch_sizes=(2,), k=0, context_range=(16, 32), repeats=1)
    assert result["k"] == 0 and len(result["batched_s"]) == 1
