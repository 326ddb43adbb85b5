"""(e) one job floods the server, another sends a small request: how long the small request waits, and what the
bound on a step's time (``--max-step-seconds``) costs the flood.

Two servers of its own, one after the other: the server's default bound, and no bound (``--max-step-seconds 0``,
steps sized by ``--max-batch-tokens`` only). On each, ``--flood-threads`` threads of the job ``bench-flood`` send
Score requests of ``--flood-sequences`` × ``--flood-tokens`` random tokens without pause; after ``--flood-warmup``
seconds (the queue is full and steps are as long as they get) the job ``bench-probe`` sends ``--flood-probes``
requests of one ``--probe-tokens`` sequence, one after the other. Reported per server: the small request's median
latency (and, on an idle server before the flood, its latency alone), and the tokens the server forwarded per
second from the first probe on, over at least ``--flood-window`` seconds (the flood's throughput, from the
server's own counter). Targets: the bounded server's flood throughput is at least 0.9× the unbounded one's, and its small
request waits less.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from klservice.bench.context import NO_CACHE

if TYPE_CHECKING:
    from klservice.bench.config import BenchConfig
    from klservice.bench.context import BenchContext
    from klservice.bench.service import ServiceProcess

KEY = "e"
ON_MAIN_SERVER = False
RANDOM_STREAM = 5
SERVERS = (("bounded", None), ("unbounded", 0.0))
"""(name, --max-step-seconds): None keeps the server's default (or the bench's --max-step-seconds)."""
FORWARDED = "klservice_tokens_forwarded_total"


def phase_count(config: "BenchConfig") -> int:
    return len(SERVERS)


def title(config: "BenchConfig") -> str:
    return (f"(e) flood: {config.flood_threads} threads x {config.flood_sequences} x {config.flood_tokens} tokens "
            f"from one job, {config.probe_tokens}-token requests from another")


def run(ctx: "BenchContext") -> None:
    from klservice.config import ServerConfig

    config = ctx.config
    bound = config.max_step_seconds if config.max_step_seconds is not None else ServerConfig.max_step_seconds
    entry = {"title": title(config), "paths": {}, "max_step_seconds": bound}
    ctx.results["workloads"][KEY] = entry
    vocab = ctx.info.vocab_size
    for name, seconds in SERVERS:
        seconds = bound if seconds is None else seconds
        with ctx.bar(f"(e) flood, --max-step-seconds {seconds:g}"):
            server, client = ctx.start_service(
                ctx.server_args + NO_CACHE + ["--max-step-seconds", str(seconds)], f"server-flood-{name}.log",
                "bench-probe",
            )
            try:
                ctx.wait_ready(server, client)
                row = flood(server, client, config, vocab, ctx.rng(RANDOM_STREAM))
            finally:
                client.close()
                server.stop()
        row["label"] = f"service, --max-step-seconds {seconds:g}" + (" (no bound)" if seconds == 0 else "")
        row["max_step_seconds"] = seconds
        entry["paths"][name] = row


def flood(server: "ServiceProcess", probe, config: "BenchConfig", vocab: int, rng: np.random.Generator) -> dict:
    """One server's row: the probes' latencies (idle, then under the flood) and the tokens the server forwarded per
    second meanwhile (its klservice_tokens_forwarded counter: the flood's, the probes' few aside)."""
    from klservice_client import KLClient

    small = [rng.integers(0, vocab, size=config.probe_tokens).tolist()]
    probe.score(small, 1)  # warm-up
    started = time.perf_counter()
    probe.score(small, 1)
    idle = time.perf_counter() - started
    stop = threading.Event()
    failures: list[BaseException] = []

    def send(seed: int) -> None:
        generator = np.random.default_rng([config.seed, RANDOM_STREAM, seed])
        with KLClient(server.target(), job_id="bench-flood", timeout=1800, max_retries=0) as client:
            while not stop.is_set():
                batch = [generator.integers(0, vocab, size=config.flood_tokens).tolist()
                         for _ in range(config.flood_sequences)]
                try:
                    client.score(batch, 1)
                except Exception as error:  # noqa: BLE001 - reported below, unless the run was over
                    if not stop.is_set():
                        failures.append(error)
                    return

    threads = [threading.Thread(target=send, args=(seed,), daemon=True) for seed in range(config.flood_threads)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(config.flood_warmup)
        forwarded_before = server.metric_sum(FORWARDED)
        window_start = time.perf_counter()
        waits = []
        for _ in range(config.flood_probes):
            small = [rng.integers(0, vocab, size=config.probe_tokens).tolist()]
            started = time.perf_counter()
            probe.score(small, 1)
            waits.append(time.perf_counter() - started)
        # The counter moves as calls finish: read it over a window of several steps, not just the probes' time.
        time.sleep(max(0.0, window_start + config.flood_window - time.perf_counter()))
        window_end = time.perf_counter()
        forwarded_after = server.metric_sum(FORWARDED)
    finally:
        stop.set()
    if failures:
        raise RuntimeError(f"a flood request failed: {failures[0]!r}")
    if forwarded_before is None or forwarded_after is None:
        raise RuntimeError(f"the server's /metrics did not give {FORWARDED}")
    tokens = forwarded_after - forwarded_before
    median = float(np.median(waits))
    return {
        "seconds": median,
        "samples_s": waits,
        "idle_seconds": idle,
        "flood_tokens": tokens,
        "flood_window_s": window_end - window_start,
        "tokens_per_s": tokens / (window_end - window_start),
    }
