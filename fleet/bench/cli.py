"""`fleet bench`: the side-by-side fleet benchmark, with `verify` and `draft` for the halves.

`fleet bench [options]` runs the fleet benchmark itself: `bench_command` is the group's
callback and does nothing when a subcommand was named.
"""

import typer

from fleet.bench.draft import bench_draft
from fleet.bench.fleet import bench_command

bench_app = typer.Typer(
    help="Benchmarks: speculative fleet vs the server alone (default), `verify`, `draft`.",
    invoke_without_command=True,
)
bench_app.callback()(bench_command)


def _register_halves() -> None:
    from server.bench import bench_verify

    bench_app.command("verify")(bench_verify)
    bench_app.command("draft")(bench_draft)


_register_halves()
