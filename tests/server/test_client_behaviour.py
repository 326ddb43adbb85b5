"""The client against real servers: splitting, retries, deadlines, lightness."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from klservice.backends.base import ReferenceBackend
from klservice.config import ServerConfig
from klservice_client import KLClient, ServiceOverloaded, ServiceUnavailable


class GatedBackend(ReferenceBackend):
    """The real backend behind a gate: forwards (or loading) wait until the test opens it."""

    def __init__(self, backend, gate_info: bool = False):
        self.backend = backend
        self.gate = threading.Event()
        self.calls = 0
        self._gate_info = gate_info

    def info(self):
        if self._gate_info:
            self.gate.wait(60)
        return self.backend.info()

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        self.calls += 1
        self.gate.wait(60)
        return self.backend.score(sequences, starts, temperature, prompt_groups)

    def close(self):
        self.gate.set()


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from klservice.backends import load_backend

    return load_backend(ServerConfig(model=str(tiny_model_dir), device="cpu"), progress=False)


def test_large_batch_is_split_and_reassembled_in_order(start_server, client):
    small = start_server(max_request_tokens=100)
    rng = np.random.default_rng(4)
    sequences = [rng.integers(0, 49152, size=int(n)).tolist() for n in rng.integers(5, 60, size=25)]
    prompts = [int(rng.integers(1, len(s))) for s in sequences]
    logprobs = rng.normal(-10, 1, size=sum(len(s) - p for s, p in zip(sequences, prompts))).astype(np.float32)
    with KLClient(small.target) as split_client:
        assert split_client.model_info().max_request_tokens == 100
        split = split_client.compute_kl(sequences, prompts, logprobs=logprobs, spec="grpo_k3_as_loss")
        requests = small.server.metrics.requests.labels("ComputeKL", "OK")._value.get()
    whole = client.compute_kl(sequences, prompts, logprobs=logprobs, spec="grpo_k3_as_loss")
    assert requests >= 8  # ~800 tokens in requests of at most 100
    # `small` runs on hf; `client` on each backend under test: hf and vllm differ by up to ~2e-5 in float32.
    for name in ("ref_logprobs", "coef", "k3"):
        np.testing.assert_allclose(getattr(split, name), getattr(whole, name), atol=1e-4, err_msg=name)
    for field, value in vars(whole.diagnostics).items():
        assert getattr(split.diagnostics, field) == pytest.approx(value, rel=1e-4, abs=1e-6), field


def test_unavailable_while_loading_then_retried(start_server, hf_backend):
    gated = GatedBackend(hf_backend, gate_info=True)
    loading = start_server(wait=False, backend=gated)
    with KLClient(loading.target, max_retries=0) as impatient:
        with pytest.raises(ServiceUnavailable, match="loading"):
            impatient.score([[1, 2, 3]], 1)
    threading.Timer(1.0, gated.gate.set).start()
    with KLClient(loading.target, max_retries=30, initial_backoff=0.05, max_backoff=0.2) as patient:
        out = patient.score([[1, 2, 3]], 1)
    assert out.ref_logprobs.shape == (2,)


def test_full_queue_is_resource_exhausted_and_retried(start_server, hf_backend):
    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated, max_queue=1)
    results, errors = [], []

    def call(retries):
        try:
            with KLClient(server.target, max_retries=retries, initial_backoff=0.05, max_backoff=0.2) as c:
                results.append(c.score([[1, 2, 3, 4]], 2).ref_logprobs)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    while gated.calls == 0:  # the first request is in the forward, holding the worker
        time.sleep(0.01)
    second = threading.Thread(target=call, args=(0,))
    second.start()
    deadline = time.time() + 10
    while server.server.service.scheduler.queued_requests < 1 and time.time() < deadline:
        time.sleep(0.01)
    third = threading.Thread(target=call, args=(0,))
    third.start()
    third.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ServiceOverloaded), errors
    assert "queue full" in str(errors[0])
    assert server.model_metrics.dropped.labels("queue_full")._value.get() == 1
    retrying = threading.Thread(target=call, args=(50,))
    retrying.start()
    time.sleep(0.3)
    gated.gate.set()
    for thread in (first, second, retrying):
        thread.join(30)
    assert len(results) == 3 and len(errors) == 1
    for values in results:
        np.testing.assert_array_equal(values, results[0])


def test_deadline_exceeded_is_typed(start_server, hf_backend):
    from klservice_client import DeadlineExceeded

    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated)
    with KLClient(server.target, timeout=0.5, max_retries=0) as c:
        with pytest.raises(DeadlineExceeded):
            c.score([[1, 2, 3]], 1)
    gated.gate.set()
    with KLClient(server.target, timeout=30) as c:
        assert c.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)


def test_client_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "import klservice_client\n"
        "from klservice_client import KLClient, kl\n"
        "kl.compute_kl(np.zeros(3), np.ones(3), [3], 'grpo_k3_as_loss')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules\n"
        "print('light')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "light"


def test_async_client(tiny_server):
    import asyncio

    from klservice_client import AsyncKLClient

    async def run():
        async with AsyncKLClient(tiny_server.target, job_id="async") as c:
            info = await c.model_info()
            outs = await asyncio.gather(
                *(c.compute_kl([[1, 2, 3, i + 4]], 2, logprobs=[-1.0, -2.0]) for i in range(8))
            )
            return info, outs

    info, outs = asyncio.run(run())
    assert info.vocab_size == 49152
    assert len(outs) == 8 and all(o.coef.shape == (2,) for o in outs)


class PermittedBackend(ReferenceBackend):
    """The real backend, each forward call waiting for one permit from the test."""

    def __init__(self, backend):
        self.backend = backend
        self.permits = threading.Semaphore(0)
        self.calls: list[list[int]] = []

    def info(self):
        return self.backend.info()

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        assert self.permits.acquire(timeout=60)
        self.calls.append([len(s) for s in sequences])
        return self.backend.score(sequences, starts, temperature, prompt_groups)

    def close(self):
        for _ in range(8):
            self.permits.release()


def test_answers_leave_per_forward_call_and_a_late_small_request_joins_the_running_step(start_server, hf_backend):
    """A step of two forward calls (a 10- and a 60-token sequence, not padded together under a 100-token budget):
    the short request is answered once its call is done, and a small request of an idle job sent during the first
    call runs as the step's next call, answered before the long call, not after the step and the one after it."""
    backend = PermittedBackend(hf_backend)
    server = start_server(backend=backend, cache_mb=0, max_batch_tokens=100, max_wait_ms=300,
                          max_step_seconds=0)  # steps sized by tokens only (the time bound is test_scheduler.py's)
    pool = concurrent.futures.ThreadPoolExecutor(3)

    def score(job, length):
        with KLClient(server.target, job_id=job, max_retries=0, timeout=60) as client:
            return client.score([list(range(1, length + 1))], 1)

    short, long = pool.submit(score, "short", 10), pool.submit(score, "long", 60)
    time.sleep(1.0)  # both arrive within --max-wait-ms: one step of two calls, waiting for its first permit
    assert server.server.service.scheduler.queued_requests == 0 and not backend.calls
    late = pool.submit(score, "late", 8)
    time.sleep(0.3)
    backend.permits.release()
    assert short.result(30).ref_logprobs.shape == (9,)
    backend.permits.release()
    assert late.result(30).ref_logprobs.shape == (7,)
    assert not long.done() and backend.calls == [[10], [8]]
    backend.permits.release()
    assert long.result(30).ref_logprobs.shape == (59,)
    pool.shutdown()
