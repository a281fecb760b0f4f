"""The benchmark's workload: which request each board sends, and when each token arrived.

Every mode and every number of boards runs the same job sequence. Job m asks for shipped prompt
m mod P; even jobs are greedy, odd jobs sample (temperature 0.7, top-p 0.95, seed m) when the
mix is "mixed". With an odd number of prompts every prompt is eventually asked both ways. Board
b of N runs jobs b, b + N, b + 2N, ... in a closed loop (the next request goes out as soon as
the previous one is answered), so the first jobs, and their greedy outputs, are the same in
every run: that is what the losslessness check compares.

Token timing comes from the response stream an app sees. A board streams the decoded text of
all committed tokens after every verdict; once the request is done its final response lists
the tokens, so each streamed chunk is matched to the number of tokens whose decoding it
completes (`chunk_token_counts`).
"""

import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fleet.app import GenerationTimeout, new_request_id
from fleet.protocol import GenerationRequest, GenerationResponse, ResponseStats

SamplingMix = Literal["mixed", "greedy", "sampled"]
SAMPLED_TEMPERATURE = 0.7
SAMPLED_TOP_P = 0.95
REQUEST_TIMEOUT_S = 900.0


class BenchPrompt(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["code", "prose"]
    prompt: str


class Job(BaseModel):
    """One request of the job sequence (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    index: int
    prompt_index: int
    kind: str
    prompt: str
    greedy: bool

    def request(self, max_new_tokens: int) -> GenerationRequest:
        sampling = {} if self.greedy else {
            "temperature": SAMPLED_TEMPERATURE, "top_p": SAMPLED_TOP_P, "seed": self.index
        }
        return GenerationRequest(
            request_id=new_request_id(), prompt=self.prompt, max_new_tokens=max_new_tokens, **sampling
        )


def shipped_bench_prompts() -> list[BenchPrompt]:
    raw = resources.files("fleet").joinpath("data/bench_prompts.json").read_text()
    return [BenchPrompt.model_validate(p) for p in json.loads(raw)]


@dataclass(frozen=True)
class JobPlan:
    prompts: Sequence[BenchPrompt]
    sampling: SamplingMix = "mixed"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the benchmark needs at least one prompt")

    def job(self, index: int) -> Job:
        prompt_index = index % len(self.prompts)
        greedy = {"mixed": index % 2 == 0, "greedy": True, "sampled": False}[self.sampling]
        prompt = self.prompts[prompt_index]
        return Job(index=index, prompt_index=prompt_index, kind=prompt.kind, prompt=prompt.prompt, greedy=greedy)

    def board_job(self, board: int, boards: int, round_: int) -> Job:
        return self.job(board + round_ * boards)

    def greedy_jobs(self, count: int) -> list[Job]:
        jobs = (self.job(index) for index in range(len(self.prompts) * 2 * max(count, 1)))
        return [job for job in jobs if job.greedy][:count]


@dataclass
class RequestRecord:
    """One request as the app saw it: when it went out, every streamed chunk, the answer.

    Times are `time.monotonic()`. `chunks` holds (arrival time, tokens) once `finish` has
    matched the streamed text to the final token list.
    """

    job: Job
    board: str
    sent: float
    texts: list[tuple[float, str]] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)
    stats: ResponseStats | None = None
    error: str | None = None

    def answered(self, response: GenerationResponse) -> None:
        self.done = time.monotonic()
        self.tokens = list(response.tokens or [])
        self.stats = response.stats
        self.error = response.error

    def finish(self, decode: Callable[[list[int]], str]) -> None:
        """Attribute the final token list to the streamed chunks (tokens left over, such as an
        end-of-text token that decodes to nothing, arrive with the final response)."""
        tokens = self.tokens
        counts = chunk_token_counts(tokens, [text for _, text in self.texts], decode)
        self.chunks = [(t, n) for (t, _), n in zip(self.texts, counts, strict=True) if n > 0]
        rest = len(tokens) - sum(counts)
        if rest > 0:
            self.chunks.append((self.done, rest))


def chunk_token_counts(tokens: Sequence[int], texts: Sequence[str], decode: Callable[[list[int]], str]) -> list[int]:
    """How many of `tokens` each streamed text chunk carried.

    The board sends `decode(committed)[len(sent):]` after each verdict, so after chunk j the
    app holds exactly decode(tokens[:m_j]); m_j is the smallest such prefix beyond m_{j-1}.
    If decoding is not prefix-stable for some token (never seen with byte-level BPE, but
    possible), fall back to the first prefix at least as long as the text received.
    """
    counts: list[int] = []
    cumulative = ""
    consumed = 0
    for text in texts:
        cumulative += text
        prefixes = range(consumed + 1, len(tokens) + 1)
        end = next((m for m in prefixes if decode(list(tokens[:m])) == cumulative), None)
        if end is None:
            end = next((m for m in prefixes if len(decode(list(tokens[:m]))) >= len(cumulative)), len(tokens))
        counts.append(end - consumed)
        consumed = end
    return counts


Generate = Callable[[str, GenerationRequest, Callable[[str], None]], GenerationResponse]


class _Window:
    """The measurement window of a closed loop: it opens once every board is streaming (all
    sessions are open and past their first round), so the burst of simultaneous session opens
    at the start is ramp-up, not steady state, and it closes `duration_s` later."""

    def __init__(self, boards: int, duration_s: float) -> None:
        self.boards = boards
        self.duration_s = duration_s
        self.start: float | None = None
        self._streaming: set[int] = set()
        self._lock = threading.Lock()

    def board_streaming(self, board: int) -> None:
        """The board's first chunk (or its first answer, even an error) has arrived."""
        with self._lock:
            self._streaming.add(board)
            if self.start is None and len(self._streaming) == self.boards:
                self.start = time.monotonic()

    @property
    def open(self) -> bool:
        start = self.start
        return start is None or time.monotonic() < start + self.duration_s

    def elapsed(self) -> float | None:
        return None if self.start is None else time.monotonic() - self.start


def run_closed_loop(
    generate: Generate,
    boards: Sequence[str],
    plan: JobPlan,
    max_new_tokens: int,
    duration_s: float,
    decode: Callable[[list[int]], str],
    on_tick: Callable[[float | None], None] | None = None,
) -> tuple[float, list[RequestRecord]]:
    """Each board sends requests back to back until the window (see `_Window`) has lasted
    `duration_s`; requests still running then are waited for (a request cannot be
    cancelled), so every record is complete. Returns the window's start and the records.

    `on_tick(seconds into the window, None while ramping up)` is called about twice a second.
    """
    records: list[RequestRecord] = []
    lock = threading.Lock()
    window = _Window(len(boards), duration_s)

    def board_loop(board_index: int, board: str) -> None:
        round_ = 0
        while window.open:
            job = plan.board_job(board_index, len(boards), round_)
            round_ += 1
            record = RequestRecord(job=job, board=board, sent=time.monotonic())
            with lock:
                records.append(record)

            def on_delta(text: str, record: RequestRecord = record) -> None:
                record.texts.append((time.monotonic(), text))
                window.board_streaming(board_index)

            try:
                record.answered(generate(board, job.request(max_new_tokens), on_delta))
            except GenerationTimeout as exc:
                record.done = time.monotonic()
                record.error = str(exc)
            window.board_streaming(board_index)

    threads = [
        threading.Thread(target=board_loop, args=(i, board), name=f"bench-{board}", daemon=True)
        for i, board in enumerate(boards)
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if on_tick is not None:
            on_tick(window.elapsed())
        for thread in threads:
            thread.join(timeout=0.5 / len(threads))
    for record in records:
        record.finish(decode)
    assert window.start is not None  # every board answered at least once before stopping
    return window.start, records


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_between_tokens(records: Sequence[RequestRecord], window: tuple[float, float]) -> list[float]:
    """Seconds between tokens, one value per token, for chunks arriving inside `window`.

    A chunk of n tokens arriving d seconds after the request's previous chunk gives each of
    its n tokens d / n. The first chunk of a request is time to first token (queueing and
    prefill), not time between tokens, and is left out.
    """
    start, end = window
    values: list[float] = []
    for record in records:
        for (previous, _), (arrived, count) in itertools.pairwise(record.chunks):
            if start <= arrived <= end:
                values.extend([(arrived - previous) / count] * count)
    return values


def tokens_in_window(records: Sequence[RequestRecord], window: tuple[float, float]) -> float:
    """Tokens delivered inside `window`, each chunk's tokens spread evenly over the time since
    its request's previous chunk (since the request was sent, for its first).

    Counted by arrival instead, a window holds a whole number of bursts: with 32 sessions
    decoded plain, all 32 tokens of a pass arrive at its end, 4 s apart on the float32 target
    here, and a 25 s window opening at the end of a pass counted five passes or six as their
    times fell (161 against 192 tokens for the same work). Spread, a session that commits one
    token every T seconds contributes duration / T whatever the phase."""
    start, end = window
    total = 0.0
    for record in records:
        previous = record.sent
        for arrived, count in record.chunks:
            inside = min(arrived, end) - max(previous, start)
            if arrived > previous:
                total += count * max(0.0, inside) / (arrived - previous)
            elif start <= arrived <= end:
                total += count
            previous = arrived
    return total
