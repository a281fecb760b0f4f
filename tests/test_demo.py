"""`fleet demo --tiny --json`: the main job end to end, checked against the target alone."""

import json

from typer.testing import CliRunner

from fleet.cli import app


def test_tiny_demo_is_lossless_and_reports_its_figures() -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--json", "--devices", "2", "--max-new-tokens", "32"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lossless"] is True and summary["mismatches"] == [] and summary["errors"] == []
    assert summary["requests"] == 8 and summary["tokens"] == 8 * 32
    assert summary["throughput_tok_s"] > 0 and 0 < summary["acceptance_rate"] <= 1
    assert summary["mean_accepted_length"] > 0
