"""TLS and mutual TLS on the gRPC port, with the Python client, `klservice health` and a Node.js client.

Every certificate is made here (a CA, a server certificate for 127.0.0.1, client certificates, and
a second CA nobody trusts); everything listens on loopback. The Node client (tests/node:
@grpc/grpc-js from npm, pinned by its package-lock.json) is installed once per session; without
node and npm its test skips, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klservice.config import ServerConfig
from klservice.server import Server
from klservice_client import AsyncKLClient, KLClient, PermissionDenied, ServiceUnavailable, Unauthenticated
from tests.server.test_auth import auth_file  # noqa: F401 - a fixture
from tests.server.test_metrics_and_health import scrape

ROOT = Path(__file__).resolve().parents[2]
KLSERVICE = shutil.which("klservice") or os.path.join(os.path.dirname(sys.executable), "klservice")
SEQUENCE = [1, 17, 230, 4021, 77, 9, 1200]


# --------------------------------------------------------------------------- certificates


class Authority:
    """A certificate authority that issues certificates into `folder` as PEM files."""

    def __init__(self, folder: Path, name: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self._write(f"{name}.pem", self.certificate)

    def _write(self, filename: str, certificate) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.folder / filename
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, common_name: str, *, server: bool = False, names: tuple[str, ...] = ("localhost",)) -> tuple[Path, Path]:
        """(certificate, key) files of a server certificate for 127.0.0.1 and `names`, or a client certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [*map(x509.DNSName, names), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        stem = f"{self.name}-{common_name}"
        key_path = self.folder / f"{stem}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return self._write(f"{stem}.pem", certificate), key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(folder, "test-ca"), Authority(folder, "rogue-ca")
    return {
        "ca": ca.pem,
        "rogue_ca": rogue.pem,
        "server": ca.issue("klservice", server=True),
        "team-a": ca.issue("team-a"),
        "ops": ca.issue("ops"),
        "intruder": ca.issue("intruder"),           # signed by the right CA, but no tenant of the server
        "rogue-team-a": rogue.issue("team-a"),      # the right name, signed by a CA the server does not trust
    }


@pytest.fixture(scope="module")
def auth(auth_file):
    """team-a, team-b and the admin ops, as in test_auth.py."""
    return auth_file


@pytest.fixture(scope="module")
def tls_server(start_server, pki):
    """TLS, no client certificates, no auth file."""
    cert, key = pki["server"]
    return start_server(tls_cert=str(cert), tls_key=str(key))


@pytest.fixture(scope="module")
def mtls_server(start_server, pki, auth):
    """Mutual TLS and an auth file: a token, or a client certificate naming a tenant."""
    cert, key = pki["server"]
    return start_server(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"]), auth_file=str(auth[0]))


def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("KLSERVICE_TOKEN", raising=False)


# --------------------------------------------------------------------------- Python


def test_tls_round_trip_and_what_is_refused(tls_server, pki, monkeypatch):
    no_token_in_the_environment(monkeypatch)
    with KLClient(tls_server.target, root_certificates=pki["ca"]) as client:
        scored = client.score([SEQUENCE], 2).ref_logprobs
    with KLClient(tls_server.target, root_certificates=pki["ca"].read_bytes()) as client:  # PEM bytes work too
        assert np.array_equal(client.score([SEQUENCE], 2).ref_logprobs, scored)

    async def through_the_async_client():
        async with AsyncKLClient(tls_server.target, root_certificates=pki["ca"]) as client:
            return (await client.score([SEQUENCE], 2)).ref_logprobs

    assert np.array_equal(asyncio.run(through_the_async_client()), scored)
    assert scored.shape == (5,) and np.isfinite(scored).all()
    for refused in (
        KLClient(tls_server.target, max_retries=0, timeout=10),                                      # plain text
        KLClient(tls_server.target, root_certificates=pki["rogue_ca"], max_retries=0, timeout=10),    # wrong CA
        KLClient(tls_server.target, tls=True, max_retries=0, timeout=10),                            # system roots
    ):
        with refused, pytest.raises(ServiceUnavailable):
            refused.score([SEQUENCE], 2)


def test_klservice_health_and_info_speak_tls(tls_server, pki):
    health = [KLSERVICE, "health", "--target", tls_server.target, "--timeout", "10"]
    result = subprocess.run([*health, "--tls-ca", str(pki["ca"])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr
    result = subprocess.run([*health, "--tls-ca", str(pki["rogue_ca"])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    result = subprocess.run([KLSERVICE, "info", "--target", tls_server.target, "--tls-ca", str(pki["ca"])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "vocab_size" in result.stdout, result.stderr


def test_the_health_port_answers_plain_grpc_health_for_a_tls_server_and_nothing_else(start_server, pki):
    """--health-port: what Kubernetes' grpc probes (no TLS) can reach; the same status as the TLS port's, and
    no ReferenceService on it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from klservice_client.wire import pb, pb_grpc

    cert, key = pki["server"]
    mtls = start_server(wait=False, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"]), health_port=0)
    port = mtls.server.health_port
    assert port and port != mtls.server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        mtls.wait_ready()
        for service in ("", "klservice.v1.ReferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ReferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        mtls.stop(grace=0.0)  # draining: the health port says so while it is open
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_mtls_the_certificate_names_the_tenant(mtls_server, pki, auth, monkeypatch):
    no_token_in_the_environment(monkeypatch)
    _, tokens = auth
    with KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["team-a"], job_id="by-cert") as client:
        assert client.score([SEQUENCE], 2).ref_logprobs.shape == (5,)
    with KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["team-a"], token=tokens["team-b"],
                  job_id="by-token") as client:  # a token, when sent, decides
        assert client.score([SEQUENCE, SEQUENCE[:4]], 2).ref_logprobs.shape == (7,)
    with KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["intruder"], max_retries=0) as client:
        with pytest.raises(Unauthenticated, match="common name 'intruder' is no tenant"):
            client.score([SEQUENCE], 2)
    for refused in (
        KLClient(mtls_server.target, root_certificates=pki["ca"], token=tokens["team-a"], max_retries=0, timeout=10),
        KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["rogue-team-a"], max_retries=0,
                 timeout=10),
    ):  # no client certificate, or one from a CA the server does not trust: the handshake fails
        with refused, pytest.raises(ServiceUnavailable):
            refused.score([SEQUENCE], 2)
    with KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["ops"]) as admin:
        assert admin.reload_auth() == ["ops", "team-a", "team-b"]  # the admin role, by certificate
    with KLClient(mtls_server.target, root_certificates=pki["ca"], client_cert=pki["team-a"], max_retries=0) as client:
        with pytest.raises(PermissionDenied):
            client.reload_auth()
    scored = {(dict(labels)["tenant"], dict(labels)["trainer_job"]): value
              for (name, labels), value in scrape(mtls_server.metrics_url).items()
              if name == "klservice_tokens_scored_total"}
    assert (scored[("team-a", "by-cert")], scored[("team-b", "by-token")]) == (5, 7)
    assert not any(tenant == "intruder" or job == "by-cert" and tenant != "team-a" for tenant, job in scored)


def test_tls_settings_that_cannot_work_fail_the_start_naming_the_flag(pki, tmp_path):
    cert, key = pki["server"]
    _, other_key = pki["team-a"]
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"secret")))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        (dict(tls_cert=str(cert)), "--tls-cert and --tls-key go together"),
        (dict(tls_client_ca=str(pki["ca"])), "--tls-client-ca needs --tls-cert"),
        (dict(tls_cert=str(not_pem), tls_key=str(key)), "--tls-cert: .* is not a PEM file"),
        (dict(tls_cert=str(cert), tls_key=str(tmp_path / "missing.key")), "--tls-key: cannot read"),
        (dict(tls_cert=str(cert), tls_key=str(other_key)), "--tls-key: .* does not match --tls-cert"),
        (dict(tls_cert=str(cert), tls_key=str(encrypted)), "or is encrypted"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            Server(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **settings))


def test_client_tls_options_are_checked_without_quoting_a_key(pki):
    _, key = pki["team-a"]
    pem_text = key.read_text()
    with pytest.raises(ValueError, match="client_cert certificate: not PEM data and not a readable file") as error:
        KLClient("127.0.0.1:1", client_cert=("/nonexistent/client.pem", pem_text))
    assert "PRIVATE KEY" not in str(error.value)
    with pytest.raises(ValueError, match="tls_server_name: only means something over TLS"):
        KLClient("127.0.0.1:1", tls_server_name="klservice")
    KLClient("127.0.0.1:1", root_certificates=pki["ca"].read_text(), client_cert=(pki["team-a"][0], pem_text)).close()


# --------------------------------------------------------------------------- Node.js


@pytest.fixture(scope="session")
def node_client(tmp_path_factory) -> Path:
    """tests/node installed with npm into a temporary folder; returns its client.js."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are needed for the Node.js client test (Debian: apt-get install nodejs npm)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " -- CI must have them (scripts/ci-system-deps.sh installs them)")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("node-client")
    for name in ("package.json", "package-lock.json", "client.js"):
        shutil.copy(ROOT / "tests" / "node" / name, folder / name)
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "client.js"


def run_node(client_js: Path, target: str, **options) -> dict:
    arguments = {"target": target, "proto_root": str(ROOT / "proto"), "tokens": SEQUENCE, "prompt_length": 2,
                 **{key: str(value) for key, value in options.items()}}
    result = subprocess.run(["node", str(client_js), json.dumps(arguments)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_node_client_over_tls_and_mtls(node_client, tls_server, mtls_server, pki, auth, monkeypatch):
    no_token_in_the_environment(monkeypatch)
    _, tokens = auth
    with KLClient(tls_server.target, root_certificates=pki["ca"]) as client:
        expected = client.score([SEQUENCE], 2).ref_logprobs

    over_tls = run_node(node_client, tls_server.target, ca=pki["ca"])
    assert over_tls.get("error") is None, over_tls
    assert over_tls["vocab_size"] == 49152 and over_tls["request_id"] == "node-1"
    np.testing.assert_array_equal(np.array(over_tls["ref_logprobs"], np.float32), expected)

    cert, key = pki["team-a"]
    by_certificate = run_node(node_client, mtls_server.target, ca=pki["ca"], cert=cert, key=key)
    np.testing.assert_array_equal(np.array(by_certificate["ref_logprobs"], np.float32), expected)
    by_token = run_node(node_client, mtls_server.target, ca=pki["ca"], cert=cert, key=key, token=tokens["team-b"])
    np.testing.assert_array_equal(np.array(by_token["ref_logprobs"], np.float32), expected)

    assert run_node(node_client, tls_server.target, ca=pki["rogue_ca"])["error"] == "UNAVAILABLE"
    assert run_node(node_client, mtls_server.target, ca=pki["ca"], token=tokens["team-a"])["error"] == "UNAVAILABLE"
    intruder_cert, intruder_key = pki["intruder"]
    refused = run_node(node_client, mtls_server.target, ca=pki["ca"], cert=intruder_cert, key=intruder_key)
    assert refused["error"] == "UNAUTHENTICATED"
    scored = {(dict(labels)["tenant"], dict(labels)["trainer_job"])
              for (name, labels), _ in scrape(mtls_server.metrics_url).items() if name == "klservice_tokens_scored_total"}
    assert {("team-a", "node-client"), ("team-b", "node-client")} <= scored
