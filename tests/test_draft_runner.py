"""The board's draft runner and drafting policy against torch on the tiny draft (float32)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from device.drafter import KEEP_UP_TOKENS, Drafter
from device.manifest import MANIFEST_FILE, DraftModelError
from device.runner import DraftRunner
from fleet.sampling import SamplingParams

pytest_plugins = ["tests.draft_fixtures"]

GREEDY = SamplingParams()
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def torch_draft(tiny_draft_pair: tuple[Path, Path]):
    return AutoModelForCausalLM.from_pretrained(tiny_draft_pair[1], dtype=torch.float32).eval()


@pytest.fixture
def runner(tiny_draft_onnx: Path) -> DraftRunner:
    return DraftRunner(tiny_draft_onnx)


@pytest.fixture
def prompt(runner: DraftRunner) -> list[int]:
    return runner.tokenizer.encode(PROMPT).ids


def torch_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at every position, computed from scratch (no cache)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def torch_greedy_after(model, context: list[int], continuation: list[int]) -> list[int]:
    """Torch's greedy choice after context + each prefix of continuation (teacher forcing)."""
    logits = torch_logits(model, context + continuation)
    return [int(t) for t in logits[len(context) - 1 :].argmax(-1)]


def test_greedy_decoding_matches_torch_over_64_tokens(runner, prompt, torch_draft):
    logits = runner.prefill(prompt)
    generated = []
    for _ in range(64):
        generated.append(int(logits.argmax()))
        logits = runner.step(generated[-1])
    assert generated == torch_greedy_after(torch_draft, prompt, generated)[:64]
    assert runner.tokens == tuple(prompt + generated)


def test_drafts_match_torch_across_rollbacks(runner, prompt, torch_draft):
    """Verdict after verdict (all accepted, some accepted, none accepted), the drafts stay
    equal to torch's greedy continuation of the committed sequence recomputed from scratch."""
    drafter = Drafter(runner, k_max=5, threshold=0.0, top_k=8)
    drafter.start(prompt)
    context = list(prompt)
    accept_schedule = [5, 2, 0, 3, 5, 1, 4]
    compared = 0
    rng = np.random.default_rng(0)
    for round_index in range(40):
        batch = drafter.draft(5, GREEDY, rng)
        expected = torch_greedy_after(torch_draft, context, list(batch.tokens))
        assert list(batch.tokens) == expected[: len(batch.tokens)]
        compared += len(batch.tokens)
        accepted = min(accept_schedule[round_index % len(accept_schedule)], len(batch.tokens))
        # The target's token: a bonus when all are accepted, else a correction that differs from
        # what the draft proposed, so the runner must drop the tail and take an unexpected token.
        target = (
            expected[accepted]
            if accepted == len(batch.tokens)
            else (batch.tokens[accepted] + 7) % 300
        )
        drafter.commit(accepted, target)
        context += [*batch.tokens[:accepted], target]
        assert runner.tokens == tuple(context)
        assert drafter.committed_length == len(context)
    assert compared >= 64


def test_rollback_to_any_length_gives_torch_logits(runner, prompt, torch_draft):
    runner.prefill(prompt)
    for token in (17, 42, 99, 5, 230):
        runner.step(token)
    full = list(runner.tokens)
    for cut in (len(full) - 1, len(prompt), 3, 1):
        runner.rollback(runner.length)  # a no-op
        runner.rollback(cut)
        assert runner.length == cut
        fresh = [11, 250, 64]
        logits = runner.feed(fresh)
        expected = torch_logits(torch_draft, full[:cut] + fresh)[-1]
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        full = list(runner.tokens)


def test_feed_and_rollback_refuse_bad_input(runner, prompt):
    runner.prefill(prompt)
    with pytest.raises(ValueError, match="outside the draft vocabulary"):
        runner.step(runner.manifest.vocab_size)
    with pytest.raises(ValueError, match="at least one token"):
        runner.feed([])
    with pytest.raises(ValueError, match="cannot roll back"):
        runner.rollback(runner.length + 1)
    with pytest.raises(ValueError, match="max_context"):
        runner.feed([1] * runner.manifest.max_context)


# -- drafting policy ---------------------------------------------------------------------------


def test_draft_length_follows_k_max_and_the_servers_suggestion(runner, prompt):
    drafter = Drafter(runner, k_max=5, threshold=0.0, top_k=8)
    drafter.start(prompt)
    rng = np.random.default_rng(0)
    for suggested, expected in ((None, 5), (3, 3), (12, 5), (0, 0), (1, 1)):
        batch = drafter.draft(suggested, GREEDY, rng)
        assert len(batch.tokens) == expected
        assert batch.q is None and len(batch.top_probs) == expected
        drafter.commit(len(batch.tokens), 7)


def test_threshold_stops_drafting_but_the_first_token_is_always_drafted(runner, prompt):
    rng = np.random.default_rng(0)
    always_unsure = Drafter(runner, k_max=5, threshold=1.0, top_k=8)
    always_unsure.start(prompt)
    assert len(always_unsure.draft(None, GREEDY, rng).tokens) == 1

    # A threshold between the confidences the tiny draft actually has stops some drafts early.
    confident = Drafter(runner, k_max=8, threshold=0.0, top_k=8)
    confident.start(prompt)
    unbounded = confident.draft(None, GREEDY, rng)
    confidences = unbounded.top_probs
    threshold = float(np.median(confidences[1:]))
    picky = Drafter(runner, k_max=8, threshold=threshold, top_k=8)
    picky.start(prompt)
    batch = picky.draft(None, GREEDY, rng)
    cut = len(batch.tokens)
    assert cut < 8
    assert all(p >= threshold for p in batch.top_probs[1:])
    assert confidences[cut] < threshold  # the same position, seen by the drafter that went on
    assert batch.tokens == unbounded.tokens[:cut]


def test_drafting_stops_after_end_of_text(tiny_draft_onnx, tmp_path, prompt):
    first = int(DraftRunner(tiny_draft_onnx).prefill(prompt).argmax())
    model_dir = shutil.copytree(tiny_draft_onnx, tmp_path / "draft")
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["eos_token_ids"] = [first]
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    drafter = Drafter(DraftRunner(model_dir), k_max=5, threshold=0.0, top_k=8)
    drafter.start(prompt)
    assert drafter.draft(None, GREEDY, np.random.default_rng(0)).tokens == (first,)


def test_sampled_drafts_carry_their_q_and_follow_the_seed(runner, prompt):
    params = SamplingParams(temperature=0.8, top_k=20)
    batches = []
    for _ in range(2):
        drafter = Drafter(runner, k_max=6, threshold=0.0, top_k=8)
        drafter.start(prompt)
        batches.append(drafter.draft(None, params, np.random.default_rng(1234)))
    batch = batches[0]
    assert batch.tokens == batches[1].tokens and len(batch.tokens) == 6
    assert batch.q is not None and len(batch.q) == 6
    for token, q, confidence in zip(batch.tokens, batch.q, batch.top_probs):
        assert token in q.ids
        assert len(q.ids) <= 8  # the board's top_k, tighter than the request's
        assert confidence == max(q.probs)


def test_commit_checks_the_verdict(runner, prompt):
    drafter = Drafter(runner, k_max=4, threshold=0.0, top_k=8)
    with pytest.raises(RuntimeError, match="start"):
        drafter.draft(None, GREEDY, np.random.default_rng(0))
    drafter.start(prompt)
    batch = drafter.draft(None, GREEDY, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="commit"):
        drafter.draft(None, GREEDY, np.random.default_rng(0))
    with pytest.raises(ValueError, match="accepted 5 of a draft of 4"):
        drafter.commit(5, 1)
    drafter.commit(len(batch.tokens), 1)
    with pytest.raises(RuntimeError, match="no draft"):
        drafter.commit(0, 1)


def test_a_discarded_draft_is_drafted_again(runner, prompt):
    """A draft lost with its server leaves the drafter at the committed context."""
    drafter = Drafter(runner, k_max=5, threshold=0.0, top_k=8)
    drafter.start(prompt)
    first = drafter.draft(None, GREEDY, np.random.default_rng(0))
    drafter.discard()
    assert runner.tokens == tuple(prompt) and drafter.committed_length == len(prompt)
    assert drafter.draft(None, GREEDY, np.random.default_rng(0)) == first


# -- bad model directories ---------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_draft_onnx: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_draft_onnx, tmp_path / "draft")


def edit_manifest(model_dir: Path, **changes) -> None:
    path = model_dir / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_manifest_is_named(model_copy):
    (model_copy / MANIFEST_FILE).unlink()
    with pytest.raises(DraftModelError, match=r"manifest not found: .*manifest\.json"):
        DraftRunner(model_copy)


def test_unreadable_manifest_is_named(model_copy):
    (model_copy / MANIFEST_FILE).write_text('{"vocab_size": "lots"')
    with pytest.raises(DraftModelError, match=r"invalid draft manifest .*manifest\.json"):
        DraftRunner(model_copy)


def test_missing_model_is_named(model_copy):
    (model_copy / "model.onnx").unlink()
    with pytest.raises(
        DraftModelError, match=r"missing: .*model\.onnx \(listed in manifest\.json\)"
    ):
        DraftRunner(model_copy)


def test_truncated_weights_are_named(model_copy):
    data = model_copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(DraftModelError, match=r"model\.onnx\.data has 1000 bytes"):
        DraftRunner(model_copy)


def test_changed_weights_are_caught_when_hashes_are_verified(model_copy):
    data = model_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    DraftRunner(model_copy)  # sizes match: only the hash can tell
    with pytest.raises(DraftModelError, match=r"model\.onnx\.data does not match its sha256"):
        DraftRunner(model_copy, verify_hashes=True)


def test_vocabulary_mismatch_between_manifest_and_model_is_named(model_copy):
    edit_manifest(model_copy, vocab_size=500)
    with pytest.raises(
        DraftModelError, match=r"model\.onnx produces 384 logits but manifest\.json says"
    ):
        DraftRunner(model_copy)


def test_tokenizer_from_another_model_is_named(model_copy):
    tokenizer = Tokenizer.from_file(str(model_copy / "tokenizer.json"))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(200)])
    tokenizer.save(str(model_copy / "tokenizer.json"))
    with pytest.raises(DraftModelError, match=r"tokenizer\.json has \d+ bytes"):
        DraftRunner(model_copy)
    manifest = json.loads((model_copy / MANIFEST_FILE).read_text())
    manifest["files"]["tokenizer.json"]["size"] = (model_copy / "tokenizer.json").stat().st_size
    (model_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DraftModelError, match=r"tokenizer .*tokenizer\.json has 584 tokens"):
        DraftRunner(model_copy)


def test_model_from_another_export_is_named(model_copy):
    edit_manifest(model_copy, num_kv_heads=4)
    with pytest.raises(DraftModelError, match=r"model\.onnx has KV heads x head dim 2x16"):
        DraftRunner(model_copy)


def test_forked_runners_share_the_session_but_not_the_cache(runner, prompt):
    twin = runner.fork()
    assert twin.session is runner.session and twin.length == 0
    first = runner.prefill(prompt)
    other = twin.prefill(prompt[:-2])
    assert runner.length == len(prompt) and twin.length == len(prompt) - 2
    np.testing.assert_array_equal(twin.feed(prompt[-2:]), first)
    runner.step(int(np.argmax(first)))
    assert twin.length == len(prompt) and not np.array_equal(other, first)


def test_a_session_that_does_not_draft_feeds_the_draft_model_only_when_asked(runner, prompt, torch_draft):
    """start() and an opening without a draft leave the cache empty; the server's tokens
    (the opening verdict's, then pushed ones) queue up, and the first real draft feeds them
    all in one pass and drafts what a drafter fed token by token would."""
    drafter = Drafter(runner, k_max=4, threshold=0.0, top_k=8)
    drafter.start(prompt)
    opening = drafter.draft(0, GREEDY, np.random.default_rng(0))
    assert opening.tokens == () and runner.length == 0
    server_tokens = torch_greedy_after(torch_draft, prompt, [])[:1]
    drafter.commit(0, server_tokens[0])
    drafter.follow([11, 12])  # the server went on alone
    assert runner.length == 0 and drafter.committed_length == len(prompt) + 3
    drafter.catch_up()
    context = [*prompt, server_tokens[0], 11, 12]
    assert runner.length == len(context)
    batch = drafter.draft(4, GREEDY, np.random.default_rng(0))
    assert list(batch.tokens) == torch_greedy_after(torch_draft, context, list(batch.tokens[:3]))


def test_a_waiting_board_keeps_its_cache_up_in_passes_of_a_few_tokens(runner, prompt, torch_draft):
    """While an open without a draft is in the server's prefill, keep_up feeds the prompt;
    tokens the server then decodes alone are fed once KEEP_UP_TOKENS of them are missing, and
    the draft after that is what a drafter fed token by token would draft."""
    assert len(prompt) >= KEEP_UP_TOKENS
    drafter = Drafter(runner, k_max=4, threshold=0.0, top_k=8)
    drafter.start(prompt)
    drafter.draft(0, GREEDY, np.random.default_rng(0))
    drafter.keep_up()
    assert runner.length == len(prompt)
    first = torch_greedy_after(torch_draft, prompt, [])[0]
    drafter.commit(0, first)
    pushed = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert runner.length == len(prompt) + 1  # the commit fed the server's first token
    drafter.follow(pushed[: KEEP_UP_TOKENS - 1])
    drafter.keep_up()  # one token short
    assert runner.length == len(prompt) + 1
    drafter.follow(pushed[KEEP_UP_TOKENS - 1 :])
    drafter.keep_up()
    context = [*prompt, first, *pushed]
    assert runner.length == len(context) and drafter.committed_length == len(context)
    batch = drafter.draft(4, GREEDY, np.random.default_rng(0))
    assert list(batch.tokens) == torch_greedy_after(torch_draft, context, list(batch.tokens[:3]))
