"""A controller and an agent talk to the broker over TLS (``amqps://``) with client certificates.

The fixture makes a CA, a server certificate (for ``localhost`` and 127.0.0.1) and a client
certificate with ``openssl`` in a temporary directory, and starts a RabbitMQ node of its own on
loopback with only a TLS listener that requires a client certificate (own node name, data, log,
config, cookie and ports, so it never touches the shared broker on 5672). It is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vfsupport import Fleet, free_port, fresh_database, node_uri

from common.errors import TransportError
from common.messages import api
from common.transport.amqp import connect
from common.transport.factory import open_transport
from common.transport.rpc import request, unwrap
from common.transport.topology import API_QUEUE

# SQLite only (deploy/test.sh): what is tested is TLS on the bus; the database only holds the fleet.
pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.backend_neutral]

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
#: A cold RabbitMQ start takes ~6 s on an idle machine and ~30 s on a loaded one (host-facts.md).
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TlsBroker:
    """The TLS node: its port and the files a client needs."""

    port: int
    ca: Path
    client_cert: Path
    client_key: Path

    def url(self, host: str = "localhost", **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqps://guest:guest@{host}:{self.port}/%2F?{query}"

    def client_url(self, host: str = "localhost", **extra: str) -> str:
        """A URL with the CA and the client certificate: what a fleet process uses."""
        return self.url(
            host, cafile=str(self.ca), certfile=str(self.client_cert), keyfile=str(self.client_key), **extra
        )


def make_certificates(tmp: Path) -> None:
    """ca.pem, server.pem/.key (localhost, 127.0.0.1) and client.pem/.key, signed by the CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vftest-ca",
        "-keyout", "ca.key", "-out", "ca.pem",
    )  # fmt: skip
    (tmp / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
        )
        extra = ["-extfile", "server.ext"] if who == "server" else []
        openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", *extra, "-out", f"{who}.pem",
        )  # fmt: skip


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if shutil.which("openssl") is None or not RABBITMQ_SERVER.exists():
        pytest.skip("needs openssl and rabbitmq-server (Debian packages openssl, rabbitmq-server)")
    tmp = tmp_path_factory.mktemp("amqps")
    make_certificates(tmp)
    port, amqp_port, dist_port = free_port(), free_port(), free_port()
    (tmp / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {tmp / 'ca.pem'}\n"
        f"ssl_options.certfile = {tmp / 'server.pem'}\n"
        f"ssl_options.keyfile = {tmp / 'server.key'}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    (tmp / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        # Its own Erlang cookie (HOME), node name, data and ports: the shared broker is untouched.
        "HOME": str(tmp),
        "RABBITMQ_NODENAME": f"vftls-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
        "RABBITMQ_LOG_BASE": str(tmp / "log"),
        "RABBITMQ_CONFIG_FILE": str(tmp / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(tmp / "rabbitmq.pid"),
    }
    log = (tmp / "node.log").open("wb")
    node = subprocess.Popen(
        [str(RABBITMQ_SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(port):
            if node.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the TLS RabbitMQ node did not start:\n{(tmp / 'node.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield TlsBroker(port, tmp / "ca.pem", tmp / "client.pem", tmp / "client.key")
    finally:
        # The whole process group of the node this fixture started (the script and beam.smp).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)


def test_controller_and_agent_talk_over_amqps(tls_broker: TlsBroker, tmp_path: Path) -> None:
    url = tls_broker.client_url()
    with fresh_database(tmp_path) as db, Fleet(tmp_path, url, db) as fleet:
        fleet.start_controller()
        fleet.start_agent("tls1", node_uri("small"))
        # The host is up: its agent's heartbeats and report reached the controller over TLS,
        # and the CLI read that over TLS too.
        fleet.wait_hosts({"tls1"})
        assert fleet.cli_ok("host", "show", "tls1")["cpus"] > 0
        client = open_transport(url, name="amqps-test")
        try:
            env = request(api.API_PING, api.Empty(), "amqps-test", timeout=20)
            assert (
                unwrap(client.call("", API_QUEUE.name, env, 20, persistent=False), api.API_PING)
                == api.Empty()
            )
        finally:
            client.close()
        assert "guest:guest" not in fleet.logs()  # the broker password is never logged


def test_a_client_without_the_ca_is_refused(tls_broker: TlsBroker) -> None:
    no_ca = tls_broker.url(certfile=str(tls_broker.client_cert), keyfile=str(tls_broker.client_key))
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(no_ca, "no-ca")


def test_a_wrong_server_name_is_refused(tls_broker: TlsBroker) -> None:
    # 127.0.0.1 is in the certificate; broker.example is not.
    by_ip = connect(tls_broker.client_url("127.0.0.1"), "by-ip")
    assert by_ip.is_open
    by_ip.close()
    with pytest.raises(TransportError, match="Hostname mismatch"):
        connect(tls_broker.client_url(server_name="broker.example"), "wrong-name")


def test_a_client_without_a_certificate_is_refused(tls_broker: TlsBroker) -> None:
    with pytest.raises(TransportError, match=r"CERTIFICATE_REQUIRED|StreamLost"):
        connect(tls_broker.url(cafile=str(tls_broker.ca)), "no-cert")


def test_plain_amqp_to_the_tls_port_is_refused(tls_broker: TlsBroker) -> None:
    with pytest.raises(TransportError):
        connect(f"amqp://guest:guest@127.0.0.1:{tls_broker.port}/%2F", "plain")
