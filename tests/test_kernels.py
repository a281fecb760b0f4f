"""The target's linear kernels (server/kernels.py): oneDNN's prepacked linears compute what
`nn.Linear` does up to float32 rounding, the server and the lossless reference use the same
ones, and a kernel that cannot run is refused by name."""

import pytest
import torch

from fleet.config import ServerSettings
from server.kernels import (
    EXACT_ROWS,
    PrepackedLinear,
    bucket_rows,
    onednn_available,
    resolve_kernel,
    use_linear_kernel,
)
from server.runner import Segment, TargetRunner

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    not onednn_available(CPU, torch.float32), reason="this torch build has no oneDNN linear ops"
)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 17])  # 2 x 17 = 34 rows run padded to 36
def test_prepacked_linear_matches_nn_linear(bias: bool, rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        expected = linear(x)
        got = PrepackedLinear(linear)(x)
    assert got.shape == expected.shape == (2, rows, 96)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_row_buckets_bound_the_shapes_onednn_sees() -> None:
    """oneDNN keeps memory per input shape (server/kernels.py): every row count from 1 to 4096
    maps to one of under a hundred buckets, none smaller than the rows, at most an eighth more."""
    buckets = {rows: bucket_rows(rows) for rows in range(1, 4097)}
    assert all(buckets[rows] == rows for rows in range(1, EXACT_ROWS + 1))
    assert all(rows <= bucket <= 1.125 * rows for rows, bucket in buckets.items())
    assert len(set(buckets.values())) <= 96
    assert all(bucket_rows(bucket) == bucket for bucket in buckets.values())


def test_auto_picks_onednn_only_for_a_cpu_float32_target() -> None:
    assert resolve_kernel("auto", CPU, torch.bfloat16) == "default"
    assert resolve_kernel("default", CPU, torch.float32) == "default"
    assert resolve_kernel("auto", CPU, torch.float32) == ("onednn" if onednn_available(CPU, torch.float32) else "default")


@pytest.mark.parametrize(
    ("kernel", "dtype", "message"),
    [
        ("onednn", torch.bfloat16, "'onednn' needs a CPU float32 target .* dtype bfloat16"),
        ("mkl", torch.float32, "unknown linear kernel 'mkl'; use one of auto, default, onednn"),
    ],
)
def test_a_kernel_that_cannot_run_is_refused(kernel: str, dtype: torch.dtype, message: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        use_linear_kernel(model, kernel, CPU, dtype)  # type: ignore[arg-type]
    assert type(model[0]) is torch.nn.Linear  # refused before anything was swapped


def test_settings_refuse_an_unknown_kernel() -> None:
    assert ServerSettings().linear_kernel == "auto"  # oneDNN wherever it runs (server/kernels.py)
    with pytest.raises(ValueError, match="linear_kernel"):
        ServerSettings(linear_kernel="fast")  # type: ignore[arg-type]


@needs_onednn
def test_target_runner_logits_agree_across_kernels(tiny_models) -> None:
    """Every linear of the tiny target is swapped, and a ragged pass of two sessions gives the
    default kernels' logits up to rounding, with the same greedy token at every position."""
    target_dir, _ = tiny_models
    default = TargetRunner(target_dir, linear_kernel="default")
    onednn = TargetRunner(target_dir, linear_kernel="auto")
    assert (default.linear_kernel, onednn.linear_kernel) == ("default", "onednn")
    assert not any(type(m) is torch.nn.Linear for m in onednn.model.modules())
    assert onednn.vocab_size == default.vocab_size
    sessions = ([5, 9, 14, 3, 27, 8], [11, 2])
    logits = []
    for runner in (default, onednn):
        kvs = [runner.new_kv(16) for _ in sessions]
        logits.append(runner.forward([Segment(kv, tokens) for kv, tokens in zip(kvs, sessions, strict=True)]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))
