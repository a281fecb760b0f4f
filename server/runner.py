"""Target runner: one forward pass of a `transformers` causal LM over a ragged batch of sessions.

Every session in a step contributes its new tokens (on open: the context; on verify: the
pending token and the draft) to ONE packed row `[1, N]` with per-token position ids, so the
projections, MLPs and output head run on exactly N tokens: no padding, whatever the sessions'
context and draft lengths. Attention is the only part that must know where one session ends
and the next begins; it is replaced by `ragged_attention`, registered with transformers'
`AttentionInterface`, which for each session's segment writes the new keys/values into that
session's own KV buffer and attends over the buffer's prefix in place (a view, no gather into
a padded batch cache, no copy back). The per-segment loop runs once per layer and costs a few
small kernel launches per session. Measured on the 2-core CPU with the 1.5B target's attention
shapes (28 layers, 12 query / 2 KV heads of 128), 16 sessions with contexts 16-512 and 5 new
tokens each: one step's attention took 54 ms this way against 82 ms for the usual padded batch
cache with a 4D mask, 39 ms of which was gathering the sessions' KV into it (and 40% of its
keys were padding); the tiny model showed the same order (1.3 against 1.5 ms).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel

from fleet.config import DEFAULT_LINEAR_KERNEL, LinearKernel
from server.kernels import use_linear_kernel
from server.kv import KVShape, SessionKV

RAGGED_ATTENTION = "fleet_ragged"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Segment:
    """One session's part of a step: `tokens` go in at positions `kv.length` onwards."""

    kv: SessionKV
    tokens: Sequence[int]


@dataclass(frozen=True)
class _SegmentPlan:
    """Where a segment sits in the packed row and how its queries may attend."""

    kv: SessionKV
    start: int
    end: int
    mask: torch.Tensor | None  # [n, past + n] bool, True = may attend; None with `causal`
    causal: bool  # no past: plain causal attention over the segment itself


class RaggedBatch:
    """The packed layout of one forward pass, passed to every attention layer via kwargs."""

    def __init__(self, segments: Sequence[Segment], device: torch.device) -> None:
        plans = []
        start = 0
        for segment in segments:
            n, past = len(segment.tokens), segment.kv.length
            mask = None
            if past > 0 and n > 1:
                # Query i sits at absolute position past + i and sees keys 0..past + i.
                keys = torch.arange(past + n, device=device)
                mask = keys[None, :] <= (past + torch.arange(n, device=device))[:, None]
            plans.append(_SegmentPlan(segment.kv, start, start + n, mask, past == 0 and n > 1))
            start += n
        self.segments = plans


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    ragged_batch: RaggedBatch | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Attention for a packed ragged batch.

    Shapes: query `[1, heads, N, head_dim]`, key/value `[1, kv_heads, N, head_dim]` (the new
    tokens only, rotary already applied). Returns `[1, N, heads, head_dim]` as transformers'
    attention functions do. `attention_mask` is unused: masks are per segment.
    """
    if ragged_batch is None:
        raise RuntimeError(
            f"attention '{RAGGED_ATTENTION}' runs only inside TargetRunner.forward (no ragged_batch)"
        )
    layer = module.layer_idx
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for plan in ragged_batch.segments:
        end = plan.kv.write(
            layer, key[0, :, plan.start : plan.end], value[0, :, plan.start : plan.end]
        )
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, plan.start : plan.end],
                plan.kv.keys(layer, end)[None],
                plan.kv.values(layer, end)[None],
                attn_mask=plan.mask,
                is_causal=plan.causal,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return attended.transpose(1, 2).contiguous(), None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)


class TargetRunner:
    """Holds the target model and runs ragged batches through it.

    The runner takes the model over: its attention implementation is switched to the ragged
    one, so it can no longer be used for `generate()`; load a second copy for that.
    """

    def __init__(
        self,
        model_dir_or_model: str | Path | PreTrainedModel,
        dtype: str = "float32",
        device: str = "cpu",
        linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL,
    ) -> None:
        """`linear_kernel` (server.kernels): `onednn` (or `auto`) prepacks the linears for
        oneDNN on a CPU float32 target, whose sgemm costs a step per few extra tokens."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if isinstance(model_dir_or_model, PreTrainedModel):
            model = model_dir_or_model
        else:
            path = Path(model_dir_or_model)
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a model directory (no config.json)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=DTYPES[dtype]).eval()
        config = self.model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(
                f"target layers {sorted(layer_types)} are not supported: ragged attention is full causal only"
            )
        self.model.set_attn_implementation(RAGGED_ATTENTION)
        self.kv_shape = KVShape.from_config(config, DTYPES[dtype], self.device)
        self.vocab_size: int = self.model.get_output_embeddings().weight.shape[0]
        self.linear_kernel = use_linear_kernel(self.model, linear_kernel, self.device, DTYPES[dtype])
        self.max_context: int = config.max_position_embeddings
        self.eos_token_ids: frozenset[int] = _eos_token_ids(self.model)

    def new_kv(self, capacity: int) -> SessionKV:
        return SessionKV(self.kv_shape, capacity)

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment], *, logits: bool = True) -> torch.Tensor | None:
        """Run all segments in one pass; returns float32 logits `[N, vocab]` in packed order
        (row j of a segment predicts the token after its j-th input), or None with
        `logits=False` (prefill: only the KV cache is wanted)."""
        batch = RaggedBatch(segments, self.device)
        input_ids = torch.tensor(
            [[token for segment in segments for token in segment.tokens]], device=self.device
        )
        position_ids = torch.cat(
            [
                torch.arange(s.kv.length, s.kv.length + len(s.tokens), device=self.device)
                for s in segments
            ]
        )[None]
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            ragged_batch=batch,
            logits_to_keep=0 if logits else 1,
        )
        return output.logits[0].float() if logits else None


def load_reference(
    path: str | Path, dtype: str = "float32", linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL
) -> PreTrainedModel:
    """A checkpoint on CPU computed as the server's target is (dtype, linear kernels) but with
    transformers' own attention, for `generate`: the target alone that outputs are checked
    against, since the lossless claim is about this server's target."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    use_linear_kernel(model, linear_kernel, torch.device("cpu"), DTYPES[dtype])
    return model


def _eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    """The ids that end generation, as `generate()` reads them (generation config first)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
