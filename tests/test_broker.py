"""The broker layer against a real Mosquitto: round trips, credentials, TLS and the fleet ACL."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.certs import CertificateAuthority, broker_tls
from broker.config import BrokerCredentials, BrokerIdentity, BrokerSpec, find_tool
from broker.process import (
    BrokerStartError,
    LocalBroker,
    MosquittoProcess,
    accepts_connections,
    free_port,
)
from fleet.config import BrokerSettings
from fleet.mqtt import BrokerRefused, BrokerTlsError, BrokerUnreachable, PublishDenied, make_client
from fleet.protocol.topics import Topics
from tests.conftest import MqttClientFactory

# Topic names come from the protocol module, so a change of layout there that the ACL does not
# follow fails here.
T = Topics()
R = T.root
SERVER_STATUS = T.server_status("server-1")


def test_anonymous_round_trip(mosquitto_anon: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    _, inbox = mqtt_client(mosquitto_anon.settings(), subscribe=["any/topic"])
    sender, _ = mqtt_client(mosquitto_anon.settings())
    sender.publish_confirmed("any/topic", b"hello")
    assert inbox.wait_for("any/topic").payload == b"hello"


def test_tls_round_trip(mosquitto_tls: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    _, inbox = mqtt_client(mosquitto_tls.settings("board-a"), subscribe=[T.requests("board-a")])
    app, _ = mqtt_client(mosquitto_tls.settings("app-1"))
    app.publish_confirmed(T.requests("board-a"), b'{"prompt": "hi"}')
    assert inbox.wait_for(T.requests("board-a")).payload == b'{"prompt": "hi"}'


def test_tls_without_the_fleet_ca_is_refused(mosquitto_tls: LocalBroker) -> None:
    # No CA file: the system trust store, which does not know the fleet's private CA.
    settings = mosquitto_tls.settings("board-a").model_copy(update={"ca_file": None})
    client = make_client("no-ca", settings)
    with pytest.raises(BrokerTlsError, match="certificate verify failed"):
        client.connect_and_wait()


def test_plain_client_cannot_talk_to_a_tls_listener(mosquitto_tls: LocalBroker) -> None:
    settings = mosquitto_tls.settings("board-a").model_copy(update={"tls": False})
    with pytest.raises((BrokerUnreachable, BrokerRefused)):
        make_client("plain", settings).connect_and_wait(timeout_s=2)


def test_client_certificate_required(tmp_path: Path) -> None:
    tls = broker_tls(tmp_path / "tls", require_certificate=True)
    identity = BrokerIdentity(name="board-a", role="device", password="secret-a")
    spec = BrokerSpec(port=free_port(), tls=tls, identities=[identity])
    cert, key = CertificateAuthority.load_or_create(tmp_path / "tls").issue(
        tmp_path / "tls", "board-a", client=True
    )
    base = BrokerSettings(
        port=spec.port, username="board-a", password="secret-a", tls=True, ca_file=tls.ca_file
    )
    with MosquittoProcess(spec, tmp_path / "broker"):
        # TLS 1.3 rejects a missing client certificate after the client's handshake finished,
        # so the client sees either a handshake error or a closed connection.
        with pytest.raises((BrokerTlsError, BrokerUnreachable)):
            make_client("no-cert", base).connect_and_wait(timeout_s=3)
        client = make_client(
            "with-cert", base.model_copy(update={"cert_file": cert, "key_file": key})
        )
        client.connect_and_wait()
        client.publish_confirmed(T.device_status("board-a"), b"online", retain=True)
        client.disconnect()
        client.loop_stop()


def test_wrong_password_is_refused(mosquitto_auth: LocalBroker) -> None:
    settings = mosquitto_auth.settings("board-a").model_copy(
        update={"password": SecretStr("not-the-password")}
    )
    with pytest.raises(BrokerRefused, match="Not authorized") as refused:
        make_client("intruder", settings).connect_and_wait()
    assert refused.value.reason.is_failure


def test_anonymous_is_refused_when_passwords_are_on(mosquitto_auth: LocalBroker) -> None:
    with pytest.raises(BrokerRefused):
        make_client("anonymous", mosquitto_auth.settings()).connect_and_wait()


def test_unreachable_broker_is_its_own_error() -> None:
    with pytest.raises(BrokerUnreachable, match="cannot reach"):
        make_client("nobody-home", BrokerSettings(port=free_port())).connect_and_wait(timeout_s=2)


# Every write attempt: (identity, topic, allowed). Allowed writes are what the topic table
# grants; the denied ones are the attacks a compromised board, app or server could try.
WRITES = [
    ("board-a", T.device_status("board-a"), True),
    ("board-a", T.open("board-a", "s1"), True),
    ("board-a", T.draft("board-a", "s1"), True),
    ("board-a", T.response("board-a", "r1"), True),
    ("board-b", T.open("board-b", "s1"), True),
    ("board-b", T.draft("board-b", "s1"), True),
    ("server-1", T.verdict("board-a", "s1"), True),
    ("server-1", T.verdict("board-b", "s1"), True),
    ("app-1", T.requests("board-a"), True),
    ("app-1", T.requests("board-b"), True),
    ("board-a", T.device_status("board-b"), False),
    ("board-a", T.open("board-b", "s1"), False),
    ("board-a", T.draft("board-b", "s1"), False),
    ("board-a", T.verdict("board-b", "s1"), False),
    ("board-a", T.verdict("board-a", "s1"), False),
    ("board-a", T.requests("board-b"), False),
    ("board-a", T.response("board-b", "r1"), False),
    ("board-a", SERVER_STATUS, False),
    ("board-a", T.server_status("board-a"), False),
    ("server-1", T.draft("board-b", "s1"), False),
    ("server-1", T.requests("board-b"), False),
    ("server-1", T.server_status("server-2"), False),
    ("server-1", T.draft("server-1", "s1"), False),
    ("app-1", T.draft("board-b", "s1"), False),
    ("app-1", T.verdict("board-b", "s1"), False),
    ("app-1", T.response("board-b", "r1"), False),
    ("app-1", T.draft("app-1", "s1"), False),
    ("ops", T.device_status("board-a"), False),
    ("ops", T.device_status("ops"), False),
]

# What each identity may read, straight from the topic table (the test's oracle).
READS = {
    "board-a": {T.verdict("board-a", "s1"), T.requests("board-a"), SERVER_STATUS},
    "board-b": {T.verdict("board-b", "s1"), T.requests("board-b"), SERVER_STATUS},
    "server-1": {
        T.device_status("board-a"),
        T.open("board-a", "s1"),
        T.draft("board-a", "s1"),
        T.open("board-b", "s1"),
        T.draft("board-b", "s1"),
        SERVER_STATUS,
    },
    "app-1": {T.device_status("board-a"), T.response("board-a", "r1"), SERVER_STATUS},
    "ops": {T.device_status("board-a"), SERVER_STATUS},
}


def test_acl_matrix(mosquitto_auth: LocalBroker, mqtt_client: MqttClientFactory) -> None:
    """Everyone subscribes to the whole tree (Mosquitto 2.0 grants every SUBACK and checks read
    access per delivered message), every write in WRITES is attempted, and each identity must
    receive exactly the allowed writes on topics it may read: a denied publish reaches no one."""
    clients = {
        name: mqtt_client(mosquitto_auth.settings(name), subscribe=[f"{R}/#"]) for name in READS
    }
    wrong: list[str] = []
    for writer, topic, allowed in WRITES:
        try:
            clients[writer][0].publish_confirmed(topic, writer.encode())
            if not allowed:
                wrong.append(f"{writer} could write {topic}")
        except PublishDenied as denied:
            assert str(denied.reason) == "Not authorized"
            if allowed:
                wrong.append(f"{writer} could not write {topic}")
    # Fence: readable by all, published last; delivery order per subscriber follows the
    # order the broker accepted the publishes in.
    clients["server-1"][0].publish_confirmed(SERVER_STATUS, b"fence")
    for name, (_, inbox) in clients.items():
        inbox.wait_for(SERVER_STATUS)
        received = {(m.topic, m.payload.decode()) for m in inbox.messages if m.payload != b"fence"}
        expected = {
            (topic, writer) for writer, topic, allowed in WRITES if allowed and topic in READS[name]
        }
        if received != expected:
            wrong.append(
                f"{name} received {sorted(received - expected)}, missed {sorted(expected - received)}"
            )
    assert not wrong, "\n".join(wrong)


def test_server_claims_opens_through_the_shared_subscription(
    mosquitto_auth: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    server, opens = mqtt_client(
        mosquitto_auth.settings("server-1"),
        subscribe=[T.all_opens_shared()],
    )
    board, verdicts = mqtt_client(
        mosquitto_auth.settings("board-a"), subscribe=[T.device_verdicts("board-a")]
    )
    board.publish_confirmed(T.open("board-a", "s7"), b"prompt")
    assert opens.wait_for(T.open("board-a", "s7")).payload == b"prompt"
    server.publish_confirmed(T.verdict("board-a", "s7"), b"accepted")
    assert verdicts.wait_for(T.verdict("board-a", "s7")).payload == b"accepted"


def test_mosquitto_cli_round_trip(mosquitto_auth: LocalBroker) -> None:
    """What any IoT app can do with the stock clients: an app asks board-a, board-a listens."""
    board, app = (
        mosquitto_auth.credentials.identity("board-a"),
        mosquitto_auth.credentials.identity("app-1"),
    )
    common = ["-h", "127.0.0.1", "-p", str(mosquitto_auth.process.port), "-V", "mqttv5", "-q", "1"]
    listener = subprocess.Popen(
        [
            find_tool("mosquitto_sub"),
            *common,
            "-u",
            board.name,
            "-P",
            board.password.get_secret_value(),
            "-t",
            T.requests("board-a"),
            "-C",
            "1",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # mosquitto_sub has no "subscribed" signal; retry the publish until the listener has it.
    for _ in range(50):
        subprocess.run(
            [
                find_tool("mosquitto_pub"),
                *common,
                "-u",
                app.name,
                "-P",
                app.password.get_secret_value(),
                "-t",
                T.requests("board-a"),
                "-m",
                '{"prompt": "ping"}',
            ],
            check=True,
            timeout=10,
        )
        try:
            out, _ = listener.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        listener.kill()
        pytest.fail("mosquitto_sub received nothing")
    assert listener.returncode == 0
    assert out.strip() == '{"prompt": "ping"}'


def test_restart_keeps_port_and_durable_sessions(
    mosquitto_persistent: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    """A restart keeps a durable board's subscription; both clients reconnect by themselves
    and the request sent after the restart arrives without the board subscribing again."""
    port = mosquitto_persistent.process.port
    _, inbox = mqtt_client(
        mosquitto_persistent.settings("board-a"),
        subscribe=[T.requests("board-a")],
        clean_start=False,
        session_expiry_s=300,
    )
    app, _ = mqtt_client(mosquitto_persistent.settings("app-1"))
    mosquitto_persistent.process.restart()
    assert mosquitto_persistent.process.port == port
    app.publish_confirmed(T.requests("board-a"), b"after restart", timeout_s=15)
    assert inbox.wait_for(T.requests("board-a"), timeout_s=15).payload == b"after restart"


def test_start_failure_quotes_the_broker_log(mosquitto_anon: LocalBroker, tmp_path: Path) -> None:
    clash = BrokerSpec(port=mosquitto_anon.process.port, anonymous=True)
    with pytest.raises(BrokerStartError, match="already in use"):
        MosquittoProcess(clash, tmp_path / "clash").start()
    broken = BrokerSpec(port=free_port(), tls=broker_tls(tmp_path / "tls"), anonymous=True)
    (tmp_path / "tls" / "broker.key").write_text("not a key")
    with pytest.raises(BrokerStartError, match="exited with status") as failed:
        MosquittoProcess(broken, tmp_path / "broken").start()
    assert "broker.key" in str(failed.value)


def test_generated_files(mosquitto_auth: LocalBroker, tmp_path: Path) -> None:
    directory = mosquitto_auth.process.directory
    passwords = (directory / "passwords").read_text()
    assert "board-a:$7$" in passwords  # sha512-pbkdf2, hashed by mosquitto_passwd
    assert (
        mosquitto_auth.credentials.identity("board-a").password.get_secret_value() not in passwords
    )
    assert stat.S_IMODE(os.stat(directory / "passwords").st_mode) == 0o600
    acl = (directory / "acl").read_text()
    assert "pattern write sled/v1/devices/%u/sessions/+/draft" in acl
    assert "user server-1" in acl and "user app-1" in acl and "user ops" in acl
    assert "allow_anonymous false" in mosquitto_auth.process.config_file.read_text()

    saved = tmp_path / "credentials.json"
    mosquitto_auth.credentials.write(saved)
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert BrokerCredentials.load(saved) == mosquitto_auth.credentials


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"anonymous": True}, "exclude each other"),
        ({"identities": []}, "at least one identity"),
        ({"identities": [{"name": "a/b", "role": "device", "password": "x"}]}, "topic level"),
        (
            {
                "identities": [
                    {"name": "x", "role": "device", "password": "p"},
                    {"name": "x", "role": "app", "password": "q"},
                ]
            },
            "unique",
        ),
        ({"identities": [{"name": "x", "role": "device", "password": "a:b"}]}, "no ':'"),
    ],
)
def test_bad_specs_name_the_problem(change: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "port": 1884,
        "identities": [{"name": "a", "role": "device", "password": "p"}],
    }
    with pytest.raises(ValueError, match=message):
        BrokerSpec.model_validate(base | change)


def test_fleet_broker_command(tmp_path: Path, mqtt_client: MqttClientFactory) -> None:
    """`fleet broker` in the foreground: secured by default, credentials usable as written,
    Ctrl-C stops it; a second run keeps the passwords and the CA."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "import typer; from broker.cli import broker_command; typer.run(broker_command)",
        "--dir",
        str(tmp_path),
        "--port",
        str(port),
        "--devices",
        "1",
        "--device",
        "kiosk-7",
    ]
    credentials_file = tmp_path / "credentials.json"
    for run in range(2):
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline = time.monotonic() + 20
            while not (process.poll() is None and accepts_connections("127.0.0.1", port)):
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "fleet broker did not start"
                time.sleep(0.05)
            credentials = BrokerCredentials.load(credentials_file)
            if run == 0:
                first = credentials
                assert (
                    credentials.tls
                    and "allow_anonymous false" in (tmp_path / "mosquitto.conf").read_text()
                )
                assert {i.name: i.role for i in credentials.identities} == {
                    "board-1": "device",
                    "kiosk-7": "device",
                    "server-1": "server",
                    "app-1": "app",
                    "ops": "observer",
                }
            else:
                assert credentials == first
            client, _ = mqtt_client(credentials.settings_for("kiosk-7"))
            client.publish_confirmed(T.device_status("kiosk-7"), b"online")
            client.disconnect()
            client.loop_stop()
        finally:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=20)
        assert process.returncode == 0, out
        assert "broker stopped" in out and "credentials" in out
