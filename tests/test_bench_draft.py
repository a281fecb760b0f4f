"""`fleet bench draft` on the tiny draft: real exports, real runs in fresh processes."""

import json

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fleet.bench.draft import bench_draft, draft_table, run_draft_bench


@pytest.fixture(scope="module")
def bench_json() -> dict:
    app = typer.Typer()
    app.command()(bench_draft)
    result = CliRunner().invoke(
        app, ["--json", "--quant", "none", "--quant", "int4", "--tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_reports_every_runtime(bench_json):
    assert bench_json["model"] == "tiny" and bench_json["tokens"] == 8
    rows = {(row["runtime"], row["quant"]): row for row in bench_json["rows"]}
    assert set(rows) == {("torch", "none"), ("onnxruntime", "none"), ("onnxruntime", "int4")}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["prefill_ms"] > 0 and row["size_mb"] > 0
        assert row["peak_rss_mb"] > row["rss_delta_mb"] > 0
    float_onnx = rows[("onnxruntime", "none")]
    assert float_onnx["greedy_prefix"] == 8  # float32 ONNX decodes exactly what torch decodes
    assert 0 < float_onnx["max_abs_logit_diff"] < 1e-3
    assert rows[("onnxruntime", "int4")]["size_mb"] < float_onnx["size_mb"]
    # A board process (onnxruntime only) is far smaller than the torch process.
    assert float_onnx["peak_rss_mb"] < rows[("torch", "none")]["peak_rss_mb"]


def test_bench_table_has_a_row_per_run(bench_json):
    console = Console(record=True, width=120)
    console.print(draft_table(bench_json))
    text = console.export_text()
    assert "draft tiny: 8 greedy tokens" in text
    lines = [line for line in text.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == ["torch", "ort", "ort"]
    assert "8/8" in lines[1]


def test_bench_refuses_unknown_quantisation():
    with pytest.raises(ValueError, match="unknown quantisation 'int2'"):
        run_draft_bench("tiny", quants=("int2",), tokens=4)  # type: ignore[arg-type]
