"""Per-session KV cache: one buffer per session, reserved at open and written in place.

Why reserve the whole buffer up front: when a session opens, its worst-case length is known
(context plus the tokens it may still generate, capped at the model's maximum), so reserving
that much makes the memory budget a hard guarantee (an admitted session can never push the
server out of memory mid-generation) and keeps growth copies off the hot path. Trimming after
a verdict is just moving `length` back: entries past it are stale and never attended.

Layout: `[layers, 2 (key, value), kv_heads, capacity, head_dim]`, so one layer's keys are a
strided view `[kv_heads, length, head_dim]` that attention reads without a copy.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """The per-token KV geometry of a model, from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_config(cls, config: object, dtype: torch.dtype, device: torch.device) -> "KVShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class SessionKV:
    """Keys and values of one session's first `length` tokens, in a fixed-capacity buffer."""

    def __init__(self, shape: KVShape, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"KV capacity must be at least 1 token, got {capacity}")
        self.buffer = torch.empty(
            (shape.num_layers, 2, shape.num_kv_heads, capacity, shape.head_dim),
            dtype=shape.dtype,
            device=shape.device,
        )
        self.length = 0
        self.capacity = capacity
        self.nbytes = self.buffer.numel() * self.buffer.element_size()

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store `[kv_heads, n, head_dim]` keys/values at positions `length..length+n`.

        `length` does not move: every layer writes at the same offset during one forward pass,
        and the engine sets `length` once the verdict says how many of the n tokens stay.
        Returns the end position (how many positions the caller may attend to).
        """
        end = self.length + keys.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV write to position {end} exceeds the reserved {self.capacity}")
        self.buffer[layer, 0, :, self.length : end].copy_(keys)
        self.buffer[layer, 1, :, self.length : end].copy_(values)
        return end

    def keys(self, layer: int, end: int) -> torch.Tensor:
        """`[kv_heads, end, head_dim]` view of this layer's keys."""
        return self.buffer[layer, 0, :, :end]

    def values(self, layer: int, end: int) -> torch.Tensor:
        """`[kv_heads, end, head_dim]` view of this layer's values."""
        return self.buffer[layer, 1, :, :end]

    def set_length(self, length: int) -> None:
        """Mark the first `length` positions valid (the committed tokens minus the pending one);
        what was written past them is stale: overwritten by the next step, never attended."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot set KV length {length} (capacity {self.capacity})")
        self.length = length
