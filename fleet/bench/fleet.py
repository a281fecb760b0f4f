"""`fleet bench`: speculative fleet serving against the server alone, side by side in one run.

Every fleet mode runs against the same real Mosquitto (with TLS, passwords and ACL), the same
target model and the same workload (`fleet.bench.workload`); the in-process peers run the
same greedy jobs. For each number of boards N, each fleet mode in turn starts a fresh fleet
whose N boards run a closed loop of requests for a `duration_s` window; the figures are taken
over that window (see docs/benchmarks.md for each definition). The summary compares `sled` with `server-only`:

- throughput_ratio: system committed tokens/s, sled / server-only, at the largest N;
- capacity_ratio: the most boards that still get `target_rate` tokens/s each, sled /
  server-only (capacities are bounded by the N tested: a capacity equal to the largest N
  means "at least");
- lossless: every greedy job's output is identical in every run of every mode, and equal to
  the target alone's (`target` mode, same dtype and linear kernels) where that ran.

Modes are data (`MODES`): a fleet mode is a set of board and server settings, so variants
(fixed or adaptive speculation length, pipelining, several servers) are added as entries.
"""

import gc
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self, TypeVar, get_args

import psutil
import typer
from pydantic import BaseModel, ConfigDict, Field

from device.agent import BoardAgent
from fleet.bench.cpus import CpuSplit, server_side, split_cpus
from fleet.bench.peers import HFPeers
from fleet.bench.profiles import BoardProfile, get_profile, measure_draft_step_ms
from fleet.bench.report import (
    BenchConfig,
    BenchReport,
    Dtype,
    ModelsChoice,
    ModeReport,
    PointResult,
    VerifyCost,
    capacity_of,
    capacity_target_rate,
    comparison_table,
    comparisons,
    is_lossless,
    lossless_check,
    results_table,
    sled_capacity_ratio,
    sled_throughput_ratio,
    sled_throughput_ratios,
    summary_lines,
    verify_cost_table,
    write_plot,
)
from fleet.bench.workload import (
    REQUEST_TIMEOUT_S,
    JobPlan,
    RequestRecord,
    SamplingMix,
    percentile,
    run_closed_loop,
    shipped_bench_prompts,
    time_between_tokens,
    tokens_in_window,
)
from fleet.config import (
    DEFAULT_LINEAR_KERNEL,
    DeviceSettings,
    LinearKernel,
    ServerSettings,
    default_home,
)
from fleet.local import FleetModels, LocalFleet
from fleet.logging import get_logger
from fleet.protocol import GenerationRequest, GenerationResponse
from server.service import ServiceStats, VerificationService

ProgressFn = Callable[[str, float, float], None]  # (what is running, done, total)
T = TypeVar("T")

DEFAULT_BOARDS = (1, 2, 4, 8, 16)
DEFAULT_DURATION_S = 20.0
DEFAULT_MODES = ("sled", "server-only", "assisted", "target")
FIXED_KS = range(2, 9)
LINK_RTTS_MS = (20, 100)
# Greedy jobs the in-process peers run: the first of the job sequence, which every fleet run
# starts with, so that they can be compared with the fleet's outputs.
DEFAULT_PEER_REQUESTS = 3
WARMUP_TOKENS = 8
RSS_SAMPLE_S = 0.2


# ---------------------------------------------------------------------------------- modes


class FleetMode(BaseModel):
    """Boards and a verification server on the real broker, with these settings on top of
    the benchmark's own (`device` and `server` are DeviceSettings / ServerSettings fields)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["fleet"] = "fleet"
    name: str
    description: str
    device: dict[str, Any] = Field(default_factory=dict)
    server: dict[str, Any] = Field(default_factory=dict)
    drafts: bool = True  # boards draft, so the emulated board step time applies
    servers: int = Field(1, ge=1)  # verification servers sharing the sessions
    board_rtt_ms: float = Field(0.0, ge=0)  # boards reach the broker over a link this slow


class PeerMode(BaseModel):
    """One process, one request at a time, no broker: what a user might run instead."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["peer"] = "peer"
    name: str
    description: str
    assistant: bool


Mode = FleetMode | PeerMode

MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        FleetMode(
            name="sled",
            description="N boards draft (k_max and confidence threshold); one server verifies "
            "the drafts of all sessions in one batched forward pass",
        ),
        FleetMode(
            name="server-only",
            description="boards only forward prompts; the same server decodes every token "
            "itself, new sessions joining the running batch (continuous batching)",
            device={"server_decodes": True},
            drafts=False,
        ),
        FleetMode(
            name="sled-threshold",
            description="SLED's own policy: boards draft up to k_max and stop below the "
            "confidence threshold; the server always suggests k_max (no adaptive k)",
            server={"speculation": "fixed"},
        ),
        *(
            FleetMode(
                name=f"sled-k{k}",
                description=f"fixed speculation length: every round drafts exactly {k} tokens "
                "(no threshold, no adaptive k)",
                device={"k_max": k, "threshold": 0.0},
                server={"speculation": "fixed", "k_max": k},
            )
            for k in FIXED_KS
        ),
        *(
            FleetMode(
                name=f"sled{'-pipelined' if pipelined else ''}-rtt{rtt}",
                description=f"SLED's threshold policy (sled-threshold) with boards behind a {rtt} "
                "ms round-trip link, "
                + ("drafting ahead while each verdict is in flight" if pipelined else "no pipelining"),
                device={"pipeline": pipelined},
                # Fixed, so that adaptive k does not hand the sessions to the server (k = 0)
                # when the round trip is long: this measures the drafting pipeline itself.
                server={"speculation": "fixed"},
                board_rtt_ms=float(rtt),
            )
            for rtt in LINK_RTTS_MS
            for pipelined in (False, True)
        ),
        FleetMode(
            name="sled-2servers",
            description="sled with two verification servers on this machine sharing the "
            "sessions through the shared-subscription claim",
            servers=2,
        ),
        PeerMode(
            name="assisted",
            description="Hugging Face assisted generation (draft as assistant_model, greedy), "
            "in-process, one request at a time",
            assistant=True,
        ),
        PeerMode(
            name="target",
            description="the target alone at batch 1 (Hugging Face generate, greedy): the "
            "reference output of the lossless check",
            assistant=False,
        ),
    )
}


# Named sets for --modes: each puts side by side what one comparison needs.
MODE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_MODES,
    "speculation": ("sled", "sled-threshold", *(f"sled-k{k}" for k in FIXED_KS), "server-only"),
    "pipelining": tuple(f"sled{p}-rtt{rtt}" for rtt in LINK_RTTS_MS for p in ("", "-pipelined")),
    "servers": ("sled", "sled-2servers"),
}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(
            f"unknown bench mode {name!r}; known: {', '.join(MODES)} (sets: {', '.join(MODE_SETS)})"
        ) from None


def expand_modes(names: Sequence[str]) -> list[str]:
    """Mode names with every set name replaced by its modes, first occurrence kept."""
    expanded = [mode for name in names for mode in MODE_SETS.get(name, (name,))]
    return [get_mode(name).name for name in dict.fromkeys(expanded)]


# ---------------------------------------------------------------------------------- report


# ---------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class BenchModels:
    fleet: FleetModels
    draft_checkpoint: Path  # the torch checkpoint the ONNX draft was exported from (assisted)


def run_fleet_bench(
    models: ModelsChoice = "tiny",
    boards: Sequence[int] = DEFAULT_BOARDS,
    duration_s: float = DEFAULT_DURATION_S,
    target_rate: float | None = None,
    emulate: bool = True,
    profile: str = "rpi5",
    modes: Sequence[str] = DEFAULT_MODES,
    sampling: SamplingMix = "mixed",
    max_new_tokens: int = 64,
    dtype: Dtype | None = None,
    linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL,
    k_max: int | None = None,
    threshold: float | None = None,
    peer_requests: int = DEFAULT_PEER_REQUESTS,
    board_step_ms: float | None = None,
    boards_for: dict[str, Sequence[int]] | None = None,
    board_cpus: int = 0,
    repeats_for: dict[str, int] | None = None,
    home: Path | None = None,
    progress: ProgressFn | None = None,
) -> BenchReport:
    """Run every mode at every number of boards; see the module docstring. `boards_for`
    gives some modes (or sets of modes) their own numbers of boards instead; `repeats_for`
    runs some modes several times at each of their N (fleet_schedule), each point pooling
    its runs.

    Emulated boards take `board_step_ms` per drafted token when given (a figure measured on
    the real board beats the profile's estimate), else this machine's measured draft step
    times the profile's hardware factor. `board_cpus` > 0 keeps that many CPUs for the emulated
    boards' drafting and runs the server, in every mode, on the rest (fleet.bench.cpus).
    """
    defaults = DeviceSettings()
    config = BenchConfig(
        models=models,
        boards=_check_boards(boards),
        duration_s=duration_s,
        modes=expand_modes(modes),
        boards_for={mode: _check_boards(counts) for mode, counts in _per_mode(boards_for).items()},
        repeats_for=_per_mode(repeats_for),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        dtype=dtype or ("bfloat16" if models == "qwen" else "float32"),
        linear_kernel=linear_kernel,
        k_max=k_max or defaults.k_max,
        threshold=defaults.threshold if threshold is None else threshold,
        emulate=emulate,
        profile=profile,
        target_rate=target_rate,
        peer_requests=peer_requests,
        board_step_ms=board_step_ms,
        board_cpus=board_cpus,
    )
    _check_config(config)
    kernel = _resolved_kernel(config)
    split = split_cpus(config.board_cpus)
    board_profile = get_profile(profile)
    progress = progress or (lambda description, done, total: None)
    log = get_logger(component="bench-fleet")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.monotonic()
    load_before = os.getloadavg()
    plan = JobPlan(shipped_bench_prompts(), config.sampling)
    results: dict[str, ModeReport] = {}
    runs: dict[str, list[RequestRecord]] = {}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, server_side(split):
        workdir = Path(tmp)
        progress("preparing models", 0, 1)
        bench_models = _prepare_models(config.models, workdir, home)
        progress("measuring the draft step on this machine", 0, 1)
        step_ms = measure_draft_step_ms(bench_models.fleet.draft_dir)
        emulated_ms = _emulated_step_ms(config, board_profile, step_ms)
        log.info("draft_step_measured", step_ms=round(step_ms, 3), emulated_ms=emulated_ms)
        tokenizer = _tokenizer(bench_models.fleet.draft_dir)
        fleet_modes = [MODES[name] for name in config.modes if isinstance(MODES[name], FleetMode)]
        done: dict[tuple[str, int], list[_FleetRun]] = {}
        for n, name, run in fleet_schedule(config, [mode.name for mode in fleet_modes]):
            fleet_run = _run_fleet_point(
                MODES[name], n, config, bench_models.fleet, workdir / f"{name}-{n}-{run + 1}", plan,
                emulated_ms, tokenizer, progress, split,
            )
            done.setdefault((name, n), []).append(fleet_run)
            runs[f"{name}@{n}" + (f"#{run + 1}" if run else "")] = fleet_run.records
            gc.collect()  # the next fleet loads the target again
        for mode in fleet_modes:
            counts = config.boards_of(mode.name)
            results[mode.name] = ModeReport(
                name=mode.name, kind="fleet", description=mode.description,
                points=[_fleet_point(n, done[mode.name, n], mode) for n in counts],
                verify_cost=_verify_cost([p for n in counts for r in done[mode.name, n] for p in r.passes]),
            )
        peers = [MODES[name] for name in config.modes if isinstance(MODES[name], PeerMode)]
        if peers:
            results.update(_run_peer_modes(peers, config, bench_models, plan, tokenizer, runs, progress))
            gc.collect()
        machine = _machine(load_before)  # inside the split: the server's torch threads
    rate, rule = capacity_target_rate(config, results)
    for report in results.values():
        if report.kind == "fleet":
            report.capacity, report.capacity_censored = capacity_of(report.points, rate)
    throughput, throughput_boards = sled_throughput_ratio(results)
    capacity, bound = sled_capacity_ratio(results)
    check = lossless_check(runs)
    errors = sum(p.errors for r in results.values() for p in r.points)
    return BenchReport(
        modes=results,
        throughput_ratio=throughput,
        throughput_boards=throughput_boards,
        throughput_ratios=sled_throughput_ratios(results),
        comparisons=comparisons(results),
        capacity_ratio=capacity,
        capacity_ratio_bound=bound,
        lossless=is_lossless(check),
        lossless_check=check,
        emulated_boards=config.emulate,
        profile=board_profile if config.emulate else None,
        draft_step_ms=step_ms,
        emulated_step_ms=emulated_ms,
        cpu_split=split,
        target_rate=rate,
        target_rate_rule=rule,
        errors=errors,
        models={
            "target": bench_models.fleet.target_name,
            "draft": bench_models.fleet.draft_dir.name,
            "dtype": config.dtype,
            "linear_kernel": kernel,
        },
        machine=machine,
        config=config,
        command=equivalent_command(config),
        started_at=started_at,
        wall_s=time.monotonic() - started,
    )


def _emulated_step_ms(config: BenchConfig, profile: BoardProfile, measured_ms: float) -> float | None:
    if not config.emulate:
        return None
    return config.board_step_ms if config.board_step_ms is not None else measured_ms * profile.hardware_factor


def _per_mode(given: dict[str, T] | None) -> dict[str, T]:
    """A value given per mode or set of modes, keyed by each mode of the set."""
    return {mode: value for name, value in (given or {}).items() for mode in expand_modes([name])}


def _check_boards(boards: Sequence[int]) -> list[int]:
    if not boards or any(n < 1 for n in boards):
        raise ValueError(f"boards must be positive numbers of boards, got {list(boards)}")
    return sorted(set(boards))


def _resolved_kernel(config: BenchConfig) -> str:
    """The linear kernel `auto` comes to on this machine (the bench's server runs on its CPU);
    an `onednn` it cannot run fails here, before any model loads."""
    import torch

    from server.kernels import resolve_kernel

    return resolve_kernel(config.linear_kernel, torch.device("cpu"), getattr(torch, config.dtype))


def _check_config(config: BenchConfig) -> None:
    if config.duration_s <= 0:
        raise ValueError(f"duration must be positive, got {config.duration_s}")
    if not config.modes:
        raise ValueError("no modes to run")
    if stray := sorted(set(config.boards_for) - set(config.modes)):
        raise ValueError(f"boards given for modes that do not run: {', '.join(stray)}")
    if stray := sorted(set(config.repeats_for) - set(config.modes)):
        raise ValueError(f"repeats given for modes that do not run: {', '.join(stray)}")
    if peers := sorted(m for m in config.repeats_for if MODES[m].kind == "peer"):
        raise ValueError(f"only fleet modes repeat, not {', '.join(peers)}")
    if any(repeats < 1 for repeats in config.repeats_for.values()):
        raise ValueError(f"repeats must be at least 1, got {config.repeats_for}")
    if not 1 <= config.max_new_tokens <= 4096:
        raise ValueError(f"max_new_tokens must be 1..4096, got {config.max_new_tokens}")
    if config.target_rate is not None and config.target_rate <= 0:
        raise ValueError(f"target rate must be positive, got {config.target_rate}")
    if config.board_step_ms is not None and (config.board_step_ms <= 0 or not config.emulate):
        raise ValueError("a board step time must be positive, and applies to emulated boards only")
    if config.peer_requests < 1:
        raise ValueError("peer_requests must be at least 1")
    if config.sampling == "sampled" and any(MODES[m].kind == "peer" for m in config.modes):
        raise ValueError("the in-process peers run greedy jobs: use sampling 'mixed' or drop them")
    DeviceSettings(k_max=config.k_max, threshold=config.threshold)  # validates both


def _prepare_models(models: ModelsChoice, workdir: Path, home: Path | None) -> BenchModels:
    """The tiny seeded pair (made here), or the Qwen pair from the model store (pulled and
    exported on first use, as `fleet demo` does)."""
    from fleet.models.export import export_draft

    if models == "tiny":
        from fleet.models.tiny import write_tiny_models

        target, draft = write_tiny_models(workdir / "tiny")
        report = export_draft(draft, workdir / "tiny" / "draft-onnx", "none")
        return BenchModels(FleetModels("tiny", target, report.out), draft)
    from rich.console import Console

    from fleet.demo import DEFAULT_DRAFT, store_models
    from fleet.models.store import ModelStore

    store_home = home or default_home()
    fleet_models = store_models(store_home, Console(stderr=True))
    return BenchModels(fleet_models, ModelStore(store_home).path(DEFAULT_DRAFT))


def _tokenizer(draft_dir: Path):  # -> tokenizers.Tokenizer
    """The boards' own tokenizer: prompts are encoded and streams decoded exactly as they do."""
    from tokenizers import Tokenizer

    from device.manifest import TOKENIZER_FILE

    return Tokenizer.from_file(str(draft_dir / TOKENIZER_FILE))


class BatchRecord(NamedTuple):
    """One batched forward pass as the service recorded it, with the server's KV bytes and
    open sessions right after it."""

    at: float  # time.monotonic() when it ended
    sessions: int
    verify_s: float
    drafted: int
    accepted: int
    committed: int
    kv_bytes: int
    open_sessions: int

    @property
    def tokens(self) -> int:
        """Tokens in the forward pass: each session's pending token plus its draft."""
        return self.sessions + self.drafted


class _ServiceLog(ServiceStats):
    """One service's rolling stats, plus every batch with the server's KV bytes and open
    sessions at that moment. Installed as `service.stats` (the service keeps only its last 64
    batches, for its status topic); `record` runs on the service's scheduler thread."""

    def __init__(self, service: VerificationService, records: list[BatchRecord]) -> None:
        super().__init__()
        self._service = service
        self._records = records

    def record(self, batch_size: int, verify_s: float, drafted: int, accepted: int, committed: int) -> None:
        super().record(batch_size, verify_s, drafted, accepted, committed)
        self._records.append(BatchRecord(
            time.monotonic(), batch_size, verify_s, drafted, accepted, committed,
            self._service.engine.total_bytes, len(self._service.routes),
        ))


class BatchLog:
    """Every batch of every service of a fleet (list.append is atomic: the services'
    scheduler threads share one list)."""

    def __init__(self, services: list[VerificationService]) -> None:
        self.records: list[BatchRecord] = []
        for service in services:
            service.stats = _ServiceLog(service, self.records)

    def window(self, start: float, end: float) -> list[BatchRecord]:
        return [r for r in self.records if start <= r.at <= end]


class _RssPeak:
    """Peak resident memory of this process while a point runs (boards, server and broker
    clients share the process: the growth is the fleet's, mostly the server's KV caches and
    activations)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


class _BoardCpu:
    """CPU seconds the boards' generation threads (drafting runs on them: one ONNX Runtime
    thread per step) used inside the measuring window, read from the kernel's per-thread
    counters when the window opens and when it closes."""

    def __init__(self, start_in: float) -> None:
        self._window_s = start_in
        self._opened: float | None = None
        self._closed: float | None = None

    def tick(self, inner: Callable[[float | None], None]) -> Callable[[float | None], None]:
        def observe(elapsed: float | None) -> None:
            if elapsed is not None:
                if self._opened is None:
                    self._opened = _generation_cpu_s()
                elif self._closed is None and elapsed >= self._window_s:
                    self._closed = _generation_cpu_s()
            inner(elapsed)

        return observe

    def share(self, window_s: float) -> float | None:
        if self._opened is None or self._closed is None:
            return None
        return (self._closed - self._opened) / window_s / (os.cpu_count() or 1)


def _pipelined_share(agents: Iterable[BoardAgent]) -> float | None:
    def total(agent: BoardAgent, name: str) -> float:
        return agent.metrics.registry.get_sample_value(f"fleet_device_{name}_total") or 0.0

    drafted = sum(total(a, "drafted_tokens") for a in agents)
    ahead = sum(total(a, "pipelined_tokens") for a in agents)
    return ahead / drafted if drafted else None


def _generation_cpu_s() -> float:
    ids = {t.native_id for t in threading.enumerate() if t.name.startswith("generation")}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


@dataclass
class _FleetRun:
    """One fresh fleet of one mode at one N, and what its measuring window saw."""

    window: tuple[float, float]
    records: list[RequestRecord]
    passes: list[BatchRecord]  # after warm-up
    window_passes: list[BatchRecord]
    rss_growth_mb: float
    load_avg_1m: float
    board_cpu_share: float | None
    pipelined_share: float | None

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]

    @property
    def tokens(self) -> float:
        return tokens_in_window(self.records, self.window)


def fleet_schedule(config: BenchConfig, modes: Sequence[str]) -> list[tuple[int, str, int]]:
    """(boards, mode, run) in the order they run. At each N, round r runs every mode asked for
    more than r runs, in the order given, and the next round runs them in reverse: two runs
    each of `sled,server-only` go sled, server-only, server-only, sled, so that a steady drift
    in the machine's speed during the point falls on both modes alike."""
    order = []
    for n in sorted({n for mode in modes for n in config.boards_of(mode)}):
        here = [mode for mode in modes if n in config.boards_of(mode)]
        for run in range(max(config.repeats_of(mode) for mode in here)):
            round_modes = [mode for mode in here if config.repeats_of(mode) > run]
            order += [(n, mode, run) for mode in (reversed(round_modes) if run % 2 else round_modes)]
    return order


def _run_fleet_point(
    mode: FleetMode,
    n: int,
    config: BenchConfig,
    models: FleetModels,
    workdir: Path,
    plan: JobPlan,
    emulated_ms: float | None,
    tokenizer,
    progress: ProgressFn,
    split: CpuSplit | None = None,
) -> _FleetRun:
    """A fresh broker, server and `n` boards in `mode`, warmed up with one short request,
    then the closed loop. A fresh fleet per point lets the modes alternate at each N, so that
    a change in the machine's other load during the run falls on both modes alike."""
    devices = [f"board-{i + 1}" for i in range(n)]
    server = ServerSettings(
        dtype=config.dtype, linear_kernel=config.linear_kernel, k_max=config.k_max, max_sessions=2 * n,
    ).model_copy(update=mode.server)
    device = DeviceSettings(
        k_max=config.k_max,
        threshold=config.threshold,
        emulated_step_ms=emulated_ms if mode.drafts else None,
        hardware=config.profile if config.emulate else "this machine",
        # A verdict late on a loaded machine is slowness to measure, not a lost server: a
        # resync would re-open the session and count the same tokens twice.
        verdict_timeout_s=REQUEST_TIMEOUT_S,
        draft_threads=1,
        draft_cpus=split.boards if split is not None else None,
    ).model_copy(update=mode.device)
    label = f"{mode.name}, {n} board{'s' if n > 1 else ''}"
    servers = [f"server-{i + 1}" for i in range(mode.servers)]
    progress(f"{label}: starting broker, server and boards", 0, config.duration_s)
    with LocalFleet(
        models=models, workdir=workdir, devices=devices, servers=servers, server=server, device=device,
        board_rtt_ms=mode.board_rtt_ms,
    ) as fleet:
        batches = BatchLog(list(fleet.services.values()))

        def generate(board: str, request: GenerationRequest, on_delta: Callable[[str], None]) -> GenerationResponse:
            return fleet.app.generate(board, request, on_delta=on_delta, timeout_s=REQUEST_TIMEOUT_S)

        def tick(elapsed: float | None) -> None:
            if elapsed is None:
                progress(f"{label}: ramping up (opening every board's session)", 0, config.duration_s)
                return
            state = "measuring" if elapsed < config.duration_s else "finishing requests in flight"
            progress(f"{label}: {state}", min(elapsed, config.duration_s), config.duration_s)

        fleet.app.generate(devices[0], plan.job(0).request(WARMUP_TOKENS), timeout_s=REQUEST_TIMEOUT_S)
        warmup_passes = len(batches.records)  # the first passes pay one-off allocations
        load = os.getloadavg()[0]
        board_cpu = _BoardCpu(start_in=config.duration_s)
        with _RssPeak() as rss:
            start, records = run_closed_loop(
                generate, devices, plan, config.max_new_tokens, config.duration_s, tokenizer.decode,
                board_cpu.tick(tick),
            )
        pipelined_share = _pipelined_share(fleet.agents.values()) if mode.device.get("pipeline") else None
    window = (start, start + config.duration_s)
    return _FleetRun(
        window=window, records=records, passes=batches.records[warmup_passes:],
        window_passes=batches.window(*window), rss_growth_mb=rss.growth_mb, load_avg_1m=load,
        board_cpu_share=board_cpu.share(config.duration_s), pipelined_share=pipelined_share,
    )


def _verify_cost(batches: Sequence[BatchRecord]) -> list[VerifyCost]:
    """Mean forward-pass time in power-of-two buckets of tokens per pass (1, 2-3, 4-7, ...)."""
    buckets: dict[int, list[float]] = {}
    for batch in batches:
        buckets.setdefault(batch.tokens.bit_length() - 1, []).append(batch.verify_s)
    return [
        VerifyCost(
            tokens_min=2**power, tokens_max=2 ** (power + 1) - 1, batches=len(times),
            verify_ms_mean=1000 * sum(times) / len(times),
        )
        for power, times in sorted(buckets.items())
    ]


def _fleet_point(n: int, runs: Sequence[_FleetRun], mode: FleetMode) -> PointResult:
    """One point from the windows of all its runs, pooled: tokens over the summed window
    time, latencies over every run's tokens."""
    seconds = sum(run.seconds for run in runs)
    tokens = sum(run.tokens for run in runs)
    records = [record for run in runs for record in run.records]
    finished = [r for run in runs for r in run.records if r.stats is not None and r.done <= run.window[1]]
    measured = finished or [r for r in records if r.stats is not None]
    stats = [r.stats for r in measured]
    batches = [batch for run in runs for batch in run.window_passes]
    drafted = sum(s.drafted for s in stats)
    accepted = sum(s.accepted for s in stats)
    verifications = sum(s.verifications for s in stats)
    verify_s = sum(b.verify_s for b in batches)
    committed = sum(b.committed for b in batches)
    peak = max(batches, key=lambda b: (b.open_sessions, b.kv_bytes), default=None)
    return PointResult(
        boards=n,
        window_s=seconds,
        requests=len(records),
        errors=sum(r.error is not None for r in records),
        tokens=tokens,
        system_tok_s=tokens / seconds,
        session_tok_s=tokens / seconds / n,
        system_tok_s_runs=[run.tokens / run.seconds for run in runs] if len(runs) > 1 else [],
        **_latency([(run.records, run.window) for run in runs]),
        acceptance_rate=accepted / drafted if mode.drafts and drafted else None,
        mean_accepted=accepted / verifications if mode.drafts and verifications else None,
        server_s_per_token=verify_s / committed if committed else None,
        server_busy=verify_s / seconds,
        batch_sessions_mean=sum(b.sessions for b in batches) / len(batches) if batches else None,
        batch_tokens_mean=sum(b.tokens for b in batches) / len(batches) if batches else None,
        kv_bytes_per_session=peak.kv_bytes / peak.open_sessions if peak is not None and peak.open_sessions else None,
        rss_growth_mb=max(run.rss_growth_mb for run in runs),
        mqtt_bytes_per_verification=(
            sum(s.bytes_out + s.bytes_in for s in stats) / verifications if verifications else None
        ),
        # Pushed verdicts (a server-decoded session, or k = 0) have no round trip.
        round_trip_ms=(
            sum(s.round_trip_ms * s.round_trips for s in stats) / round_trips
            if mode.drafts and (round_trips := sum(s.round_trips for s in stats)) else None
        ),
        board_cpu_share=_mean([run.board_cpu_share for run in runs]),
        pipelined_share=_mean([run.pipelined_share for run in runs]),
        load_avg_1m=_mean([run.load_avg_1m for run in runs]),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _latency(
    windows: Sequence[tuple[Sequence[RequestRecord], tuple[float, float]]],
) -> dict[str, float | None]:
    """Latency percentiles over the tokens of every (records, window) pair, pooled."""
    tbt = [gap for records, window in windows for gap in time_between_tokens(records, window)]
    ttft = [
        r.chunks[0][0] - r.sent
        for records, (start, end) in windows for r in records if r.chunks and start <= r.chunks[0][0] <= end
    ]
    p50, p95, first = percentile(tbt, 50), percentile(tbt, 95), percentile(ttft, 50)
    return {
        "tbt_ms_p50": None if p50 is None else 1000 * p50,
        "tbt_ms_p95": None if p95 is None else 1000 * p95,
        "ttft_ms_p50": None if first is None else 1000 * first,
    }


def _run_peer_modes(
    peers: list[PeerMode],
    config: BenchConfig,
    models: BenchModels,
    plan: JobPlan,
    tokenizer,
    runs: dict[str, list[RequestRecord]],
    progress: ProgressFn,
) -> dict[str, ModeReport]:
    jobs = plan.greedy_jobs(config.peer_requests)
    reports = {}
    progress("loading the target (and draft) with transformers", 0, 1)
    with HFPeers(models.fleet.target_dir, models.draft_checkpoint, config.dtype, config.linear_kernel) as hf:
        for mode in peers:
            done = [0]

            def tick(mode: PeerMode = mode, done: list[int] = done) -> None:
                done[0] += 1
                progress(f"{mode.name}: one request at a time", done[0], len(jobs))

            progress(f"{mode.name}: one request at a time", 0, len(jobs))
            records = hf.run(
                jobs, lambda text: tokenizer.encode(text).ids, config.max_new_tokens, mode.assistant, tick
            )
            runs[f"{mode.name}@1"] = records
            reports[mode.name] = ModeReport(
                name=mode.name, kind="peer", description=mode.description, points=[_peer_point(records)]
            )
    return reports


def _peer_point(records: list[RequestRecord]) -> PointResult:
    """One session at a time: its busy time is the whole elapsed time, and all of it is the
    serving machine's compute."""
    busy = sum(r.done - r.sent for r in records)
    tokens = sum(len(r.tokens) for r in records)
    window = (min(r.sent for r in records), max(r.done for r in records))
    return PointResult(
        boards=1,
        window_s=busy,
        requests=len(records),
        errors=0,
        tokens=tokens,
        system_tok_s=tokens / busy,
        session_tok_s=tokens / busy,
        **_latency([(records, window)]),
        server_s_per_token=busy / tokens if tokens else None,
        server_busy=1.0,
    )


# ---------------------------------------------------------------------------------- summary


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    mosquitto = shutil.which("mosquitto")
    version = None
    if mosquitto:
        out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=10, check=False).stdout
        version = next((line for line in out.splitlines() if "version" in line), None)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": False,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "mosquitto": version,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def equivalent_command(config: BenchConfig) -> str:
    """The `fleet bench` command line that repeats this configuration."""
    parts = [
        "fleet bench",
        f"--models {config.models}",
        f"--boards {','.join(map(str, config.boards))}",
        f"--duration {config.duration_s:g}",
        f"--modes {','.join(config.modes)}",
        f"--sampling {config.sampling}",
        f"--max-new-tokens {config.max_new_tokens}",
        f"--dtype {config.dtype}",
        f"--k-max {config.k_max}",
        f"--threshold {config.threshold:g}",
        f"--peer-requests {config.peer_requests}",
        f"--profile {config.profile}" if config.emulate else "--real-drafting",
    ]
    if config.linear_kernel != DEFAULT_LINEAR_KERNEL:
        parts.append(f"--linear-kernel {config.linear_kernel}")
    if config.board_step_ms is not None:
        parts.append(f"--board-step-ms {config.board_step_ms:g}")
    if config.board_cpus:
        parts.append(f"--board-cpus {config.board_cpus}")
    for mode, counts in config.boards_for.items():
        parts.append(f"--boards-for {mode}={','.join(map(str, counts))}")
    for mode, repeats in config.repeats_for.items():
        parts.append(f"--repeats-for {mode}={repeats}")
    if config.target_rate is not None:
        parts.append(f"--target-rate {config.target_rate:g}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------- output


def _parse_boards(value: str, what: str) -> list[int]:
    try:
        return [int(n) for n in _parse_list(value, what)]
    except ValueError as exc:
        raise typer.BadParameter(f"{what} must be whole numbers, got {value!r}") from exc


def _parse_repeats(value: str) -> int:
    counts = _parse_boards(value, "--repeats-for")
    if len(counts) != 1:
        raise typer.BadParameter(f"--repeats-for takes one number of runs, got {value!r}")
    return counts[0]


def _parse_per_mode(entries: list[str] | None, option: str, shape: str, parse: Callable[[str], T]) -> dict[str, T]:
    """The MODE_OR_SET=VALUE entries of a repeatable option."""
    per_mode: dict[str, T] = {}
    for entry in entries or []:
        name, separator, value = entry.partition("=")
        if not separator or not name.strip():
            raise typer.BadParameter(f"{option} takes {shape}, got {entry!r}")
        per_mode[name.strip()] = parse(value)
    return per_mode


def _parse_list(value: str, what: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter(f"{what}: give a comma-separated list")
    return items


def bench_command(
    ctx: typer.Context,
    models: Annotated[str, typer.Option("--models", help="tiny (seeded, made here) or qwen (the model store's pair).")] = "tiny",
    boards: Annotated[str, typer.Option("--boards", help="Numbers of boards to run, comma-separated.")] = "1,2,4,8,16",
    duration: Annotated[float, typer.Option("--duration", min=1.0, help="Seconds each mode runs at each number of boards.")] = DEFAULT_DURATION_S,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON to FILE.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write tokens/s against boards as PNG to FILE.")] = None,
    profile: Annotated[str, typer.Option("--profile", help="Board profile to emulate: rpi5, rpi4b, jetson-orin-nano.")] = "rpi5",
    real_drafting: Annotated[bool, typer.Option("--real-drafting", help="Boards draft at this machine's speed (no emulation).")] = False,
    target_rate: Annotated[float | None, typer.Option("--target-rate", min=0.0, help="Per-session tokens/s that counts toward capacity [default: half of one server-only session's rate in this run].")] = None,
    modes: Annotated[str, typer.Option("--modes", help=f"Comma-separated modes ({', '.join(MODES)}) or sets ({', '.join(MODE_SETS)}).")] = "default",
    sampling: Annotated[str, typer.Option("--sampling", help="mixed (half greedy, half sampled), greedy or sampled.")] = "mixed",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=4096)] = 64,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Target dtype for every mode [default: bfloat16 for qwen, float32 for tiny].")] = None,
    linear_kernel: Annotated[str, typer.Option("--linear-kernel", help="Target linears: default, onednn (prepacked; CPU float32) or auto (onednn where it runs).")] = DEFAULT_LINEAR_KERNEL,
    k_max: Annotated[int | None, typer.Option("--k-max", min=1, max=64, help="Most tokens a board drafts per round.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0, help="Boards stop drafting below this confidence.")] = None,
    peer_requests: Annotated[int, typer.Option("--peer-requests", min=1, help="Greedy requests the in-process peers run.")] = DEFAULT_PEER_REQUESTS,
    board_step_ms: Annotated[float | None, typer.Option("--board-step-ms", min=0.0, help="Emulated board draft step in ms, instead of the profile's factor x this machine's step.")] = None,
    boards_for: Annotated[list[str] | None, typer.Option("--boards-for", help="MODE_OR_SET=1,4: run these modes at their own numbers of boards (repeatable).")] = None,
    repeats_for: Annotated[list[str] | None, typer.Option("--repeats-for", help="MODE_OR_SET=R: run these modes R times at each N, alternating, and pool the runs (repeatable).")] = None,
    board_cpus: Annotated[int, typer.Option("--board-cpus", min=0, help="CPUs kept for the emulated boards' drafting; the server runs on the rest [default: 0, all shared].")] = 0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "warning",
) -> None:
    """Speculative fleet (sled) against the server alone and HF assisted generation, in one run.

    Also usable as the callback of a `bench` group: it does nothing when a subcommand
    (`fleet bench verify`, `fleet bench draft`) was asked for.
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as transformers_logging

    from fleet.logging import configure_logging

    try:
        configure_logging(log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    transformers_logging.disable_progress_bar()  # model loads would break the progress bar

    if models not in ("tiny", "qwen"):
        raise typer.BadParameter(f"--models must be tiny or qwen, not {models!r}")
    if sampling not in ("mixed", "greedy", "sampled"):
        raise typer.BadParameter(f"--sampling must be mixed, greedy or sampled, not {sampling!r}")
    if dtype not in (None, "float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    if linear_kernel not in get_args(LinearKernel):
        raise typer.BadParameter(f"--linear-kernel must be auto, default or onednn, not {linear_kernel!r}")
    board_counts = _parse_boards(boards, "--boards")
    per_mode = _parse_per_mode(boards_for, "--boards-for", "MODE_OR_SET=1,4", lambda v: _parse_boards(v, "--boards-for"))
    repeats = _parse_per_mode(repeats_for, "--repeats-for", "MODE_OR_SET=R", _parse_repeats)
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)

        def show(description: str, done: float, total: float) -> None:
            bar.update(task, description=description, completed=done, total=total)

        try:
            report = run_fleet_bench(
                models=models, boards=board_counts, duration_s=duration, target_rate=target_rate,
                emulate=not real_drafting, profile=profile, modes=_parse_list(modes, "--modes"),
                sampling=sampling, max_new_tokens=max_new_tokens, dtype=dtype,
                linear_kernel=linear_kernel, k_max=k_max,
                threshold=threshold, peer_requests=peer_requests, board_step_ms=board_step_ms,
                boards_for=per_mode, repeats_for=repeats, board_cpus=board_cpus, progress=show,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    console.print(results_table(report))
    console.print(verify_cost_table(report))
    if (table := comparison_table(report)) is not None:
        console.print(table)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
        console.print(f"report written to {json_out}")
    if plot is not None:
        write_plot(report, plot)
        console.print(f"plot written to {plot}")
