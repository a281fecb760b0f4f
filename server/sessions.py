"""One session's state on the server: committed tokens, KV cache, limits and stop conditions.

The KV cache holds every committed token except the last one, the *pending* token: a verify
step feeds the pending token followed by the draft, so the target scores k + 1 positions
(the draft's k plus the bonus) in one pass without re-running anything already committed.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import LogitsProcessor

from fleet.sampling import SamplingParams
from server.kv import SessionKV

FinishReason = Literal["eos", "length", "stop"]


class StopStrings:
    """Finds the first token whose text completes a stop string (HF `stop_strings` semantics:
    that token is kept, and a stop string may span tokens or end inside one).

    Only generated text is searched, never the prompt. Each new token is checked against a
    window of the last tokens wide enough to hold any stop string (each token carries at least
    one byte), plus one token so that a decoder that strips the first token's leading space
    cannot hide a match.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> None:
        self.stops = tuple(stops)
        self.decode = decode
        self.window = max(len(stop.encode()) for stop in self.stops) + 1

    def first_stop(self, generated: Sequence[int], new: int) -> int | None:
        """Index, among the last `new` tokens of `generated`, of the one completing a stop."""
        first_new = len(generated) - new
        for index in range(first_new, len(generated)):
            text = self.decode(generated[max(0, index + 1 - self.window) : index + 1])
            if any(stop in text for stop in self.stops):
                return index - first_new
        return None


@dataclass
class Session:
    """A generation in progress. `limit` is the committed length at which it ends for length:
    context + the new tokens it may still produce, capped at the model's maximum context."""

    session_id: str
    params: SamplingParams
    committed: list[int]
    generated_from: int  # index in `committed` where generated text starts
    limit: int
    kv: SessionKV | None
    warpers: list[LogitsProcessor]
    stop_strings: StopStrings | None = None
    finished: bool = False
    reason: FinishReason | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def committed_len(self) -> int:
        return len(self.committed)

    @property
    def pending(self) -> int:
        return self.committed[-1]

    @property
    def remaining(self) -> int:
        """Tokens this session may still emit."""
        return self.limit - len(self.committed)

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0

    def commit(self, tokens: Sequence[int], eos_token_ids: frozenset[int]) -> list[int]:
        """Append a verdict's tokens, cut at the first stop condition; return what was kept.

        The earliest token that ends generation wins; on one token EOS is named before a stop
        string, and either before length. A finished session drops its KV cache at once:
        nothing will attend to it again.
        """
        kept = list(tokens[: self.remaining])
        self.committed.extend(kept)
        ends: list[tuple[int, FinishReason]] = []
        eos_at = next((index for index, token in enumerate(kept) if token in eos_token_ids), None)
        if eos_at is not None:
            ends.append((eos_at, "eos"))
        if self.stop_strings is not None:
            stop_at = self.stop_strings.first_stop(self.committed[self.generated_from :], len(kept))
            if stop_at is not None:
                ends.append((stop_at, "stop"))
        if ends:
            end, self.reason = min(ends, key=lambda item: item[0])
            del self.committed[len(self.committed) - len(kept) + end + 1 :]
            kept = kept[: end + 1]
        elif self.remaining <= 0:
            self.reason = "length"
        if self.reason is not None:
            self.finished = True
            self.kv = None
        else:
            self.kv.set_length(len(self.committed) - 1)
        self.last_used = time.monotonic()
        return kept
