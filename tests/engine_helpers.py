"""Drafting and driving helpers for the engine tests: the draft model runs with transformers
here (the board's ONNX drafter is tested with the device code)."""

import functools
from collections.abc import Callable

import torch

from fleet.models.tiny import TINY_VOCAB
from fleet.sampling import SparseDist
from server.engine import DraftProposal, Engine, Verdict

DRAFT_TOP_K = 16


def prompt(length: int, seed: int) -> list[int]:
    """Random tiny-vocabulary ids clear of the special tokens (0 end-of-text, 1 pad)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, TINY_VOCAB, (length,), generator=generator).tolist()


@torch.no_grad()
def greedy_reference(target, context: list[int], max_new_tokens: int = 64, **kwargs) -> list[int]:
    out = target.generate(
        torch.tensor([context]), do_sample=False, max_new_tokens=max_new_tokens, **kwargs
    )
    return out[0, len(context) :].tolist()


@torch.no_grad()
def greedy_draft(draft, context: list[int], k: int) -> list[int]:
    """k greedy tokens of the draft model (a plain loop: lighter than generate() per call)."""
    tokens: list[int] = []
    for _ in range(k):
        tokens.append(int(draft(torch.tensor([context + tokens])).logits[0, -1].argmax()))
    return tokens


@functools.lru_cache(maxsize=4096)
def _draft_q(draft, context: tuple[int, ...], temperature: float) -> SparseDist:
    with torch.no_grad():
        logits = draft(torch.tensor([context])).logits[0, -1] / temperature
    top = logits.topk(DRAFT_TOP_K)
    return SparseDist(
        ids=tuple(top.indices.tolist()),
        probs=tuple(torch.softmax(top.values.double(), -1).tolist()),
    )


def sampled_draft(
    draft, context: list[int], k: int, temperature: float, generator: torch.Generator
):
    """k tokens sampled from the draft's top-K, temperature-scaled distribution, with that q."""
    tokens, q = [], []
    for _ in range(k):
        dist = _draft_q(draft, tuple(context + tokens), temperature)
        choice = int(torch.multinomial(torch.tensor(dist.probs), 1, generator=generator))
        tokens.append(dist.ids[choice])
        q.append(dist)
    return tokens, q


def verify_one(engine: Engine, session_id: str, tokens: list[int], q=None) -> Verdict:
    return engine.verify([DraftProposal(session_id=session_id, tokens=tokens, q=q)])[0]


def run_to_end(
    engine: Engine,
    contexts: dict[str, list[int]],
    propose: Callable[[str, list[int], int], DraftProposal],
) -> dict[str, list[int]]:
    """Verify all unfinished sessions in one batch per step until every one has finished;
    `propose(session_id, context, step)` gives each session's DraftProposal."""
    produced = {session_id: [] for session_id in contexts}
    contexts = {session_id: list(context) for session_id, context in contexts.items()}
    for step in range(1000):
        live = [s for s in contexts if not engine.sessions[s].finished]
        if not live:
            return produced
        for verdict in engine.verify([propose(s, contexts[s], step) for s in live]):
            assert verdict.error_code is None, verdict
            produced[verdict.session_id] += verdict.tokens
            contexts[verdict.session_id] += verdict.tokens
    raise AssertionError("sessions did not finish")
