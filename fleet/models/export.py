"""Export a Hugging Face causal LM to the board's ONNX draft format, quantise, and self-check.

Route (DESIGN.md section 7, route 1): a small wrapper turns flat past-KV tensors into a
transformers `DynamicCache` and is exported with `torch.onnx.export` (dynamo, opset 18). It
needs no package beyond torch's own exporter, keeps `position_ids` as an input (after a
rollback, positions continue from the cut, which the board controls exactly), and works for
any architecture transformers' cache supports. Quantisation uses onnxruntime's own tools:
`quantize_dynamic` (int8 MatMul weights) and `MatMulNBitsQuantizer` (int4, block 32, the
embedding too as GatherBlockQuantized).

The export checks itself through the board's own runner (device.runner.DraftRunner) against
torch on the same tokens, for a prefill and a decode step with past KV. A float export whose
logits are off by more than the tolerance is refused; quantised exports report their drift
(their q is what the board samples from, so drift moves acceptance, never correctness).
Everything is written into a temporary directory beside the destination and renamed at the
end: a failed export leaves nothing half-written behind.

Runs on the server or a workstation (torch, transformers), never on a board.
"""

import importlib.metadata
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict

from device.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    QUANTS,
    TOKENIZER_FILE,
    DraftManifest,
    Quant,
    ValidationRecord,
    check_files,
    draft_store_dir,
    file_record,
    graph_io,
    read_manifest,
    sha256_files,
    write_manifest,
)
from fleet.logging import get_logger
from fleet.models.catalog import ModelStoreError

OPSET = 18
DEFAULT_TOLERANCE = 1e-3  # largest |logit difference| / largest |logit|, float export only
INT4_BLOCK = 32
# The prompt the self-check runs: code, like most drafting requests the product expects.
VALIDATION_PROMPT = "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
_TRACE_PAST, _TRACE_SEQ = 3, 2  # sizes 0 and 1 would specialise the dynamic dimensions

Progress = Callable[[str, int, int], None]
"""progress(stage description, stages done, stages in all)."""


class ExportError(RuntimeError):
    """The export could not be done or did not pass its own check; nothing was written."""


class ExportReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    out: Path
    manifest: DraftManifest
    float_validation: ValidationRecord
    seconds: float
    size_bytes: int


def export_draft(
    source: Path | str,
    out: Path | None = None,
    quant: Quant = "none",
    progress: Progress | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    float_export: Path | None = None,
) -> ExportReport:
    """Export SOURCE (checkpoint directory or catalog name) to OUT (default: the draft store).

    `float_export`: an earlier checked float export of the same checkpoint to quantise, which
    saves exporting again (minutes and several GB of memory for a 0.5B model).
    """
    if quant not in QUANTS:
        raise ExportError(f"unknown quantisation {quant!r}; use one of {', '.join(QUANTS)}")
    if float_export is not None and quant == "none":
        raise ExportError("a float export is only reused for a quantised export (int8, int4)")
    started = time.perf_counter()
    name, checkpoint = resolve_source(source)
    out = Path(out) if out is not None else draft_store_dir(name, quant)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (overwrite it with --force)")
    stages = _Stages(
        ["load checkpoint"]
        + (
            ["export to ONNX", "check float export against torch"]
            if float_export is None
            else [f"reuse float export {float_export}"]
        )
        + ([f"quantise {quant}", f"check {quant} export against torch"] if quant != "none" else [])
        + ["write manifest"],
        progress,
        get_logger(component="export", source=name, quant=quant),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as tmp:
        work = Path(tmp)
        stages.advance()
        model = _load_torch_model(checkpoint)
        reference = TorchReference(model, _validation_ids(checkpoint, model.config.vocab_size))
        base = _base_manifest(name, checkpoint, model)
        if float_export is None:
            stages.advance()
            float_dir = work / "none"
            _export_onnx(model, float_dir / MODEL_FILE)
            del model  # reference logits are computed: free the weights for ORT and quantising
            _finish_dir(float_dir, checkpoint, base.model_copy(update={"quant": "none"}))
            stages.advance()
            float_validation = reference.compare(float_dir)
        else:
            del model
            stages.advance()
            float_dir = Path(float_export)
            float_validation = _checked_float_export(float_dir, base)
        if float_validation.relative_diff > tolerance:
            raise ExportError(
                f"ONNX export of {checkpoint} differs from torch by "
                f"{float_validation.max_abs_diff:.3g} "
                f"(relative {float_validation.relative_diff:.3g} > tolerance {tolerance:g}); "
                "nothing was written"
            )
        final_dir, validation = float_dir, float_validation
        if quant != "none":
            stages.advance()
            final_dir = work / quant
            _quantise(float_dir / MODEL_FILE, final_dir / MODEL_FILE, quant)
            if float_dir.is_relative_to(work):
                shutil.rmtree(float_dir)  # a 0.5B float export is 2.5 GB: free it before checking
            _finish_dir(final_dir, checkpoint, base.model_copy(update={"quant": quant}))
            stages.advance()
            validation = reference.compare(final_dir)
        stages.advance()
        manifest = _finish_dir(
            final_dir,
            checkpoint,
            base.model_copy(update={"quant": quant, "validation": validation}),
        )
        if out.exists():
            shutil.rmtree(out)
        final_dir.rename(out)
    stages.finish()
    size = sum(record.size for record in manifest.files.values())
    report = ExportReport(
        out=out,
        manifest=manifest,
        float_validation=float_validation,
        seconds=time.perf_counter() - started,
        size_bytes=size,
    )
    stages.log.info(
        "draft exported",
        out=str(out),
        size_mb=round(size / 1e6, 1),
        max_abs_diff=validation.max_abs_diff,
        seconds=round(report.seconds, 1),
    )
    return report


class _Stages:
    """The export's stages, announced to the log and to the progress callback in turn."""

    def __init__(self, names: list[str], progress: Progress | None, log) -> None:
        self.names, self.progress, self.log = names, progress, log
        self.done = -1

    def advance(self) -> None:
        self.done += 1
        self.log.info("export stage", stage=self.names[self.done])
        if self.progress is not None:
            self.progress(self.names[self.done], self.done, len(self.names))

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", len(self.names), len(self.names))


def _checked_float_export(model_dir: Path, base: DraftManifest) -> ValidationRecord:
    """The recorded check of a reusable float export; refuses one of another checkpoint."""
    manifest = read_manifest(model_dir)
    check_files(model_dir, manifest)
    if manifest.quant != "none" or manifest.validation is None:
        raise ExportError(f"{model_dir} is not a checked float export")
    if manifest.source_sha256 != base.source_sha256:
        raise ExportError(f"{model_dir} was exported from other weights than {base.name}")
    return manifest.validation


def resolve_source(source: Path | str) -> tuple[str, Path]:
    """(name, checkpoint dir) for a checkpoint directory or a catalog name in the model store."""
    path = Path(source).expanduser()
    if path.is_dir():
        name = path.resolve().name
    else:
        try:
            from fleet.models.store import resolve_model
        except ImportError as exc:
            raise ExportError(
                f"{source} is not a checkpoint directory (and no model store)"
            ) from exc
        try:
            path = resolve_model(str(source))
        except ModelStoreError as exc:
            raise ExportError(f"{source}: {exc}") from exc
        name = str(source)
    for required in ("config.json", TOKENIZER_FILE):
        if not (path / required).is_file():
            raise ExportError(f"checkpoint {path} has no {required}")
    if not _weight_files(path):
        raise ExportError(f"checkpoint {path} has no *.safetensors weights")
    return name, path


def _weight_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def _load_torch_model(checkpoint: Path):  # -> transformers.PreTrainedModel
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def _dims(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def _base_manifest(name: str, checkpoint: Path, model) -> DraftManifest:
    """Everything but the files, quantisation and validation, which differ per output."""
    config = model.config
    layers, kv_heads, head_dim = _dims(config)
    eos = set(_as_ids(config.eos_token_id))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        eos |= set(_as_ids(generation.eos_token_id))
    if not eos:
        raise ExportError(f"checkpoint {checkpoint} declares no eos_token_id")
    inputs, outputs = graph_io(layers)
    return DraftManifest.model_construct(
        name=name,
        architecture=(config.architectures or [type(model).__name__])[0],
        source_sha256=sha256_files(_weight_files(checkpoint)),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=config.max_position_embeddings,
        quant="none",
        eos_token_ids=tuple(sorted(eos)),
        input_names=inputs,
        output_names=outputs,
        files={},
        tools={
            pkg: importlib.metadata.version(pkg)
            for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
        },
        validation=None,
    )


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _finish_dir(model_dir: Path, checkpoint: Path, manifest: DraftManifest) -> DraftManifest:
    """Copy the tokenizer files beside the model and write a validated manifest of them all."""
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, model_dir / name)
    model_dir.chmod(0o755)  # temporary directories are private; the export is for provisioning
    for path in model_dir.iterdir():
        path.chmod(0o644)  # onnxruntime's quantiser writes its external data as 0600
    files = {
        path.name: file_record(path)
        for path in sorted(model_dir.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    finished = DraftManifest.model_validate({**manifest.model_dump(), "files": files})
    write_manifest(model_dir, finished)
    return finished


def _export_onnx(model, path: Path) -> None:
    import torch

    layers, kv_heads, head_dim = _dims(model.config)
    ids = torch.zeros((1, _TRACE_SEQ), dtype=torch.int64)
    mask = torch.ones((1, _TRACE_PAST + _TRACE_SEQ), dtype=torch.int64)
    positions = torch.arange(_TRACE_PAST, _TRACE_PAST + _TRACE_SEQ).unsqueeze(0)
    past = tuple(torch.zeros(1, kv_heads, _TRACE_PAST, head_dim) for _ in range(2 * layers))
    # The mask's length (past + seq) needs a dimension of its own (DESIGN.md section 7).
    seq = torch.export.Dim("seq", min=1, max=1 << 17)
    past_len = torch.export.Dim("past", min=0, max=1 << 17)
    total = torch.export.Dim("total", min=1, max=1 << 18)
    dynamic = ({1: seq}, {1: total}, {1: seq}, tuple({2: past_len} for _ in past))
    input_names, output_names = graph_io(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about our model
        program = torch.onnx.export(
            _cached_decoder(model).eval(),
            (ids, mask, positions, *past),
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic,
            input_names=list(input_names),
            output_names=list(output_names),
            external_data=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)


def _cached_decoder(model):  # -> torch.nn.Module
    import torch
    from transformers import DynamicCache

    class CachedDecoder(torch.nn.Module):
        """forward(ids, mask, positions, *past) -> (last logits, *present): flat tensors only,
        as ONNX needs, with the model's own cache class in between."""

        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            present = [
                t for layer in output.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (output.logits[:, -1, :], *present)

    return CachedDecoder(model)


def _quantise(source: Path, dest: Path, quant: Quant) -> None:
    """int8: dynamic (per-tensor activation) MatMul weights; the embedding stays float because
    a quantised Gather there would dequantise the whole table on every step. int4: block-wise
    MatMulNBits plus GatherBlockQuantized for the embedding (a real int4 kernel)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("onnxruntime.quantization")  # logs one INFO line per node
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        if quant == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                source,
                dest,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                use_external_data_format=True,
            )
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(
                str(source),
                bits=4,
                block_size=INT4_BLOCK,
                is_symmetric=True,
                accuracy_level=4,  # int8 activations inside MatMulNBits: the fast CPU path
                op_types_to_quantize=("MatMul", "Gather"),
                quant_axes=(("MatMul", 0), ("Gather", 1)),
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(dest), use_external_data_format=True)
    finally:
        quiet.setLevel(level)


def _validation_ids(checkpoint: Path, vocab_size: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(checkpoint / TOKENIZER_FILE)).encode(VALIDATION_PROMPT).ids
    if len(ids) < 2 or max(ids) >= vocab_size:
        raise ExportError(f"tokenizer of {checkpoint} does not fit the model (vocab {vocab_size})")
    return ids


class TorchReference:
    """Torch's logits for the validation prompt and one decode step, computed once and
    compared with each export (float and quantised) through the board's own runner."""

    def __init__(self, model, ids: list[int]) -> None:
        import torch

        with torch.no_grad():
            prefill = model(torch.tensor([ids])).logits[0, -1].numpy()
            self.next_token = int(prefill.argmax())
            decode = model(torch.tensor([[*ids, self.next_token]])).logits[0, -1].numpy()
        self.ids, self.prefill, self.decode = ids, prefill, decode

    def compare(self, model_dir: Path) -> ValidationRecord:
        from device.runner import DraftRunner

        runner = DraftRunner(model_dir)
        prefill = runner.prefill(self.ids)
        decode = runner.step(self.next_token)
        return ValidationRecord(
            max_abs_diff_prefill=float(np.abs(prefill - self.prefill).max()),
            max_abs_diff_decode=float(np.abs(decode - self.decode).max()),
            logit_scale=float(max(np.abs(self.prefill).max(), np.abs(self.decode).max())),
            greedy_agrees=bool(
                prefill.argmax() == self.prefill.argmax()
                and decode.argmax() == self.decode.argmax()
            ),
        )


def export_draft_command(
    source: Annotated[
        str, typer.Argument(help="catalog name or Hugging Face checkpoint directory")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="output directory (default: FLEET_HOME/drafts/NAME-QUANT)"),
    ] = None,
    quant: Annotated[str, typer.Option("--quant", help="none | int8 | int4")] = "none",
    tolerance: Annotated[
        float, typer.Option(help="largest relative logit difference accepted for 'none'")
    ] = DEFAULT_TOLERANCE,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing output directory")
    ] = False,
    from_float: Annotated[
        Path | None,
        typer.Option("--from-float", help="quantise this float export of SOURCE (saves time)"),
    ] = None,
) -> None:
    """Export a draft model to ONNX with KV cache for the boards, quantise, and check it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quant not in QUANTS:
        raise typer.BadParameter(f"use one of {', '.join(QUANTS)}", param_hint="--quant")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False
    ) as bar:
        task = bar.add_task("export", total=None)

        def show(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        try:
            report = export_draft(
                source,
                out,
                quant,
                progress=show,
                tolerance=tolerance,
                overwrite=force,
                float_export=from_float,
            )
        except (ExportError, ValueError, FileNotFoundError) as exc:
            typer.echo(f"export-draft: {exc}", err=True)
            raise typer.Exit(1) from exc
    validation = report.manifest.validation
    typer.echo(
        f"exported {report.manifest.name} ({quant}) to {report.out}: "
        f"{report.size_bytes / 1e6:.1f} MB, "
        f"max |logit diff| vs torch {validation.max_abs_diff:.3g} "
        f"(float export {report.float_validation.max_abs_diff:.3g}), {report.seconds:.0f} s"
    )
