"""The scheduler's hold for drafts due soon (`VerificationService._due_by`): which missing
drafts a short batch waits for, and until when.

The service is built but not started: `_due_by` reads only its routes, its recent passes and
its speculation policy, so the cases are set up exactly, without timing races.
"""

import time
from pathlib import Path

import pytest

from fleet.config import ServerSettings, Settings
from server.engine import Engine
from server.service import HOLD_SHARE, HOLD_SLACK, Inbound, Route, VerificationService
from server.speculation import make_policy

K = 4
WINDOW_S = 0.005
PASS_S = 0.2


@pytest.fixture
def service(tiny_models: tuple[Path, Path]) -> VerificationService:
    settings = Settings(
        server=ServerSettings(k_max=K, speculation="fixed", batch_window_ms=1000 * WINDOW_S)
    )
    service = VerificationService(settings, Engine(tiny_models[0], k_max=K), "tiny")
    for _ in range(3):
        service.stats.record(2, PASS_S, 0, 0, 2)
    return service


def _drafting(service: VerificationService, device: str, draft_ms: float, sent_ago_s: float) -> Route:
    """A session whose last verdict (suggesting K) went out `sent_ago_s` ago, on a board that
    drafts at `draft_ms` per token."""
    route = Route(device=device, session="s")
    service.routes[route.key] = route
    service.speculation.observe_verdict(route.key, device, K, 1, draft_ms=draft_ms, rtt_s=0.01)
    assert service.speculation.next_k(route.key, pending_sessions=4) == K
    route.verdict_sent_at = time.monotonic() - sent_ago_s
    return route


def _expected(route: Route, draft_ms: float) -> float:
    assert route.verdict_sent_at is not None
    due_in = K * draft_ms / 1000 + 0.01  # the board's drafting plus the round trip
    return route.verdict_sent_at + due_in * (1 + HOLD_SLACK) + WINDOW_S


def test_holds_for_the_latest_draft_due_within_half_a_pass(service: VerificationService) -> None:
    soon = _drafting(service, "board-a", draft_ms=20.0, sent_ago_s=0.05)  # due in ~0.05 s
    sooner = _drafting(service, "board-b", draft_ms=10.0, sent_ago_s=0.03)  # due in ~0.03 s
    late = _drafting(service, "board-c", draft_ms=100.0, sent_ago_s=0.0)  # due in ~0.45 s
    arrived = _drafting(service, "board-d", draft_ms=20.0, sent_ago_s=0.05)
    overdue = _drafting(service, "board-e", draft_ms=20.0, sent_ago_s=1.0)
    batch = [Inbound(service.topics.draft(arrived.device, arrived.session), b"", time.monotonic())]

    due = service._due_by(batch)

    assert due == pytest.approx(_expected(soon, 20.0))
    assert _expected(sooner, 10.0) < due < time.monotonic() + HOLD_SHARE * PASS_S
    # The late board would hold the pass for more than half of it; the overdue one is lost
    # or slow: neither is waited for.
    assert _expected(late, 100.0) > time.monotonic() + HOLD_SHARE * PASS_S
    assert _expected(overdue, 20.0) < time.monotonic()


def test_no_hold_for_sessions_the_server_decodes_or_before_any_pass(
    service: VerificationService,
) -> None:
    pushed = _drafting(service, "board-a", draft_ms=20.0, sent_ago_s=0.05)
    pushed.pushing = True
    assert service._due_by([]) == 0.0
    pushed.pushing = False
    assert service._due_by([]) > 0
    service.stats.batches.clear()  # no pass yet: nothing says how long a pass takes
    assert service._due_by([]) == 0.0


def test_no_hold_for_a_session_told_to_draft_nothing(service: VerificationService) -> None:
    service.speculation = make_policy("off", K)
    route = Route(device="board-a", session="s")
    service.routes[route.key] = route
    service.speculation.observe_verdict(route.key, route.device, K, 1, draft_ms=20.0, rtt_s=0.01)
    assert service.speculation.next_k(route.key, pending_sessions=1) == 0
    route.verdict_sent_at = time.monotonic() - 0.05
    assert service._due_by([]) == 0.0
