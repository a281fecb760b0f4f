"""The benchmark's report: its shape (pydantic, the JSON `fleet bench --json` writes), the
summary figures computed from the measured points, and how it is shown (table, PNG plot).

Definitions of every figure: docs/benchmarks.md.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from fleet.bench.cpus import CpuSplit
from fleet.bench.profiles import BoardProfile
from fleet.bench.workload import RequestRecord, SamplingMix
from fleet.config import LinearKernel

ModelsChoice = Literal["tiny", "qwen"]
Dtype = Literal["float32", "bfloat16"]
# The capacity threshold when none is given: this share of what one session gets from the
# server alone (server-only mode, smallest N) in the same run.
DEFAULT_TARGET_SHARE = 0.5


class PointResult(BaseModel):
    """One mode at one number of boards (definitions in docs/benchmarks.md)."""

    boards: int
    window_s: float
    requests: int
    errors: int
    tokens: float  # delivered inside the window (workload.tokens_in_window)
    system_tok_s: float
    session_tok_s: float
    # Each run's own figure where the point pooled several (`repeats_for`): the spread.
    system_tok_s_runs: list[float] = Field(default_factory=list)
    tbt_ms_p50: float | None
    tbt_ms_p95: float | None
    ttft_ms_p50: float | None
    acceptance_rate: float | None = None
    mean_accepted: float | None = None
    server_s_per_token: float | None = None
    server_busy: float | None = None  # share of the window the target spent in forward passes
    batch_sessions_mean: float | None = None
    batch_tokens_mean: float | None = None
    kv_bytes_per_session: float | None = None
    rss_growth_mb: float | None = None
    mqtt_bytes_per_verification: float | None = None
    round_trip_ms: float | None = None
    # Share of this machine's cores the emulated boards' real drafting took in the window: CPU
    # the server did not get, which real boards would have drafted on their own.
    board_cpu_share: float | None = None
    # Share of the drafted tokens sent that were drafted ahead while a verdict was in flight.
    pipelined_share: float | None = None
    load_avg_1m: float | None = None  # the load when the point started (mean over its runs)


class VerifyCost(BaseModel):
    """Batched forward passes with `tokens_min`..`tokens_max` tokens (sessions plus drafted
    tokens), and their mean wall time."""

    tokens_min: int
    tokens_max: int
    batches: int
    verify_ms_mean: float


class ModeReport(BaseModel):
    name: str
    kind: Literal["fleet", "peer"]
    description: str
    points: list[PointResult]
    capacity: int | None = None  # fleet modes only
    capacity_censored: bool = False  # met at the largest N tested: the capacity is at least that
    # Fleet modes: the server's measured cost shape, forward-pass wall time by tokens in the pass.
    verify_cost: list[VerifyCost] = Field(default_factory=list)

    def at(self, boards: int) -> PointResult | None:
        return next((p for p in self.points if p.boards == boards), None)


class Mismatch(BaseModel):
    job: int
    prompt_index: int
    runs: list[str]  # runs whose output differs from the reference
    reference: str
    first_divergence: int


class LosslessCheck(BaseModel):
    jobs_compared: int  # greedy jobs that ran more than once (any mode, any N)
    jobs_against_target: int  # of those, how many the target alone also ran (the reference)
    outputs_compared: int
    modes_compared: list[str]
    mismatches: list[Mismatch]


class BenchConfig(BaseModel):
    models: ModelsChoice
    boards: list[int]
    duration_s: float
    modes: list[str]
    sampling: SamplingMix
    max_new_tokens: int
    dtype: Dtype
    # The server's and the in-process target's (server/kernels.py); a report from before the
    # field ran torch's kernels.
    linear_kernel: LinearKernel = "default"
    k_max: int
    threshold: float
    emulate: bool
    profile: str
    target_rate: float | None
    peer_requests: int
    board_step_ms: float | None = None  # given emulated step time, instead of profile x measured
    board_cpus: int = 0  # CPUs kept for the emulated boards' drafting, apart from the server's
    boards_for: dict[str, list[int]] = Field(default_factory=dict)  # modes run at other Ns
    repeats_for: dict[str, int] = Field(default_factory=dict)  # modes run more than once per N

    def boards_of(self, mode: str) -> list[int]:
        return self.boards_for.get(mode, self.boards)

    def repeats_of(self, mode: str) -> int:
        return self.repeats_for.get(mode, 1)


class Comparison(BaseModel):
    """One mode against a baseline at one number of boards, on one figure. `gain` > 1 means
    the mode did better (higher tokens/s, or lower time between tokens)."""

    topic: str
    boards: int
    metric: Literal["system_tok_s", "tbt_ms_p50"]
    mode: str
    value: float
    baseline: str
    baseline_value: float
    gain: float


class BenchReport(BaseModel):
    modes: dict[str, ModeReport]
    throughput_ratio: float | None
    throughput_boards: int | None
    # sled / server-only system tokens/s at every N both ran.
    throughput_ratios: dict[int, float] = Field(default_factory=dict)
    comparisons: list[Comparison] = Field(default_factory=list)
    capacity_ratio: float | None
    capacity_ratio_bound: Literal["exact", "lower", "upper", "unknown"]
    lossless: bool
    lossless_check: LosslessCheck
    emulated_boards: bool
    profile: BoardProfile | None
    draft_step_ms: float  # measured on this machine
    emulated_step_ms: float | None
    cpu_split: CpuSplit | None = None  # the CPUs of the server and of the emulated boards
    target_rate: float
    target_rate_rule: str
    errors: int
    models: dict[str, str]
    machine: dict[str, Any]
    config: BenchConfig
    command: str
    started_at: str
    wall_s: float


# ---------------------------------------------------------------------------------- summary


def capacity_target_rate(config: BenchConfig, results: dict[str, ModeReport]) -> tuple[float, str]:
    if config.target_rate is not None:
        return config.target_rate, "given"
    fleet_modes = [r for r in results.values() if r.kind == "fleet"]
    base = results.get("server-only") or (fleet_modes[0] if fleet_modes else None)
    if base is None or not base.points:
        return 0.0, "no fleet mode ran: capacity not measured"
    point = base.points[0]
    rule = (
        f"{DEFAULT_TARGET_SHARE:g} x the per-session rate of {base.name} "
        f"with {point.boards} board{'s' if point.boards > 1 else ''} in this run"
    )
    return DEFAULT_TARGET_SHARE * point.session_tok_s, rule


def capacity_of(points: Sequence[PointResult], rate: float) -> tuple[int, bool]:
    """The largest N tested up to which every tested N got `rate` per session, and whether
    the largest N tested still did (then the true capacity is at least that)."""
    capacity = 0
    for point in sorted(points, key=lambda p: p.boards):
        if point.session_tok_s < rate:
            return capacity, False
        capacity = point.boards
    return capacity, True


def sled_throughput_ratio(results: dict[str, ModeReport]) -> tuple[float | None, int | None]:
    sled, alone = results.get("sled"), results.get("server-only")
    if sled is None or alone is None:
        return None, None
    common = sorted({p.boards for p in sled.points} & {p.boards for p in alone.points})
    if not common:
        return None, None
    n = common[-1]
    base = alone.at(n).system_tok_s
    return (sled.at(n).system_tok_s / base if base > 0 else None), n


def sled_throughput_ratios(results: dict[str, ModeReport]) -> dict[int, float]:
    sled, alone = results.get("sled"), results.get("server-only")
    if sled is None or alone is None:
        return {}
    return {
        p.boards: p.system_tok_s / base.system_tok_s
        for p in sled.points
        if (base := alone.at(p.boards)) is not None and base.system_tok_s > 0
    }


# (topic, mode, baselines, metric): the mode against the best of the baselines that ran.
COMPARISONS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("adaptive k vs the best fixed k", "sled", tuple(f"sled-k{k}" for k in range(2, 9)), "system_tok_s"),
    ("adaptive k vs threshold only", "sled", ("sled-threshold",), "system_tok_s"),
    ("speculation vs the server alone", "sled", ("server-only",), "system_tok_s"),
    *(
        (f"pipelining at {rtt} ms round trip", f"sled-pipelined-rtt{rtt}", (f"sled-rtt{rtt}",), metric)
        for rtt in (20, 100)
        for metric in ("tbt_ms_p50", "system_tok_s")
    ),
    ("two servers vs one", "sled-2servers", ("sled",), "system_tok_s"),
)


def comparisons(results: dict[str, ModeReport]) -> list[Comparison]:
    """Every comparison of COMPARISONS whose modes ran, at every N they share."""
    found = []
    for topic, name, baselines, metric in COMPARISONS:
        mode = results.get(name)
        if mode is None:
            continue
        lower_is_better = metric == "tbt_ms_p50"
        for point in mode.points:
            value = getattr(point, metric)
            candidates = [
                (getattr(base_point, metric), base)
                for base in baselines
                if base in results and (base_point := results[base].at(point.boards)) is not None
                and getattr(base_point, metric) is not None
            ]
            if value is None or not candidates:
                continue
            best_value, best = (min if lower_is_better else max)(candidates)
            gain = (best_value / value if lower_is_better else value / best_value) if value and best_value else 0.0
            found.append(Comparison(
                topic=topic, boards=point.boards, metric=metric, mode=name, value=value,
                baseline=best, baseline_value=best_value, gain=gain,
            ))
    return found


def sled_capacity_ratio(results: dict[str, ModeReport]) -> tuple[float | None, str]:
    """sled / server-only capacity, and what kind of figure it is: a capacity at the largest
    N tested is a lower bound, so the ratio is then a lower or an upper bound (or neither)."""
    sled, alone = results.get("sled"), results.get("server-only")
    if sled is None or alone is None or sled.capacity is None or alone.capacity is None:
        return None, "unknown"
    if alone.capacity == 0:
        return None, "unknown"
    ratio = sled.capacity / alone.capacity
    censored = (sled.capacity_censored, alone.capacity_censored)
    bound = {(False, False): "exact", (True, False): "lower", (False, True): "upper"}.get(censored, "unknown")
    return ratio, bound


def lossless_check(runs: dict[str, list[RequestRecord]]) -> LosslessCheck:
    """Group the greedy outputs of every run by job and compare each with the reference: the
    target alone's output where it ran that job, else the job's first run."""
    outputs: dict[int, dict[str, list[int]]] = {}
    prompts: dict[int, int] = {}
    for run, records in runs.items():
        for record in records:
            if record.job.greedy and record.error is None:
                outputs.setdefault(record.job.index, {})[run] = record.tokens
                prompts[record.job.index] = record.job.prompt_index
    compared = {job: by_run for job, by_run in sorted(outputs.items()) if len(by_run) > 1}
    mismatches = []
    for job, by_run in compared.items():
        reference_run = next((run for run in by_run if run.startswith("target@")), next(iter(by_run)))
        reference = by_run[reference_run]
        differing = [run for run, tokens in by_run.items() if tokens != reference]
        if differing:
            mismatches.append(Mismatch(
                job=job,
                prompt_index=prompts[job],
                runs=differing,
                reference=reference_run,
                first_divergence=min(_divergence(reference, by_run[run]) for run in differing),
            ))
    return LosslessCheck(
        jobs_compared=len(compared),
        jobs_against_target=sum(any(run.startswith("target@") for run in by_run) for by_run in compared.values()),
        outputs_compared=sum(len(by_run) for by_run in compared.values()),
        modes_compared=sorted({run.split("@")[0] for by_run in compared.values() for run in by_run}),
        mismatches=mismatches,
    )


def _divergence(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def is_lossless(check: LosslessCheck) -> bool:
    """True only when outputs of at least two modes were compared and none differed."""
    return len(check.modes_compared) >= 2 and not check.mismatches


# ---------------------------------------------------------------------------------- output


def results_table(report: BenchReport):  # -> rich.table.Table
    from rich.table import Table

    boards = "emulated " + report.profile.name if report.profile else "real drafting"
    step = f", {report.emulated_step_ms:.1f} ms/token" if report.emulated_step_ms else ""
    table = Table(
        title=f"fleet bench: {report.models['target']} ({report.models['dtype']}, "
        f"{report.models.get('linear_kernel', 'default')} linears), "
        f"draft {report.models['draft']}, boards {boards}{step}",
        caption="tok/s: committed tokens per second (in parentheses: the lowest and highest run of a "
        "repeated point); TBT, TTFT and RTT in ms; srv s/tok: server forward-pass seconds per committed "
        "token; busy: share of the window in forward passes",
    )
    columns = ("mode", "N", "sys tok/s", "sess tok/s", "TBT p50/p95", "TTFT p50", "accept",
               "mean acc", "srv s/tok", "busy", "KV/sess", "B/verif", "RTT", "err")
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=column == "mode")
    for mode in report.modes.values():
        for p in mode.points:
            table.add_row(
                mode.name, str(p.boards), f"{p.system_tok_s:.2f}" + _spread(p.system_tok_s_runs),
                f"{p.session_tok_s:.2f}",
                f"{_f(p.tbt_ms_p50, '.0f')}/{_f(p.tbt_ms_p95, '.0f')}", _f(p.ttft_ms_p50, ".0f"),
                _f(p.acceptance_rate, ".2f"), _f(p.mean_accepted, ".2f"), _f(p.server_s_per_token, ".4f"),
                _f(p.server_busy, ".0%"), _bytes(p.kv_bytes_per_session),
                _f(p.mqtt_bytes_per_verification, ".0f"), _f(p.round_trip_ms, ".0f"), str(p.errors),
            )
    return table


def verify_cost_table(report: BenchReport):  # -> rich.table.Table
    """The server's forward-pass time by tokens per pass, per fleet mode: the cost shape that
    bounds what speculation can gain on this machine."""
    from rich.table import Table

    fleet_modes = [m for m in report.modes.values() if m.kind == "fleet"]
    table = Table(title="server forward pass: mean ms by tokens in the pass (batches)")
    table.add_column("tokens", justify="right")
    for mode in fleet_modes:
        table.add_column(mode.name, justify="right")
    ranges = sorted({(c.tokens_min, c.tokens_max) for m in fleet_modes for c in m.verify_cost})
    for low, high in ranges:
        cells = []
        for mode in fleet_modes:
            cost = next((c for c in mode.verify_cost if c.tokens_min == low), None)
            cells.append("-" if cost is None else f"{cost.verify_ms_mean:.0f} ({cost.batches})")
        table.add_row(str(low) if low == high else f"{low}-{high}", *cells)
    return table


def summary_lines(report: BenchReport) -> list[str]:
    capacities = ", ".join(
        f"{m.name} {m.capacity}{'+' if m.capacity_censored else ''}"
        for m in report.modes.values() if m.capacity is not None
    )
    check = report.lossless_check
    by_boards = ", ".join(f"N={n}: {r:.2f}" for n, r in sorted(report.throughput_ratios.items()))
    return [
        (
            f"throughput_ratio (sled / server-only, system tok/s at N={report.throughput_boards}): "
            f"{_f(report.throughput_ratio, '.2f')}" + (f" (at every N: {by_boards})" if by_boards else "")
        ),
        f"capacity at >= {report.target_rate:.2f} tok/s per session ({report.target_rate_rule}): {capacities}",
        f"capacity_ratio: {_f(report.capacity_ratio, '.2f')} ({report.capacity_ratio_bound})",
        (
            f"lossless: {report.lossless} ({check.jobs_compared} greedy jobs, {check.outputs_compared} "
            f"outputs across {', '.join(check.modes_compared) or 'nothing'}, "
            f"{check.jobs_against_target} of them against the target alone; {len(check.mismatches)} differ)"
        ),
        f"boards: {'emulated ' + report.profile.name if report.profile else 'real ONNX drafting on this machine'}"
        f" (draft step here {report.draft_step_ms:.2f} ms"
        + (f", emulated {report.emulated_step_ms:.2f} ms)" if report.emulated_step_ms else ")")
        + (
            f"; boards draft on CPUs {report.cpu_split.boards}, the server runs on {report.cpu_split.server}"
            if report.cpu_split else "; boards and server share every CPU"
        ),
    ]


def comparison_table(report: BenchReport):  # -> rich.table.Table | None
    if not report.comparisons:
        return None
    from rich.table import Table

    table = Table(title="comparisons (gain > 1: the mode did better than the best baseline)")
    for column in ("comparison", "N", "figure", "mode", "baseline", "gain"):
        table.add_column(column, justify="left" if column in ("comparison", "figure") else "right")
    for c in report.comparisons:
        unit = "tok/s" if c.metric == "system_tok_s" else "ms TBT p50"
        table.add_row(
            c.topic, str(c.boards), unit, f"{c.mode} {c.value:.2f}", f"{c.baseline} {c.baseline_value:.2f}",
            f"{c.gain:.2f}",
        )
    return table


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(runs: Sequence[float]) -> str:
    return f" ({min(runs):.2f}-{max(runs):.2f})" if runs else ""


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 1024:.0f} KiB"


def write_plot(report: BenchReport, path: Path) -> None:
    """System and per-session tokens/s against the number of boards, one line per mode; the
    in-process peers (one request at a time) are drawn as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (system, session) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in report.modes.values():
        if mode.kind == "fleet":
            n = [p.boards for p in mode.points]
            system.plot(n, [p.system_tok_s for p in mode.points], marker="o", label=mode.name)
            session.plot(n, [p.session_tok_s for p in mode.points], marker="o", label=mode.name)
        else:
            rate = mode.points[0].system_tok_s
            system.axhline(rate, linestyle=":", color="grey" if mode.name == "target" else "tab:green",
                           label=f"{mode.name} (1 at a time)")
            session.axhline(rate, linestyle=":", color="grey" if mode.name == "target" else "tab:green",
                            label=f"{mode.name} (1 at a time)")
    session.axhline(report.target_rate, linestyle="--", color="tab:red", label="capacity target")
    for axes, title in ((system, "system committed tokens/s"), (session, "per-session tokens/s")):
        axes.set_xscale("log", base=2)
        ticks = sorted({p.boards for m in report.modes.values() if m.kind == "fleet" for p in m.points})
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.set_xlabel("boards (concurrent sessions)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
    session.legend(fontsize=8)
    boards = f"emulated {report.profile.name}" if report.profile else "real drafting"
    figure.suptitle(f"{report.models['target']} ({report.models['dtype']}) + {report.models['draft']}, "
                    f"{boards}; {report.machine['logical_cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
