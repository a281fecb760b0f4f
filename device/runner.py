"""The board's draft model: ONNX Runtime with a KV cache kept as numpy arrays.

The cache lives outside the graph (past in, present out) so that rolling back after a
rejected draft is a slice along the sequence axis: no recomputation, and positions simply
continue from the cut. Only onnxruntime, numpy and tokenizers are imported: boards have no
torch.
"""

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from device.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MANIFEST_FILE,
    MODEL_FILE,
    POSITION_IDS,
    TOKENIZER_FILE,
    DraftManifest,
    DraftModelError,
    check_files,
    past_names,
    read_manifest,
)
from fleet.logging import get_logger


class DraftRunner:
    """One session's draft model state: the token ids in the KV cache and the cache itself."""

    def __init__(
        self,
        model_dir: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        verify_hashes: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.manifest: DraftManifest = read_manifest(self.model_dir)
        check_files(self.model_dir, self.manifest, verify_hashes=verify_hashes)
        self.tokenizer = _load_tokenizer(self.model_dir / TOKENIZER_FILE, self.manifest)
        self.session = _load_session(self.model_dir / MODEL_FILE, providers, intra_op_threads)
        _check_graph(self.model_dir / MODEL_FILE, self.session, self.manifest)
        self._past_names = past_names(self.manifest.num_layers)
        self._ids: list[int] = []
        self._past: list[np.ndarray] = []
        self.reset()
        get_logger(component="draft-runner").info(
            "draft model loaded",
            model=self.manifest.name,
            quant=self.manifest.quant,
            providers=self.session.get_providers(),
        )

    def fork(self) -> "DraftRunner":
        """A runner with a KV cache of its own over this runner's ONNX session: concurrent
        requests on a board share one copy of the weights (InferenceSession.run is
        thread-safe) instead of loading the model once per request."""
        twin = copy.copy(self)
        twin.reset()
        return twin

    @property
    def length(self) -> int:
        """Tokens in the KV cache; the next token fed gets this position."""
        return len(self._ids)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The ids whose keys and values the cache holds."""
        return tuple(self._ids)

    def reset(self) -> None:
        empty = (1, self.manifest.num_kv_heads, 0, self.manifest.head_dim)
        self._past = [np.zeros(empty, dtype=np.float32) for _ in self._past_names]
        self._ids = []

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Start over with `ids` as the whole context; logits for the token after them."""
        self.reset()
        return self.feed(ids)

    def step(self, token: int) -> np.ndarray:
        """One-step decode: append `token`; logits for the token after it."""
        return self.feed([token])

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Append several tokens in one forward pass (catching up after a verdict).

        Returns the float32 logits of the last position, shape [vocab_size].
        """
        new = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        count = new.shape[1]
        if count == 0:
            raise ValueError("feed needs at least one token")
        if new.min() < 0 or new.max() >= self.manifest.vocab_size:
            raise ValueError(
                f"token id outside the draft vocabulary (0..{self.manifest.vocab_size - 1})"
            )
        start = self.length
        if start + count > self.manifest.max_context:
            raise ValueError(
                f"context of {start + count} tokens exceeds the draft's max_context "
                f"{self.manifest.max_context}"
            )
        inputs = {
            INPUT_IDS: new,
            ATTENTION_MASK: np.ones((1, start + count), dtype=np.int64),
            POSITION_IDS: np.arange(start, start + count, dtype=np.int64).reshape(1, -1),
            **dict(zip(self._past_names, self._past)),
        }
        logits, *present = self.session.run(None, inputs)
        self._past = present
        self._ids.extend(int(t) for t in new[0])
        return logits[0]

    def rollback(self, length: int) -> None:
        """Forget everything after the first `length` tokens (a rejected draft's tail)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} tokens")
        if length == self.length:
            return
        # [batch, kv_heads, seq, head_dim]: cut along seq
        self._past = [np.ascontiguousarray(p[:, :, :length]) for p in self._past]
        del self._ids[length:]


def _load_tokenizer(path: Path, manifest: DraftManifest) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON
        raise DraftModelError(f"cannot read tokenizer {path}: {exc}") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > manifest.vocab_size:
        raise DraftModelError(
            f"tokenizer {path} has {size} tokens but the draft model's vocabulary is "
            f"{manifest.vocab_size} (tokenizer from another model?)"
        )
    return tokenizer


def _load_session(
    path: Path, providers: Sequence[str], intra_op_threads: int | None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1  # a decoder is one chain of ops; more threads only contend
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise DraftModelError(f"onnxruntime cannot load {path}: {exc}") from exc


def _check_graph(path: Path, session: ort.InferenceSession, manifest: DraftManifest) -> None:
    """The graph's interface and shapes match the manifest (else: mixed-up files)."""
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if (inputs, outputs) != (manifest.input_names, manifest.output_names):
        raise DraftModelError(
            f"{path} does not have the inputs/outputs {MANIFEST_FILE} lists "
            f"({len(inputs)} inputs, {len(outputs)} outputs vs {len(manifest.input_names)}, "
            f"{len(manifest.output_names)}: exported from another model?)"
        )
    logits = next(o for o in session.get_outputs() if o.name == LOGITS)
    if logits.shape[-1] != manifest.vocab_size:
        raise DraftModelError(
            f"{path} produces {logits.shape[-1]} logits but {MANIFEST_FILE} says vocab_size "
            f"{manifest.vocab_size}"
        )
    past = session.get_inputs()[3]
    if (past.shape[1], past.shape[3]) != (manifest.num_kv_heads, manifest.head_dim):
        raise DraftModelError(
            f"{path} has KV heads x head dim {past.shape[1]}x{past.shape[3]}, {MANIFEST_FILE} says "
            f"{manifest.num_kv_heads}x{manifest.head_dim}"
        )
