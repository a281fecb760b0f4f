"""Session fixtures for the draft-model tests: the tiny draft checkpoint and its ONNX exports.

Test modules load this as a plugin (`pytest_plugins = ["tests.draft_fixtures"]`, not an
import, so that pytest rewrites its asserts and each fixture runs once per test run).
"""

from collections.abc import Callable
from pathlib import Path

import pytest

from device.manifest import MANIFEST_FILE, Quant
from fleet.models.export import export_draft
from fleet.models.tiny import write_tiny_models


@pytest.fixture(scope="session")
def tiny_draft_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target checkpoint, draft checkpoint) of the seeded tiny Qwen2 pair."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny-draft-pair"))


@pytest.fixture(scope="session")
def tiny_draft_exports(
    tmp_path_factory: pytest.TempPathFactory, tiny_draft_pair: tuple[Path, Path]
) -> Callable[[Quant], Path]:
    """exported(quant) -> the tiny draft's export with that quantisation, made on first use."""
    root = tmp_path_factory.mktemp("tiny-draft-exports")

    def exported(quant: Quant) -> Path:
        out = root / quant
        if not (out / MANIFEST_FILE).is_file():
            export_draft(tiny_draft_pair[1], out, quant)
        return out

    return exported


@pytest.fixture(scope="session")
def tiny_draft_onnx(tiny_draft_exports: Callable[[Quant], Path]) -> Path:
    """The tiny draft exported in float32 (quant none)."""
    return tiny_draft_exports("none")
