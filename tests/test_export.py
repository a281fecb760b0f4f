"""Exporting the tiny draft: manifest, self-check against torch, refusal, quantisation, CLI."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from device.drafter import Drafter
from device.manifest import read_manifest
from device.runner import DraftRunner
from fleet.models.export import (
    ExportError,
    TorchReference,
    _load_torch_model,
    _validation_ids,
    export_draft,
    export_draft_command,
)
from fleet.sampling import SamplingParams

pytest_plugins = ["tests.draft_fixtures"]


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))


def test_manifest_describes_the_export(tiny_draft_onnx, tiny_draft_pair):
    draft = tiny_draft_pair[1]
    config = json.loads((draft / "config.json").read_text())
    manifest = read_manifest(tiny_draft_onnx)
    assert (manifest.vocab_size, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim) == (
        config["vocab_size"],
        config["num_hidden_layers"],
        config["num_key_value_heads"],
        config["hidden_size"] // config["num_attention_heads"],
    )
    assert manifest.quant == "none" and manifest.dtype == "float32"
    assert manifest.eos_token_ids == (config["eos_token_id"],)
    assert manifest.max_context == config["max_position_embeddings"]
    assert (
        manifest.source_sha256
        == hashlib.sha256((draft / "model.safetensors").read_bytes()).hexdigest()
    )
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest.files
    )
    for name, record in manifest.files.items():
        content = (tiny_draft_onnx / name).read_bytes()
        assert record.size == len(content)
        assert record.sha256 == hashlib.sha256(content).hexdigest()
    assert (tiny_draft_onnx / "tokenizer.json").read_bytes() == (
        draft / "tokenizer.json"
    ).read_bytes()
    assert set(manifest.tools) == {"torch", "transformers", "onnx", "onnxscript", "onnxruntime"}
    validation = manifest.validation
    assert validation is not None and validation.greedy_agrees
    assert 0 < validation.relative_diff < 1e-5


def test_self_check_notices_an_export_of_another_model(tiny_draft_onnx, tiny_draft_pair):
    """The check compares real logits: the draft's export against the target's torch model."""
    target = _load_torch_model(tiny_draft_pair[0])
    reference = TorchReference(target, _validation_ids(tiny_draft_pair[0], 384))
    mismatch = reference.compare(tiny_draft_onnx).relative_diff
    draft = _load_torch_model(tiny_draft_pair[1])
    match = (
        TorchReference(draft, _validation_ids(tiny_draft_pair[1], 384))
        .compare(tiny_draft_onnx)
        .relative_diff
    )
    assert match < 1e-5
    assert mismatch > 1e-2


def test_refusal_leaves_nothing_behind(tiny_draft_pair, tmp_path):
    out = tmp_path / "exports" / "draft-none"
    with pytest.raises(
        ExportError, match=r"differs from torch by .* > tolerance 0\); nothing was written"
    ):
        export_draft(tiny_draft_pair[1], out, "none", tolerance=0.0)
    assert list((tmp_path / "exports").iterdir()) == []


def test_checkpoint_without_tokenizer_is_refused(tiny_draft_pair, tmp_path):
    checkpoint = shutil.copytree(tiny_draft_pair[1], tmp_path / "ckpt")
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"ckpt has no tokenizer\.json"):
        export_draft(checkpoint, tmp_path / "out", "none")
    with pytest.raises(ExportError, match="unknown quantisation"):
        export_draft(tiny_draft_pair[1], tmp_path / "out", "int3")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="not-a-model-anywhere"):
        export_draft("not-a-model-anywhere", tmp_path / "out", "none")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_exports_load_draft_and_shrink(quant, tiny_draft_exports, tiny_draft_onnx):
    model_dir = tiny_draft_exports(quant)
    manifest = read_manifest(model_dir)
    assert manifest.quant == quant
    assert manifest.validation is not None and manifest.validation.max_abs_diff > 0
    assert model_bytes(model_dir) < model_bytes(tiny_draft_onnx)
    runner = DraftRunner(model_dir)
    drafter = Drafter(runner, k_max=6, threshold=0.0, top_k=8)
    drafter.start(runner.tokenizer.encode("def add(a, b):\n    return").ids)
    for params in (SamplingParams(), SamplingParams(temperature=0.7)):
        batch = drafter.draft(None, params, np.random.default_rng(0))
        assert len(batch.tokens) == 6
        assert all(0 <= t < manifest.vocab_size for t in batch.tokens)
        drafter.commit(3, batch.tokens[3])


def test_cli_command_exports_and_replaces_only_when_forced(tiny_draft_pair, tmp_path):
    app = typer.Typer()
    app.command()(export_draft_command)
    source = str(tiny_draft_pair[1])
    out = tmp_path / "cli-export"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    refused = CliRunner().invoke(app, [source, "--out", str(out), "--quant", "int8"])
    assert refused.exit_code == 1 and "already exists" in refused.output
    assert (out / "stale.txt").is_file()
    forced = CliRunner().invoke(app, [source, "--out", str(out), "--quant", "int8", "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"exported draft (int8) to {out}" in forced.output
    assert read_manifest(out).quant == "int8" and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-export"]  # no partial directory
    bad = CliRunner().invoke(app, [source, "--out", str(tmp_path / "x"), "--quant", "fp8"])
    assert bad.exit_code == 2 and "int4" in bad.output


REAL_DRAFT = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def real_float_export(tmp_path_factory) -> Path:
    """Needs `fleet models pull qwen2.5-coder-0.5b`; exports 2.5 GB and peaks near 6 GB RSS."""
    from fleet.models.export import resolve_source

    try:
        resolve_source(REAL_DRAFT)
    except ExportError as exc:
        pytest.skip(f"{REAL_DRAFT} is not in the model store: {exc}")
    report = export_draft(REAL_DRAFT, tmp_path_factory.mktemp("real") / "none", "none")
    assert report.float_validation.relative_diff < 1e-4
    assert report.float_validation.greedy_agrees
    return report.out


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_real_draft_exports_and_drafts_code(quant, real_float_export, tmp_path):
    model_dir = real_float_export
    if quant != "none":
        model_dir = export_draft(
            REAL_DRAFT, tmp_path / quant, quant, float_export=real_float_export
        ).out
    runner = DraftRunner(model_dir)
    prompt = runner.tokenizer.encode("def is_prime(n: int) -> bool:\n").ids
    drafter = Drafter(runner, k_max=8, threshold=0.0, top_k=32)
    drafter.start(prompt)
    generated: list[int] = []
    while len(generated) < 48:
        batch = drafter.draft(None, SamplingParams(), np.random.default_rng(0))
        generated += batch.tokens
        drafter.commit(len(batch.tokens) - 1, batch.tokens[-1])  # all accepted, in effect
    text = runner.tokenizer.decode(generated)
    assert "return" in text and "n" in text, text


def test_quantises_a_reused_float_export(tiny_draft_pair, tiny_draft_onnx, tmp_path):
    report = export_draft(
        tiny_draft_pair[1], tmp_path / "int4", "int4", float_export=tiny_draft_onnx
    )
    assert report.manifest.quant == "int4"
    assert report.float_validation == read_manifest(tiny_draft_onnx).validation
    assert DraftRunner(tiny_draft_onnx).manifest.quant == "none"  # the float export is untouched


def test_refuses_a_float_export_of_other_weights(tiny_draft_pair, tiny_draft_onnx, tmp_path):
    foreign = shutil.copytree(tiny_draft_onnx, tmp_path / "foreign")
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["source_sha256"] = hashlib.sha256(b"other weights").hexdigest()
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="exported from other weights"):
        export_draft(tiny_draft_pair[1], tmp_path / "int8", "int8", float_export=foreign)
    with pytest.raises(ExportError, match="only reused for a quantised export"):
        export_draft(tiny_draft_pair[1], tmp_path / "none", "none", float_export=tiny_draft_onnx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]
