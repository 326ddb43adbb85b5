"""The throughput engine through real servers: prefix sharing across requests, the cache, many clients."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from klservice_client import KLClient


def test_grpo_groups_share_prompts_across_requests_with_unshared_values(start_server, tiny_model_dir):
    from klservice.backends.hf import HFBackend

    server = start_server(cache_mb=0, max_wait_ms=50)
    rng = np.random.default_rng(6)
    prompt = rng.integers(0, 49152, size=64).tolist()
    groups = [[prompt + rng.integers(0, 49152, size=int(n)).tolist() for n in rng.integers(8, 40, size=4)] for _ in range(2)]
    results = [None, None]

    def send(i):
        with KLClient(server.target, job_id=f"g{i}") as c:
            results[i] = c.score(groups[i], 64).ref_logprobs

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    saved = server.model_metrics.tokens_saved._value.get()
    assert saved >= 6 * 64  # 8 sequences, one prompt computed: 7 x 64 when both requests share a step

    unshared = HFBackend(tiny_model_dir, device="cpu", progress=False, share_prompts=False)
    for group, got in zip(groups, results):
        want = np.concatenate(unshared.score([np.array(s) for s in group], [64] * len(group)).values)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_compute_kl_again_with_new_policy_logprobs_hits_the_cache(start_server):
    server = start_server()
    rng = np.random.default_rng(7)
    sequences = [rng.integers(0, 49152, size=30).tolist() for _ in range(4)]
    with KLClient(server.target) as c:
        first = c.compute_kl(sequences, 10, logprobs=rng.normal(-10, 1, size=80).astype(np.float32))
        forwarded = server.model_metrics.tokens_forwarded._value.get()
        epoch2_logp = rng.normal(-10, 1, size=80).astype(np.float32)
        second = c.compute_kl(sequences, 10, logprobs=epoch2_logp, spec="grpo_k3_as_loss")
        assert server.model_metrics.tokens_forwarded._value.get() == forwarded  # no forward
        hot = c.score(sequences, 10, temperature=0.5)
        assert server.model_metrics.tokens_forwarded._value.get() > forwarded  # another temperature: a miss
    np.testing.assert_array_equal(first.ref_logprobs, second.ref_logprobs)
    assert not np.allclose(hot.ref_logprobs, first.ref_logprobs)
    np.testing.assert_allclose(second.k1, epoch2_logp - second.ref_logprobs, rtol=1e-6)


def test_many_concurrent_clients_with_mixed_sizes_get_exactly_their_results(start_server):
    server = start_server(cache_mb=0, max_batch_tokens=2048)
    rng = np.random.default_rng(8)
    work = []
    for client_index in range(8):
        requests = []
        for _ in range(4):
            n = int(rng.integers(1, 12))
            sequences = [rng.integers(0, 49152, size=int(rng.integers(2, 200))).tolist() for _ in range(n)]
            prompts = [int(rng.integers(1, len(s))) for s in sequences]
            requests.append((sequences, prompts))
        work.append(requests)
    got: dict[tuple[int, int], np.ndarray] = {}

    def run_client(client_index):
        with KLClient(server.target, job_id=f"job{client_index % 3}") as c:
            for r, (sequences, prompts) in enumerate(work[client_index]):
                got[client_index, r] = c.score(sequences, prompts).ref_logprobs

    threads = [threading.Thread(target=run_client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 32
    with KLClient(server.target) as c:
        for (client_index, r), values in got.items():
            sequences, prompts = work[client_index][r]
            alone = c.score(sequences, prompts).ref_logprobs  # the same request on an idle server
            assert values.shape == alone.shape
            np.testing.assert_allclose(values, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [True, False])
def test_batch_metrics_count_the_positions_the_model_computed(start_server, tiny_model_dir, packed):
    """klservice_batch_tokens is what the model computed and klservice_tokens_forwarded the real tokens of it (each
    sequence's inputs: its last token is only a target): equal on a packed forward (the default), sequences x
    longest input per call on a padded one (--attention-kernel none), so the padding share 1 - forwarded / batch
    tokens is what was padded."""
    from klservice.backends.hf import HFBackend

    backend = HFBackend(tiny_model_dir, device="cpu", progress=False, kernel=None if packed else "none",
                        share_prompts=False)
    assert (backend.kernel is not None) == packed
    server = start_server(backend=backend, cache_mb=0, max_batch_tokens=100_000)
    rng = np.random.default_rng(9)
    sequences = [rng.integers(0, 49152, size=int(n)).tolist() for n in (5, 90, 33, 200, 17)]
    with KLClient(server.target) as client:
        client.score(sequences, 1)
    metrics = server.model_metrics
    computed = metrics.batch_tokens._sum.get()
    assert metrics.batch_sequences._sum.get() == len(sequences)
    inputs = [len(s) - 1 for s in sequences]
    assert metrics.tokens_forwarded._value.get() == sum(inputs)
    assert computed == (sum(inputs) if packed else len(inputs) * max(inputs))


def test_a_shared_prompt_is_forwarded_once_in_the_metrics(start_server):
    """Two groups with prompts of 40 and 24 tokens: each prompt runs once, followed by its members' continuations,
    in one packed forward without padding; the metrics say so."""
    server = start_server(cache_mb=0, max_batch_tokens=100_000)
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, 49152, size=n).tolist() for n in (40, 24)]
    responses = [[rng.integers(0, 49152, size=n).tolist() for n in sizes] for sizes in ((3, 9), (12, 5, 7))]
    sequences = [prompt + response for prompt, group in zip(prompts, responses) for response in group]
    starts = [40, 40, 24, 24, 24]
    with KLClient(server.target) as client:
        client.score(sequences, starts)
    metrics = server.model_metrics
    continuations = [len(r) - 1 for group in responses for r in group]
    assert metrics.tokens_saved._value.get() == 40 + 2 * 24
    assert metrics.tokens_forwarded._value.get() == 40 + 24 + sum(continuations)
    assert metrics.batch_tokens._sum.get() == 40 + 24 + sum(continuations)
