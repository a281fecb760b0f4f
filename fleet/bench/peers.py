"""In-process peers the fleet is compared with: the target alone and Hugging Face assisted
generation, one request at a time, no MQTT.

`assisted` is what a user with one machine would pick instead of a fleet: `generate` with the
draft as `assistant_model` (greedy). `target` is the target alone at batch 1; its greedy tokens
are the reference every mode's output must equal (the lossless check), computed in the same
dtype and with the same linear kernels as the verification server (`load_reference`). Both
stream through a streamer that timestamps every chunk of tokens `generate` commits, so their
time between tokens is measured the same way as the fleet's.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from fleet.bench.workload import Job, RequestRecord
from fleet.config import DEFAULT_LINEAR_KERNEL, LinearKernel
from fleet.logging import get_logger


class _TimedStreamer:
    """A `generate` streamer (the BaseStreamer protocol: put/end) that records when each chunk
    of new tokens was produced. The first `put` is the prompt itself."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value) -> None:  # value: torch.Tensor of token ids
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.chunks.append((time.monotonic(), int(value.numel())))

    def end(self) -> None:
        """Nothing to flush: chunks are recorded as they come."""


class HFPeers:
    """The target (and, for `assisted`, the draft) loaded once with transformers; use as a
    context manager so that the weights are released before the next mode loads its own."""

    def __init__(
        self, target_dir: Path, draft_checkpoint: Path, dtype: str, linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL
    ) -> None:
        self.target_dir = target_dir
        self.draft_checkpoint = draft_checkpoint
        self.dtype = dtype
        self.linear_kernel = linear_kernel
        self._target = None
        self._draft = None
        self.log = get_logger(component="bench-peers")

    def __enter__(self) -> Self:
        self._target = self._load(self.target_dir)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._target = self._draft = None

    def _load(self, path: Path):  # -> transformers.PreTrainedModel
        from server.runner import load_reference

        return load_reference(path, self.dtype, self.linear_kernel)

    def run(
        self,
        jobs: Sequence[Job],
        prompt_ids: Callable[[str], list[int]],
        max_new_tokens: int,
        assistant: bool,
        on_done: Callable[[], None] | None = None,
    ) -> list[RequestRecord]:
        """Greedy `generate` of each job in turn; one RequestRecord per job."""
        import torch

        if self._target is None:
            raise RuntimeError("use HFPeers as a context manager")
        if any(not job.greedy for job in jobs):
            raise ValueError("the in-process peers run greedy jobs only")
        if assistant and self._draft is None:
            self._draft = self._load(self.draft_checkpoint)
        records = []
        for job in jobs:
            ids = prompt_ids(job.prompt)
            streamer = _TimedStreamer()
            record = RequestRecord(job=job, board="in-process", sent=time.monotonic())
            with torch.inference_mode():
                out = self._target.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    assistant_model=self._draft if assistant else None,
                    streamer=streamer,
                )
            record.done = time.monotonic()
            record.tokens = out[0, len(ids):].tolist()
            record.chunks = streamer.chunks
            records.append(record)
            self.log.debug("peer_request_done", assisted=assistant, job=job.index, tokens=len(record.tokens))
            if on_done is not None:
                on_done()
        return records
