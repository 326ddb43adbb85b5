"""Tenants and bearer tokens: a server with --auth-file serves only callers with a valid token, as their tenant.

The auth file is written with the real `klservice auth` command; the servers are real (the tiny
Llama in this process, and `klservice serve` on the embedded model for SIGHUP).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from klservice.auth import AuthFileError, hash_token, load_auth_file
from klservice_client import InvalidArgument, KLClient, Unauthenticated
from tests.server.test_metrics_and_health import scrape

KLSERVICE = shutil.which("klservice") or os.path.join(os.path.dirname(sys.executable), "klservice")


def add_tenant(path, name, *extra) -> str:
    result = subprocess.run([KLSERVICE, "auth", "add-tenant", str(path), name, *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    tokens = {name: add_tenant(path, name) for name in ("team-a", "team-b")}
    tokens["ops"] = add_tenant(path, "ops", "--role", "admin")
    return path, tokens


@pytest.fixture(scope="module")
def auth_server(start_server, auth_file):
    return start_server(auth_file=str(auth_file[0]))


def test_the_file_holds_hashes_never_tokens(auth_file):
    path, tokens = auth_file
    text = path.read_text()
    for token in tokens.values():
        assert token.startswith("kls_") and len(token) > 40
        assert token not in text
        assert hash_token(token) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    table = load_auth_file(path)
    assert table.identify(tokens["team-b"]).name == "team-b"
    assert table.identify(tokens["ops"]).is_admin
    assert table.identify(tokens["team-a"] + "x") is None


def test_a_malformed_auth_file_is_refused_naming_the_field(tmp_path):
    bad = tmp_path / "auth.toml"
    bad.write_text('[tenants.team-a]\ntokens = ["kls_plaintext-token"]\n')
    with pytest.raises(AuthFileError, match=r"tenants.team-a.tokens\[0\]: not a token hash"):
        load_auth_file(bad)
    bad.write_text('[tenants.team-a]\nrole = "root"\n')
    with pytest.raises(AuthFileError, match=r"tenants.team-a.role: 'root' is not one of trainer, admin"):
        load_auth_file(bad)


def test_calls_without_a_valid_token_are_unauthenticated(auth_server, auth_file):
    _, tokens = auth_file
    for token in (None, "", "kls_not-a-token", tokens["team-a"][:-1]):
        env_token = os.environ.pop("KLSERVICE_TOKEN", None)
        try:
            with KLClient(auth_server.target, token=token, max_retries=0) as client:
                with pytest.raises(Unauthenticated, match="authorization"):
                    client.score([[1, 2, 3]], 1)
        finally:
            if env_token is not None:
                os.environ["KLSERVICE_TOKEN"] = env_token
    with grpc.insecure_channel(auth_server.target) as channel:  # health stays open
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with KLClient(auth_server.target, token=tokens["team-a"]) as client:
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)


@pytest.mark.parametrize("order", ["wrong, right", "right, wrong"])
def test_a_call_with_two_authorization_headers_is_refused_whatever_their_order(auth_server, auth_file, order):
    """Which of two headers wins is not the caller's to choose: two are refused, in either order; so are two
    x-job-id headers."""
    from klservice_client.wire import pb, pb_grpc

    _, tokens = auth_file
    right, wrong = ("authorization", f"Bearer {tokens['team-a']}"), ("authorization", "Bearer kls_wrong")
    headers = (wrong, right) if order == "wrong, right" else (right, wrong)
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=headers, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: the call carries 2 of them" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(right, ("x-job-id", "a"), ("x-job-id", "b")), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-job-id" in refused.value.details()
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(right,), timeout=10).vocab_size == 49152


def test_the_token_comes_from_the_environment(auth_server, auth_file, monkeypatch):
    _, tokens = auth_file
    monkeypatch.setenv("KLSERVICE_TOKEN", tokens["team-b"])
    with KLClient(auth_server.target) as client:
        assert client.model_info().vocab_size == 49152
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
    assert tokens["team-b"] not in repr(client._options)


def test_a_job_id_is_a_job_within_the_tenant_of_the_token(auth_server, auth_file):
    """Both tenants send x-job-id "run-7": each is counted under its own tenant, neither as the other."""
    _, tokens = auth_file
    for tenant, size in (("team-a", 3), ("team-b", 5)):
        with KLClient(auth_server.target, token=tokens[tenant], job_id="run-7") as client:
            client.score([list(range(1, size + 2))], 1)
    with KLClient(auth_server.target, token=tokens["team-b"], job_id="team-a/run-7") as client:
        client.score([[1, 2, 3]], 1)  # naming another tenant in the job id stays within team-b
    samples = scrape(auth_server.metrics_url)
    scored = {(dict(labels)["tenant"], dict(labels)["trainer_job"]): value for (name, labels), value in samples.items()
              if name == "klservice_tokens_scored_total"}
    assert scored["team-a", "run-7"] == 3
    assert scored["team-b", "run-7"] == 5
    assert scored["team-b", "team-a/run-7"] == 2
    assert ("anonymous", "run-7") not in scored


def test_tokens_are_never_logged(start_server, auth_file, caplog):
    path, tokens = auth_file
    with caplog.at_level(logging.DEBUG):
        server = start_server(auth_file=str(path))
        with KLClient(server.target, token=tokens["team-a"]) as client:
            client.score([[1, 2, 3]], 1)
            with pytest.raises(InvalidArgument):
                client.score([[1, 99999, 3]], 1)
        with KLClient(server.target, token=tokens["team-a"] + "-wrong", max_retries=0) as client:
            with pytest.raises(Unauthenticated):
                client.score([[1, 2, 3]], 1)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged  # the server did log (loading, requests)
    assert tokens["team-a"] not in logged and tokens["team-a"][4:20] not in logged
    exported = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'tenant="team-a"' in exported  # the tenant is there, its credential is not
    for secret in (tokens["team-a"], tokens["team-a"][4:20], hash_token(tokens["team-a"])[7:]):
        assert secret not in exported


def test_without_auth_beyond_loopback_the_server_warns(start_server, caplog):
    with caplog.at_level(logging.WARNING, logger="klservice.server"):
        start_server(host="0.0.0.0")
    warnings = [r.getMessage() for r in caplog.records]
    assert any("SERVING WITHOUT AUTHENTICATION" in w for w in warnings)
    assert any("NO TLS" in w and "travel in clear" in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klservice.server"):
        start_server(host="127.0.0.1")
    assert not any("WITHOUT AUTHENTICATION" in r.getMessage() or "NO TLS" in r.getMessage() for r in caplog.records)


def test_with_auth_metrics_stay_on_loopback_unless_told_otherwise(start_server, auth_file, caplog):
    """Tenant names and their KL figures are on /metrics: with --auth-file it listens on 127.0.0.1 by default, even
    when gRPC listens on every interface; --metrics-host 0.0.0.0 is honoured, with a warning."""
    path, _ = auth_file
    with caplog.at_level(logging.WARNING, logger="klservice.server"):
        server = start_server(host="0.0.0.0", auth_file=str(path))
    assert server.server.metrics_host == "127.0.0.1"
    assert not any("/metrics on" in r.getMessage() for r in caplog.records)
    assert not any("WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klservice.server"):
        exposed = start_server(host="0.0.0.0", auth_file=str(path), metrics_host="0.0.0.0")
    assert exposed.server.metrics_host == "0.0.0.0"
    assert any("/metrics on 0.0.0.0" in r.getMessage() and "tenant names" in r.getMessage() for r in caplog.records)
    unauthenticated = start_server(host="0.0.0.0")  # without auth /metrics follows --host, as before
    assert unauthenticated.server.metrics_host == "0.0.0.0"


def test_sighup_reloads_the_auth_file_without_a_restart(model_cache_dir, tmp_path):
    """`klservice serve --auth-file`: a token added by `klservice auth add-token` works after SIGHUP; a file
    broken afterwards leaves the previous one in force."""
    path = tmp_path / "auth.toml"
    first = add_tenant(path, "team-a")
    env = dict(os.environ, KLSERVICE_CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")
    env.pop("KLSERVICE_TOKEN", None)
    process = subprocess.Popen(
        [KLSERVICE, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--auth-file", str(path)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any("listening on" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        target = "127.0.0.1:" + re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1)
        with KLClient(target, token=first) as client:
            try:
                client.wait_ready(timeout=120)
            except TimeoutError:
                raise AssertionError(f"the server did not become ready (exit {process.poll()}):\n{''.join(lines)[-4000:]}")
            assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
        result = subprocess.run([KLSERVICE, "auth", "add-token", str(path), "team-a"], capture_output=True, text=True, timeout=60)
        second = result.stdout.strip()
        with KLClient(target, token=second, max_retries=0) as client:
            with pytest.raises(Unauthenticated):
                client.score([[1, 2, 3]], 1)  # not yet: the server has not re-read the file
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not any("auth file reloaded" in line for line in lines) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
        path.write_text("this is not toml [")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any("not reloaded" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        with KLClient(target, token=first) as client:
            assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)  # the previous file is still in force
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    logged = "".join(lines)
    assert "not reloaded" in logged
    assert first not in logged and second not in logged
