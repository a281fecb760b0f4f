"""Options and settings handling shared by every `fleet` command that talks to the broker."""

from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer
from pydantic import SecretStr, ValidationError

from fleet.config import BrokerSettings, Settings, load_settings
from fleet.logging import configure_logging

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML configuration file (also FLEET_CONFIG).")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.")]
UserOpt = Annotated[str | None, typer.Option("--username", help="Broker username (the device or server id for those roles).")]
PasswordOpt = Annotated[str | None, typer.Option("--password", envvar="FLEET_BROKER_PASSWORD", help="Broker password.")]
CaOpt = Annotated[Path | None, typer.Option("--ca-file", help="CA certificate for a TLS broker.")]
CredsOpt = Annotated[Path | None, typer.Option("--credentials", help="Credentials file written by `fleet broker`; with --username picks that identity.")]
LevelOpt = Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")]
FormatOpt = Annotated[str | None, typer.Option("--log-format", help="console (humans) or json (services).")]
MetricsPortOpt = Annotated[int | None, typer.Option("--metrics-port", min=1, max=65535, help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics.")]


def settings_from_cli(
    config: Path | None,
    broker: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    credentials: Path | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    default_format: str = "console",
    **sections: dict[str, object],
) -> Settings:
    """Settings from file and environment, then the command line on top; logging configured."""
    overrides: dict[str, object] = {k: v for k, v in sections.items() if v}
    try:
        settings = load_settings(config, **overrides)
        settings = settings.model_copy(
            update={"broker": broker_settings_from_cli(settings.broker, broker, username, password, ca_file, credentials)}
        )
        chosen = "log_format" in settings.model_fields_set
        fmt = log_format or (settings.log_format if chosen else default_format)
        configure_logging(log_level or settings.log_level, fmt)  # type: ignore[arg-type]
    except (ValueError, ValidationError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    except KeyError as exc:  # an identity the credentials file does not hold
        raise typer.BadParameter(str(exc.args[0])) from exc
    return settings


def broker_settings_from_cli(
    base: BrokerSettings,
    url: str | None,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    credentials: Path | None,
) -> BrokerSettings:
    update: dict[str, object] = {}
    if credentials is not None:
        from broker.config import BrokerCredentials

        creds = BrokerCredentials.load(credentials)
        name = username or base.username
        if name is None:
            raise ValueError("--credentials needs --username to pick an identity")
        update.update(creds.settings_for(name).model_dump(exclude_unset=False))
    if url is not None:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError(f"--broker {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        update.update(host=parsed.hostname, tls=parsed.scheme == "mqtts", port=parsed.port or (8883 if parsed.scheme == "mqtts" else 1883))
    if username is not None:
        update["username"] = username
    if password is not None:
        update["password"] = SecretStr(password)
    if ca_file is not None:
        update.update(ca_file=ca_file, tls=True)
    return BrokerSettings.model_validate({**base.model_dump(), **update})

