"""Pipelined drafting: a board that drafts ahead while its verdict is in flight must propose
exactly what a board drafting after the verdict would, and never change the output."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.drafter import Drafter
from device.runner import DraftRunner
from fleet.config import DeviceSettings, ServerSettings
from fleet.local import FleetModels, LocalFleet
from fleet.protocol import GenerationRequest
from fleet.sampling import SamplingParams
from tests.conftest import NEW_TOKENS, PROMPTS

pytest_plugins = ["tests.draft_fixtures"]

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def shared_runner(tiny_draft_onnx: Path) -> DraftRunner:
    return DraftRunner(tiny_draft_onnx)


def _fresh_draft(runner: DraftRunner, context: list[int], k: int) -> tuple[int, ...]:
    """What a drafter that never drafted ahead proposes after `context`."""
    fresh = Drafter(runner.fork(), k_max=5, threshold=0.0, top_k=8)
    fresh.start(context)
    return fresh.draft(k, GREEDY, np.random.default_rng(0)).tokens


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rounds=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 10), st.booleans(), st.integers(0, 5)),
        min_size=1, max_size=6,
    ),
)
def test_drafting_ahead_keeps_exactly_what_a_fresh_draft_would_propose(
    shared_runner: DraftRunner, rounds: list[tuple[int, int, bool, int]]
) -> None:
    """Random verdicts (accepted count, how many tokens were drafted ahead before it came,
    whether the target's token is the board's guess, the next k): after each, the next draft
    equals a fresh drafter's on the committed context, and the cache holds that context."""
    rng = np.random.default_rng(0)
    drafter = Drafter(shared_runner.fork(), k_max=5, threshold=0.0, top_k=8)
    context = shared_runner.tokenizer.encode(PROMPTS[0]).ids
    drafter.start(context)
    k = 5
    for accept, ahead, guess_right, next_k in rounds:
        batch = drafter.draft(k, GREEDY, rng)
        assert batch.tokens == _fresh_draft(shared_runner, context, k)
        for _ in range(ahead):
            drafter.draft_ahead(GREEDY, rng)
        accepted = min(accept, len(batch.tokens))
        guesses = drafter.ahead_tokens
        if guess_right and accepted == len(batch.tokens) and guesses:
            target = guesses[0]
        else:
            target = (batch.tokens[accepted] + 1 if accepted < len(batch.tokens) else 7) % 100
        drafter.commit(accepted, target)
        context = [*context, *batch.tokens[:accepted], target]
        assert drafter.committed_length == len(context)
        assert list(drafter.runner.tokens[: len(context)]) == context
        k = next_k
    batch = drafter.draft(k, GREEDY, rng)
    assert batch.tokens == _fresh_draft(shared_runner, context, k)


def test_a_right_guess_carries_the_tokens_drafted_ahead(shared_runner: DraftRunner) -> None:
    drafter = Drafter(shared_runner.fork(), k_max=3, threshold=0.0, top_k=8)
    drafter.start(shared_runner.tokenizer.encode(PROMPTS[1]).ids)
    rng = np.random.default_rng(0)
    batch = drafter.draft(3, GREEDY, rng)
    while drafter.draft_ahead(GREEDY, rng):
        pass
    guesses = drafter.ahead_tokens
    assert len(guesses) == 4  # the bonus guess and a whole next draft of k_max
    drafter.commit(len(batch.tokens), guesses[0])
    following = drafter.draft(3, GREEDY, rng)
    assert following.tokens == guesses[1:]
    assert following.fresh == 0 and drafter.carried_total == 3


def test_a_discarded_draft_forgets_what_was_drafted_ahead(shared_runner: DraftRunner) -> None:
    context = shared_runner.tokenizer.encode(PROMPTS[2]).ids
    drafter = Drafter(shared_runner.fork(), k_max=4, threshold=0.0, top_k=8)
    drafter.start(context)
    rng = np.random.default_rng(0)
    batch = drafter.draft(4, GREEDY, rng)
    for _ in range(3):
        drafter.draft_ahead(GREEDY, rng)
    drafter.commit(len(batch.tokens), drafter.ahead_tokens[0])  # carried tokens pending now
    context = [*context, *batch.tokens, drafter.runner.tokens[len(context) + len(batch.tokens)]]
    drafter.draft(4, GREEDY, rng)
    drafter.draft_ahead(GREEDY, rng)
    drafter.discard()
    assert drafter.runner.length == len(context)
    assert drafter.draft(4, GREEDY, rng).tokens == _fresh_draft(shared_runner, context, 4)


def test_pipelined_boards_give_the_target_alone_output(
    fleet_models: FleetModels, references: dict[str, list[int]], tmp_path: Path
) -> None:
    """Boards slower than the server (emulated) draft ahead while verdicts are in flight; the
    output stays the target's, and drafted-ahead tokens were really used."""
    fleet = LocalFleet(
        models=fleet_models, workdir=tmp_path, devices=["board-1"],
        server=ServerSettings(k_max=6, batch_window_ms=5, speculation="fixed"),  # no hand-off
        device=DeviceSettings(k_max=4, threshold=0.0, pipeline=True, emulated_step_ms=5.0),
        board_rtt_ms=40.0,
    )
    with fleet:
        agent = fleet.agents["board-1"]
        for index, prompt in enumerate(PROMPTS[:3]):
            request = GenerationRequest(request_id=f"p{index}", prompt=prompt, max_new_tokens=NEW_TOKENS)
            response = fleet.app.generate("board-1", request, timeout_s=120)
            assert response.error is None, response.error
            assert response.tokens == references[prompt], f"pipelined output differs for {prompt!r}"
        assert agent.metrics.registry.get_sample_value("fleet_device_pipelined_tokens_total") > 0
