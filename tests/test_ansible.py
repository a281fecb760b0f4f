"""Provisioning with Ansible, run for real on this machine.

The roles are applied with `-c local` into sandbox roots standing in for `/` (no systemd here,
so service management is switched off by its variable). The board and verifier runs build a
real virtualenv and pip-install a real wheel of this repository with the role's extra; the
dependencies are offered from the development venv through PYTHONPATH with the package index
switched off, so a run takes seconds and cannot download anything. The Mosquitto role's
output is started as a real broker and its ACL checked through PUBACK reason codes.
"""

import grp
import importlib.metadata
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.certs import broker_tls
from broker.config import find_tool
from broker.process import free_port
from fleet.config import load_settings
from fleet.models.store import ModelStore

pytest_plugins = ["tests.draft_fixtures"]

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = REPO / "ansible"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory/example/hosts.yml"
BIN = Path(sys.executable).parent
PLAYBOOK = shutil.which("ansible-playbook", path=str(BIN)) or shutil.which("ansible-playbook")
LINT = shutil.which("ansible-lint", path=str(BIN)) or shutil.which("ansible-lint")

pytestmark = pytest.mark.skipif(
    PLAYBOOK is None, reason="ansible-playbook is not installed (ansible-core is in the dev extra)"
)

RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)"
    r"\s+unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
USER = pwd.getpwuid(os.getuid()).pw_name
GROUP = grp.getgrgid(os.getgid()).gr_name
# Working-tree content that never goes into the wheel (copying it would only cost time).
NOT_PACKAGED = (".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "build", "dist", "out*",
                "ansible", "tests", "*.onnx", "*.onnx.data")
# Distributions a board must not need: if the device extra pulled one in, pip would look for
# it on the (disabled) index and the board run would fail.
SERVER_ONLY = ("torch", "transformers")


# --------------------------------------------------------------------------- running Ansible


@dataclass
class Run:
    returncode: int
    output: str

    def recap(self, host: str) -> dict[str, int]:
        for match in RECAP.finditer(self.output):
            if match["host"] == host:
                return {key: int(match[key]) for key in ("ok", "changed", "unreachable", "failed")}
        raise AssertionError(f"no PLAY RECAP line for {host}:\n{self.output[-3000:]}")


def command(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def ansible_env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(work / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(work / ".ansible" / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_site(inventory: dict[str, Any], work: Path, *extra: str) -> Run:
    """ansible-playbook site.yml against `inventory` (written as YAML-compatible JSON)."""
    inventory_file = work / "inventory.yml"
    inventory_file.write_text(json.dumps(inventory, indent=2))
    result = command([PLAYBOOK, "-i", str(inventory_file), str(ANSIBLE_DIR / "site.yml"), *extra],
                     cwd=work, env=ansible_env(work), timeout_s=300)
    return Run(result.returncode, result.stdout + result.stderr)


def local_host(**variables: Any) -> dict[str, Any]:
    """Host variables for a run on this machine, as root of nothing: no become, no ssh."""
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        **variables,
    }


def converge(inventory: dict[str, Any], work: Path, host: str) -> tuple[Run, Run]:
    """Two runs: the first must change things, the second nothing."""
    first = run_site(inventory, work)
    assert first.returncode == 0, first.output[-4000:]
    second = run_site(inventory, work)
    assert second.returncode == 0, second.output[-4000:]
    return first, second


# ------------------------------------------------------------------------ package and deps


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this repository, built from a copy so the working tree gets no build files;
    what goes into it is decided by pyproject.toml alone, as for a release."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    build = command([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                     "--quiet", "-w", str(work / "dist"), str(source)], cwd=work, timeout_s=300)
    assert build.returncode == 0, build.stderr
    (built,) = (work / "dist").glob("sled_fleet-*.whl")
    return built


def dependency_overlay(directory: Path, exclude: tuple[str, ...]) -> Path:
    """The dev venv's site-packages as symlinks, minus sled-fleet itself and `exclude`.

    Offered through PYTHONPATH, pip counts these as installed, so the role's pip tasks resolve
    the extra's requirements without an index; sled-fleet has to be installed for real.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    unwanted = {_normalise(name) for name in ("sled-fleet", *exclude)}
    hidden: set[str] = set()
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if _normalise(dist.metadata["Name"]) in unwanted:
            hidden |= {file.parts[0] for file in dist.files or () if file.parts[0] != ".."}
    directory.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name in hidden or entry.suffix == ".pth" or entry.name.startswith("__"):
            continue
        (directory / entry.name).symlink_to(entry)
    return directory


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_environment(overlay: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(overlay), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def in_venv(venv: Path, overlay: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a program of the provisioned venv (`python`, `fleet`) from a neutral directory."""
    return command([str(venv / "bin" / argv[0]), *argv[1:]], cwd=venv,
                   env={**os.environ, "PYTHONPATH": str(overlay)})


# ----------------------------------------------------------------------------------- lint


def test_ansible_lint_production_profile_passes(tmp_path: Path) -> None:
    if LINT is None:
        pytest.skip("ansible-lint is not installed (it is in the dev extra)")
    result = command([LINT, "--offline", "--profile", "production", "--nocolor"],
                     cwd=ANSIBLE_DIR, env=ansible_env(tmp_path), timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_site_playbook_passes_syntax_check(tmp_path: Path) -> None:
    result = command([PLAYBOOK, "--syntax-check", "-i", str(EXAMPLE_INVENTORY),
                      str(ANSIBLE_DIR / "site.yml")], cwd=ANSIBLE_DIR, env=ansible_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_inventory_resolves_per_board_kind(tmp_path: Path) -> None:
    """Raspberry Pi and Jetson get their differences from group variables alone."""
    wanted = ("board_onnxruntime_package", "board_onnxruntime_index_url", "board_package_extra",
              "board_draft_quantization", "board_extra_groups", "board_broker_password")
    # Role defaults are not loaded here: what is unset in the inventory comes back as null.
    expression = "{{ {" + ", ".join(f"'{name}': {name} | default(None)" for name in wanted) + "} }}"
    result = command([str(BIN / "ansible"), "boards", "-i", str(EXAMPLE_INVENTORY),
                      "-m", "ansible.builtin.debug", "-a", f"msg={expression}"],
                     cwd=ANSIBLE_DIR, env=ansible_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    answers = re.finditer(r"^(?P<host>\S+) \| SUCCESS => (?P<result>\{.*?^\})", result.stdout,
                          re.MULTILINE | re.DOTALL)
    boards = {answer["host"]: json.loads(answer["result"])["msg"] for answer in answers}
    assert sorted(boards) == ["jetson-lab", "rpi-garage", "rpi-kitchen"]
    pi, jetson = boards["rpi-kitchen"], boards["jetson-lab"]
    assert pi["board_onnxruntime_package"] == "onnxruntime"
    assert pi["board_onnxruntime_index_url"] == ""
    assert jetson["board_onnxruntime_package"] == "onnxruntime-gpu"
    assert jetson["board_onnxruntime_index_url"].startswith("https://")
    assert set(jetson["board_extra_groups"]) >= {"video", "render"}
    assert pi["board_extra_groups"] is None
    assert boards["rpi-garage"]["board_draft_quantization"] == "int8"
    assert pi["board_broker_password"] == "CHANGE-ME-rpi-kitchen", "secrets come from the vault"


def test_broker_role_refuses_the_example_placeholder_passwords(tmp_path: Path) -> None:
    sandbox = {**local_host(), "mosquitto_root": str(tmp_path / "root"),
               "mosquitto_manage_system": False}
    result = command([PLAYBOOK, "-i", str(EXAMPLE_INVENTORY), str(ANSIBLE_DIR / "site.yml"),
                      "--limit", "broker", "-e", json.dumps(sandbox)],
                     cwd=tmp_path, env=ansible_env(tmp_path))
    assert result.returncode != 0
    assert "CHANGE-ME placeholders" in result.stdout, result.stdout[-3000:]
    assert not (tmp_path / "root").exists(), "nothing may be written before the check"


# ---------------------------------------------------------------------------------- board


@dataclass
class Provisioned:
    root: Path
    config: Path
    venv: Path
    overlay: Path
    first: Run
    second: Run
    expected: dict[str, Any]


@pytest.fixture(scope="module")
def board(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, tiny_draft_exports: Callable[[str], Path]
) -> Provisioned:
    work = tmp_path_factory.mktemp("board")
    root = work / "root"
    overlay = dependency_overlay(work / "overlay", exclude=SERVER_ONLY)
    draft = tiny_draft_exports("int8")
    ca = broker_tls(work / "pki").ca_file
    expected = {
        "device_id": "board-a",
        "password": secrets.token_urlsafe(16),
        "host": "broker.fleet.test",
        "port": 18883,
        "k_max": 6,
        "threshold": 0.25,
        "hardware": "raspberry-pi-5",
    }
    host = local_host(
        board_root=str(root),
        board_manage_system=False,
        board_owner=USER, board_user=USER, board_group=GROUP,
        board_python=sys.executable,
        board_pip_environment=pip_environment(overlay),
        board_package_source=str(wheel),
        board_draft_model="tiny-draft",
        board_draft_quantization="int8",
        board_draft_src=str(draft),
        board_hardware=expected["hardware"],
        board_broker_host=expected["host"],
        board_broker_port=expected["port"],
        board_broker_password=expected["password"],
        board_broker_ca_src=str(ca),
        board_k_max=expected["k_max"],
        board_threshold=expected["threshold"],
    )
    rpi = {"rpi": {"hosts": {"board-a": host}}}
    inventory = {"all": {"children": {"boards": {"children": rpi}}}}
    first, second = converge(inventory, work, "board-a")
    return Provisioned(
        root=root, config=root / "etc/fleet/device.toml", venv=root / "opt/fleet/device",
        overlay=overlay, first=first, second=second, expected=expected,
    )


def test_board_role_converges_then_changes_nothing(board: Provisioned) -> None:
    assert board.first.recap("board-a")["changed"] > 0
    second = board.second.recap("board-a")
    assert second["changed"] == 0 and second["failed"] == 0, board.second.output[-4000:]


def test_board_configuration_loads_with_the_inventory_values(board: Provisioned) -> None:
    settings = load_settings(board.config)
    want = board.expected
    assert settings.device.device_id == want["device_id"]
    assert settings.device.draft_model == str(board.root / "var/lib/fleet/drafts/tiny-draft-int8")
    assert settings.device.k_max == want["k_max"]
    assert settings.device.threshold == pytest.approx(want["threshold"])
    assert settings.device.hardware == want["hardware"]
    assert settings.broker.host == want["host"] and settings.broker.port == want["port"]
    assert settings.broker.username == want["device_id"]
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == want["password"]
    assert settings.broker.tls and settings.broker.ca_file == board.root / "etc/fleet/ca.crt"
    assert settings.broker.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert settings.home == board.root / "var/lib/fleet"
    assert board.config.stat().st_mode & 0o777 == 0o640, "the file holds the broker password"


def test_board_gets_a_unit_for_fleet_device(board: Provisioned) -> None:
    unit = (board.root / "etc/systemd/system/fleet-device.service").read_text()
    assert f"ExecStart={board.venv}/bin/fleet device --config {board.config}\n" in unit
    assert f"User={USER}\n" in unit


# Runs in the provisioned venv: its own sled-fleet, the device extra's onnxruntime, no torch.
BOARD_CHECK = """
import importlib.util, json, sys
from pathlib import Path
import fleet
from fleet.config import load_settings
from fleet.models.store import ModelStore
from device.runner import DraftRunner

assert importlib.util.find_spec("torch") is None, "torch reached the board"
settings = load_settings(Path(sys.argv[1]))
runner = DraftRunner(Path(settings.device.draft_model), verify_hashes=True)
ids = runner.tokenizer.encode("def add(a, b):").ids
logits = runner.prefill(ids)
print(json.dumps({"fleet": fleet.__file__, "quant": runner.manifest.quant,
                  "vocab": len(logits), "length": runner.length, "context": len(ids)}))
"""


def test_board_venv_drafts_with_the_copied_model_without_torch(board: Provisioned) -> None:
    result = in_venv(board.venv, board.overlay, "python", "-c", BOARD_CHECK, str(board.config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fleet"].startswith(str(board.venv)), "sled-fleet must come from the board venv"
    assert report["quant"] == "int8" and report["vocab"] > 0
    assert report["length"] == report["context"] > 0
    cli = in_venv(board.venv, board.overlay, "fleet", "device", "--help")
    assert cli.returncode == 0, cli.stderr


# -------------------------------------------------------------------------------- verifier


def test_verifier_role_installs_the_server_with_its_target_model(
    tmp_path: Path, wheel: Path, tiny_draft_pair: tuple[Path, Path]
) -> None:
    target, _ = tiny_draft_pair
    root = tmp_path / "root"
    overlay = dependency_overlay(tmp_path / "overlay", exclude=())
    password = secrets.token_urlsafe(16)
    share_group = secrets.token_hex(12)
    host = local_host(
        verifier_root=str(root),
        verifier_manage_system=False,
        verifier_owner=USER, verifier_user=USER, verifier_group=GROUP,
        verifier_python=sys.executable,
        verifier_pip_environment=pip_environment(overlay),
        verifier_package_source=str(wheel),
        verifier_torch_package=f"torch=={importlib.metadata.version('torch').split('+')[0]}",
        verifier_target_model="tiny-target",
        verifier_target_model_src=str(target),
        verifier_broker_host="broker.fleet.test",
        verifier_broker_password=password,
        verifier_broker_tls=False,
        verifier_dtype="bfloat16",
        verifier_max_sessions=12,
        verifier_share_group=share_group,
    )
    inventory = {"all": {"children": {"servers": {"hosts": {"server-1": host}}}}}
    # Idempotency of the shared installer is proven by the board's second run; the second run
    # here only drops the share group.
    run = run_site(inventory, tmp_path, "-v")
    assert run.returncode == 0, run.output[-4000:]
    assert run.recap("server-1")["changed"] > 0
    assert share_group not in run.output and password not in run.output, "secrets were printed"

    config = root / "etc/fleet/server.toml"
    assert f'share_group = "{share_group}"\n' in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o640, "the file holds the password and share group"
    settings = load_settings(config)
    assert settings.server.share_group.get_secret_value() == share_group
    assert settings.server.server_id == "server-1"
    assert settings.server.dtype == "bfloat16" and settings.server.max_sessions == 12
    assert settings.broker.username == "server-1" and not settings.broker.tls
    assert settings.broker.ca_file is None
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == password
    store = ModelStore(settings.home)
    copied = store.resolve(settings.server.target_model)
    assert copied == root / "var/lib/fleet/models/tiny-target"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in target.iterdir())
    venv = root / "opt/fleet/server"
    unit = (root / "etc/systemd/system/fleet-server.service").read_text()
    assert f"ExecStart={venv}/bin/fleet serve --config {config}\n" in unit
    code = "import fleet.config, torch; print(fleet.config.__file__)"
    result = in_venv(venv, overlay, "python", "-c", code)
    assert result.returncode == 0 and result.stdout.startswith(str(venv)), result.stderr

    # A single server may leave it unset: the line goes, and `fleet serve` makes its own.
    host["verifier_share_group"] = ""
    again = run_site(inventory, tmp_path)
    assert again.returncode == 0, again.output[-4000:]
    assert again.recap("server-1")["changed"] == 1, again.output[-4000:]
    assert "share_group" not in config.read_text()
    assert load_settings(config).server.share_group.get_secret_value() != share_group


SHARE_GROUP_REQUIRED = "verifier_share_group is required"
SHARE_GROUP_MALFORMED = "verifier_share_group must be one MQTT topic level"


def test_verifier_role_refuses_a_missing_or_malformed_share_group(tmp_path: Path) -> None:
    """Several servers: each host fails the check its own value breaks, before anything is
    written, and no value is printed (the bad ones carry a marker to look for)."""
    root = tmp_path / "root"
    marker = secrets.token_hex(8)
    share_groups: dict[str, str | None] = {
        "server-unset": None,
        "server-empty": "",
        "server-slash": f"{marker}/x",
        "server-plus": f"{marker}+",
        "server-hash": f"{marker}#",
        "server-space": f"{marker} x",
        "server-newline": f"{marker}\n",
        "server-dollar": f"${marker}",
        "server-long": marker * 5,   # 80 characters, the limit is 64
        "server-placeholder": f"CHANGE-ME-{marker}",
    }
    expected = {name: SHARE_GROUP_REQUIRED if not value else SHARE_GROUP_MALFORMED
                for name, value in share_groups.items()}
    hosts = {
        name: local_host(
            verifier_root=str(root),
            verifier_manage_system=False,
            verifier_package_source=str(tmp_path / "never-read.whl"),
            verifier_broker_password=secrets.token_urlsafe(16),
            **({} if value is None else {"verifier_share_group": value}),
        )
        for name, value in share_groups.items()
    }
    inventory = {"all": {"children": {"servers": {"hosts": hosts}}}}
    run = run_site(inventory, tmp_path, "-vvv")
    assert run.returncode != 0
    failures = {
        match["host"]: json.loads(match["result"])["msg"]
        for match in re.finditer(r"^fatal: \[(?P<host>[^\]]+)\]: FAILED! => (?P<result>\{.*?^\})",
                                 run.output, re.MULTILINE | re.DOTALL)
    }
    assert sorted(failures) == sorted(share_groups), run.output[-4000:]
    for name, message in failures.items():
        assert message.startswith(expected[name]), (name, message)
    assert "10 servers" in failures["server-unset"]
    assert "CHANGE-ME placeholder" in failures["server-placeholder"]
    assert marker not in run.output, "a share group was printed"
    assert not root.exists(), "nothing may be written before the check"


def test_verifier_role_refuses_the_example_placeholder_share_group(tmp_path: Path) -> None:
    """The example inventory takes the share group from the vault file's placeholder."""
    sandbox = {**local_host(), "verifier_root": str(tmp_path / "root"),
               "verifier_manage_system": False}
    result = command([PLAYBOOK, "-i", str(EXAMPLE_INVENTORY), str(ANSIBLE_DIR / "site.yml"),
                      "--limit", "servers", "-e", json.dumps(sandbox)],
                     cwd=tmp_path, env=ansible_env(tmp_path))
    assert result.returncode != 0
    assert SHARE_GROUP_MALFORMED in result.stdout, result.stdout[-3000:]
    assert "CHANGE-ME-share-group" not in result.stdout
    assert not (tmp_path / "root").exists(), "nothing may be written before the check"


# ------------------------------------------------------------------------------- mosquitto


@contextmanager
def running_broker(config: Path, port: int, log: Path) -> Iterator[None]:
    """`mosquitto -c FILE` exactly as the role rendered it, until the block ends."""
    with log.open("wb") as out:
        process = subprocess.Popen([find_tool("mosquitto"), "-c", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start from {config}:\n{log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Client:
    """A paho MQTT v5 client whose CONNACK, SUBACK and PUBACK outcomes the test can wait for."""

    def __init__(self, username: str, password: str, port: int, ca: Path | None) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{username}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.connack: ReasonCode | None = None
        self.suback: list[ReasonCode] | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    props: Any) -> None:
        with self._changed:
            self.connack = reason
            self._changed.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode],
                      props: Any) -> None:
        with self._changed:
            self.suback = reasons
            self._changed.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    props: Any) -> None:
        with self._changed:
            self.pubacks[mid] = reason
            self._changed.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, message.payload))
            self._changed.notify_all()

    def wait(self, ready: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, timeout=timeout_s):
                pytest.fail(f"no {what} within {timeout_s} s")

    def subscribe(self, topic: str) -> None:
        self.suback = None
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: self.suback is not None, f"SUBACK for {topic}")
        assert self.suback is not None and not self.suback[0].is_failure, self.suback

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """The broker's PUBACK reason code: without it a denied publish looks delivered."""
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]


@contextmanager
def connected(username: str, password: str, port: int, ca: Path | None = None) -> Iterator[Client]:
    client = Client(username, password, port, ca)
    try:
        yield client
    finally:
        client.client.disconnect()
        client.client.loop_stop()


def test_mosquitto_role_renders_a_broker_that_enforces_the_acl(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tls = broker_tls(tmp_path / "pki")
    passwords = {name: secrets.token_urlsafe(16) for name in ("board-a", "board-b", "server-1")}
    tls_port, plain_port = free_port(), free_port()
    host = local_host(
        mosquitto_root=str(root),
        mosquitto_manage_system=False,
        mosquitto_user=USER, mosquitto_group=GROUP,
        mosquitto_run_as_root=os.geteuid() == 0,
        mosquitto_passwords=passwords,
        mosquitto_servers=["server-1"],
        mosquitto_tls_ca_src=str(tls.ca_file),
        mosquitto_tls_cert_src=str(tls.cert_file),
        mosquitto_tls_key_src=str(tls.key_file),
        mosquitto_listeners=[
            {"port": tls_port, "bind_address": "127.0.0.1", "tls": True,
             "cafile": "{{ mosquitto_tls_dir }}/ca.crt",
             "certfile": "{{ mosquitto_tls_dir }}/server.crt",
             "keyfile": "{{ mosquitto_tls_dir }}/server.key"},
            {"port": plain_port, "bind_address": "127.0.0.1"},
        ],
    )
    inventory = {"all": {"children": {"broker": {"hosts": {"broker-1": host}}}}}
    first, second = converge(inventory, tmp_path, "broker-1")
    assert first.recap("broker-1")["changed"] > 0
    assert second.recap("broker-1")["changed"] == 0, "unchanged passwords must keep their hashes"
    config = root / "etc/mosquitto/mosquitto.conf"
    assert f"password_file {root}/etc/mosquitto/passwd\n" in config.read_text()

    with running_broker(config, plain_port, tmp_path / "mosquitto.log"):
        with connected("server-1", passwords["server-1"], tls_port, ca=tls.ca_file) as server, \
                connected("board-a", passwords["board-a"], plain_port) as board_a:
            server.subscribe("sled/v1/devices/+/sessions/+/draft")
            own = board_a.publish("sled/v1/devices/board-a/sessions/s1/draft", b"mine")
            foreign = board_a.publish("sled/v1/devices/board-b/sessions/s1/draft", b"intrusion")
            assert own.value == 0, own
            assert foreign.value == 135 and foreign.getName() == "Not authorized", foreign
            server.wait(lambda: len(server.messages) >= 1, "the board's own draft")
            time.sleep(0.2)  # a wrongly delivered intrusion would arrive right behind it
            assert server.messages == [("sled/v1/devices/board-a/sessions/s1/draft", b"mine")]
        with connected("board-b", passwords["board-a"], plain_port) as impostor:
            assert impostor.connack.is_failure, "another board's password must be refused"

    # A changed password rewrites the file (one change) and takes effect on the next start.
    new_password = secrets.token_urlsafe(16)
    host["mosquitto_passwords"] = {**passwords, "board-b": new_password}
    third = run_site(inventory, tmp_path)
    assert third.returncode == 0, third.output[-4000:]
    assert third.recap("broker-1")["changed"] == 1
    with running_broker(config, plain_port, tmp_path / "mosquitto-2.log"):
        with connected("board-b", new_password, plain_port) as board_b:
            assert not board_b.connack.is_failure
        with connected("board-b", passwords["board-b"], plain_port) as stale:
            assert stale.connack.is_failure
