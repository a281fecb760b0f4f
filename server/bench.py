"""`fleet bench verify`: what one batched verification saves over verifying sessions one by one.

For each batch size B, B sessions with mixed context lengths get drafts of k tokens, step after
step. Timed per step: one `Engine.verify` call with all B drafts (batched) against B calls with
one draft each (sequential). `efficiency` = sequential / batched: how many
sessions' worth of verification one batched step does for the price of one.

Drafted tokens are random ids: the forward pass scores all k + 1 positions whatever gets
accepted, so acceptance does not change the cost being measured.
"""

import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fleet.config import DEFAULT_LINEAR_KERNEL, LinearKernel
from fleet.models.store import resolve_model
from fleet.models.tiny import write_tiny_models
from fleet.sampling import SamplingParams
from server.engine import DraftProposal, Engine

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
# Verification steps timed per round and per way (batched, sequential), on the same sessions.
STEPS_PER_ROUND = 8


@contextmanager
def _target_dir(model: str | Path) -> Iterator[Path]:
    """The target checkpoint: `tiny` builds the seeded tiny pair in a temporary directory;
    anything else resolves through the model store (a pulled catalog name or a directory)."""
    if str(model) == "tiny":
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
            target, _draft = write_tiny_models(Path(tmp))
            yield target
    else:
        yield resolve_model(model)


@dataclass
class _Round:
    """Per-step timings of one round, and the KV bytes its sessions reserved (mean)."""

    batched_s: list[float]
    sequential_s: list[float]
    kv_bytes: float


def _time_round(
    engine: Engine, rng: random.Random, size: int, k: int, context_range: tuple[int, int]
) -> _Round:
    """Open `size` sessions and time STEPS_PER_ROUND steps each way.

    The same sessions are verified both ways, alternately: a step grows every context by a
    token or so, the same work for either way, both ways see the same background load, and
    only one set of prefills is paid.
    """
    # Room for every step of the round to accept everything and one token more: no session
    # ends within the round (with k = 0 every step commits exactly one token).
    params = SamplingParams(max_new_tokens=2 * STEPS_PER_ROUND * (k + 1) + 1)

    def propose(session_id: str) -> DraftProposal:
        return DraftProposal(session_id=session_id, tokens=_random_ids(rng, engine.vocab_size, k))

    sessions = [f"bench-{i}" for i in range(size)]
    for session_id in sessions:
        context = _random_ids(rng, engine.vocab_size, rng.randint(*context_range))
        result = engine.open(session_id, context, params)
        if result.status != "ok":
            raise RuntimeError(f"bench session refused: {result.reason}")
    measured = _Round([], [], statistics.mean(engine.session_bytes(s) for s in sessions))
    for _ in range(STEPS_PER_ROUND):
        for timings, batches in (
            (measured.batched_s, [sessions]),
            (measured.sequential_s, [[s] for s in sessions]),
        ):
            proposals = [[propose(s) for s in batch] for batch in batches]
            verdicts = []
            start = time.perf_counter()
            for batch in proposals:
                verdicts += engine.verify(batch)
            timings.append(time.perf_counter() - start)
            if any(v.error_code is not None or v.finished for v in verdicts):
                raise RuntimeError(f"a bench session stopped: {verdicts}")
    for session_id in sessions:
        engine.close(session_id)
    return measured


def run_verify_bench(
    model: str | Path = "tiny",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    k: int = 4,
    context_range: tuple[int, int] = (16, 512),
    repeats: int = 3,
    dtype: str = "float32",
    linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Time batched against sequential verification; `on_step` is called after each round.

    Returns batch_sizes, batched_s and sequential_s (seconds for one verification step of all B
    sessions, the best of `repeats` x STEPS_PER_ROUND steps: the one least disturbed by other
    load on the machine), efficiency (sequential / batched), kv_bytes_per_session
    (mean KV bytes each session reserved: its context plus the tokens a round may add) and
    kv_bytes_per_token.
    """
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("repeats and every batch size must be at least 1")
    if not 2 <= context_range[0] <= context_range[1]:
        raise ValueError(f"context range {context_range} must satisfy 2 <= low <= high")
    rng = random.Random(seed)
    with _target_dir(model) as path:
        # End-of-text is ignored: after random tokens a real model soon emits it, and a
        # finished session would make a timed step verify fewer than B sessions.
        engine = Engine(
            path,
            dtype=dtype,
            linear_kernel=linear_kernel,
            k_max=k,
            memory_budget_bytes=1 << 62,
            max_sessions=max(batch_sizes),
            eos_token_ids=(),
        )
        _time_round(engine, rng, min(batch_sizes), k, context_range)  # warm-up
        result: dict = {
            "model": str(model),
            "k": k,
            "context_range": list(context_range),
            "repeats": repeats,
            "dtype": dtype,
            "linear_kernel": engine.linear_kernel,
            "torch_threads": torch.get_num_threads(),
            "batch_sizes": list(batch_sizes),
            "batched_s": [],
            "sequential_s": [],
            "efficiency": [],
            "kv_bytes_per_session": [],
            "kv_bytes_per_token": engine.kv_bytes_per_token,
        }
        for size in batch_sizes:
            rounds = []
            for _ in range(repeats):
                rounds.append(_time_round(engine, rng, size, k, context_range))
                if on_step is not None:
                    on_step()
            batched_s = min(t for r in rounds for t in r.batched_s)
            sequential_s = min(t for r in rounds for t in r.sequential_s)
            result["batched_s"].append(batched_s)
            result["sequential_s"].append(sequential_s)
            result["efficiency"].append(sequential_s / batched_s)
            result["kv_bytes_per_session"].append(
                round(statistics.mean(r.kv_bytes for r in rounds))
            )
        return result


def bench_verify(
    model: str = typer.Option(
        "tiny", "--model", help="'tiny', a pulled catalog name or a checkpoint path."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    repeats: int = typer.Option(
        3, "--repeats", min=1, help="Rounds per batch size (best step reported)."
    ),
    k: int = typer.Option(4, "--k", min=0, max=64, help="Drafted tokens per session."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    linear_kernel: str = typer.Option(
        DEFAULT_LINEAR_KERNEL, "--linear-kernel", help="default, onednn (prepacked; CPU float32) or auto (onednn where it runs)."
    ),
    threads: int = typer.Option(
        0,
        "--threads",
        min=0,
        help="torch CPU threads (0: one for tiny, torch's default for a real model).",
    ),
) -> None:
    """Time verifying B sessions in one batch against B separate verifications."""
    # The tiny model's kernels are too small to split across threads: a second thread only
    # adds waiting, and on a busy machine (a descheduled worker) it makes timings erratic.
    if threads or model == "tiny":
        torch.set_num_threads(threads or 1)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("verify bench", total=repeats * len(DEFAULT_BATCH_SIZES))
        try:
            result = run_verify_bench(
                model, k=k, repeats=repeats, dtype=dtype, linear_kernel=linear_kernel,  # type: ignore[arg-type]
                on_step=lambda: progress.advance(task),
            )
        except ValueError as exc:  # a dtype or kernel this target cannot take
            raise typer.BadParameter(str(exc)) from exc
    if json_out:
        typer.echo(json.dumps(result))
        return
    low, high = result["context_range"]
    table = Table(
        title=f"verify bench: {model}, k={k}, contexts {low}-{high}, {dtype}, "
        f"{result['linear_kernel']} linears, "
        f"{result['torch_threads']} torch threads"
    )
    for column in ("B", "batched s", "sequential s", "efficiency", "KV bytes/session"):
        table.add_column(column, justify="right")
    for size, batched, sequential, efficiency, kv_bytes in zip(
        result["batch_sizes"],
        result["batched_s"],
        result["sequential_s"],
        result["efficiency"],
        result["kv_bytes_per_session"],
    ):
        table.add_row(
            str(size), f"{batched:.4f}", f"{sequential:.4f}", f"{efficiency:.2f}", f"{kv_bytes:,}"
        )
    console = Console()
    console.print(table)
    console.print(f"KV bytes per token: {result['kv_bytes_per_token']:,}")


def _random_ids(rng: random.Random, vocab_size: int, count: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(count)]
