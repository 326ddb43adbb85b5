"""TokenBudgetScheduler: budget, fairness, ordering, backpressure, deadlines, cache.

These tests use a recording backend whose values are a known function of the tokens:
what is under test is which sequences reach the backend, in what batches and in what
order, and whether every result comes back to its request. The real model adds nothing
here (it is exercised through the same scheduler in the server tests).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from klservice.backends.base import Interrupted, ReferenceBackend, Scored
from klservice.cache import ReferenceCache
from klservice.errors import DeadlineExpired, NotReady, Overloaded
from klservice.scheduler import TokenBudgetScheduler, plan_calls
from klservice.validation import Batch


class RecordingBackend(ReferenceBackend):
    """Value of token t at temperature T: -(t + 1) / (1000 T). Records every call."""

    def info(self):
        raise AssertionError("the scheduler never asks for the model info")

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[list[int], float]] = []  # (sequence lengths, temperature)
        self.seen: list[bytes] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = delay

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        self.calls.append(([len(s) for s in sequences], temperature))
        self.seen.extend(np.asarray(s).tobytes() for s in sequences)
        return Scored([expected(s[start:], temperature) for s, start in zip(sequences, starts)])


def expected(tokens, temperature=1.0) -> np.ndarray:
    return (-(np.asarray(tokens, dtype=np.float64) + 1) / (1000 * temperature)).astype(np.float32)


def make_batch(sequences, prompts) -> Batch:
    return Batch(
        token_ids=np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]),
        lengths=np.array([len(s) for s in sequences], dtype=np.int64),
        prompt_lengths=np.array(prompts, dtype=np.int64),
    )


def flat_expected(sequences, prompts, temperature=1.0):
    return np.concatenate([expected(s[p:], temperature) for s, p in zip(sequences, prompts)])


def run(coroutine):
    return asyncio.run(coroutine)


async def started(backend, **options) -> TokenBudgetScheduler:
    scheduler = TokenBudgetScheduler(backend, **{"max_batch_tokens": 256, "max_queue": 64, "max_wait_s": 0.001, **options})
    await scheduler.start()
    return scheduler


def test_plan_calls_respects_budget_and_keeps_prompt_groups_together():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 100, size=20)
    group = [np.concatenate([prompt, rng.integers(0, 100, size=int(n))]) for n in (5, 30, 12, 8)]
    singles = [rng.integers(0, 100, size=int(n)) for n in (3, 90, 40, 41, 7, 300)]
    sequences = singles[:3] + group + singles[3:]
    starts = [1, 1, 1, 20, 20, 20, 20, 1, 1, 1]
    planned = plan_calls(sequences, starts, max_batch_tokens=200)
    calls = [call.indices for call in planned]
    assert sorted(i for call in calls for i in call) == list(range(len(sequences)))
    group_calls = {k for k, call in enumerate(calls) for i in call if 3 <= i <= 6}
    assert len(group_calls) == 1, calls
    for call in calls:
        longest = max(len(sequences[i]) for i in call)
        assert len(call) * longest <= 200 or len(call) == 1, call
    # Sorted by length: a call never mixes the 300-token sequence with short ones.
    assert [9] in calls
    # The group reaches the backend as one prompt group, every other sequence as a group of its own.
    groups = [sorted(call.indices[p] for p in group) for call in planned for group in call.prompt_groups]
    assert sorted(groups) == sorted([[3, 4, 5, 6]] + [[i] for i in (0, 1, 2, 7, 8, 9)])


def test_plan_calls_splits_mixed_lengths_rather_than_pad_them():
    """A step of mixed lengths (16-2048 tokens): short sequences are not padded to the longest one."""
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 1000, size=int(n)) for n in rng.integers(16, 2048, size=14)]
    starts = [1] * len(sequences)

    def padded_share(calls):
        padded = sum(len(c.indices) * max(len(sequences[i]) for i in c.indices) for c in calls)
        return 1 - sum(len(s) for s in sequences) / padded

    packed = plan_calls(sequences, starts, 16384)
    unsplit = plan_calls(sequences, starts, 16384, max_padding=float("inf"))
    for calls in (packed, unsplit):
        assert sorted(i for c in calls for i in c.indices) == list(range(len(sequences)))
        assert all(len(c.indices) * max(len(sequences[i]) for i in c.indices) <= 16384 for c in calls)
    assert padded_share(packed) < 0.6 * padded_share(unsplit), (padded_share(packed), padded_share(unsplit))
    assert all(sum(len(sequences[i]) for i in c.indices) >= 16384 // 8 for c in packed[:-1])  # no tiny calls


def test_plan_calls_for_a_packing_backend_sizes_calls_by_the_tokens_computed():
    """A backend that packs (no padding, a group's prompt once) gets each call costed by the tokens it computes:
    lone sequences by their real tokens whatever their lengths mix, a prompt group by its prompt once plus its
    members' continuations. A group with one long response is no longer costed as if every member were that long;
    a group beyond the largest unit is cut into runs that each fit it."""
    rng = np.random.default_rng(3)
    lone = [rng.integers(0, 1000, size=int(n)) for n in rng.integers(16, 2048, size=14)]
    prompt = rng.integers(0, 1000, size=32)
    uneven = [np.concatenate([prompt, rng.integers(0, 1000, size=n)]) for n in [4000] + [50] * 63]
    short_prompt = rng.integers(0, 1000, size=20)
    small = [np.concatenate([short_prompt, rng.integers(0, 1000, size=n)]) for n in (5, 30, 12)]
    long_prompt = rng.integers(0, 1000, size=500)
    huge = [np.concatenate([long_prompt, rng.integers(0, 1000, size=700)]) for _ in range(40)]  # 500 + 40 x 700
    sequences = lone + uneven + small + huge
    starts = [1] * 14 + [32] * 64 + [20] * 3 + [500] * 40
    groups = [set(range(14, 78)), set(range(78, 81)), set(range(81, 121))]

    def computed(indices):
        """Tokens a packing backend computes for these sequences: each group's prompt once, then continuations."""
        members = set(indices)
        total = sum(len(sequences[i]) for i in members if not any(i in g for g in groups))
        for group in groups:
            inside = group & members
            if len(inside) > 1:
                prompt = starts[min(inside)]
                total += prompt + sum(len(sequences[i]) - prompt for i in inside)
            elif inside:
                total += len(sequences[min(inside)])
        return total

    calls = plan_calls(sequences, starts, 16384, packed=True, max_unit_tokens=16384)
    assert sorted(i for c in calls for i in c.indices) == list(range(len(sequences)))
    assert sum(1 for c in calls if groups[0] & set(c.indices)) == 1  # 32 + 4000 + 63 x 50 computed: one call
    assert sum(1 for c in calls if groups[1] & set(c.indices)) == 1
    assert sum(1 for c in calls if groups[2] & set(c.indices)) == -(-40 // ((16384 - 500) // 700))  # cut in runs
    assert all(computed(c.indices) <= 16384 for c in calls), [computed(c.indices) for c in calls]
    padded = plan_calls(sequences, starts, 16384, max_unit_tokens=16384)
    assert sum(1 for c in padded if groups[0] & set(c.indices)) > 1  # costed 64 x 4032 padded, the group is cut
    # Lone sequences alone: packed calls hold up to the budget in real tokens, fewer calls than padded planning.
    packed, padded = plan_calls(lone, [1] * 14, 4096, packed=True), plan_calls(lone, [1] * 14, 4096)
    assert all(sum(len(lone[i]) for i in c.indices) <= 4096 for c in packed)
    assert len(packed) < len(padded)


def test_every_result_returns_to_its_request_in_order():
    backend = RecordingBackend()
    rng = np.random.default_rng(1)

    async def main():
        scheduler = await started(backend, max_batch_tokens=300)
        jobs = []
        for r in range(60):
            n = int(rng.integers(1, 6))
            sequences = [rng.integers(0, 5000, size=int(rng.integers(2, 120))) for _ in range(n)]
            prompts = [int(rng.integers(1, len(s) + 1)) for s in sequences]
            jobs.append((sequences, prompts, scheduler.score(make_batch(sequences, prompts), 1.0, f"job{r % 5}")))
        results = await asyncio.gather(*(job[2] for job in jobs))
        await scheduler.stop()
        return jobs, results

    jobs, results = run(main())
    for (sequences, prompts, _), result in zip(jobs, results):
        np.testing.assert_array_equal(result, flat_expected(sequences, prompts))
    for lengths, _ in backend.calls:
        assert len(lengths) * max(lengths) <= 300 or len(lengths) == 1


def test_temperatures_are_never_mixed_in_one_call():
    backend = RecordingBackend()

    async def main():
        scheduler = await started(backend)
        sequences, prompts = [[1, 2, 3, 4]], [1]
        out = await asyncio.gather(
            *(scheduler.score(make_batch(sequences, prompts), t, "job") for t in (1.0, 0.5, 1.0, 2.0))
        )
        await scheduler.stop()
        return out

    out = run(main())
    for values, temperature in zip(out, (1.0, 0.5, 1.0, 2.0)):
        np.testing.assert_array_equal(values, flat_expected([[1, 2, 3, 4]], [1], temperature))


def test_a_large_job_does_not_starve_a_small_one():
    backend = RecordingBackend(delay=0.002)

    async def main():
        scheduler = await started(backend, max_batch_tokens=200, max_queue=1000)
        big = [scheduler.score(make_batch([[7] * 50] * 4, [1] * 4), 1.0, "big") for _ in range(50)]
        big_tasks = [asyncio.ensure_future(b) for b in big]
        await asyncio.sleep(0)  # the big job's 10k tokens are queued first
        small = asyncio.ensure_future(scheduler.score(make_batch([[9] * 50], [1]), 1.0, "small"))
        await small
        calls_when_small_done = len(backend.calls)
        await asyncio.gather(*big_tasks)
        await scheduler.stop()
        return calls_when_small_done

    calls_when_small_done = run(main())
    total_calls = len(backend.calls)
    # FIFO would answer the small job after all ~50 calls of the big one; deficit round-robin within 2 steps.
    assert calls_when_small_done <= 3 < total_calls


def test_backlogged_jobs_share_steps_equally():
    backend = RecordingBackend()

    async def main():
        backend.gate.clear()
        scheduler = await started(backend, max_batch_tokens=400, max_queue=1000)
        first = asyncio.ensure_future(scheduler.score(make_batch([[0] * 10], [1]), 1.0, "warmup"))
        await asyncio.sleep(0.05)  # the worker is now blocked in the gated forward
        tasks = []
        for job, value in (("a", 1), ("b", 2)):
            for _ in range(20):
                # Prompts of 1 and 2 tokens: two lone sequences, not a GRPO group (a group is chosen whole).
                tasks.append(asyncio.ensure_future(scheduler.score(make_batch([[value] * 40] * 2, [1, 2]), 1.0, job)))
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(first, *tasks)
        await scheduler.stop()

    run(main())
    seen = backend.seen[1:]  # after the warm-up sequence
    # Each step holds 400 tokens = 10 sequences; both jobs appear in equal numbers in every step.
    for step in range(0, 40, 10):
        window = seen[step : step + 10]
        a = sum(1 for s in window if np.frombuffer(s, np.int64)[0] == 1)
        assert a == 5, (step, a)


def test_full_queue_is_refused_with_a_retry_hint():
    backend = RecordingBackend()

    async def main():
        backend.gate.clear()
        scheduler = await started(backend, max_queue=2)
        running = asyncio.ensure_future(scheduler.score(make_batch([[1, 2, 3]], [1]), 1.0, "j"))
        await asyncio.sleep(0.05)  # taken by the worker, blocked in the forward
        queued = [asyncio.ensure_future(scheduler.score(make_batch([[1, 2, 4]], [1]), 1.0, "j")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue full") as refused:
            await scheduler.score(make_batch([[1, 2, 5]], [1]), 1.0, "j")
        backend.gate.set()
        await asyncio.gather(running, *queued)
        await scheduler.stop()
        return refused.value

    refused = run(main())
    assert refused.retry_after is not None and 0.05 <= refused.retry_after <= 10


def test_work_past_its_deadline_is_dropped_unrun():
    backend = RecordingBackend()

    async def main():
        backend.gate.clear()
        scheduler = await started(backend)
        running = asyncio.ensure_future(scheduler.score(make_batch([[1, 2, 3]], [1]), 1.0, "j"))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(
            scheduler.score(make_batch([[42, 43, 44]], [1]), 1.0, "j", deadline=time.monotonic() + 0.05)
        )
        await asyncio.sleep(0.1)
        backend.gate.set()
        await running
        with pytest.raises(DeadlineExpired):
            await late
        await scheduler.stop()

    run(main())
    assert np.array([42, 43, 44], dtype=np.int64).tobytes() not in backend.seen


def test_cancelled_requests_are_not_forwarded():
    backend = RecordingBackend()

    async def main():
        backend.gate.clear()
        scheduler = await started(backend)
        running = asyncio.ensure_future(scheduler.score(make_batch([[1, 2, 3]], [1]), 1.0, "j"))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(scheduler.score(make_batch([[77, 78]], [1]), 1.0, "j"))
        await asyncio.sleep(0.01)
        gone.cancel()
        backend.gate.set()
        await running
        await asyncio.sleep(0.05)
        await scheduler.stop()

    run(main())
    assert np.array([77, 78], dtype=np.int64).tobytes() not in backend.seen


def test_cache_hits_skip_the_forward_and_misses_on_temperature_or_revision():
    backend = RecordingBackend()
    cache = ReferenceCache(max_bytes=1 << 20, revision="rev-a")
    sequences, prompts = [[5, 6, 7, 8], [9, 10, 11]], [2, 1]

    async def main():
        scheduler = await started(backend, cache=cache)
        first = await scheduler.score(make_batch(sequences, prompts), 1.0, "j")
        calls_after_first = len(backend.calls)
        again = await scheduler.score(make_batch(sequences, prompts), 1.0, "j")
        calls_after_again = len(backend.calls)
        hotter = await scheduler.score(make_batch(sequences, prompts), 2.0, "j")
        await scheduler.stop()
        return first, again, hotter, calls_after_first, calls_after_again

    first, again, hotter, calls_after_first, calls_after_again = run(main())
    np.testing.assert_array_equal(first, again)
    assert calls_after_again == calls_after_first  # served from the cache
    np.testing.assert_array_equal(hotter, flat_expected(sequences, prompts, 2.0))
    assert len(backend.calls) == calls_after_first + 1
    other_revision = ReferenceCache(max_bytes=1 << 20, revision="rev-b")
    key = cache.key(np.array(sequences[0]), 2, 1.0)
    assert cache.get(key) is not None
    assert other_revision.key(np.array(sequences[0]), 2, 1.0) != key
    assert cache.key(np.array(sequences[0]), 3, 1.0) != key  # another scored range


def test_cache_is_bounded_by_bytes_and_evicts_least_recently_used():
    cache = ReferenceCache(max_bytes=100, revision="r")
    keys = [cache.key(np.array([i, i + 1]), 1, 1.0) for i in range(5)]
    for key in keys:
        cache.put(key, np.zeros(10, np.float32))  # 40 bytes each
    assert cache.size_bytes <= 100 and len(cache) == 2
    assert cache.get(keys[0]) is None and cache.get(keys[4]) is not None
    cache.get(keys[3])
    cache.put(cache.key(np.array([9, 9]), 1, 1.0), np.zeros(10, np.float32))
    assert cache.get(keys[3]) is not None and cache.get(keys[4]) is None
    values = cache.get(keys[3])
    with pytest.raises(ValueError):
        values[0] = 1.0  # cached arrays are read-only


@pytest.mark.parametrize("job_ids", [1, 4])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_a_tenant_gains_nothing_by_spreading_its_load_over_more_job_ids(weights, job_ids):
    """Tenant A sends its backlog under `job_ids` job ids, tenant B under 1; while both have work queued, each
    gets its weight's share of the tokens (within 10 points), however many job ids it uses. `pytest -s` prints
    the shares."""
    backend = RecordingBackend(delay=0.002)
    weight_a, weight_b = weights

    async def main():
        scheduler = await started(backend, max_batch_tokens=256, max_queue=1000, max_wait_s=0.0)
        backend.gate.clear()  # let the whole backlog queue up before the first step
        calls = []
        for r in range(40):
            sequence_a, sequence_b = [1] * 16, [2] * 16
            calls.append(scheduler.score(make_batch([sequence_a], [1]), 1.0, f"a-{r % job_ids}", None, "team-a", weight_a))
            calls.append(scheduler.score(make_batch([sequence_b], [1]), 1.0, "b-0", None, "team-b", weight_b))
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(*tasks)
        await scheduler.stop()

    run(main())
    order = [int(np.frombuffer(seen, dtype=np.int64)[0]) for seen in backend.seen]
    steps = 0  # whole steps (one backend call each here) within the first half: both tenants have work queued
    for lengths, _ in backend.calls:
        if steps + len(lengths) > len(order) // 2:
            break
        steps += len(lengths)
    first = order[:steps]
    share_a = first.count(1) / len(first)
    print(f"weights {weight_a:g}:{weight_b:g}, team-a on {job_ids} job id(s): team-a's share {share_a:.3f} "
          f"(configured {weight_a / (weight_a + weight_b):.3f})")
    assert abs(share_a - weight_a / (weight_a + weight_b)) <= 0.10, share_a


class SteppedBackend(RecordingBackend):
    """Each backend call waits for one permit: the test lets steps through one at a time."""

    def __init__(self):
        super().__init__()
        self.permits = threading.Semaphore(0)

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        assert self.permits.acquire(timeout=30)
        return super().score(sequences, starts, temperature, prompt_groups)


def test_a_tenants_quota_counts_only_what_it_has_queued():
    """Quota 40 tokens for team-q: two 20-token requests fill it and a third is refused (Overloaded, with a retry
    hint) while team-b is not limited; a cancelled request, and each request a step takes, give their tokens
    back at once, so team-q is served again while the rest of its work still waits."""
    backend = SteppedBackend()

    async def main():
        scheduler = await started(backend, max_batch_tokens=20, max_queue=100, max_wait_s=0.0)
        quota = dict(share="team-q", quota=40)
        score = lambda tokens, job, **share: asyncio.ensure_future(  # noqa: E731
            scheduler.score(make_batch([tokens], [1]), 1.0, job, None, **share))
        plug = score([3] * 20, "b", share="team-b")
        await asyncio.sleep(0.01)
        assert scheduler.queued_requests == 0  # the plug is in a step, waiting for its permit
        first, second = score([1] * 20, "q-0", **quota), score([1] * 19 + [2], "q-1", **quota)
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await scheduler.score(make_batch([[4] * 20], [1]), 1.0, "q-2", None, **quota)
        assert refused.value.retry_after > 0
        unlimited = score([5] * 60, "b", share="team-b")  # team-b has no quota
        first.cancel()
        await asyncio.sleep(0.01)
        third = score([6] * 20, "q-2", **quota)  # the cancelled request's 20 tokens are free again
        await asyncio.sleep(0.01)
        assert scheduler.queued_requests == 3  # second, third, unlimited
        with pytest.raises(Overloaded):  # ... and given back once only: the quota is full again
            await scheduler.score(make_batch([[9, 9]], [1]), 1.0, "q-x", None, **quota)
        backend.permits.release()  # the plug's step ends; the next step takes one 20-token item
        await plug
        await asyncio.sleep(0.01)
        assert scheduler.queued_requests == 2  # the step took team-q's second request (deficit round-robin)
        fourth = score([7] * 20, "q-3", **quota)  # team-q has 20 tokens queued now, not 40: accepted
        await asyncio.sleep(0.01)
        for _ in range(10):
            backend.permits.release()
        results = await asyncio.gather(second, third, unlimited, fourth)
        # nothing is left counted, and nothing was given back twice: the quota holds exactly again
        backend.permits = threading.Semaphore(0)  # no permits left over
        plug = score([3] * 20, "b", share="team-b")
        await asyncio.sleep(0.01)
        full = score([8] * 40, "q-4", **quota)
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await scheduler.score(make_batch([[9, 9]], [1]), 1.0, "q-5", None, **quota)
        for _ in range(10):
            backend.permits.release()
        await asyncio.gather(plug, full)
        await scheduler.stop()
        return [result.shape for result in results]

    assert run(main()) == [(19,), (19,), (59,), (19,)]


def test_a_request_is_answered_when_the_call_holding_it_is_done_not_the_whole_step():
    """One step, two backend calls (a short and a long sequence are not padded together): the short request's
    answer comes back as soon as its call is done, while the long one's call is still held."""
    backend = SteppedBackend()

    async def scenario():
        scheduler = await started(backend, max_batch_tokens=100, max_wait_s=0.2)
        short, long = [list(range(1, 11))], [list(range(1, 61))]
        first = asyncio.ensure_future(scheduler.score(make_batch(short, [1]), 1.0, "job-short"))
        second = asyncio.ensure_future(scheduler.score(make_batch(long, [1]), 1.0, "job-long"))
        await asyncio.sleep(0.3)  # both are in the one step the worker formed
        backend.permits.release()  # the first call (the shorter sequence) may run; the second waits
        value = await asyncio.wait_for(first, 10)
        assert not second.done() and [lengths for lengths, _ in backend.calls] == [[10]]
        backend.permits.release()
        assert (await asyncio.wait_for(second, 10)).shape == (59,)
        await scheduler.stop()
        return value

    np.testing.assert_array_equal(run(scenario()), flat_expected([list(range(1, 11))], [1]))


def test_a_request_arriving_during_a_step_joins_its_next_call():
    """A step of two calls (a short and a long sequence); while its first call runs, an idle job sends a small
    request: it joins the step as the next call and is answered before the long call, not after the step."""
    backend = SteppedBackend()

    async def scenario():
        scheduler = await started(backend, max_batch_tokens=100, max_wait_s=0.2)
        short, long, late = [list(range(1, 11))], [list(range(1, 61))], [list(range(200, 208))]
        first = asyncio.ensure_future(scheduler.score(make_batch(short, [1]), 1.0, "job-short"))
        second = asyncio.ensure_future(scheduler.score(make_batch(long, [1]), 1.0, "job-long"))
        await asyncio.sleep(0.3)  # the step (short + long, two calls) is formed; its first call waits for a permit
        third = asyncio.ensure_future(scheduler.score(make_batch(late, [1]), 1.0, "job-late"))
        await asyncio.sleep(0.05)
        backend.permits.release()  # the short call
        await asyncio.wait_for(first, 10)
        backend.permits.release()  # the next call: the late request, which joined the running step
        value = await asyncio.wait_for(third, 10)
        assert not second.done()
        assert [lengths for lengths, _ in backend.calls] == [[10], [8]]
        backend.permits.release()
        await asyncio.wait_for(second, 10)
        assert [lengths for lengths, _ in backend.calls] == [[10], [8], [60]]
        await scheduler.stop()
        return value

    np.testing.assert_array_equal(run(scenario()), flat_expected([list(range(200, 208))], [1]))


class TimedBackend(RecordingBackend):
    """A call takes `seconds_per_token` per padded token (count × longest), as a forward roughly does; records
    the first token of each sequence of each call."""

    def __init__(self, seconds_per_token: float):
        super().__init__()
        self.seconds_per_token = seconds_per_token
        self.firsts: list[list[int]] = []

    def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
        time.sleep(len(sequences) * max(len(s) for s in sequences) * self.seconds_per_token)
        self.firsts.append([int(s[0]) for s in sequences])
        return super().score(sequences, starts, temperature, prompt_groups)


def flood_then_small(max_step_s: float) -> tuple[TimedBackend, int]:
    """One job floods (40 sequences of 50 tokens: 2,000 tokens, 0.2 s of model time); once its first step runs,
    an idle job sends one sequence. Returns the backend and how many flood sequences were scored before the
    small one."""
    backend = TimedBackend(seconds_per_token=1e-4)
    flood = [[1000 + n] + list(range(1, 50)) for n in range(40)]
    small = [[7] + list(range(1, 10))]

    async def scenario():
        scheduler = await started(backend, max_batch_tokens=4096, max_wait_s=0.0, max_step_s=max_step_s)
        warm_up = [[5] + list(range(1, 50))] * 4  # a first call, so that the step bound has a measured rate
        await scheduler.score(make_batch(warm_up, [1] * 4), 1.0, "job-warm-up")
        while scheduler._running:  # its step has ended
            await asyncio.sleep(0.001)
        flooding = asyncio.ensure_future(scheduler.score(make_batch(flood, [1] * 40), 1.0, "job-flood"))
        while not scheduler._running:  # the flood's first step has been formed
            await asyncio.sleep(0.001)
        value = await asyncio.wait_for(scheduler.score(make_batch(small, [1]), 1.0, "job-small"), 30)
        np.testing.assert_array_equal(value, flat_expected(small, [1]))
        np.testing.assert_array_equal(await asyncio.wait_for(flooding, 30), flat_expected(flood, [1] * 40))
        await scheduler.stop()

    run(scenario())
    calls = backend.firsts = backend.firsts[1:]  # after the warm-up call
    small_call = next(number for number, firsts in enumerate(calls) if 7 in firsts)
    return backend, sum(len(firsts) for firsts in calls[:small_call] if 7 not in firsts)


def test_a_small_request_of_an_idle_job_waits_one_bounded_step_not_the_whole_flood():
    """--max-step-seconds: with a 20 ms bound a step takes ~200 of the flood's tokens (the rate measured on a
    warm-up call), so the small request is scored after a few flood sequences; without it, the flood is one step of
    all 40 sequences and the small request waits for all of them."""
    bounded, before_bounded = flood_then_small(max_step_s=0.02)
    unbounded, before_unbounded = flood_then_small(max_step_s=0.0)
    assert before_unbounded == 40 and len(unbounded.firsts) == 2
    assert before_bounded < 10, bounded.firsts
    assert max(len(firsts) for firsts in bounded.firsts) < 10, bounded.firsts  # steps of ~4 sequences


def test_a_grpo_group_is_never_split_across_steps_unless_it_alone_exceeds_the_budget():
    """Requests of one job, each a group of 4 sequences with one prompt (4 × 30 = 120 tokens): a 200-token budget
    holds one group per step, never 1.67 groups; a group of 8 (240 tokens) alone exceeds it and is split."""
    backend = RecordingBackend()
    groups = [[[g * 100] + list(range(1, 20)) + [g * 100 + 1 + m] * 10 for m in range(size)]
              for g, size in enumerate([4, 4, 4, 8, 4], start=1)]

    async def scenario():
        scheduler = await started(backend, max_batch_tokens=200, max_wait_s=0.05)
        answers = await asyncio.gather(*(scheduler.score(make_batch(group, [20] * len(group)), 1.0, "job-grpo")
                                         for group in groups))
        for group, answer in zip(groups, answers):
            np.testing.assert_array_equal(answer, flat_expected(group, [20] * len(group)))
        await scheduler.stop()

    backend.firsts = []
    original = backend.score

    def recording(sequences, starts, temperature=1.0, prompt_groups=None):
        backend.firsts.append([int(s[0]) for s in sequences])
        return original(sequences, starts, temperature, prompt_groups)

    backend.score = recording
    run(scenario())
    calls_of = {g: [n for n, firsts in enumerate(backend.firsts) if g * 100 in firsts] for g in range(1, 6)}
    assert all(len(calls_of[g]) == 1 for g in (1, 2, 3, 5)), backend.firsts
    assert len(calls_of[4]) == 2, backend.firsts  # 8 × 30 tokens: over the budget alone


def test_a_negative_step_bound_fails_naming_its_flag(server_config):
    import dataclasses

    from klservice.server import Server

    with pytest.raises(ValueError, match="--max-step-seconds -1"):
        Server(dataclasses.replace(server_config, max_step_seconds=-1.0))


def test_a_grpo_group_larger_than_a_bounded_step_stays_in_one_call():
    """A step bounded in time may be smaller than a GRPO group; the group is then a call of its own, whole (its prompt
    computed once), as long as it fits --max-batch-tokens; beyond that it is split into runs that do."""
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, 1000, size=256)
    group = [np.concatenate([prompt, rng.integers(0, 1000, size=128)]) for _ in range(8)]
    singles = [rng.integers(0, 1000, size=100) for _ in range(3)]
    sequences, starts = singles + group, [1, 1, 1] + [256] * 8
    calls = plan_calls(sequences, starts, 1600, max_unit_tokens=16384)
    assert [sorted(c.indices) for c in calls if 3 in c.indices] == [list(range(3, 11))]
    assert all(len(c.indices) * max(len(sequences[i]) for i in c.indices) <= 1600 for c in calls if 3 not in c.indices)
    # Without the allowance (or beyond it), the group is cut into budget-sized runs.
    def group_calls(**allowance):
        return [len(c.indices) for c in plan_calls(sequences, starts, 1600, **allowance) if 3 in c.indices or 10 in c.indices]

    assert group_calls() == [4, 4]  # 1600 // 384 sequences a call
    assert group_calls(max_unit_tokens=2000) == [5, 3]


def test_stop_interrupts_the_backend_only_during_a_call():
    """A backend call in flight is interrupted on stop (its request fails UNAVAILABLE-style); a scheduler stopped
    between calls leaves its backend alone, so a backend shared with another scheduler serves on."""

    class Interruptible(SteppedBackend):
        def __init__(self):
            super().__init__()
            self.interrupts = 0
            self.entered = threading.Event()

        def score(self, sequences, starts, temperature=1.0, prompt_groups=None):
            self.entered.set()
            assert self.permits.acquire(timeout=30)
            if self.interrupts:  # as HFBackend: an interrupted call gives up
                raise Interrupted("the forward was interrupted")
            return RecordingBackend.score(self, sequences, starts, temperature, prompt_groups)

        def interrupt(self):
            self.interrupts += 1
            self.permits.release()  # wakes the waiting call, which then gives up

    backend = Interruptible()

    async def main():
        scheduler = await started(backend, max_wait_s=0.0)
        backend.permits.release()
        await scheduler.score(make_batch([[1, 2, 3]], [1]), 1.0, "a")  # answered: its call returned
        await scheduler.stop()
        assert backend.interrupts == 0
        scheduler = await started(backend, max_wait_s=0.0)
        backend.entered.clear()
        waiting = asyncio.ensure_future(scheduler.score(make_batch([[4, 5, 6]], [1]), 1.0, "a"))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        await scheduler.stop()
        assert backend.interrupts == 1
        with pytest.raises(NotReady):
            await waiting

    asyncio.run(main())
