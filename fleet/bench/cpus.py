"""Give emulated boards CPUs of their own, apart from the verification server's.

Real boards draft on their own hardware and take none of the server's CPU. Emulated boards run
the real ONNX draft on the benchmark machine; sharing every core with the server, their drafting
slows its forward passes (measured on two cores: passes 1.2-1.7 times as long while boards
drafted), and lowering their priority instead starves them whenever the server decodes without
pause. A split gives the boards' drafting threads the last `board_cpus` CPUs and the server (and
everything else in the process) the rest, with torch using one thread per server CPU: every mode,
the server alone included, then runs on the same, smaller server.

Linux only (per-thread affinity): a thread's CPU set is inherited by the threads it starts, so
the split is set on the calling thread before the bench starts any fleet, and undone after.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict


class CpuSplit(BaseModel):
    model_config = ConfigDict(frozen=True)

    server: list[int]
    boards: list[int]


def split_cpus(board_cpus: int) -> CpuSplit | None:
    """The last `board_cpus` CPUs this process may use go to the boards; None for 0."""
    if board_cpus == 0:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--board-cpus needs per-thread CPU affinity (Linux)")
    allowed = sorted(os.sched_getaffinity(0))
    if not 0 < board_cpus < len(allowed):
        raise ValueError(
            f"--board-cpus must leave the server at least one of this process's {len(allowed)} CPUs, got {board_cpus}"
        )
    return CpuSplit(server=allowed[:-board_cpus], boards=allowed[-board_cpus:])


@contextmanager
def server_side(split: CpuSplit | None) -> Iterator[None]:
    """Run the calling thread, and every thread it starts meanwhile, on the server's CPUs, with
    torch using one thread per server CPU; restore both afterwards."""
    if split is None:
        yield
        return
    import torch  # the server's side only: reports read CpuSplit without torch

    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, split.server)
    torch.set_num_threads(len(split.server))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, allowed)
