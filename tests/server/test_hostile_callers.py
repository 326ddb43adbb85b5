"""What a hostile or careless caller can do to a shared server, and what it gets back.

Each test sends what an adversarial user sent to an earlier version (many distinct job ids,
undecodable messages, responses too large to send, requests left to expire in the queue,
extreme values) and checks the server refuses it precisely, accounts for it honestly and keeps
serving everyone else.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from klservice.backends.base import ReferenceBackend, Scored
from klservice.config import ServerConfig
from klservice.errors import INTERNAL_MESSAGE
from klservice.scheduler import TokenBudgetScheduler
from klservice.validation import Batch
from klservice_client import InvalidArgument, KLClient, TooLarge, kl
from klservice_client.wire import from_tensor, pb, pb_grpc, to_tensor
from tests.server.test_client_behaviour import GatedBackend
from tests.server.test_metrics_and_health import scrape


def batch_message(sequences, prompts) -> pb.SequenceBatch:
    return pb.SequenceBatch(
        token_ids=to_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])),
        lengths=to_tensor(np.array([len(s) for s in sequences], dtype=np.int64)),
        prompt_lengths=to_tensor(np.array(prompts, dtype=np.int64)),
    )


def good_score() -> pb.ScoreRequest:
    return pb.ScoreRequest(batch=batch_message([[5, 6, 7, 8]], [2]))


def wait_for(condition, timeout: float = 30.0) -> bool:
    """Poll until `condition()` holds (an event, not a speed: the timeout only bounds a broken run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from klservice.backends import load_backend

    return load_backend(ServerConfig(model=str(tiny_model_dir), device="cpu"), progress=False)


# --- bounded state ----------------------------------------------------------------------


class Instant(ReferenceBackend):
    def info(self):
        raise AssertionError("not needed")

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        return Scored([np.full(len(s) - st, -1.0, np.float32) for s, st in zip(sequences, starts)])


def test_distinct_job_ids_leave_no_state_behind():
    """3,000 requests from 3,000 job ids: once answered, the scheduler holds no job at all."""

    async def main():
        scheduler = TokenBudgetScheduler(Instant(), max_batch_tokens=4096, max_queue=4096, max_wait_s=0.001)
        await scheduler.start()
        batch = Batch(np.arange(1, 9, dtype=np.int64), np.array([8]), np.array([4]))
        peak = 0

        async def one(i):
            nonlocal peak
            peak = max(peak, scheduler.active_jobs)
            return await scheduler.score(batch, 1.0, f"job-{i:05d}-" + "x" * 100)

        results = await asyncio.gather(*(one(i) for i in range(3000)))
        remaining = scheduler.active_jobs
        await scheduler.stop()
        return results, remaining, peak

    results, remaining, peak = asyncio.run(main())
    assert len(results) == 3000 and all(r.shape == (4,) for r in results)
    assert peak > 1  # the jobs were really held while queued
    assert remaining == 0


def test_an_overlong_job_id_is_refused(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(good_score(), timeout=30, metadata=(("x-job-id", "j" * 7000),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-job-id: 7000 characters, at most 128" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused_stream:
            list(stub.StreamKL(iter([]), timeout=30, metadata=(("x-job-id", "j" * 7000),)))
        assert refused_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.Score(good_score(), timeout=30, metadata=(("x-job-id", "j" * 128),)).scored_lengths.shape == [1]


def test_metadata_too_large_for_grpc_is_not_retried_as_overload(tiny_server):
    """RESOURCE_EXHAUSTED without the server's retry hint is a size limit: raised at once as TooLarge."""
    with KLClient(tiny_server.target, job_id="j" * 20_000, max_retries=5, initial_backoff=5.0) as client:
        with pytest.raises(TooLarge):
            client.score([[1, 2, 3]], 1)


# --- undecodable messages ---------------------------------------------------------------------


def test_an_undecodable_message_is_invalid_argument_and_does_not_end_a_stream(tiny_server):
    garbage = b"\x0a\xff\xff\xff\xff\xff"  # field 1, length-delimited, with a length past the end
    with grpc.insecure_channel(tiny_server.target) as channel:
        raw_score = channel.unary_unary("/klservice.v1.ReferenceService/Score")
        with pytest.raises(grpc.RpcError) as refused:
            raw_score(garbage, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid klservice.v1.ScoreRequest message" in refused.value.details()

        good = pb.KLRequest(
            request_id="good", batch=batch_message([[5, 6, 7, 8]], [2]), logprobs=to_tensor(np.full(2, -1.0, np.float32))
        )
        raw_stream = channel.stream_stream(
            "/klservice.v1.ReferenceService/StreamKL", response_deserializer=pb.StreamKLResponse.FromString
        )
        answers = list(raw_stream(iter([garbage, good.SerializeToString()]), timeout=60))
    kinds = sorted((a.request_id, a.WhichOneof("result")) for a in answers)
    assert kinds == [("", "error"), ("good", "response")]
    error = next(a.error for a in answers if a.WhichOneof("result") == "error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid klservice.v1.KLRequest message" in error.message


# --- responses too large to send -------------------------------------------------------------


def test_a_response_too_large_is_refused_before_any_forward(start_server):
    """The request fits the 1 MiB limit, its ComputeKL response would not: refused up front, counted as refused."""
    server = start_server(max_message_mb=1, cache_mb=0)
    rng = np.random.default_rng(11)
    sequences = [rng.integers(0, 49152, size=500).tolist() for _ in range(100)]
    scored = 100 * 499  # float32 outputs: 4 + 5 * 4 bytes a token, ~1.2 MB
    request = pb.KLRequest(
        batch=batch_message(sequences, [1] * 100), logprobs=to_tensor(rng.normal(-10, 1, size=scored).astype(np.float32))
    )
    assert request.ByteSize() < 1 << 20
    forwarded = server.model_metrics.tokens_forwarded._value.get()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ComputeKL(request, timeout=120)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "response to 49900 scored tokens would take up to" in refused.value.details()
    assert "send at most" in refused.value.details()
    assert dict(refused.value.trailing_metadata() or ()).get("retry-after-ms") is None
    assert server.model_metrics.tokens_forwarded._value.get() == forwarded  # no model time was spent
    samples = scrape(server.metrics_url)
    assert samples["klservice_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("method", "ComputeKL"))] == 1

    # The client splits the same batch by response size and gets every value.
    logprobs = np.asarray(rng.normal(-10, 1, size=scored), dtype=np.float32)
    with KLClient(server.target) as client:
        out = client.compute_kl(sequences, 1, logprobs=logprobs, spec="grpo_k3_as_loss")
    expected = kl.compute_kl(logprobs, out.ref_logprobs, out.scored_lengths, "grpo_k3_as_loss")
    np.testing.assert_allclose(out.coef, expected.coef, rtol=1e-6)
    assert samples.get(("klservice_requests_total", (("code", "OK"), ("method", "ComputeKL"))), 0) == 0
    parts = scrape(server.metrics_url)["klservice_requests_total", (("code", "OK"), ("method", "ComputeKL"))]
    assert parts >= 2


def test_the_response_size_check_sizes_float32_outputs_as_float32(start_server):
    """A ComputeKL answer is sized as it will be sent: with float32 log-probs its per-token outputs are float32, so
    48 x 500 tokens (~575 KB of answer) fit a 1 MiB limit, where sizing them as float64 (~1.05 MB) refused them."""
    server = start_server(max_message_mb=1, cache_mb=0)
    rng = np.random.default_rng(12)
    sequences = [rng.integers(0, 49152, size=500).tolist() for _ in range(48)]
    request = pb.KLRequest(batch=batch_message(sequences, [1] * 48),
                           logprobs=to_tensor(rng.normal(-10, 1, size=48 * 499).astype(np.float32)))
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 1 << 20)]) as channel:
        reply = pb_grpc.ReferenceServiceStub(channel).ComputeKL(request, timeout=300)
    assert reply.ByteSize() < 1 << 20 and from_tensor(reply.coef, "coef").dtype == np.float32
    with pytest.raises(grpc.RpcError) as refused:  # the same tokens in float64 would not fit: refused up front
        request.logprobs.CopyFrom(to_tensor(rng.normal(-10, 1, size=48 * 499)))
        with grpc.insecure_channel(server.target) as channel:
            pb_grpc.ReferenceServiceStub(channel).ComputeKL(request, timeout=300)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- deadlines --------------------------------------------------------------------------------


def test_work_whose_deadline_passes_in_the_queue_is_counted_and_leaves_the_queue_at_once(start_server, hf_backend):
    gated = GatedBackend(hf_backend)
    server = start_server(backend=gated, cache_mb=0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        holding = stub.Score.future(good_score(), timeout=120)  # occupies the worker behind the gate
        assert wait_for(lambda: gated.calls == 1)
        expiring = [stub.Score.future(pb.ScoreRequest(batch=batch_message([[9, 10, 11, i + 1]], [1])), timeout=3.0)
                    for i in range(5)]
        scheduler = server.server.service.scheduler
        assert wait_for(lambda: scheduler.queued_requests == 5, timeout=2.5)  # all queued before they expire
        for call in expiring:
            with pytest.raises(grpc.RpcError) as expired:
                call.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Gone from the queue while the forward still holds the worker (the gate is still closed).
        assert wait_for(lambda: scheduler.queued_requests == 0)
        samples = scrape(server.metrics_url)
        assert samples["klservice_queue_depth", server.labels()] == 0
        assert wait_for(lambda: scrape(server.metrics_url).get(("klservice_dropped_total", server.labels(reason="deadline"))) == 5)
        assert gated.calls == 1
        gated.gate.set()
        assert holding.result().scored_lengths.shape == [1]
    samples = scrape(server.metrics_url)
    assert samples["klservice_requests_total", (("code", "DEADLINE_EXCEEDED"), ("method", "Score"))] == 5


# --- values that would not be finite ---------------------------------------------------------


class Extreme(ReferenceBackend):
    """The real backend, but its log-probs are replaced by `value`."""

    def __init__(self, backend, value):
        self.backend, self.value = backend, value

    def info(self):
        return self.backend.info()

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        scored = self.backend.score(sequences, starts, temperature, prompt_groups)
        return Scored([np.full_like(v, self.value) for v in scored.values], scored.tokens_saved)


@pytest.mark.parametrize("value", [np.nan, 5.0, 0.01])
def test_model_output_that_is_no_log_prob_is_internal_and_never_cached(start_server, hf_backend, value):
    """NaN, and values above 0 beyond float rounding (a log-probability is at most 0): the backend's failure."""
    server = start_server(backend=Extreme(hf_backend, value))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        for _ in range(2):  # the second time too: the NaNs were not cached as an answer
            with pytest.raises(grpc.RpcError) as failed:
                stub.Score(good_score(), timeout=60)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert failed.value.details() == INTERNAL_MESSAGE


def test_an_ok_compute_kl_never_carries_inf(start_server, hf_backend):
    """A reference of -3e38 (finite) makes k2 = inf in float32: refused naming the token, never OK with inf."""
    server = start_server(backend=Extreme(hf_backend, -3e38))
    with KLClient(server.target, max_retries=0) as client:
        assert np.isfinite(client.score([[5, 6, 7, 8]], 2).ref_logprobs).all()
        with pytest.raises(InvalidArgument, match=r"k2 is not finite at sequence 0, scored token 0 .*float64"):
            client.compute_kl([[5, 6, 7, 8]], 2, logprobs=np.array([-1.0, -1.0], np.float32))
        with pytest.raises(InvalidArgument, match="is not a log-prob"):
            client.compute_kl([[5, 6, 7, 8]], 2, logprobs=[-1.0, 3e38])


def test_in_range_log_probs_whose_importance_weight_overflows_float32_are_refused_naming_the_token(tiny_server):
    """Each log-prob is in range, but the sequence weight e^(sum log w) times delta overflows float32."""
    spec = kl.KLSpec(estimator=kl.Estimator.K1, mode=kl.Mode.IN_REWARD, importance_sampling=kl.ImportanceSampling.SEQUENCE)
    with KLClient(tiny_server.target, max_retries=0) as client:
        with pytest.raises(InvalidArgument, match=r"coef is not finite at sequence 0, scored token 0 \(policy -10000"):
            client.compute_kl(
                [[5, 6, 7, 8, 9]], 1, logprobs=np.array([-1e4, 0, 0, 0], np.float32),
                old_logprobs=np.array([0, -1e4, -1e4, -1e4], np.float32), spec=spec,
            )
        assert client.score([[5, 6, 7, 8]], 2).ref_logprobs.shape == (2,)


class MissingOne(ReferenceBackend):
    """The real backend, but its first call returns one value too few (a backend bug)."""

    def __init__(self, backend):
        self.backend, self.broken = backend, True

    def info(self):
        return self.backend.info()

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        scored = self.backend.score(sequences, starts, temperature, prompt_groups)
        if self.broken:
            self.broken = False
            return Scored(scored.values[:-1], scored.tokens_saved)
        return scored


def test_a_backend_bug_fails_its_step_and_the_server_keeps_serving(start_server, hf_backend):
    server = start_server(backend=MissingOne(hf_backend), cache_mb=0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ReferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Score(good_score(), timeout=60)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == INTERNAL_MESSAGE
        assert stub.Score(good_score(), timeout=60).scored_lengths.shape == [1]  # the worker is still alive


# --- IPv6 and hosts that do not resolve --------------------------------------------------------


@pytest.mark.parametrize("host, metrics_host", [("::1", None), ("[::1]", None), ("127.0.0.1", "[::1]")])
def test_ipv6_literals_work_for_grpc_and_metrics(start_server, host, metrics_host):
    import urllib.request

    server = start_server(host=host, metrics_host=metrics_host)
    target = "[::1]" if "::1" in host else "127.0.0.1"
    with KLClient(f"{target}:{server.server.port}") as client:
        assert client.score([[1, 2, 3]], 1).ref_logprobs.shape == (2,)
    metrics = "[::1]" if "::1" in (metrics_host or host) else "127.0.0.1"
    text = urllib.request.urlopen(f"http://{metrics}:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    assert "klservice_requests_total" in text


def test_a_host_that_does_not_resolve_fails_at_start_naming_the_flag(tmp_path):
    import subprocess

    from tests.server.test_auth import KLSERVICE

    for flag in ("--host", "--metrics-host"):
        result = subprocess.run([KLSERVICE, "serve", flag, "no-such-host.invalid", "--port", "0", "--model", str(tmp_path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert f"{flag} 'no-such-host.invalid': not an address this host can listen on" in result.stderr
        assert "Traceback" not in result.stderr and "__del__" not in result.stderr, result.stderr


# --- no OK answer with an infinite figure -------------------------------------------------------


def test_no_ok_answer_or_metric_carries_an_infinity_for_any_preset_at_the_extremes(start_server):
    """Every preset, float32 log-probs at the ends of the accepted range, ~7,000 scored tokens: each answer is OK
    with every per-token value and every diagnostic finite, or refused INVALID_ARGUMENT naming the overflow; and
    /metrics never shows an infinity. (float32 sums of such values used to overflow the diagnostics.)"""
    from klservice.validation import MAX_LOGPROB, MIN_LOGPROB

    server = start_server(max_request_tokens=1 << 20)
    rng = np.random.default_rng(13)
    sequences = [rng.integers(0, 49152, size=501).tolist() for _ in range(14)]
    scored = 14 * 500
    extremes = [(0.0, MIN_LOGPROB), (MIN_LOGPROB, 0.0), (MAX_LOGPROB, MIN_LOGPROB), (MIN_LOGPROB, MIN_LOGPROB),
                (MAX_LOGPROB, MAX_LOGPROB)]
    tried, ok, refused, non_finite = 0, 0, 0, []
    with KLClient(server.target, job_id="extremes", max_retries=0) as client:
        for preset in kl.PRESETS:
            for policy, behaviour in extremes:
                tried += 1
                logprobs, old = np.full(scored, policy, np.float32), np.full(scored, behaviour, np.float32)
                try:
                    out = client.compute_kl(sequences, 1, logprobs=logprobs, old_logprobs=old, spec=preset)
                except InvalidArgument as error:
                    assert "not finite" in str(error), error
                    refused += 1
                    continue
                ok += 1
                figures = {f: getattr(out.diagnostics, f) for f in out.diagnostics.__dataclass_fields__}
                arrays = {name: getattr(out, name) for name in ("k1", "k2", "k3", "coef", "coef_principled")}
                if not all(np.isfinite(v) for v in figures.values()) or not all(np.isfinite(a).all() for a in arrays.values()):
                    non_finite.append((preset, policy, behaviour))
    print(f"{tried} preset x extreme answers: {ok} OK, {refused} refused, {len(non_finite)} OK with a non-finite figure")
    assert non_finite == []
    assert refused == 0  # sums in float64 keep these in range: nothing at the accepted extremes needs refusing
    samples = scrape(server.metrics_url)
    kl_series = {key: value for key, value in samples.items() if key[0].startswith("klservice_kl_")}
    assert kl_series and all(np.isfinite(value) for value in samples.values())
