"""ReferenceService without gRPC: readiness, draining, score, compute_kl, model info, metrics.

The service runs on a real hf backend (the tiny Llama) inside this process; requests are the
validated domain objects the servicer would build, so no server, channel or protobuf is
involved.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from klservice.errors import NotReady
from klservice.metrics import Metrics
from klservice.service import ReferenceService
from klservice.validation import Batch, KLRequest, ScoreRequest
from klservice_client import kl

SEQUENCES = [np.array([5, 6, 7, 8, 9]), np.array([10, 11, 12])]
PROMPTS = [2, 1]


def batch() -> Batch:
    return Batch(
        token_ids=np.concatenate(SEQUENCES),
        lengths=np.array([len(s) for s in SEQUENCES], dtype=np.int64),
        prompt_lengths=np.array(PROMPTS, dtype=np.int64),
    )


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from klservice.backends.hf import HFBackend

    return HFBackend(tiny_model_dir, device="cpu", progress=False)


@pytest.fixture()
def service(backend, server_config):
    config = dataclasses.replace(server_config, cache_mb=0)
    service = ReferenceService(config, Metrics(CollectorRegistry()))
    loop = asyncio.new_event_loop()
    yield service, loop
    loop.run_until_complete(service.stop())
    loop.close()


def test_not_ready_before_start_and_after_drain(service, backend):
    service, loop = service
    job = service.job("job-a", peer=None)
    with pytest.raises(NotReady, match="loading"):
        loop.run_until_complete(service.score(ScoreRequest(batch(), 1.0), job, None))
    served = loop.run_until_complete(service.start(backend))
    assert service.ready and service.model_info() == served.info
    assert served.limits.model_name == backend.info().name
    service.drain()
    assert not service.ready
    with pytest.raises(NotReady, match="draining"):
        loop.run_until_complete(service.score(ScoreRequest(batch(), 1.0), job, None))
    with pytest.raises(NotReady, match="draining"):
        service.model_info()


def test_score_is_the_backends_forward_and_counts_the_job(service, backend):
    service, loop = service
    loop.run_until_complete(service.start(backend))
    result = loop.run_until_complete(service.score(ScoreRequest(batch(), 0.7), service.job("job-a", None), None))
    expected = np.concatenate(backend.score(SEQUENCES, PROMPTS, temperature=0.7).values)
    np.testing.assert_allclose(result.ref_logprobs, expected, atol=1e-5, rtol=0)
    assert result.scored_lengths.tolist() == [3, 2]
    assert result.model.revision == backend.info().revision
    assert service.metrics.tokens_scored.labels(result.model.name, "anonymous", "job-a")._value.get() == 5


def test_compute_kl_is_the_kl_library_on_the_reference(service, backend):
    service, loop = service
    loop.run_until_complete(service.start(backend))
    rng = np.random.default_rng(0)
    logprobs = rng.normal(-10, 1, size=5).astype(np.float32)
    old = logprobs + rng.normal(0, 0.1, size=5).astype(np.float32)
    spec = kl.resolve_spec("principled_off_policy")
    request = KLRequest(batch(), 1.0, logprobs, old, spec, spec_label="principled_off_policy")
    result = loop.run_until_complete(service.compute_kl(request, service.job(None, peer="ipv4:1.2.3.4"), None))
    expected = kl.compute_kl(logprobs, result.ref_logprobs, [3, 2], spec, old)
    np.testing.assert_array_equal(result.kl.coef, expected.coef)
    assert result.kl.diagnostics == expected.diagnostics
    # No job id: fairness by connection, metrics as "anonymous".
    assert service.job(None, peer="ipv4:1.2.3.4").key == "peer:ipv4:1.2.3.4"
    assert service.metrics.kl_k3.labels(result.model.name, "anonymous", "default")._value.get() == pytest.approx(expected.diagnostics.k3_mean_per_token)
