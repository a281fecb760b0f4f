"""`fleet bench`: the fleet benchmark on the tiny seeded pair, real Mosquitto, real ONNX draft,
real transformers target; plus the pure parts (token attribution, capacity, losslessness).

The full run is shared by the tests below (module fixture): boards 1 and 2, a few seconds
each, every mode.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fleet.bench.cpus import server_side, split_cpus
from fleet.bench.fleet import (
    MODE_SETS,
    MODES,
    bench_command,
    expand_modes,
    fleet_schedule,
    run_fleet_bench,
)
from fleet.bench.profiles import PROFILES, get_profile
from fleet.bench.report import (
    BenchConfig,
    BenchReport,
    PointResult,
    capacity_of,
    lossless_check,
    sled_capacity_ratio,
    write_plot,
)
from fleet.bench.workload import (
    Job,
    JobPlan,
    RequestRecord,
    chunk_token_counts,
    percentile,
    shipped_bench_prompts,
    time_between_tokens,
    tokens_in_window,
)

BOARDS = [1, 2]
DURATION_S = 2.0
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def report() -> BenchReport:
    return run_fleet_bench("tiny", boards=BOARDS, duration_s=DURATION_S, max_new_tokens=NEW_TOKENS, peer_requests=2)


def test_report_has_every_mode_and_point(report: BenchReport) -> None:
    assert set(report.modes) == {"sled", "server-only", "assisted", "target"}
    for name in ("sled", "server-only"):
        mode = report.modes[name]
        assert [p.boards for p in mode.points] == BOARDS
        for point in mode.points:
            assert point.errors == 0
            assert point.requests >= point.boards
            assert point.tokens > 0 and point.system_tok_s > 0
            assert math.isclose(point.session_tok_s * point.boards, point.system_tok_s)
            assert 0 < point.tbt_ms_p50 <= point.tbt_ms_p95
            assert point.ttft_ms_p50 > 0
            assert point.server_s_per_token > 0 and 0 < point.server_busy <= 1.0
            assert point.batch_sessions_mean >= 1 and point.batch_tokens_mean >= point.batch_sessions_mean
            assert point.kv_bytes_per_session > 0
            assert point.mqtt_bytes_per_verification > 0
            assert point.rss_growth_mb is not None
    for point in report.modes["sled"].points:
        # The tiny target verifies in milliseconds, so adaptive k may rightly hand every
        # session to the server (k = 0, no drafts); drafting figures are checked on the
        # fixed-k modes (test_comparison_modes_run_and_are_compared).
        assert point.acceptance_rate is None or 0 <= point.acceptance_rate <= 1
        assert point.batch_tokens_mean >= point.batch_sessions_mean
    for point in report.modes["server-only"].points:
        assert point.acceptance_rate is None and point.round_trip_ms is None
        assert point.batch_tokens_mean == point.batch_sessions_mean  # one token per session a step
    for name in ("assisted", "target"):
        (point,) = report.modes[name].points
        assert point.boards == 1 and point.requests == 2 and point.tokens > 0
        assert point.tbt_ms_p50 is not None


def test_summary_fields(report: BenchReport) -> None:
    sled, alone = report.modes["sled"], report.modes["server-only"]
    assert report.throughput_boards == max(BOARDS)
    expected = sled.at(2).system_tok_s / alone.at(2).system_tok_s
    assert math.isclose(report.throughput_ratio, expected)
    assert report.target_rate > 0 and "server-only" in report.target_rate_rule
    for mode in (sled, alone):
        assert mode.capacity in (0, 1, 2)
    assert report.capacity_ratio_bound in ("exact", "lower", "upper", "unknown")
    assert report.emulated_boards and report.profile is not None and report.profile.name == "rpi5"
    assert math.isclose(report.emulated_step_ms, report.draft_step_ms * report.profile.hardware_factor)
    assert report.machine["logical_cpus"] >= 1 and report.machine["torch"]
    assert report.command.startswith("fleet bench --models tiny --boards 1,2 --duration 2 ")
    assert report.errors == 0


def test_greedy_outputs_identical_across_modes(report: BenchReport) -> None:
    check = report.lossless_check
    assert report.lossless, check.mismatches
    assert check.jobs_against_target == 2  # the peers' two greedy jobs, also run by the fleet
    assert {"sled", "server-only", "target"} <= set(check.modes_compared)
    assert check.jobs_compared >= 1 and check.outputs_compared > check.jobs_compared


def test_json_round_trip_and_plot(report: BenchReport, tmp_path: Path) -> None:
    data = json.loads(report.model_dump_json())
    for key in ("modes", "throughput_ratio", "capacity_ratio", "lossless", "emulated_boards", "machine", "command"):
        assert key in data
    assert BenchReport.model_validate(data) == report
    plot = tmp_path / "bench.png"
    write_plot(report, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- pure parts ------------------------------------------------------------------------


def test_job_plan_is_the_same_for_every_board_count() -> None:
    plan = JobPlan(shipped_bench_prompts())
    assert len(plan.prompts) % 2 == 1, "an odd prompt count asks every prompt both ways"
    jobs = [plan.job(i) for i in range(2 * len(plan.prompts))]
    assert {(j.prompt_index, j.greedy) for j in jobs} == {(p, g) for p in range(len(plan.prompts)) for g in (True, False)}
    assert {p.kind for p in plan.prompts} == {"code", "prose"}
    # Board b of N runs jobs b, b + N, ...: together the boards run jobs 0.. in order.
    assert sorted(plan.board_job(b, 4, r).index for b in range(4) for r in range(3)) == list(range(12))
    sampled = plan.job(1).request(16)
    assert sampled.temperature > 0 and sampled.seed == 1
    assert plan.job(0).request(16).temperature == 0.0
    assert [j.index for j in plan.greedy_jobs(3)] == [0, 2, 4]


def test_chunk_token_counts_follows_the_stream() -> None:
    words = {1: "a", 2: "bc", 3: "", 4: "d", 5: "ef"}

    def decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids)

    # Chunks as a board streams them: text of all committed tokens minus what was sent.
    assert chunk_token_counts([1, 2, 4, 5], ["abc", "def"], decode) == [2, 2]
    # A token decoding to nothing is left for the final response.
    assert chunk_token_counts([1, 2, 4, 3], ["a", "bcd"], decode) == [1, 2]


def test_record_finish_and_time_between_tokens() -> None:
    job = Job(index=0, prompt_index=0, kind="code", prompt="x", greedy=True)
    record = RequestRecord(job=job, board="b", sent=10.0, texts=[(11.0, "ab"), (11.5, "c")], done=11.6)
    record.tokens = [1, 2, 3, 4]  # "a", "b", "c", then one that decodes to nothing
    record.finish(lambda ids: "".join({1: "a", 2: "b", 3: "c", 4: ""}[i] for i in ids))
    assert record.chunks == [(11.0, 2), (11.5, 1), (11.6, 1)]
    # The first chunk is time to first token; later chunks spread their gap over their tokens.
    assert time_between_tokens([record], (0.0, 100.0)) == pytest.approx([0.5, 0.1])
    assert time_between_tokens([record], (11.55, 100.0)) == pytest.approx([0.1])


@pytest.mark.parametrize("phase", [0.0, 1.0, 2.5, 3.9])
def test_tokens_in_a_window_do_not_depend_on_where_the_bursts_fall(phase: float) -> None:
    """32 sessions committing one token each every 4 s (all 32 at the end of each pass): a
    25 s window gets 25 / 4 passes' worth, 200 tokens, whatever the phase of the passes. By
    arrival it got six passes or seven (192 or 224)."""
    job = Job(index=0, prompt_index=0, kind="code", prompt="x", greedy=True)
    ends = [phase + 4.0 * i for i in range(12)]
    records = [
        RequestRecord(job=job, board=f"b{b}", sent=-4.0, chunks=[(end, 1) for end in ends])
        for b in range(32)
    ]
    assert tokens_in_window(records, (10.0, 35.0)) == pytest.approx(200.0)
    by_arrival = sum(1 for end in ends if 10.0 <= end <= 35.0) * 32
    assert by_arrival in (192, 224)


def test_a_chunk_counts_for_the_part_of_its_wait_inside_the_window() -> None:
    """A chunk of 4 tokens arriving 2 s after the previous one, the window covering the last
    half of that wait, counts 2; a first chunk is spread from the request's sending."""
    job = Job(index=0, prompt_index=0, kind="code", prompt="x", greedy=True)
    record = RequestRecord(job=job, board="b", sent=0.0, chunks=[(1.0, 2), (3.0, 4)])
    assert tokens_in_window([record], (2.0, 10.0)) == pytest.approx(2.0)
    assert tokens_in_window([record], (0.5, 10.0)) == pytest.approx(5.0)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def _point(boards: int, rate: float) -> PointResult:
    return PointResult(
        boards=boards, window_s=1, requests=1, errors=0, tokens=1, system_tok_s=rate * boards,
        session_tok_s=rate, tbt_ms_p50=None, tbt_ms_p95=None, ttft_ms_p50=None,
    )


def test_capacity_is_the_last_board_count_before_the_rate_is_missed() -> None:
    assert capacity_of([_point(1, 5), _point(2, 4), _point(4, 2)], rate=3) == (2, False)
    assert capacity_of([_point(1, 5), _point(2, 4)], rate=3) == (2, True)  # censored: at least 2
    assert capacity_of([_point(1, 2), _point(2, 4)], rate=3) == (0, False)


def test_capacity_ratio_says_which_bound_it_is(report: BenchReport) -> None:
    modes = {name: mode.model_copy() for name, mode in report.modes.items()}
    modes["sled"].capacity, modes["sled"].capacity_censored = 4, True
    modes["server-only"].capacity, modes["server-only"].capacity_censored = 2, False
    assert sled_capacity_ratio(modes) == (2.0, "lower")
    modes["server-only"].capacity = 0
    assert sled_capacity_ratio(modes) == (None, "unknown")


def test_lossless_check_reports_the_first_divergence() -> None:
    job = Job(index=4, prompt_index=4, kind="code", prompt="x", greedy=True)

    def record(tokens: list[int]) -> RequestRecord:
        r = RequestRecord(job=job, board="b", sent=0.0)
        r.tokens = tokens
        return r

    check = lossless_check({"sled@1": [record([1, 2, 3])], "target@1": [record([1, 2, 4])], "server-only@1": [record([1, 2, 4])]})
    assert check.jobs_compared == check.jobs_against_target == 1 and check.outputs_compared == 3
    (mismatch,) = check.mismatches
    assert mismatch.runs == ["sled@1"] and mismatch.reference == "target@1" and mismatch.first_divergence == 2


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boards": [0, 2]}, "boards"),
        ({"duration_s": 0}, "duration"),
        ({"modes": ["sled", "nope"]}, "unknown bench mode 'nope'"),
        ({"profile": "pi9"}, "unknown board profile 'pi9'"),
        ({"sampling": "sampled"}, "greedy jobs"),
        ({"emulate": False, "board_step_ms": 10.0}, "emulated boards only"),
        ({"boards_for": {"pipelining": [1]}}, "do not run: sled-pipelined-rtt100"),
        ({"boards_for": {"sled": [0]}}, "boards"),
        ({"repeats_for": {"sled-k4": 2}}, "repeats given for modes that do not run: sled-k4"),
        ({"repeats_for": {"sled": 0}}, "at least 1"),
        ({"repeats_for": {"target": 2}}, "only fleet modes repeat"),
        ({"board_cpus": len(os.sched_getaffinity(0))}, "leave the server at least one"),
        ({"dtype": "bfloat16", "linear_kernel": "onednn"}, "'onednn' needs a CPU float32 target"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_fleet_bench("tiny", **kwargs)


def test_cpu_split_gives_the_boards_the_last_cpus_and_is_undone() -> None:
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    assert split_cpus(0) is None
    if len(allowed) < 2:
        pytest.skip("a CPU split needs two CPUs")
    split = split_cpus(1)
    assert split is not None and split.boards == [max(allowed)] and set(split.server) == allowed - {max(allowed)}
    with server_side(split):
        assert os.sched_getaffinity(0) == set(split.server)
        assert torch.get_num_threads() == len(split.server)
    assert os.sched_getaffinity(0) == allowed and torch.get_num_threads() == threads


def test_repeated_modes_alternate_so_that_drift_falls_on_both() -> None:
    config = BenchConfig(
        models="tiny", boards=[1, 4], duration_s=1.0, modes=["sled", "server-only", "sled-k2"],
        sampling="mixed", max_new_tokens=8, dtype="float32", k_max=4, threshold=0.3, emulate=True,
        profile="rpi5", target_rate=None, peer_requests=1, boards_for={"sled-k2": [4]},
        repeats_for={"sled": 2, "server-only": 2},
    )
    assert fleet_schedule(config, config.modes) == [
        (1, "sled", 0), (1, "server-only", 0), (1, "server-only", 1), (1, "sled", 1),
        (4, "sled", 0), (4, "server-only", 0), (4, "sled-k2", 0), (4, "server-only", 1), (4, "sled", 1),
    ]
    config.repeats_for = {"sled": 3}
    assert [(mode, run) for n, mode, run in fleet_schedule(config, config.modes) if n == 1] == [
        ("sled", 0), ("server-only", 0), ("sled", 1), ("sled", 2),
    ]


def test_cli_rejects_bad_boards() -> None:
    import typer

    app = typer.Typer()
    app.command()(bench_command)
    result = CliRunner().invoke(app, ["--boards", "1,x"])
    assert result.exit_code != 0 and "--boards" in result.output
    for repeats in ("sled", "sled=2,3", "sled=x"):
        result = CliRunner().invoke(app, ["--repeats-for", repeats])
        assert result.exit_code != 0 and "--repeats-for" in result.output, repeats


def test_profiles_declare_their_basis() -> None:
    assert {"rpi5", "jetson-orin-nano"} <= set(PROFILES)
    for profile in PROFILES.values():
        assert profile.hardware_factor > 0 and len(profile.rationale) > 80
    assert get_profile("rpi5").hardware_factor > get_profile("jetson-orin-nano").hardware_factor
    assert set(MODES) >= {"sled", "server-only", "assisted", "target"}


def test_mode_sets_expand_in_order_without_repeats() -> None:
    assert expand_modes(["sled", "speculation"]) == list(dict.fromkeys(["sled", *MODE_SETS["speculation"]]))
    assert expand_modes(["pipelining"]) == [
        "sled-rtt20", "sled-pipelined-rtt20", "sled-rtt100", "sled-pipelined-rtt100",
    ]
    with pytest.raises(ValueError, match="sets: default"):
        expand_modes(["nope"])


BEYOND = ["sled", "sled-threshold", "sled-k2", "sled-k4", "sled-rtt100", "sled-pipelined-rtt100",
          "sled-2servers", "server-only"]


@pytest.fixture(scope="module")
def beyond() -> BenchReport:
    """The comparison modes of issue 10 side by side, two boards, a short window; boards
    emulated at 20 ms a token so that a 100 ms round trip leaves room to draft ahead."""
    return run_fleet_bench(
        "tiny", boards=[2], duration_s=3.0, max_new_tokens=24, modes=BEYOND, board_step_ms=20.0,
        boards_for={"sled": [1, 2], "server-only": [1, 2]}, repeats_for={"sled": 2},
    )


def test_comparison_modes_run_and_are_compared(beyond: BenchReport) -> None:
    assert list(beyond.modes) == BEYOND
    assert beyond.lossless, beyond.lossless_check.mismatches
    assert set(beyond.lossless_check.modes_compared) == set(BEYOND)
    topics = {c.topic for c in beyond.comparisons}
    assert topics == {
        "adaptive k vs the best fixed k", "adaptive k vs threshold only", "speculation vs the server alone",
        "pipelining at 100 ms round trip", "two servers vs one",
    }
    for name in ("sled-threshold", "sled-k2", "sled-k4"):
        point = beyond.modes[name].at(2)
        assert 0 < point.acceptance_rate < 1  # the tiny draft is a perturbed target: some of both
        assert point.mean_accepted > 0 and point.round_trip_ms > 0
        assert point.batch_tokens_mean > point.batch_sessions_mean  # drafts are verified
    best_fixed = next(c for c in beyond.comparisons if c.topic == "adaptive k vs the best fixed k")
    fixed = {name: beyond.modes[name].at(2).system_tok_s for name in ("sled-k2", "sled-k4")}
    assert best_fixed.baseline == max(fixed, key=fixed.get)
    assert best_fixed.gain == pytest.approx(beyond.modes["sled"].at(2).system_tok_s / max(fixed.values()))
    assert [p.boards for p in beyond.modes["sled"].points] == [1, 2]
    assert [p.boards for p in beyond.modes["sled-k2"].points] == [2]
    assert set(beyond.throughput_ratios) == {1, 2}
    assert "--boards-for sled=1,2" in beyond.command and "--repeats-for sled=2" in beyond.command
    assert beyond.throughput_ratios[2] == pytest.approx(
        beyond.modes["sled"].at(2).system_tok_s / beyond.modes["server-only"].at(2).system_tok_s
    )


def test_a_repeated_point_pools_its_runs(beyond: BenchReport) -> None:
    for n in (1, 2):
        point = beyond.modes["sled"].at(n)
        assert len(point.system_tok_s_runs) == 2 and all(rate > 0 for rate in point.system_tok_s_runs)
        assert point.window_s == pytest.approx(2 * 3.0)
        assert point.system_tok_s == pytest.approx(sum(point.system_tok_s_runs) / 2)  # equal windows
    assert beyond.modes["server-only"].at(2).system_tok_s_runs == []
    assert beyond.modes["server-only"].at(2).window_s == pytest.approx(3.0)


def test_link_and_pipelining_show_in_the_figures(beyond: BenchReport) -> None:
    plain, pipelined = beyond.modes["sled-rtt100"].at(2), beyond.modes["sled-pipelined-rtt100"].at(2)
    assert plain.round_trip_ms is not None and plain.round_trip_ms >= 100
    assert pipelined.pipelined_share is not None and pipelined.pipelined_share > 0
    assert plain.pipelined_share is None
    assert beyond.modes["sled"].at(2).round_trip_ms < 100
    for point in (plain, pipelined):
        assert point.board_cpu_share is not None and 0 < point.board_cpu_share < 1


# --- the real pair (slow) ----------------------------------------------------------------


@pytest.mark.slow
def test_qwen_pair_short_run_is_lossless_in_float32() -> None:
    """The Qwen pair from the model store, float32 (greedy equality is exact only there), one
    board, a short window: real acceptance, and greedy outputs equal across modes."""
    from device.manifest import draft_store_dir
    from fleet.demo import DEFAULT_DRAFT, DEFAULT_DRAFT_QUANT, DEFAULT_TARGET
    from fleet.models.store import ModelStore

    store = ModelStore()
    if not all(store.status(name).verified for name in (DEFAULT_TARGET, DEFAULT_DRAFT)):
        pytest.skip("the Qwen pair is not in the model store (fleet models pull)")
    if not (draft_store_dir(DEFAULT_DRAFT, DEFAULT_DRAFT_QUANT) / "manifest.json").is_file():
        pytest.skip("the Qwen draft is not exported (fleet models export-draft)")
    report = run_fleet_bench(
        "qwen", boards=[1], duration_s=20, modes=["sled", "server-only", "target"], dtype="float32",
        max_new_tokens=16, peer_requests=1,
    )
    assert report.errors == 0
    assert report.lossless, report.lossless_check.mismatches
    assert report.lossless_check.jobs_against_target == 1
    (sled,) = report.modes["sled"].points
    assert sled.acceptance_rate > 0.3  # the 0.5B draft agrees with the 1.5B target most of the time
    assert report.throughput_ratio is not None and report.throughput_ratio > 0
