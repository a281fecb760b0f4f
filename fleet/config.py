"""Configuration: one pydantic-settings model, read from `FLEET_*` environment variables and a
TOML file (`--config FILE` or `FLEET_CONFIG`).

Precedence, highest first: explicit arguments, environment, the TOML file, defaults. Nested
sections use `__` in the environment: `FLEET_BROKER__PORT=8883`.
"""

import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fleet.protocol.topics import check_id


def default_home() -> Path:
    """Model store and runtime state; `FLEET_HOME` overrides ~/.cache/fleet."""
    return Path(os.environ.get("FLEET_HOME", Path.home() / ".cache" / "fleet"))


class BrokerSettings(BaseModel):
    """How a client reaches the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)


# How the target's linears run (server/kernels.py); a name here so that the bench's
# configuration takes the same values without importing torch.
LinearKernel = Literal["auto", "default", "onednn"]
# oneDNN wherever it runs (a CPU float32 target), torch's kernels elsewhere: the server's, the
# bench's and every lossless reference's default alike.
DEFAULT_LINEAR_KERNEL: LinearKernel = "auto"


class ServerSettings(BaseModel):
    """Verification server knobs."""

    server_id: str = "server-1"
    target_model: str = "qwen2.5-coder-1.5b"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    # "auto" (the default) prepacks the target's linears for oneDNN where that runs (a CPU
    # float32 target), where MKL's sgemm prices a verification pass of 4 tokens like two of 3
    # (server/kernels.py); "default" keeps torch's kernels, "onednn" insists on oneDNN.
    linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL
    k_max: int = Field(8, ge=1, le=64)
    batch_window_ms: float = Field(5.0, ge=0, le=1000)
    idle_timeout_s: float = Field(60.0, gt=0)
    max_sessions: int = Field(64, ge=1)
    # Sessions one board may hold at once: a compromised board cannot starve the others.
    max_sessions_per_device: int = Field(16, ge=1)
    memory_budget_mb: float = Field(4096, gt=0)
    # How each verdict's next_k is chosen (docs/speculation.md): "adaptive" plans every
    # batch for the most committed tokens/s; "fixed" always suggests k_max (comparisons);
    # "off" suggests 0: the server decodes every token and boards draft nothing.
    speculation: Literal["adaptive", "fixed", "off"] = "adaptive"
    # Servers claim opens through `$share/<share_group>/...`. Mosquitto 2.0 does not check
    # SUBSCRIBE against the ACL, so a board that knows the name can join the group and swallow
    # the opens it is handed (it cannot read them): keep the name secret. The default is
    # generated per process, which is right for one server; every server of a multi-server
    # fleet must be given the same value (docs/security.md).
    share_group: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_hex(12)))

    @field_validator("share_group")
    @classmethod
    def _share_group_is_one_level(cls, value: SecretStr) -> SecretStr:
        check_id("share group", value.get_secret_value())
        return value


class DeviceSettings(BaseModel):
    """Board agent knobs."""

    device_id: str = "board-1"
    draft_model: str = "qwen2.5-coder-0.5b"
    hardware: str = "unknown"
    k_max: int = Field(8, ge=1, le=64)
    threshold: float = Field(0.3, ge=0, le=1)
    top_k: int = Field(32, ge=1, le=1024)
    # A crashed server is noticed through its last will; this catches lost messages, and must
    # exceed the slowest verification the server may take under load.
    verdict_timeout_s: float = Field(120.0, gt=0)
    max_concurrent_requests: int = Field(4, ge=1)
    # Benchmarks emulate a board slower than this machine: each drafted token takes this long
    # (the real ONNX draft still chooses the tokens). None drafts at this machine's speed.
    emulated_step_ms: float | None = Field(None, ge=0)
    # ONNX Runtime intra-op threads per draft step. None lets ONNX Runtime use every core (a
    # board drafts alone); the benchmark sets 1 so that emulated boards sharing the server's
    # machine do not oversubscribe its cores.
    draft_threads: int | None = Field(None, ge=1)
    # CPUs (Linux) the threads that serve requests, where drafting runs, are held to. A board
    # that also runs other apps can keep drafting off their cores; the benchmark gives emulated
    # boards CPUs apart from the server's (`fleet bench --board-cpus`). None: any CPU.
    draft_cpus: list[int] | None = Field(None, min_length=1)
    # No drafting at all: the server decodes every token (the server-alone baseline).
    server_decodes: bool = False
    # Keep drafting while a verdict is in flight, as if the whole draft were accepted; the
    # part the verdict confirms opens the next draft (docs/speculation.md).
    pipeline: bool = False

    @field_validator("draft_cpus")
    @classmethod
    def _cpus_exist(cls, cpus: list[int] | None) -> list[int] | None:
        last = (os.cpu_count() or 1) - 1
        if cpus is not None and not all(0 <= cpu <= last for cpu in cpus):
            raise ValueError(f"draft_cpus {cpus}: this machine has CPUs 0..{last}")
        return cpus


class Settings(BaseSettings):
    """Everything a `fleet` process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(default_factory=default_home)
    topic_root: str = "sled/v1"
    log_level: str = "info"
    log_format: Literal["console", "json"] = "console"
    broker: BrokerSettings = BrokerSettings()
    server: ServerSettings = ServerSettings()
    device: DeviceSettings = DeviceSettings()

    @field_validator("topic_root")
    @classmethod
    def _topic_root_is_plain(cls, value: str) -> str:
        if not value or any(c in value for c in "#+$") or value.startswith("/") or value.endswith("/"):
            raise ValueError("topic_root must be a plain topic prefix such as 'sled/v1'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < TOML file < environment < `overrides`.

    The TOML file is read here rather than as a settings source so that a missing or
    malformed file is a clear error naming the file.
    """
    path = config_file or (Path(os.environ["FLEET_CONFIG"]) if os.environ.get("FLEET_CONFIG") else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"configuration file {path} is not valid TOML: {exc}") from exc
    env_values = Settings().model_dump(exclude_unset=True)
    merged = _deep_merge(_deep_merge(file_values, env_values), overrides)
    return Settings.model_validate(merged)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
