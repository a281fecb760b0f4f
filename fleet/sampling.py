"""Sampling parameters and sparse draft distributions, shared by boards and server.

No torch here: boards import this module.
"""

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SamplingParams(BaseModel):
    """How a generation samples; the target's p is processed exactly as the target alone would.

    temperature 0 means greedy. top_k 0 and top_p 1 switch those filters off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    max_new_tokens: int = Field(128, ge=1, le=32768)
    stop: tuple[str, ...] = Field((), max_length=8)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SparseDist(BaseModel):
    """The draft's distribution at one position: K (id, probability) pairs.

    The board samples from its top-K-truncated, temperature-scaled distribution, so this is
    exactly the q it drew from, not an approximation: probabilities outside `ids` are zero.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: tuple[int, ...] = Field(min_length=1, max_length=1024)
    probs: tuple[float, ...] = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _consistent(self) -> "SparseDist":
        if len(self.ids) != len(self.probs):
            raise ValueError(f"q has {len(self.ids)} ids but {len(self.probs)} probabilities")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("q repeats a token id")
        if any(i < 0 for i in self.ids):
            raise ValueError("q has a negative token id")
        if any(not (0.0 <= p <= 1.0) for p in self.probs):
            raise ValueError("q has a probability outside [0, 1]")
        total = sum(self.probs)
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"q sums to {total:.6f}, not 1")
        return self
