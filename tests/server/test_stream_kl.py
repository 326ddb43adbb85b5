"""KLClient.stream_kl and AsyncKLClient.stream_kl against a real server, and the two clients' parity.

The server here takes at most 64 tokens per request, so items of more are split over several
StreamKL requests and reassembled by the client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import numpy as np
import pytest

from klservice_client import (
    AsyncKLClient,
    InvalidArgument,
    KLClient,
    KLItem,
    ServerError,
    TokenizerMismatch,
    kl,
)

MAX_REQUEST_TOKENS = 64


@pytest.fixture(scope="module")
def small_requests_server(start_server):
    return start_server(max_request_tokens=MAX_REQUEST_TOKENS)


def make_items(count: int, seed: int = 0) -> list[KLItem]:
    """Items of 1-4 sequences with random prompts; some longer than one request."""
    rng = np.random.default_rng(seed)
    presets = sorted(p for p in kl.PRESETS if not kl.PRESETS[p].spec.needs_old_logprobs)
    items = []
    for i in range(count):
        lengths = rng.integers(3, 40, size=int(rng.integers(1, 5)))
        sequences = [rng.integers(0, 49152, size=int(n)).tolist() for n in lengths]
        prompts = [int(rng.integers(1, n)) for n in lengths]
        scored = int(sum(n - p for n, p in zip(lengths, prompts)))
        logprobs = rng.normal(-10, 1, size=scored).astype(np.float32)
        items.append(KLItem(sequences, prompts, logprobs, spec=presets[i % len(presets)], key=f"item-{i}"))
    return items


def assert_same_as_compute_kl(client: KLClient, item: KLItem, got) -> None:
    want = client.compute_kl(item.sequences, item.prompt_lengths, logprobs=item.logprobs, spec=item.spec)
    assert got.scored_lengths.tolist() == want.scored_lengths.tolist()
    for name in ("ref_logprobs", "k1", "k2", "k3", "coef", "coef_principled"):
        # Equal up to float32 rounding: batch composition (padding, kernel blocking) may differ by an ulp.
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, err_msg=name)
    assert got.spec == want.spec


def test_stream_kl_answers_every_item_like_compute_kl(small_requests_server):
    items = make_items(12)
    assert any(sum(len(s) for s in item.sequences) > MAX_REQUEST_TOKENS for item in items)  # some are split
    bad = KLItem([[1, 2, 3]], [1], np.zeros(5, np.float32), key="bad")  # 5 log-probs for 2 scored tokens
    too_big = KLItem([[1, 2, 49152]], [1], [-1.0, -1.0], key="bad-token")  # token id out of the vocabulary
    # Two parts of 40 tokens each: the first is refused by the server (a token outside the vocabulary), the
    # second is answered; the item fails once and the answer to its other part is dropped.
    split_bad = KLItem([[49152] + [1] * 39, [2] * 40], [1, 1], np.full(78, -1.0, np.float32), key="split-bad")
    unknown_preset = KLItem([[1, 2, 3]], [1], np.full(2, -1.0, np.float32), spec="kl_magic", key="unknown-preset")
    stream = items[:5] + [bad, split_bad] + items[5:9] + [too_big, unknown_preset] + items[9:]
    with KLClient(small_requests_server.target) as client:
        results = list(client.stream_kl(stream))
        assert sorted(str(r.key) for r in results) == sorted(str(item.key) for item in stream)
        by_key = {r.key: r for r in results}
        assert isinstance(by_key["bad"].error, InvalidArgument)
        assert "logprobs" in str(by_key["bad"].error)  # found by the client before sending
        assert isinstance(by_key["bad-token"].error, InvalidArgument)
        assert "49152" in str(by_key["bad-token"].error)  # found by the server; the stream went on
        with pytest.raises(InvalidArgument):
            by_key["bad"].result()
        assert isinstance(by_key["split-bad"].error, InvalidArgument) and "49152" in str(by_key["split-bad"].error)
        assert isinstance(by_key["unknown-preset"].error, InvalidArgument)
        assert "kl_magic" in str(by_key["unknown-preset"].error)
        for item in items:
            assert by_key[item.key].error is None
            assert_same_as_compute_kl(client, item, by_key[item.key].result())


def test_stream_kl_keys_default_to_positions(small_requests_server):
    items = [KLItem(item.sequences, item.prompt_lengths, item.logprobs) for item in make_items(3, seed=4)]
    with KLClient(small_requests_server.target) as client:
        results = {r.key: r.result() for r in client.stream_kl(items)}
        assert sorted(results) == [0, 1, 2]
        for position, item in enumerate(items):
            assert_same_as_compute_kl(client, item, results[position])


def test_stream_kl_answers_while_items_are_still_coming(small_requests_server):
    """The second item is produced only after the first one's result has arrived: a client that read all
    items before answering would wait here forever (bounded by the event's timeout, then fail)."""
    first, second = make_items(2, seed=7)
    answered = threading.Event()
    seen_before_second = []

    def produce():
        yield first
        seen_before_second.append(answered.wait(60))
        yield second

    with KLClient(small_requests_server.target) as client:
        keys = []
        for result in client.stream_kl(produce()):
            result.result()
            keys.append(result.key)
            answered.set()
    assert keys == [first.key, second.key]
    assert seen_before_second == [True]


def test_a_failing_item_iterator_is_raised_to_the_caller(small_requests_server):
    (item,) = make_items(1, seed=9)

    def produce():
        yield item
        raise RuntimeError("rollout worker died")

    with KLClient(small_requests_server.target) as client:
        with pytest.raises(RuntimeError, match="rollout worker died"):
            list(client.stream_kl(produce()))


def test_async_stream_kl_equals_the_blocking_one(small_requests_server):
    items = make_items(8, seed=2)

    async def produce():
        for item in items:
            await asyncio.sleep(0)
            yield item

    async def main():
        async with AsyncKLClient(small_requests_server.target) as client:
            from_async = {r.key: r.result() async for r in client.stream_kl(produce())}
            from_list = {r.key: r.result() async for r in client.stream_kl(items)}
            return from_async, from_list

    from_async, from_list = asyncio.run(main())
    with KLClient(small_requests_server.target) as client:
        for item in items:
            assert_same_as_compute_kl(client, item, from_async[item.key])
            np.testing.assert_array_equal(from_async[item.key].coef, from_list[item.key].coef)


def test_both_clients_refuse_the_same_inputs_with_the_same_messages(small_requests_server):
    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    def blocking_errors():
        errors = []
        with KLClient(small_requests_server.target) as client:
            for call in (
                lambda: client.check_tokenizer(OtherTokenizer()),
                lambda: client.compute_kl([[1, 2, 3]], 1, logprobs=None),
                lambda: client.score([[1, 2, 3]], 4),
            ):
                with pytest.raises((TokenizerMismatch, InvalidArgument)) as failure:
                    call()
                errors.append((type(failure.value), str(failure.value)))
        return errors

    async def async_errors():
        errors = []
        async with AsyncKLClient(small_requests_server.target) as client:
            for call in (
                lambda: client.check_tokenizer(OtherTokenizer()),
                lambda: client.compute_kl([[1, 2, 3]], 1, logprobs=None),
                lambda: client.score([[1, 2, 3]], 4),
            ):
                with pytest.raises((TokenizerMismatch, InvalidArgument)) as failure:
                    await call()
                errors.append((type(failure.value), str(failure.value)))
        return errors

    blocking = blocking_errors()
    assert [kind for kind, _ in blocking] == [TokenizerMismatch, InvalidArgument, InvalidArgument]
    assert "logprobs: required" in blocking[1][1]
    assert asyncio.run(async_errors()) == blocking


@pytest.fixture(scope="module")
def aging_server(start_server):
    """Connections (and StreamKL streams) closed after 0.4 s, splitting items as above."""
    return start_server(max_request_tokens=MAX_REQUEST_TOKENS, max_connection_age_seconds=0.4,
                        max_connection_age_grace_seconds=5.0)


def slowly(items, seconds: float):
    for item in items:
        time.sleep(seconds)
        yield item


def reopenings(caplog) -> int:
    return sum("StreamKL reopened" in record.getMessage() for record in caplog.records)


def test_streams_ended_at_the_connection_age_are_reopened_without_losing_items(aging_server, caplog):
    """Items arrive over ~2 s, the server ends each stream after 0.4 s: the client reopens it, resends
    what was unanswered, and every item gets exactly one result equal to compute_kl's."""
    caplog.set_level(logging.DEBUG, logger="klservice_client")
    items = make_items(20, seed=11)
    with KLClient(aging_server.target) as client:
        results = list(client.stream_kl(slowly(items, 0.1)))
        assert sorted(r.key for r in results) == sorted(item.key for item in items)
        by_key = {r.key: r.result() for r in results}
        for item in items:
            assert_same_as_compute_kl(client, item, by_key[item.key])
    assert reopenings(caplog) >= 2


def test_async_streams_ended_at_the_connection_age_are_reopened_without_losing_items(aging_server, caplog):
    caplog.set_level(logging.DEBUG, logger="klservice_client")
    items = make_items(20, seed=12)

    async def arriving():
        for item in items:
            await asyncio.sleep(0.1)
            yield item

    async def run():
        async with AsyncKLClient(aging_server.target) as client:
            return [r async for r in client.stream_kl(arriving())]

    results = asyncio.run(run())
    assert sorted(r.key for r in results) == sorted(item.key for item in items)
    with KLClient(aging_server.target) as client:
        for result, item in zip(sorted(results, key=lambda r: r.key), sorted(items, key=lambda i: i.key)):
            assert_same_as_compute_kl(client, item, result.result())
    assert reopenings(caplog) >= 2


def test_a_status_lost_to_a_late_write_reopens_the_stream_and_a_server_internal_does_not():
    """grpc.aio replaces the server's status with a local INTERNAL when a request is written just as the
    server ends the stream (grpc/grpc#36066; seen once at the connection age). The race cannot be forced
    from outside, so the error is built as grpc.aio builds it: the client reopens the stream on it and
    resends what had no answer, while an INTERNAL the server sent is raised."""
    from grpc.aio import AioRpcError, Metadata

    from klservice_client.client import _Outbox, _StreamAssembly

    def error(details: str, debug: str) -> AioRpcError:
        return AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details=details, debug_error_string=debug)

    late_write = error("Internal error from Core",
                       'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f30>,)')
    from_server = error("internal error", "grpc_status:13, grpc_message:\"internal error\"")
    client = KLClient("localhost:1", max_retries=2, initial_backoff=0.01)
    try:
        assembly = _StreamAssembly(lambda prepared: [slice(0, len(prepared.tokens))], lambda item: ("", ""))
        outbox = _Outbox()
        item = make_items(1, seed=3)[0]
        sent = assembly.requests(0, item)
        deadline = time.monotonic() + 60
        closed = client._stream_closed(late_write, assembly, outbox, (0, 0), deadline)
        assert closed is not None and closed[1] == (0, 1)
        assert outbox.attempt == 1 and outbox.take_nowait(1) is sent[0]  # resent on the new stream
        with pytest.raises(ServerError, match="internal error"):
            client._stream_closed(from_server, assembly, outbox, (0, 0), deadline)
        with pytest.raises(ServerError, match="Internal error from Core"):  # bounded like UNAVAILABLE
            client._stream_closed(late_write, assembly, outbox, (0, 2), deadline)
    finally:
        client.close()


def test_a_negative_connection_age_fails_naming_its_flag(server_config):
    import dataclasses

    from klservice.server import Server

    with pytest.raises(ValueError, match="--max-connection-age-seconds -1"):
        Server(dataclasses.replace(server_config, max_connection_age_seconds=-1))


def test_a_stream_whose_server_goes_away_is_reopened_on_another_and_loses_no_item(start_server, caplog):
    """Two servers behind one round-robin target; the one holding the stream stops mid-stream (its queued
    work answered UNAVAILABLE, the connection closed). The client reopens the stream on the other server,
    resends what had no answer, and every item gets exactly one result equal to compute_kl's."""
    caplog.set_level(logging.DEBUG, logger="klservice_client")
    servers = [start_server(max_request_tokens=MAX_REQUEST_TOKENS) for _ in range(2)]
    target = "ipv4:///" + ",".join(server.target for server in servers)
    items = make_items(24, seed=13)
    stopped = []

    def produce():
        for number, item in enumerate(items):
            if number == len(items) // 2:
                # The server holding the stream is the one that has answered StreamKL items.
                holder = max(servers, key=lambda s: s.server.registry.get_sample_value(
                    "klservice_requests_total", {"method": "StreamKL", "code": "OK"}) or 0)
                holder.stop(grace=0.0)
                stopped.append(holder)
            time.sleep(0.05)
            yield item

    with KLClient(target, load_balancing="round_robin") as client:
        results = list(client.stream_kl(produce()))
    assert stopped
    assert sorted(r.key for r in results) == sorted(item.key for item in items)
    survivor = next(server for server in servers if server not in stopped)
    with KLClient(survivor.target) as client:
        for result in results:
            item = next(i for i in items if i.key == result.key)
            assert_same_as_compute_kl(client, item, result.result())
    assert reopenings(caplog) >= 1
