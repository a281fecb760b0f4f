"""The scheduler's hold for drafts due soon (`VerificationService._due_by`): which missing
drafts a short batch waits for, and until when.

The service is built but not started: `_due_by` reads only its routes, its recent passes and
its speculation policy, so the cases are set up exactly, without timing races.
"""

import time
from pathlib import Path

import pytest

from fleet.config import ServerSettings, Settings
from fleet.protocol import DraftMessage
from fleet.sampling import SamplingParams
from server.engine import Engine, Verdict
from server.service import HOLD_SLACK, Inbound, Route, VerificationService, session_key
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


def _drafting(service: VerificationService, device: str, due_in_s: float) -> Route:
    """A session told to draft K tokens whose next draft is expected `due_in_s` from now (the
    board's drafting and round trip as the policy estimates them, with the service's slack)."""
    route = Route(device=device, session="s")
    service.routes[route.key] = route
    service.speculation.observe_verdict(route.key, device, K, 1, draft_ms=20.0, rtt_s=0.01)
    assert service.speculation.next_k(route.key, pending_sessions=4) == K
    route.verdict_sent_at = time.monotonic() + due_in_s - _due_after_verdict(service, route)
    return route


def _due_after_verdict(service: VerificationService, route: Route) -> float:
    """Seconds from the session's verdict to when the service expects its draft, slack included."""
    due_in = service.speculation.draft_due_s(route.key)
    assert due_in is not None
    return due_in * (1 + HOLD_SLACK) + WINDOW_S


def _expected(service: VerificationService, route: Route) -> float:
    assert route.verdict_sent_at is not None
    return route.verdict_sent_at + _due_after_verdict(service, route)


def _verdict() -> Verdict:
    return Verdict(session_id="s", accepted=0, tokens=[1], committed_len=4)


def _arrived(service: VerificationService, *routes: Route) -> list[Inbound]:
    return [Inbound(service.topics.draft(r.device, r.session), b"", time.monotonic()) for r in routes]


def test_holds_for_the_latest_draft_that_pays(service: VerificationService) -> None:
    """One draft in hand, four missing: holding w for the J drafts due by then pays while
    1 x w < J x (2 x pass - w)."""
    soon = _drafting(service, "board-a", due_in_s=0.05)
    sooner = _drafting(service, "board-b", due_in_s=0.03)
    late = _drafting(service, "board-c", due_in_s=0.35)  # 3 due by then: pays up to 0.3 s
    arrived = _drafting(service, "board-d", due_in_s=0.0)
    overdue = _drafting(service, "board-e", due_in_s=-0.5)  # lost or slow: not waited for

    due = service._due_by(_arrived(service, arrived))

    assert due == pytest.approx(_expected(service, soon), abs=1e-3)
    assert _expected(service, sooner) < due < _expected(service, late)
    assert _expected(service, overdue) < time.monotonic()


def test_holds_up_to_a_whole_pass_for_a_cohort_as_large_as_the_one_in_hand(
    service: VerificationService,
) -> None:
    """Two cohorts of two that would alternate passes: the one in hand waits for the other
    due in 0.8 of a pass (each of the two saves 1.2 passes, each held loses 0.8). One late
    board among three in hand is not waited for as long (2 x pass x 1 / 4 is half a pass)."""
    in_hand = [_drafting(service, f"board-{i}", due_in_s=0.0) for i in range(2)]
    joining = [_drafting(service, f"board-{i}", due_in_s=0.8 * PASS_S) for i in range(2, 4)]
    assert service._due_by(_arrived(service, *in_hand)) == pytest.approx(_expected(service, joining[0]), abs=1e-3)

    third = _drafting(service, "board-9", due_in_s=0.0)
    service.routes.pop(joining[1].key)
    assert service._due_by(_arrived(service, *in_hand, third)) == 0.0
    assert service._due_by(_arrived(service, *in_hand[:1])) > 0  # one in hand: 0.8 < 2 x 1 / 2


def test_beside_sessions_the_server_decodes_a_late_draft_saves_one_pass_less(
    service: VerificationService,
) -> None:
    """Passes follow one another for the session decoded alone, so a draft that misses one
    joins the next. One in hand and one decoded alone: a draft due in 0.4 of a pass is not
    waited for (0.4 > 1 x 1 / 3), one due in 0.3 is."""
    in_hand = _drafting(service, "board-a", due_in_s=0.0)
    alone = _drafting(service, "board-b", due_in_s=0.0)
    alone.pushing = True
    joining = _drafting(service, "board-c", due_in_s=0.4 * PASS_S)
    assert service._due_by(_arrived(service, in_hand)) == 0.0
    alone.pushing = False  # without it, the same draft saves a whole pass more: held
    assert service._due_by(_arrived(service, in_hand, alone)) == pytest.approx(_expected(service, joining), abs=1e-3)
    alone.pushing = True
    service.routes.pop(joining.key)
    sooner = _drafting(service, "board-d", due_in_s=0.3 * PASS_S)
    assert service._due_by(_arrived(service, in_hand)) == pytest.approx(_expected(service, sooner), abs=1e-3)


def test_a_session_handed_back_to_drafting_is_held_for_up_to_a_pass_longer(
    service: VerificationService,
) -> None:
    """Its first draft after pushed verdicts comes out of step: later than its pace says by
    up to a pass. Overdue by half a pass, it is still held for; others are not."""
    in_hand = _drafting(service, "board-a", due_in_s=0.0)
    overdue = _drafting(service, "board-b", due_in_s=-0.5 * PASS_S)
    assert service._due_by(_arrived(service, in_hand)) == 0.0
    overdue.returning = True
    assert service._due_by(_arrived(service, in_hand)) == pytest.approx(_expected(service, overdue) + PASS_S, abs=1e-3)


def test_a_verdict_that_hands_a_pushed_session_back_marks_it_returning(service: VerificationService) -> None:
    route = _drafting(service, "board-a", due_in_s=0.0)
    route.pushing = True
    step = DraftMessage(session=route.session, seq=1, committed_len=0)
    service._publish_verdict(route, step, _verdict(), pending=1)
    assert route.returning and not route.pushing
    service._publish_verdict(route, step.model_copy(update={"seq": 2}), _verdict(), pending=1)
    assert not route.returning  # its next draft keeps the pace again


def test_no_hold_for_sessions_the_server_decodes_or_before_any_pass(
    service: VerificationService,
) -> None:
    pushed = _drafting(service, "board-a", due_in_s=0.05)
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


def test_every_verdict_of_a_batch_is_planned_for_the_same_batch(service: VerificationService) -> None:
    """A session that finishes closes as its verdict goes out; the verdicts after it must
    still be planned for the whole batch, or they carry a k meant for a batch without it."""
    asked: list[int] = []
    next_k = service.speculation.next_k

    def recording(session_key: str, pending_sessions: int) -> int:
        asked.append(pending_sessions)
        return next_k(session_key, pending_sessions)

    service.speculation.next_k = recording  # type: ignore[method-assign]
    proposals = []
    for device, max_new in (("board-a", 1), ("board-b", 8), ("board-c", 8)):
        opening = DraftMessage(
            session="s", seq=0, committed_len=3, context=[5, 6, 7], params=SamplingParams(max_new_tokens=max_new)
        )
        opened = service._open(device, "s", opening)
        assert opened is not None
        proposals.append(opened)

    service._verify(proposals)

    assert session_key("board-a", "s") not in service.routes  # finished and closed first
    assert asked == [3, 3, 3]
