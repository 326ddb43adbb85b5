"""cache: (b) again on a server with the reference cache on (a server of its own), once to fill the
cache and then timed; its rows join (b)'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from klservice.bench import grpo
from klservice.bench.config import BenchConfig
from klservice.bench.measure import ForeignCpu, Measured

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "cache"
ON_MAIN_SERVER = False


def phase_count(config: BenchConfig) -> int:
    return 3


def run(ctx: "BenchContext") -> None:
    work = grpo.workload(ctx)
    with ctx.bar("cache: start server"):
        server, client = ctx.start_service(ctx.server_args, "server-cache.log", "bench-cache")
        ctx.wait_ready(server, client)
        client.score(work.sequences[:1], work.starts[:1])  # warm-up
    entry = ctx.results["workloads"].get(grpo.KEY) or ctx.new_entry(work)
    for phase, path in (("cache: fill", "cache_fill"), ("cache: hit", "cache_hit")):
        with ctx.bar(phase):
            samples, foreign = [], []
            for _ in range(1 if path == "cache_fill" else ctx.config.timed_rounds):
                with ForeignCpu(["self", server.pid]) as watch:
                    seconds, _ = ctx.timed(lambda: client.score(work.sequences, work.starts).ref_logprobs)
                samples.append(seconds)
                foreign.append(watch.fraction)
            measured = Measured(samples, None, None, foreign[samples.index(min(samples))])
            ctx.record(entry, path, work, measured, None, "none")
    client.close()
    server.stop()
