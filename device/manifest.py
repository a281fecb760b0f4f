"""The draft model's manifest: what the exporter promises and the board checks before drafting.

A board gets a directory (`model.onnx`, its external data, tokenizer files, `manifest.json`)
copied onto it by provisioning. Files go stale or get mixed up between models, so the
manifest records every file's size and hash and the model's shape (vocabulary, layers, KV
heads); the runner compares the ONNX graph and the tokenizer against it and names the file
that does not fit instead of failing somewhere inside onnxruntime.

Input/output names live here (not in the exporter) because both sides must agree on them.
"""

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.config import default_home

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1

Quant = Literal["none", "int8", "int4"]
QUANTS: tuple[Quant, ...] = ("none", "int8", "int4")

# Graph interface: batch is fixed at 1 (one board drafts one session at a time).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"  # [1, vocab]: the last position only; drafting never needs the others


def past_names(num_layers: int) -> list[str]:
    """KV cache inputs, in graph order: key then value for each layer."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """KV cache outputs, same order as `past_names`: past + the new positions."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def graph_io(num_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of an exported draft with `num_layers` layers."""
    inputs = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers))
    return inputs, (LOGITS, *present_names(num_layers))


class DraftModelError(ValueError):
    """A draft model directory that cannot be used; the message names the offending file."""


class FileRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ValidationRecord(BaseModel):
    """How far ONNX Runtime's logits were from torch's on the same inputs, at export time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_abs_diff_prefill: float = Field(ge=0)
    max_abs_diff_decode: float = Field(ge=0)
    logit_scale: float = Field(gt=0, description="largest |logit| torch produced")
    greedy_agrees: bool = Field(description="same argmax as torch at both checked positions")

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_prefill, self.max_abs_diff_decode)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.logit_scale


class DraftManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1)
    architecture: str
    source_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the checkpoint's weight files, in name order",
    )
    vocab_size: int = Field(ge=2, description="width of the logits (may exceed the tokenizer's)")
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    max_context: int = Field(ge=2)
    dtype: Literal["float32"] = "float32"
    quant: Quant
    eos_token_ids: tuple[int, ...] = Field(min_length=1)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    files: dict[str, FileRecord] = Field(min_length=2)
    tools: dict[str, str] = Field(default_factory=dict, description="exporter package versions")
    validation: ValidationRecord | None = None


def read_manifest(model_dir: Path) -> DraftManifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DraftModelError(f"draft model manifest not found: {path}")
    try:
        manifest = DraftManifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise DraftModelError(f"invalid draft manifest {path}: {where}: {first['msg']}") from exc
    if graph_io(manifest.num_layers) != (manifest.input_names, manifest.output_names):
        raise DraftModelError(f"{path}: input/output names do not match its num_layers")
    if any(e >= manifest.vocab_size for e in manifest.eos_token_ids):
        raise DraftModelError(f"{path}: an eos token id is outside the vocabulary")
    return manifest


def write_manifest(model_dir: Path, manifest: DraftManifest) -> Path:
    path = Path(model_dir) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def file_record(path: Path) -> FileRecord:
    return FileRecord(size=path.stat().st_size, sha256=sha256_files([path]))


def sha256_files(paths: list[Path]) -> str:
    """One hash over the files' bytes in the given order (equals the file's sha256 for one)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def check_files(model_dir: Path, manifest: DraftManifest, verify_hashes: bool = False) -> None:
    """Every recorded file is present with its recorded size (and hash, when asked).

    Sizes are always checked because they are free and catch truncated copies and files from
    another export; hashing a 2 GB model on a board takes seconds, so it is on request.
    """
    for name, record in manifest.files.items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise DraftModelError(f"draft model file missing: {path} (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != record.size:
            raise DraftModelError(
                f"draft model file {path} has {size} bytes, {MANIFEST_FILE} records {record.size}"
            )
        if verify_hashes and sha256_files([path]) != record.sha256:
            raise DraftModelError(
                f"draft model file {path} does not match its sha256 in {MANIFEST_FILE}"
            )


def draft_store_dir(name: str, quant: Quant, home: Path | None = None) -> Path:
    """Where exported drafts live by default: FLEET_HOME/drafts/NAME-QUANT."""
    return (home or default_home()) / "drafts" / f"{name}-{quant}"
