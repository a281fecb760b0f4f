"""Linear kernels for the target on CPU: oneDNN's prepacked matmul instead of MKL's sgemm.

Why: in float32 on a CPU, `nn.Linear` calls MKL's sgemm, whose cost for the few rows of a
verification pass is a staircase, not the memory-bound line the speculation planner's load
model assumes. Measured on a 2-vCPU Xeon with the 1.5B target (one thread, whole pass):
1-3 tokens 0.42-0.45 s, 4-6 tokens 0.83-0.87 s, 7-8 tokens 1.17 s, 12 tokens 1.46 s, so a pass
of 4 tokens cost twice one of 3 and every draft longer than 2 tokens was priced like a second
pass. oneDNN reorders each weight once into its blocked layout and then streams it for any row
count: the same passes cost 0.45, 0.46, 0.55 and 0.61 s, and 0.98 s at 32 tokens against 1.26.
Its logits differ from sgemm's by float32 rounding (7.6e-5 at most over the 1.5B's vocabulary)
and gave the same argmax at every position; greedy outputs are compared against the target
run with the same kernels (`fleet bench`'s `target` mode), as the losslessness claim is about
this server's target.

The ops used (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`) are the ones
torch's inductor emits for frozen CPU linears; torch is pinned, and `auto` falls back to the
default kernels wherever they are missing.

The row counts oneDNN sees are bucketed (`bucket_rows`): torch's oneDNN linear keeps memory
for every input shape it has run (measured on torch 2.13: about 0.7 MB per distinct row count
of one 256 x 256 linear, growing without end over 1200 distinct counts, whatever
ONEDNN_PRIMITIVE_CACHE_CAPACITY or LRU_CACHE_CAPACITY say), and a verification pass's row
count changes with every batch. Padded to buckets, a second sweep over the same 1200 counts
added nothing, and the passes of up to 32 sessions at k = 8 (288 rows) meet 49 shapes per
weight.
"""

from typing import Literal, get_args

import torch

from fleet.config import LinearKernel
from fleet.logging import get_logger

LINEAR_KERNELS: tuple[LinearKernel, ...] = get_args(LinearKernel)

log = get_logger(component="kernels")

# A row count is padded to the next m * 2**e with m in [BUCKET_MANTISSA, 2 * BUCKET_MANTISSA):
# at most 1/BUCKET_MANTISSA more rows, BUCKET_MANTISSA buckets per doubling, and every count up
# to EXACT_ROWS is its own bucket. Above, padding costs about its share of rows (measured on
# the 1.5B, one thread, compute-bound from a few rows: 9 rows 0.43 s a pass, padded to 10
# 0.50 s; 18 -> 20 0.71 -> 0.78 s), so the buckets are fine, and a fleet of up to 16 tokens a
# pass (one to a few boards, where a pass costs most per token) runs unpadded.
BUCKET_MANTISSA = 8
EXACT_ROWS = 2 * BUCKET_MANTISSA


def bucket_rows(rows: int) -> int:
    """The row count oneDNN runs for `rows` rows: rows itself up to EXACT_ROWS, else the next
    bucket (17 -> 18, 33 -> 36, 100 -> 104, 1000 -> 1024)."""
    step = 1 << max(0, (rows - 1).bit_length() - BUCKET_MANTISSA.bit_length())
    return -(-rows // step) * step


class PrepackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight oneDNN has reordered into its blocked layout once.

    The reordered weight replaces the original (it is not a view of it), so a weight tied to
    the input embedding (the 1.5B target's output head) costs a second copy: 0.93 GB in
    float32 for a 151936 x 1536 head.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None))
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., in_features]` -> `[..., out_features]`; oneDNN takes 2-D input, padded with
        zero rows to its bucket (`bucket_rows`) and cut back after."""
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        padding = bucket_rows(count) - count
        if padding:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y[:count].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=onednn"


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear runs on CPU; float32 is where sgemm's staircase is measured
    (bfloat16 already goes through oneDNN and costs about the same from 1 to 32 tokens)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def resolve_kernel(kernel: LinearKernel, device: torch.device, dtype: torch.dtype) -> Literal["default", "onednn"]:
    """`auto` picks oneDNN where it runs; asking for `onednn` where it cannot is an error."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; use one of {', '.join(LINEAR_KERNELS)}")
    available = onednn_available(device, dtype)
    if kernel == "onednn" and not available:
        raise ValueError(
            f"linear kernel 'onednn' needs a CPU float32 target with oneDNN (device {device}, "
            f"dtype {str(dtype).removeprefix('torch.')}); use 'auto' or 'default'"
        )
    if kernel == "auto":
        return "onednn" if available else "default"
    return kernel


@torch.no_grad()
def use_linear_kernel(
    model: torch.nn.Module, kernel: LinearKernel, device: torch.device, dtype: torch.dtype
) -> Literal["default", "onednn"]:
    """Swap every `nn.Linear` of `model` for the chosen kernel, in place; returns the kernel
    used. One layer at a time, so the peak memory is the model plus one reordered weight."""
    chosen = resolve_kernel(kernel, device, dtype)
    if chosen == "onednn":
        swapped = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, PrepackedLinear(child))
                    swapped += 1
        log.info("linear_kernel", kernel=chosen, requested=kernel, linears=swapped)
    return chosen
