"""The engine on the real pair from the model store: qwen2.5-coder-1.5b verifying drafts of
qwen2.5-coder-0.5b in float32 must emit what the 1.5B's own `generate()` emits. Needs both
models pulled (`fleet models pull ...`) and minutes of CPU: marked slow."""

import pytest

from fleet.models.catalog import ModelStoreError
from fleet.models.store import load_causal_lm, load_tokenizer
from fleet.sampling import SamplingParams
from server.engine import DraftProposal, Engine
from tests.engine_helpers import greedy_draft, greedy_reference, run_to_end

PROMPTS = [
    "def is_prime(n: int) -> bool:\n",
    "MQTT is a lightweight messaging protocol that",
]
NEW_TOKENS = 32


@pytest.mark.slow
def test_greedy_equals_generate_on_the_real_pair():
    try:
        target = load_causal_lm("qwen2.5-coder-1.5b")
        draft = load_causal_lm("qwen2.5-coder-0.5b")
    except ModelStoreError as exc:
        pytest.skip(str(exc))
    tokenizer = load_tokenizer("qwen2.5-coder-1.5b")
    contexts = {f"s{i}": tokenizer(text)["input_ids"] for i, text in enumerate(PROMPTS)}
    references = {
        s: greedy_reference(target, context, max_new_tokens=NEW_TOKENS)
        for s, context in contexts.items()
    }
    engine = Engine(target, tokenizer=tokenizer)  # takes the same weights over: no second copy
    for session_id, context in contexts.items():
        assert (
            engine.open(session_id, context, SamplingParams(max_new_tokens=NEW_TOKENS)).status
            == "ok"
        )
    produced = run_to_end(
        engine,
        contexts,
        lambda s, context, step: DraftProposal(
            session_id=s, tokens=greedy_draft(draft, context, 4)
        ),
    )
    assert produced == references
