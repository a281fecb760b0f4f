"""The catalog: which models the store can pull, where their pieces live and what they must hash to.

The pieces come from anonymous uploads on the package index, so the catalog pins everything the
store checks before trusting them: the exact package versions, the path of the piece inside each
wheel, and the sha256 of the assembled GGUF file. The entries live in `catalog.toml` next to this
module so that adding a model is a data change.
"""

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CATALOG_FILE = Path(__file__).with_name("catalog.toml")

Role = Literal["draft", "target"]


class ModelStoreError(Exception):
    """A model-store operation failed for a reason the user can act on; the message says which."""


class UnknownModelError(ModelStoreError):
    """A model name that is not in the catalog."""


class PartSource(BaseModel):
    """One raw piece of a model file, carried by one wheel on the package index."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    package: str = Field(min_length=1, description="distribution name on the package index")
    version: str = Field(min_length=1)
    member: str = Field(min_length=1, description="path of the raw piece inside the wheel")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class CatalogEntry(BaseModel):
    """A model the store knows: its role in speculative decoding and how to rebuild its GGUF."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    role: Role
    family: str = Field(description="transformers model_type the converted checkpoint must have")
    description: str = ""
    gguf_file: str = Field(pattern=r"^[^/\\]+\.gguf$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the assembled GGUF file")
    parts: tuple[PartSource, ...] = Field(min_length=1, description="in assembly order")


class _PartsTemplate(BaseModel):
    """The TOML shorthand for n numbered packages: `{n}` in the strings is the part number."""

    model_config = ConfigDict(extra="forbid")

    package: str
    version: str
    count: int = Field(ge=1, le=1000)
    member: str

    def expand(self) -> list[PartSource]:
        return [
            PartSource(
                package=self.package.format(n=n),
                version=self.version,
                member=self.member.format(n=n),
            )
            for n in range(1, self.count + 1)
        ]


def load_catalog(path: Path = CATALOG_FILE) -> dict[str, CatalogEntry]:
    """Entries of a catalog TOML file by name; a malformed file is an error naming the file."""
    try:
        raw = tomllib.loads(path.read_text())
        entries = []
        for item in raw.get("models", []):
            item = dict(item)
            if isinstance(item.get("parts"), dict):
                item["parts"] = _PartsTemplate.model_validate(item["parts"]).expand()
            entries.append(CatalogEntry.model_validate(item))
    except (OSError, tomllib.TOMLDecodeError, ValidationError, KeyError, ValueError) as exc:
        raise ModelStoreError(f"model catalog {path} is invalid: {exc}") from exc
    return catalog_of(entries)


def catalog_of(entries: Iterable[CatalogEntry]) -> dict[str, CatalogEntry]:
    """Index entries by name, refusing duplicates (a second would silently shadow the first)."""
    catalog: dict[str, CatalogEntry] = {}
    for entry in entries:
        if entry.name in catalog:
            raise ModelStoreError(f"model catalog names {entry.name!r} twice")
        catalog[entry.name] = entry
    return catalog


def lookup(catalog: Mapping[str, CatalogEntry], name: str) -> CatalogEntry:
    """The entry called `name`, or an error listing the names that exist."""
    try:
        return catalog[name]
    except KeyError:
        known = ", ".join(sorted(catalog)) or "none"
        raise UnknownModelError(f"unknown model {name!r}; the catalog knows: {known}") from None
