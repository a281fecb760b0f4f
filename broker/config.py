"""What a broker is told: identities, listeners and files, rendered from the shared templates.

The templates in `broker/templates/` are also rendered by the Ansible `mosquitto` role, so
everything they need is handed over as plain `mosquitto_*` variables (`template_vars`); this
module only decides those values and writes the files a local broker needs.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal, Self

import jinja2
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from fleet.config import BrokerSettings

Role = Literal["device", "server", "app", "observer", "bridge"]

# Pattern ACLs substitute the username into topics; mosquitto itself refuses usernames with
# `+`, `#` or `/` there, and spaces or colons would break the ACL and password file formats.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TEMPLATES = Path(__file__).parent / "templates"

CONFIG_FILE = "mosquitto.conf"
ACL_FILE = "acl"
PASSWORD_FILE = "passwords"
CREDENTIALS_FILE = "credentials.json"


class BrokerIdentity(BaseModel):
    """One MQTT username: a board (its device id), a server, an IoT app or an observer."""

    name: str
    role: Role
    password: SecretStr

    @field_validator("name")
    @classmethod
    def _name_is_topic_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"identity name {value!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "and start with a letter or digit (it becomes a topic level)"
            )
        return value

    @field_validator("password")
    @classmethod
    def _password_fits_the_file(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret or any(c in secret for c in ":\r\n"):
            raise ValueError(
                "a broker password must be non-empty and contain no ':' or line breaks"
            )
        return value


class TlsMaterial(BaseModel):
    """PEM files of a TLS listener."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


class BridgeTopic(BaseModel):
    """One topic filter a Mosquitto bridge carries. The direction is seen from the broker that
    opens the bridge: `out` copies its messages to the other broker, `in` the other's to it.
    On the accepting broker, the bridge's identity may write the `out` filters and read the
    `in` ones, nothing else."""

    pattern: str
    direction: Literal["in", "out"]
    qos: int = Field(1, ge=0, le=2)


class BridgeSpec(BaseModel):
    """A bridge this broker opens to another broker (a Mosquitto `connection` section),
    logging in there as the identity `name` of role "bridge"."""

    name: str = Field(pattern=_NAME.pattern)  # also a client id and a topic level
    host: str
    port: int = Field(ge=1, le=65535)
    password: SecretStr
    ca_file: Path | None = None  # the other broker's CA: the link uses TLS when given
    topics: list[BridgeTopic]


class BrokerSpec(BaseModel):
    """One local broker: a single listener, who may connect, and where state lives."""

    port: int = Field(ge=1, le=65535)
    bind_address: str = "127.0.0.1"
    tls: TlsMaterial | None = None
    identities: list[BrokerIdentity] = []
    topic_root: str = "sled/v1"
    anonymous: bool = False
    persistence_dir: Path | None = None
    max_packet_size: int = Field(1_048_576, ge=1024)
    # Mosquitto lets any authenticated client take over another's connection by connecting
    # with the same client id (a denial of service; docs/security.md). With this on, the
    # username is the client id, at the price of one connection per identity.
    username_as_client_id: bool = False
    # Bridges this broker opens, and what each accepted bridge identity (role "bridge") may
    # carry here (broker/bridge.py builds both for a multi-site fleet).
    bridges: list[BridgeSpec] = []
    bridge_topics: dict[str, list[BridgeTopic]] = {}
    # Started as root, mosquitto drops to the `mosquitto` user and can then no longer read
    # files in a private directory (DESIGN.md section 7); staying root avoids that.
    run_as_root: bool = Field(default_factory=lambda: os.geteuid() == 0)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        names = [identity.name for identity in self.identities]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"identity names must be unique across roles; repeated: {duplicates}")
        if self.anonymous and self.identities:
            raise ValueError("anonymous access and a password file exclude each other")
        if not self.anonymous and not self.identities:
            raise ValueError("with anonymous access off, at least one identity is needed")
        if sorted(self.bridge_topics) != sorted(self.names("bridge")):
            raise ValueError("every bridge identity needs its bridge_topics, and only those")
        return self

    def names(self, role: Role) -> list[str]:
        return [identity.name for identity in self.identities if identity.role == role]


def template_vars(spec: BrokerSpec, directory: Path) -> dict[str, Any]:
    """The `mosquitto_*` variables both templates take, for a broker whose files live in
    `directory` (the Ansible role builds the same dictionary from its inventory)."""
    listener: dict[str, Any] = {"port": spec.port, "bind_address": spec.bind_address, "tls": False}
    if spec.tls is not None:
        listener |= {
            "tls": True,
            "cafile": str(spec.tls.ca_file),
            "certfile": str(spec.tls.cert_file),
            "keyfile": str(spec.tls.key_file),
            "require_certificate": spec.tls.require_certificate,
        }
    secured = bool(spec.identities)
    return {
        "mosquitto_listeners": [listener],
        "mosquitto_allow_anonymous": spec.anonymous,
        "mosquitto_use_username_as_clientid": spec.username_as_client_id,
        "mosquitto_password_file": str(directory / PASSWORD_FILE) if secured else "",
        "mosquitto_acl_file": str(directory / ACL_FILE) if secured else "",
        "mosquitto_persistence_dir": str(spec.persistence_dir) if spec.persistence_dir else "",
        "mosquitto_log_dest": "stderr",
        "mosquitto_run_as_root": spec.run_as_root,
        "mosquitto_max_packet_size": spec.max_packet_size,
        "mosquitto_topic_root": spec.topic_root,
        "mosquitto_servers": spec.names("server"),
        "mosquitto_apps": spec.names("app"),
        "mosquitto_observers": spec.names("observer"),
        "mosquitto_bridge_users": [
            {"name": name, "topics": [topic.model_dump() for topic in topics]}
            for name, topics in spec.bridge_topics.items()
        ],
        "mosquitto_bridges": [
            {
                "name": bridge.name,
                "address": f"{bridge.host}:{bridge.port}",
                "remote_username": bridge.name,
                "remote_password": bridge.password.get_secret_value(),
                "cafile": str(bridge.ca_file) if bridge.ca_file else "",
                "topics": [topic.model_dump() for topic in bridge.topics],
            }
            for bridge in spec.bridges
        ],
    }


def render_template(name: str, variables: dict[str, Any]) -> str:
    """Render one shared template with Ansible's whitespace defaults (trim_blocks)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template(name).render(**variables)


def render(spec: BrokerSpec, directory: Path) -> Path:
    """Write mosquitto.conf (and, with identities, the ACL and hashed password file) into
    `directory`; returns the config file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    variables = template_vars(spec, directory)
    if spec.persistence_dir is not None:
        spec.persistence_dir.mkdir(parents=True, exist_ok=True)
    if spec.identities:
        (directory / ACL_FILE).write_text(render_template("acl.j2", variables))
        write_password_file(directory / PASSWORD_FILE, spec.identities)
    config = directory / CONFIG_FILE
    config.unlink(missing_ok=True)
    config.touch(mode=0o600 if spec.bridges else 0o644)  # a bridge's password is in it
    config.write_text(render_template("mosquitto.conf.j2", variables))
    return config


def write_password_file(path: Path, identities: list[BrokerIdentity]) -> None:
    """Hash the passwords with mosquitto's own tool, so the broker reads exactly its format.

    The plain text exists only inside a 0600 file that `mosquitto_passwd -U` rewrites in place.
    """
    tool = find_tool("mosquitto_passwd")
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as plain:
        for identity in identities:
            plain.write(f"{identity.name}:{identity.password.get_secret_value()}\n")
    result = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"mosquitto_passwd failed on {path}: {result.stderr.strip() or result.stdout.strip()}"
        )


def find_tool(name: str) -> str:
    """A Mosquitto executable; /usr/sbin is searched too since it is not on every user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError(
            f"{name} not found; install the Debian packages `mosquitto` and `mosquitto-clients` "
            "(`make setup` does it)"
        )
    return found


class BrokerCredentials(BaseModel):
    """How every identity reaches one broker: what `fleet broker` leaves for other commands
    (and what the test fixtures hand to tests).

    Stored as JSON, mode 0600: `{"host", "port", "tls", "ca_file", "topic_root",
    "identities": {name: {"role", "password"}}}`.
    """

    host: str = "127.0.0.1"
    port: int
    tls: bool
    ca_file: Path | None = None
    topic_root: str = "sled/v1"
    identities: list[BrokerIdentity]

    def identity(self, name: str) -> BrokerIdentity:
        for identity in self.identities:
            if identity.name == name:
                return identity
        known = ", ".join(identity.name for identity in self.identities)
        raise KeyError(f"no broker identity {name!r}; known: {known}")

    def settings_for(self, name: str) -> BrokerSettings:
        identity = self.identity(name)
        return BrokerSettings(
            host=self.host,
            port=self.port,
            username=identity.name,
            password=identity.password,
            tls=self.tls,
            ca_file=self.ca_file,
        )

    def write(self, path: Path) -> None:
        document = {
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "topic_root": self.topic_root,
            "identities": {
                identity.name: {
                    "role": identity.role,
                    "password": identity.password.get_secret_value(),
                }
                for identity in self.identities
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "BrokerCredentials":
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(
                f"broker credentials file not found: {path} (run `fleet broker`)"
            ) from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"broker credentials file {path} is not valid JSON: {exc}") from exc
        identities = [
            {"name": name, **entry} for name, entry in document.get("identities", {}).items()
        ]
        return cls.model_validate({**document, "identities": identities})
