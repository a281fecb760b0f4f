"""Configuration: defaults < TOML file < FLEET_* environment < explicit overrides."""

from pathlib import Path

import pytest

from fleet.config import load_settings


def test_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('topic_root = "site-a/v1"\n[broker]\nport = 8883\nhost = "broker.lan"\n[server]\nk_max = 5\n')
    monkeypatch.setenv("FLEET_BROKER__PORT", "9000")
    settings = load_settings(config, server={"batch_window_ms": 7.5})
    assert settings.topic_root == "site-a/v1"
    assert settings.broker.host == "broker.lan"
    assert settings.broker.port == 9000  # the environment beats the file
    assert settings.server.k_max == 5 and settings.server.batch_window_ms == 7.5


def test_fleet_home_and_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[device]\ndevice_id = "rpi-7"\nthreshold = 0.5\n')
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    settings = load_settings()
    assert settings.device.device_id == "rpi-7" and settings.device.threshold == 0.5
    assert settings.home == tmp_path / "home"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[broker\nport = 1", "not valid TOML"),
        ("[broker]\nport = 70000\n", "less than or equal to 65535"),
        ("unknown_key = 1\n", "Extra inputs are not permitted"),
        ('topic_root = "sled/#"\n', "plain topic prefix"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_settings(config)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="configuration file not found: .*nope.toml"):
        load_settings(tmp_path / "nope.toml")
