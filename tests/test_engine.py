"""The verification engine on the seeded tiny models (float32): greedy output equals the target's
own `generate()`, sampling follows the target's distribution, sessions survive rejections,
stop conditions end them, bad input stays with the session that sent it, memory is admitted.

The draft side runs the tiny draft model with transformers here; the ONNX drafter is the
board's job and tested with the device code.
"""

import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from fleet.models.tiny import TINY_VOCAB, write_tiny_models
from fleet.sampling import SamplingParams, SparseDist
from server.engine import DraftProposal, Engine, Verdict
from server.verifier import logits_warpers, target_probs
from tests.engine_helpers import (
    greedy_draft,
    greedy_reference,
    prompt,
    run_to_end,
    sampled_draft,
    verify_one,
)
from tests.sampling_stats import total_variation, tv_bound

GREEDY = SamplingParams(max_new_tokens=64)
SAMPLING = SamplingParams(temperature=1.0, top_k=30, seed=5, max_new_tokens=40)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models' kernels are too small to split: with two threads on a busy 2-core
    machine every op waits for a descheduled worker (measured: tests 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("tiny-engine"))


@pytest.fixture(scope="module")
def target(tiny_pair):
    """A separate copy of the target for `generate()`: the engine takes its own copy over."""
    return AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=torch.float32).eval()


@pytest.fixture
def engine(tiny_pair) -> Engine:
    return Engine(tiny_pair[0], k_max=8)


# ------------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize("sessions", [1, 3, 8])
def test_greedy_equals_generate_for_concurrent_sessions(engine, target, draft, sessions):
    lengths = [3, 41, 17, 90, 8, 60, 25, 1][:sessions]
    contexts = {f"s{i}": prompt(n, seed=100 + i) for i, n in enumerate(lengths)}
    for session_id, context in contexts.items():
        assert engine.open(session_id, context, GREEDY).status == "ok"
    index = {session_id: i for i, session_id in enumerate(contexts)}

    def propose(session_id: str, context: list[int], step: int) -> DraftProposal:
        k = 4 if sessions == 1 else (index[session_id] + step) % (engine.k_max + 1)
        return DraftProposal(session_id=session_id, tokens=greedy_draft(draft, context, k))

    produced = run_to_end(engine, contexts, propose)
    for session_id, context in contexts.items():
        reference = greedy_reference(target, context)
        assert len(reference) == 64
        assert produced[session_id] == reference, session_id


def test_drafts_are_partly_accepted_so_both_paths_run(engine, draft):
    """The equality above means something only if drafts get accepted and rejected."""
    context = prompt(20, seed=7)
    engine.open("s", context, GREEDY)
    accepted = drafted = 0
    for _ in range(10):
        tokens = greedy_draft(draft, context, 4)
        verdict = verify_one(engine, "s", tokens)
        accepted, drafted = accepted + verdict.accepted, drafted + len(tokens)
        context += verdict.tokens
    assert 0 < accepted < drafted


# ------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(temperature=1.5, top_k=0, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=2.0),
    ],
)
def test_target_probs_are_generates_own_processing(target, params):
    """p must be what `generate(do_sample=True)` samples from: its processed scores, softmaxed."""
    context = torch.tensor([prompt(12, seed=3)])
    out = target.generate(
        context,
        do_sample=True,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        max_new_tokens=1,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = torch.softmax(out.scores[0], dim=-1)
    assert torch.equal(target_probs(out.logits[0], logits_warpers(params)), expected)


def test_first_sampled_token_follows_the_target_distribution(tiny_pair, target, draft):
    """Engine end to end: many sessions, same context, different seeds, each verifying a draft
    sampled from the real draft model. The first emitted token must follow the target's p.

    One-token contexts (nothing to prefill) keep this fast; the token is one after which the
    target is unsure (no token above 0.35), so a wrong p shows.
    """
    params = SamplingParams(temperature=2.0, top_k=6, max_new_tokens=8)
    for token in range(2, TINY_VOCAB):
        out = target.generate(
            torch.tensor([[token]]),
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k,
            max_new_tokens=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
        p = torch.softmax(out.scores[0][0].double(), dim=-1)
        if p.max() < 0.35:
            break
    sessions, batch = 6000, 500
    engine = Engine(tiny_pair[0], k_max=2, max_sessions=batch)
    generator = torch.Generator().manual_seed(1)
    first = []
    for start in range(0, sessions, batch):
        proposals = []
        for i in range(batch):
            engine.open(f"s{i}", [token], params.model_copy(update={"seed": start + i}))
            tokens, q = sampled_draft(draft, [token], 2, params.temperature, generator)
            proposals.append(DraftProposal(session_id=f"s{i}", tokens=tokens, q=q))
        first += [verdict.tokens[0] for verdict in engine.verify(proposals)]
    tv = total_variation(torch.tensor(first), p)
    bound = tv_bound(sessions, cells=int((p > 0).sum()), failure=1e-4)
    assert tv < bound, (tv, bound)


def test_sampling_reproduces_with_the_seed(tiny_pair, draft):
    def run(seed: int) -> list[Verdict]:
        engine = Engine(tiny_pair[0])
        params = SAMPLING.model_copy(update={"seed": seed})
        context = prompt(15, seed=9)
        engine.open("s", context, params)
        generator = torch.Generator().manual_seed(2)
        verdicts = []
        while not engine.sessions["s"].finished:
            tokens, q = sampled_draft(draft, context, 3, params.temperature, generator)
            verdict = verify_one(engine, "s", tokens, q)
            context += verdict.tokens
            verdicts.append(verdict)
        return verdicts

    assert run(5) == run(5)
    assert [v.tokens for v in run(5)] != [v.tokens for v in run(6)]


@pytest.mark.parametrize("params", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_after_a_rejection_the_session_continues_as_a_fresh_one(engine, draft, params):
    """Session a is verified until a draft is rejected; session b is opened fresh with a's
    committed context. Fed the same drafts, both give identical verdicts: the rejected tokens'
    KV entries are gone, and the random stream depends on the committed length only."""
    context = prompt(30, seed=21)
    first_len = len(context)
    engine.open("a", context, params)
    generator = torch.Generator().manual_seed(4)

    def propose(context: list[int]) -> tuple[list[int], list[SparseDist] | None]:
        if params.greedy:
            # A wrong token at position 3 forces a rejection whenever the first two are accepted.
            tokens = greedy_draft(draft, context, 4)
            return tokens[:2] + [(tokens[2] + 1) % TINY_VOCAB] + tokens[3:], None
        return sampled_draft(draft, context, 4, params.temperature, generator)

    for _ in range(20):
        tokens, q = propose(context)
        verdict = verify_one(engine, "a", tokens, q)
        context += verdict.tokens
        if verdict.accepted < len(tokens):
            break
    else:
        raise AssertionError("no draft was rejected")
    assert engine.open("b", context, params, generated=len(context) - first_len).status == "ok"
    for _ in range(5):
        tokens, q = propose(context)
        a, b = engine.verify(
            [
                DraftProposal(session_id="a", tokens=tokens, q=q),
                DraftProposal(session_id="b", tokens=tokens, q=q),
            ]
        )
        assert a.model_copy(update={"session_id": "b"}) == b
        context += a.tokens


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("ids", "probs", "problem"),
    [
        ((5, 6), (1.2, -0.2), "outside \\[0, 1\\]"),
        ((5, 6), (0.5, 0.2), "sums to 0.700000, not 1"),
        ((5, 6), (1.0,), "2 ids but 1 probabilities"),
    ],
)
def test_a_malformed_q_is_refused_when_the_proposal_is_built(ids, probs, problem):
    """Negative, unnormalised or mismatched q never reaches the engine: building the proposal
    (from a validated protocol message, one per session) fails and names the problem."""
    with pytest.raises(ValidationError, match=problem):
        DraftProposal(session_id="s", tokens=[5], q=[{"ids": ids, "probs": probs}])


def uniform_q(ids: tuple[int, ...]) -> SparseDist:
    return SparseDist(ids=ids, probs=tuple(1 / len(ids) for _ in ids))


def test_bad_drafts_get_their_error_and_leave_the_batch_alone(engine, draft):
    vocab = engine.vocab_size
    context, sampled_context = prompt(12, seed=31), prompt(14, seed=32)
    for session_id in ("good", "twin", "too_long", "bad_token", "used_up"):
        engine.open(
            session_id,
            context,
            GREEDY.model_copy(update={"max_new_tokens": 1 if session_id == "used_up" else 64}),
        )
    for session_id in ("sampled", "sampled_twin", "q1", "q2", "q3", "q4"):
        engine.open(session_id, sampled_context, SAMPLING)
    assert verify_one(engine, "used_up", []).finished

    good_tokens = greedy_draft(draft, context, 4)
    sampled_tokens, sampled_q = sampled_draft(
        draft, sampled_context, 3, 1.0, torch.Generator().manual_seed(0)
    )
    batch = [
        DraftProposal(session_id="good", tokens=good_tokens),
        DraftProposal(session_id="ghost", tokens=[5]),
        DraftProposal(session_id="too_long", tokens=[5] * 9),
        DraftProposal(session_id="bad_token", tokens=[5, vocab]),
        DraftProposal(session_id="used_up", tokens=[5]),
        DraftProposal(session_id="good", tokens=good_tokens),
        DraftProposal(session_id="sampled", tokens=sampled_tokens, q=sampled_q),
        DraftProposal(session_id="q1", tokens=[5]),
        DraftProposal(session_id="q2", tokens=[5, 6], q=[uniform_q((5,))]),
        DraftProposal(session_id="q3", tokens=[5], q=[uniform_q((6, 7))]),
        DraftProposal(session_id="q4", tokens=[5], q=[uniform_q((5, vocab + 3))]),
    ]
    verdicts = engine.verify(batch)
    codes = [v.error_code for v in verdicts]
    assert codes == [
        None, "unknown_session", "too_long", "bad_token", "finished", "duplicate",
        None, "bad_q", "bad_q", "bad_q", "bad_q",
    ]  # fmt: skip
    for verdict in verdicts:
        if verdict.error_code is not None:
            assert verdict.error and not verdict.tokens and verdict.accepted == 0
    assert "outside the vocabulary" in verdicts[3].error
    assert "q = 0" in verdicts[9].error

    # The good sessions got exactly what they get when verified alone.
    alone = [
        verify_one(engine, "twin", good_tokens),
        verify_one(engine, "sampled_twin", sampled_tokens, sampled_q),
    ]
    assert verdicts[0].model_copy(update={"session_id": "twin"}) == alone[0]
    assert verdicts[6].model_copy(update={"session_id": "sampled_twin"}) == alone[1]
    # A refused draft left its session intact: a valid draft goes through afterwards.
    after = verify_one(engine, "too_long", good_tokens)
    assert after.model_copy(update={"session_id": "twin"}) == alone[0]


def test_non_finite_logits_refuse_only_their_session(engine, target, draft):
    """A target fault confined to one session (here a NaN embedding row for one token id) gets
    that session an internal error with nothing committed; the rest of the batch is exact."""
    context = prompt(12, seed=41)
    healthy_draft = greedy_draft(draft, context, 3)
    poisoned = next(t for t in range(2, 100) if t not in context + healthy_draft)
    engine.open("healthy", context, GREEDY)
    engine.open("faulty", context, GREEDY)
    with torch.no_grad():
        engine._runner.model.get_input_embeddings().weight[poisoned] = float("nan")
    verdicts = engine.verify([
        DraftProposal(session_id="healthy", tokens=healthy_draft),
        DraftProposal(session_id="faulty", tokens=[poisoned]),
    ])
    assert verdicts[1].error_code == "internal" and "non-finite" in (verdicts[1].error or "")
    assert verdicts[1].tokens == [] and verdicts[1].committed_len == len(context)
    assert verdicts[0].error_code is None
    assert verdicts[0].tokens == greedy_reference(target, context, len(verdicts[0].tokens))


def test_open_refusals_name_the_problem(tiny_pair, engine):
    cases = [
        ([], GREEDY, 0, "empty_context"),
        ([5, TINY_VOCAB], GREEDY, 0, "bad_token"),
        ([5] * engine.max_context, GREEDY, 0, "context_overflow"),
        ([5, 6], GREEDY, 3, "bad_request"),
        ([5, 6, 7], GREEDY.model_copy(update={"max_new_tokens": 2}), 2, "bad_request"),
    ]
    for context, params, generated, code in cases:
        result = engine.open("s", context, params, generated=generated)
        assert (result.status, result.error_code) == ("error", code)
        assert result.reason
    no_tokenizer = Engine(AutoModelForCausalLM.from_pretrained(tiny_pair[0]))
    result = no_tokenizer.open("s", [5, 6], GREEDY.model_copy(update={"stop": ("x",)}))
    assert (result.status, result.error_code) == ("error", "bad_params")
    assert engine.sessions == {} and no_tokenizer.sessions == {}


def test_memory_budget_and_session_count_answer_busy(tiny_pair, target):
    context = prompt(10, seed=41)
    per_token = Engine(tiny_pair[0]).kv_bytes_per_token
    per_session = (len(context) + GREEDY.max_new_tokens - 1) * per_token
    engine = Engine(tiny_pair[0], memory_budget_bytes=2 * per_session, max_sessions=3)
    assert engine.open("a", context, GREEDY).status == "ok"
    assert engine.open("b", context, GREEDY).status == "ok"
    refused = engine.open("c", context, GREEDY)
    assert refused.status == "busy" and "budget" in refused.reason
    # Re-opening "a" with a longer context does not fit either, and leaves the old "a" running.
    assert engine.open("a", context + context, GREEDY).status == "busy"
    reference = greedy_reference(target, context, max_new_tokens=3)
    for _ in range(3):
        verdicts = engine.verify([DraftProposal(session_id=s, tokens=[]) for s in ("a", "b")])
        assert [v.error_code for v in verdicts] == [None, None]
    assert engine.sessions["a"].committed_len == len(context) + 3
    assert [v.tokens for v in verdicts] == [reference[2:3]] * 2

    by_count = Engine(tiny_pair[0], max_sessions=1)
    assert by_count.open("a", context, GREEDY).status == "ok"
    refused = by_count.open("b", context, GREEDY)
    assert refused.status == "busy" and "sessions" in refused.reason
    by_count.close("a")
    assert by_count.open("b", context, GREEDY).status == "ok"


def test_kv_bytes_are_reserved_per_session_and_freed(engine):
    contexts = {"a": prompt(10, seed=51), "b": prompt(100, seed=52)}
    params = GREEDY.model_copy(update={"max_new_tokens": 2})
    for session_id, context in contexts.items():
        engine.open(session_id, context, params)
    expected = {s: (len(c) + 1) * engine.kv_bytes_per_token for s, c in contexts.items()}
    assert {s: engine.session_bytes(s) for s in contexts} == expected
    assert engine.total_bytes == sum(expected.values())
    for _ in range(2):
        verify_one(engine, "a", [])
    assert engine.sessions["a"].finished and engine.session_bytes("a") == 0
    assert engine.close("b") and not engine.close("b")
    assert engine.total_bytes == 0
    with pytest.raises(KeyError, match="unknown session"):
        engine.session_bytes("b")


def test_evict_idle_closes_only_idle_sessions(engine):
    engine.open("old", [5, 6], GREEDY)
    time.sleep(0.3)
    engine.open("new", [5, 6], GREEDY)
    assert engine.evict_idle(0.15) == ["old"]
    assert list(engine.sessions) == ["new"]


# ------------------------------------------------------------------------ stop conditions


@pytest.mark.parametrize("given_by", ["generation-config", "argument"])
def test_eos_ends_the_session_and_discards_later_drafts(tiny_pair, target, given_by):
    context = prompt(16, seed=61)
    reference = greedy_reference(target, context, max_new_tokens=20)
    end = next(i for i in range(3, 20) if reference[i] not in reference[:i])
    if given_by == "argument":
        engine = Engine(tiny_pair[0], eos_token_ids=[reference[end]])
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
        model.generation_config.eos_token_id = [reference[end]]
        engine = Engine(model)
    engine.open("s", context, GREEDY)
    produced = []
    while not engine.sessions["s"].finished:
        # The draft is the target's own continuation, running past the end of text.
        done = len(produced)
        verdict = verify_one(engine, "s", reference[done : done + 8])
        produced += verdict.tokens
    assert (verdict.finished, verdict.reason) == (True, "eos")
    assert produced == reference[: end + 1]
    assert produced == greedy_reference(
        target, context, max_new_tokens=20, eos_token_id=reference[end]
    )


def test_max_new_tokens_counts_tokens_generated_before_a_resync(engine, target):
    context = prompt(16, seed=62)
    reference = greedy_reference(target, context, max_new_tokens=10)
    params = GREEDY.model_copy(update={"max_new_tokens": 10})
    engine.open("s", context + reference[:3], params, generated=3)
    produced = run_to_end(
        engine,
        {"s": context + reference[:3]},
        lambda s, c, step: DraftProposal(session_id=s, tokens=[]),
    )
    assert produced["s"] == reference[3:]
    assert engine.sessions["s"].reason == "length"
    assert engine.sessions["s"].committed_len == len(context) + 10


@pytest.mark.parametrize("where", ["at-token-end", "inside-a-token", "across-tokens"])
def test_stop_string_keeps_the_token_that_completes_it(tiny_pair, engine, target, where):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    context = prompt(10, seed=66)
    reference = greedy_reference(target, context)
    pieces = [tokenizer.decode([token]) for token in reference]

    def plain(piece: str) -> bool:
        return len(piece) >= 3 and piece.isascii() and piece.isprintable()

    # A token with plain text after another one, so the stop can sit anywhere around it.
    j = next(i for i in range(3, 64) if plain(pieces[i - 1]) and plain(pieces[i]))
    text, width = tokenizer.decode(reference[: j + 1]), len(pieces[j])
    stop = {
        "at-token-end": text[-3:],
        "inside-a-token": text[-width : -width + 2],
        "across-tokens": text[-width - 2 : -width + 2],
    }[where]
    end = next(i for i in range(64) if stop in tokenizer.decode(reference[: i + 1]))
    engine.open("s", context, GREEDY.model_copy(update={"stop": ("never-there", stop)}))
    produced = []
    while not engine.sessions["s"].finished:
        done = len(produced)
        produced += verify_one(engine, "s", reference[done : done + 4]).tokens
    assert produced == reference[: end + 1]
    assert engine.sessions["s"].reason == "stop"


def test_a_session_ends_for_length_at_the_models_maximum_context(engine):
    context = prompt(engine.max_context - 3, seed=64)
    engine.open("s", context, GREEDY)
    verdict = verify_one(engine, "s", [5] * 8)
    produced = verdict.tokens
    while not verdict.finished:
        verdict = verify_one(engine, "s", [5] * 8)
        produced += verdict.tokens
    assert (verdict.reason, verdict.committed_len, len(produced)) == (
        "length",
        engine.max_context,
        3,
    )


def test_a_bfloat16_target_verifies_with_half_the_kv_bytes(tiny_pair, draft):
    """bfloat16 is the speed setting: batched kernels may then break greedy near-ties, so the
    check here is that it runs end to end and what it holds, not token equality."""
    engine = Engine(tiny_pair[0], dtype="bfloat16")
    assert engine.kv_bytes_per_token * 2 == Engine(tiny_pair[0]).kv_bytes_per_token
    contexts = {"a": prompt(20, seed=71), "b": prompt(45, seed=72)}
    for session_id, context in contexts.items():
        engine.open(session_id, context, GREEDY)
    produced = run_to_end(
        engine,
        contexts,
        lambda s, context, step: DraftProposal(
            session_id=s, tokens=greedy_draft(draft, context, 4)
        ),
    )
    assert [len(tokens) for tokens in produced.values()] == [64, 64]
