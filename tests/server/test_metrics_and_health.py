"""Prometheus metrics over HTTP, health states, reflection."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from klservice_client import KLClient


def job_labels(job: str, tenant: str = "anonymous", model: str | None = None) -> tuple:
    """The labels of a per-job series, as `scrape` keys them (with `model`: of a per-model one too)."""
    labels = {"tenant": tenant, "trainer_job": job, **({"model": model} if model is not None else {})}
    return tuple(sorted(labels.items()))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_endpoint_reports_requests_tokens_and_kl(start_server):
    server = start_server()
    rng = np.random.default_rng(5)
    sequences = [rng.integers(0, 49152, size=20).tolist() for _ in range(3)]
    logprobs = rng.normal(-10, 1, size=3 * 15).astype(np.float32)
    with KLClient(server.target, job_id="job-a") as a, KLClient(server.target, job_id="job-b") as b:
        out = a.compute_kl(sequences, 5, logprobs=logprobs, spec="grpo_k3_as_loss")
        b.score(sequences, 5)
        with pytest.raises(Exception):
            b.score([[1, 49152]], 1)
    samples = scrape(server.metrics_url)
    assert samples["klservice_requests_total", (("code", "OK"), ("method", "ComputeKL"))] == 1
    assert samples["klservice_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Score"))] == 1
    job_a, job_b = server.labels(tenant="anonymous", trainer_job="job-a"), server.labels(tenant="anonymous", trainer_job="job-b")
    assert samples["klservice_tokens_scored_total", job_a] == 45
    assert samples["klservice_tokens_scored_total", job_b] == 45
    assert samples["klservice_kl_k3_mean", job_a] == pytest.approx(out.diagnostics.k3_mean_per_token)
    assert samples["klservice_kl_coef_bias_abs_mean", job_a] == pytest.approx(out.diagnostics.coef_bias_abs_mean)
    assert samples["klservice_kl_batches_total", server.labels(spec="grpo_k3_as_loss", tenant="anonymous", trainer_job="job-a")] == 1
    assert samples["klservice_request_seconds_count", (("method", "ComputeKL"),)] == 1
    assert samples["klservice_forward_seconds_count", server.labels()] >= 1
    # job-b's Score repeats job-a's sequences: answered from the reference cache, not forwarded again. Forwarded:
    # each sequence's 19 inputs (its last token is only a target).
    assert samples["klservice_tokens_forwarded_total", server.labels()] == 3 * 19
    assert samples["klservice_cache_lookups_total", server.labels(result="hit")] == 3
    assert samples["klservice_cache_lookups_total", server.labels(result="miss")] == 3
    assert samples["klservice_ready", ()] == 1
    info = [key for key in samples if key[0] == "klservice_model_info"]
    assert len(info) == 1 and dict(info[0][1])["revision"] == a.model_info().revision
    assert dict(info[0][1])["model"] == server.model and dict(info[0][1])["generation"] == "1"


def test_job_labels_are_bounded(start_server):
    server = start_server(max_jobs=2)
    for job in ("one", "two", "three", "four"):
        with KLClient(server.target, job_id=job) as c:
            c.score([[1, 2, 3]], 1)
    samples = scrape(server.metrics_url)
    jobs = {dict(labels)["trainer_job"] for name, labels in samples if name == "klservice_tokens_scored_total"}
    assert jobs == {"one", "two", "other"}
    assert not any(dict(labels).get("job") for _, labels in samples), "`job` is the scrape job's label"


def test_health_not_serving_while_loading_then_serving(start_server, tiny_model_dir):
    import threading

    from klservice.backends import load_backend
    from klservice.backends.base import ReferenceBackend
    from klservice.config import ServerConfig

    class SlowToLoad(ReferenceBackend):
        def __init__(self):
            self.backend = load_backend(ServerConfig(model=str(tiny_model_dir), device="cpu"), progress=False)
            self.gate = threading.Event()

        def info(self):
            self.gate.wait(60)
            return self.backend.info()

        def score(self, *args):
            return self.backend.score(*args)

        def close(self):
            self.gate.set()

    slow = SlowToLoad()
    server = start_server(wait=False, backend=slow)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "klservice.v1.ReferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        slow.gate.set()
        server.wait_ready()
        status = health.Check(health_pb2.HealthCheckRequest(service="klservice.v1.ReferenceService"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(tiny_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {service.name for service in response.list_services_response.service}
    assert {"klservice.v1.ReferenceService", "grpc.health.v1.Health"} <= names
