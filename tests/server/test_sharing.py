"""A server shared between tenants: the admin role and ReloadAuth, quotas, and the attacks of a hostile tenant.

Real servers on the tiny Llama with an auth file written by `klservice auth`; a gated backend holds
the model busy where a test needs a queue.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import threading
import time

import numpy as np
import pytest

from klservice_client import (
    FailedPrecondition, KLClient, KLItem, PermissionDenied, ServiceOverloaded, TooLarge, Unauthenticated,
)
from tests.server.test_auth import KLSERVICE, add_tenant
from tests.server.test_client_behaviour import GatedBackend
from tests.server.test_client_behaviour import hf_backend  # noqa: F401 - a fixture used below
from tests.server.test_metrics_and_health import scrape


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture()
def tenants(tmp_path):
    path = tmp_path / "auth.toml"
    tokens = {
        "team-a": add_tenant(path, "team-a"),
        "team-b": add_tenant(path, "team-b"),
        "ops": add_tenant(path, "ops", "--role", "admin"),
    }
    return path, tokens


def series(samples, name: str) -> dict[tuple[str, str], float]:
    """(tenant, trainer_job) -> value of one per-job metric."""
    return {(dict(labels)["tenant"], dict(labels)["trainer_job"]): value
            for (sample, labels), value in samples.items() if sample == name}


# --------------------------------------------------------------------------- the admin role


def test_reload_auth_needs_the_admin_role(start_server, tenants):
    path, tokens = tenants
    server = start_server(auth_file=str(path))
    with KLClient(server.target, token=tokens["team-a"], max_retries=0) as trainer:
        with pytest.raises(PermissionDenied, match="ReloadAuth: tenant 'team-a' has the role 'trainer'"):
            trainer.reload_auth()
    with KLClient(server.target, token="kls_forged", max_retries=0) as stranger:
        with pytest.raises(Unauthenticated):
            stranger.reload_auth()
    env_token = os.environ.pop("KLSERVICE_TOKEN", None)
    try:
        with KLClient(server.target, max_retries=0) as anonymous:
            with pytest.raises(Unauthenticated, match="authorization: missing"):
                anonymous.reload_auth()
    finally:
        if env_token is not None:
            os.environ["KLSERVICE_TOKEN"] = env_token

    newcomer = add_tenant(path, "team-c")  # not in force until the server re-reads the file
    with KLClient(server.target, token=newcomer, max_retries=0) as client:
        with pytest.raises(Unauthenticated):
            client.score([[1, 2, 3]], 1)
        with KLClient(server.target, token=tokens["ops"]) as admin:
            assert admin.reload_auth() == ["ops", "team-a", "team-b", "team-c"]
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)

    path.write_text("[tenants.team-a]\ntokens = [\"kls_not-a-hash\"]\n")
    with KLClient(server.target, token=tokens["ops"], max_retries=0) as admin:
        with pytest.raises(FailedPrecondition, match=r"previous one stays in force: .*tenants.team-a.tokens\[0\]"):
            admin.reload_auth()
        assert admin.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)  # the previous file is still in force
    samples = scrape(server.metrics_url)
    assert samples["klservice_requests_total", (("code", "PERMISSION_DENIED"), ("method", "ReloadAuth"))] == 1
    assert samples["klservice_requests_total", (("code", "OK"), ("method", "ReloadAuth"))] == 1


def test_without_an_auth_file_nobody_is_an_admin(start_server):
    server = start_server()
    with KLClient(server.target, token="kls_anything", max_retries=0) as client:
        with pytest.raises(PermissionDenied, match="no --auth-file"):
            client.reload_auth()


def test_klservice_auth_reload_calls_the_server(start_server, tenants):
    path, tokens = tenants
    server = start_server(auth_file=str(path))
    add_tenant(path, "team-d")
    env = {k: v for k, v in os.environ.items() if k != "KLSERVICE_TOKEN"}
    command = [KLSERVICE, "auth", "reload", "--target", server.target]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={**env, "KLSERVICE_TOKEN": tokens["ops"]})
    assert result.returncode == 0, result.stderr
    assert "4 tenant(s): ops, team-a, team-b, team-d" in result.stdout
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env={**env, "KLSERVICE_TOKEN": tokens["team-b"]})
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    assert tokens["team-b"] not in refused.stderr + refused.stdout


def test_a_revoked_token_stops_being_served_on_its_open_stream(start_server, tmp_path):
    """The operator removes team-a from the auth file and reloads it while team-a has a StreamKL stream open: the
    items team-a sends from then on are answered UNAUTHENTICATED, the stream stays up for the answers."""
    path = tmp_path / "auth.toml"
    admin = add_tenant(path, "ops", "--role", "admin")
    without_team_a = path.read_text()
    token = add_tenant(path, "team-a")
    server = start_server(auth_file=str(path))
    sequences = [[1, 2, 3, 4, 5]]
    with KLClient(server.target, token=token) as client:
        reference = client.score(sequences, 1).ref_logprobs
    item = lambda key: KLItem(sequences, 1, logprobs=reference, spec="principled", key=key)  # noqa: E731
    first_answered, revoked = threading.Event(), threading.Event()

    def items():
        yield item("before")
        assert first_answered.wait(60)
        assert revoked.wait(60)
        yield item("after")

    results = {}
    with KLClient(server.target, token=token) as client:
        for result in client.stream_kl(items()):
            results[result.key] = result
            if result.key == "before":
                first_answered.set()
                path.write_text(without_team_a)
                with KLClient(server.target, token=admin) as operator:
                    assert operator.reload_auth() == ["ops"]
                revoked.set()
    assert results["before"].error is None and results["before"].output.k3.shape == (4,)
    assert isinstance(results["after"].error, Unauthenticated), results["after"]


# --------------------------------------------------------------------------- quotas


def test_a_tenant_over_its_quota_is_refused_and_the_others_are_not(start_server, hf_backend, tmp_path):
    """team-q may queue 40 tokens: a third 20-token request is RESOURCE_EXHAUSTED with a retry hint, one of 50
    tokens is TooLarge, while team-b queues 100 tokens and every accepted request is answered."""
    path = tmp_path / "auth.toml"
    quota_token = add_tenant(path, "team-q", "--max-queued-tokens", "40")
    other_token = add_tenant(path, "team-b")
    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated, auth_file=str(path), cache_mb=0)
    scheduler = server.server.service.scheduler
    rng = np.random.default_rng(3)
    sequence = lambda n: rng.integers(5, 49152, size=n).tolist()  # noqa: E731
    with KLClient(server.target, token=quota_token, max_retries=0) as q, \
            KLClient(server.target, token=other_token, max_retries=0) as b, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        plug = pool.submit(b.score, [sequence(10)], 1)  # holds the model: what follows waits in the queue
        assert wait_until(lambda: gated.calls == 1)
        accepted = [pool.submit(q.score, [sequence(20)], 1) for _ in range(2)]
        assert wait_until(lambda: scheduler.queued_requests == 2)
        with pytest.raises(ServiceOverloaded, match="tenant 'team-q' has 40 tokens queued and its quota is 40"):
            q.score([sequence(20)], 1)
        with pytest.raises(TooLarge, match="50 tokens to queue, over the quota of tenant 'team-q': 40 queued tokens"):
            q.score([sequence(50)], 1)
        other = pool.submit(b.score, [sequence(100)], 1)  # team-b has no quota: queued beside team-q's 40
        assert wait_until(lambda: scheduler.queued_requests == 3)
        gated.gate.set()
        assert plug.result(60).ref_logprobs.shape == (9,)
        assert [f.result(60).ref_logprobs.shape for f in accepted] == [(19,), (19,)]
        assert other.result(60).ref_logprobs.shape == (99,)
        # the quota counts what is queued now: with the queue drained team-q is served again
        assert q.score([sequence(40)], 1).ref_logprobs.shape == (39,)
    samples = scrape(server.metrics_url)
    assert samples["klservice_dropped_total", server.labels(reason="quota")] == 1  # TooLarge is not a drop: waiting won't help
    assert samples["klservice_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("method", "Score"))] == 2


def test_a_client_splits_its_batches_to_fit_its_tenants_quota(start_server, tmp_path):
    """GetModelInfo tells each tenant the most tokens one request may carry: its quota where that is lower, so a
    batch larger than the quota goes through, split into requests the quota can take."""
    path = tmp_path / "auth.toml"
    quota_token = add_tenant(path, "team-q", "--max-queued-tokens", "40")
    other_token = add_tenant(path, "team-b")
    server = start_server(auth_file=str(path), cache_mb=0)
    rng = np.random.default_rng(8)
    sequences = [rng.integers(5, 49152, size=20).tolist() for _ in range(5)]
    with KLClient(server.target, token=other_token) as unlimited:
        assert unlimited.model_info().max_request_tokens == server.server.config.max_request_tokens
        expected = unlimited.score(sequences, 4).ref_logprobs
    with KLClient(server.target, token=quota_token) as limited:
        assert limited.model_info().max_request_tokens == 40
        np.testing.assert_array_equal(limited.score(sequences, 4).ref_logprobs, expected)
    requests = server.server.metrics.requests.labels("Score", "OK")._value.get()
    assert requests == 1 + 3  # team-b's one request; team-q's 100 tokens in requests of at most 40


# --------------------------------------------------------------------------- the attacks


def test_a_tenant_cannot_write_another_tenants_kl_series(start_server, tenants):
    """Before: a second client sending `x-job-id: tenant-A` moved tenant-A's coefficient-bias gauge from 0 to 6.2e7
    (and would have fired KLServiceLargeKLBias against the wrong team). Now its numbers land under its own tenant."""
    path, tokens = tenants
    server = start_server(auth_file=str(path))
    rng = np.random.default_rng(0)
    sequences = [rng.integers(5, 49152, size=12).tolist() for _ in range(2)]
    with KLClient(server.target, token=tokens["team-a"], job_id="tenant-A") as honest:
        reference = honest.score(sequences, 2).ref_logprobs
        honest.compute_kl(sequences, 2, logprobs=reference, spec="grpo_k3_as_loss")  # policy == reference: no bias
    with KLClient(server.target, token=tokens["team-b"], job_id="tenant-A") as spoofer:
        spoofer.compute_kl(sequences, 2, logprobs=np.minimum(reference + 20.0, 0.0), spec="grpo_k3_as_loss")
    bias = series(scrape(server.metrics_url), "klservice_kl_coef_bias_abs_mean")
    assert bias["team-a", "tenant-A"] == 0.0
    assert bias["team-b", "tenant-A"] > 0.1  # the spoofer's own series
    assert set(bias) == {("team-a", "tenant-A"), ("team-b", "tenant-A")}


def test_junk_job_ids_cannot_push_another_tenant_into_other(start_server, tenants):
    """Before: 64 junk job ids filled the label set, and the real job "tenant-A" was reported as `other` from then on.
    Now each tenant has its own --max-jobs labels, and calls that fail authentication create none."""
    path, tokens = tenants
    server = start_server(auth_file=str(path), max_jobs=4)
    with KLClient(server.target, token="kls_forged", max_retries=0) as stranger:
        for index in range(8):
            with KLClient(server.target, token="kls_forged", job_id=f"forged-{index}", max_retries=0) as forged:
                with pytest.raises(Unauthenticated):
                    forged.score([[1, 2, 3]], 1)
        with pytest.raises(Unauthenticated):
            stranger.score([[1, 2, 3]], 1)
    for index in range(64):
        with KLClient(server.target, token=tokens["team-b"], job_id=f"junk-{index}") as junk:
            junk.score([[1, 2, 3]], 1)
    with KLClient(server.target, token=tokens["team-a"], job_id="tenant-A") as honest:
        honest.score([[1, 2, 3, 4]], 1)
    scored = series(scrape(server.metrics_url), "klservice_tokens_scored_total")
    assert scored["team-a", "tenant-A"] == 3
    assert {job for tenant, job in scored if tenant == "team-b"} == {"junk-0", "junk-1", "junk-2", "junk-3", "other"}
    assert scored["team-b", "other"] == 2 * 60
    assert not any(job.startswith("forged") for _, job in scored)
    assert {tenant for tenant, _ in scored} == {"team-a", "team-b"}
