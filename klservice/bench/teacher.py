"""teacher: what teacher outputs cost, on (b)'s sequences on the main server: plain Score against Score with top-k
1, 20 and 100 and with 20 candidate ids per position (`KLClient.score(top_k=..., candidate_ids=...)`), taking
turns round by round; per variant its throughput and the response's bytes per scored token (one raw gRPC call of
the whole batch, measured with ``ByteSize``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from klservice.bench import grpo
from klservice.bench.config import BenchConfig
from klservice.bench.measure import NotMeasured, TimedPath

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "teacher"
ON_MAIN_SERVER = True
CANDIDATES = 20
VARIANTS = {"teacher_plain": (0, False), "teacher_top1": (1, False), "teacher_top20": (20, False),
            "teacher_top100": (100, False), "teacher_candidates": (0, True)}
"""Path name -> (top_k, whether it gives `CANDIDATES` candidate ids per position)."""


def phase_count(config: BenchConfig) -> int:
    return 2 + config.timed_rounds * len(VARIANTS)  # bytes per token, warm-up, then each variant each round


def run(ctx: "BenchContext") -> None:
    work = grpo.workload(ctx)
    candidates = np.random.default_rng([ctx.config.seed, 9]).integers(0, ctx.info.vocab_size,
                                                                     (work.scored, CANDIDATES))
    calls = {path: _call(ctx, work, top_k, candidates if given else None)
             for path, (top_k, given) in VARIANTS.items()}
    entry = ctx.new_entry(work, key=KEY)
    entry["title"] = f"(teacher) teacher outputs on {work.title[4:]}"
    with ctx.bar("teacher: bytes per token"):
        sizes = {path: _bytes_per_token(ctx, work, top_k, candidates if given else None)
                 for path, (top_k, given) in VARIANTS.items()}
    entry["response_bytes_per_scored_token"] = sizes
    paths = [TimedPath(path, lambda _work, call=calls[path]: call(), NotMeasured) for path in VARIANTS]
    measured = ctx.measure(KEY, paths, work, work, ctx.config.timed_rounds)
    for path in VARIANTS:
        ctx.record(entry, path, work, measured[path], None, "none")
        entry["paths"][path]["response_bytes_per_scored_token"] = sizes[path]


def _call(ctx: "BenchContext", work, top_k: int, candidates):
    return lambda: ctx.client.score(work.sequences, work.starts, top_k=top_k, candidate_ids=candidates).ref_logprobs


def _bytes_per_token(ctx: "BenchContext", work, top_k: int, candidates) -> float:
    """The serialised Score response of the whole batch, over its scored tokens."""
    import grpc

    from klservice_client._requests import prepare, score_requests, with_teacher
    from klservice_client.wire import pb_grpc

    prepared = with_teacher(prepare(work.sequences, work.starts), top_k, candidates)
    (request,) = score_requests(prepared, [slice(0, len(work.sequences))], "", 1.0)
    with grpc.insecure_channel(ctx.server.target(), options=[("grpc.max_receive_message_length", 1 << 30),
                                                             ("grpc.max_send_message_length", 1 << 30)]) as channel:
        response = pb_grpc.ReferenceServiceStub(channel).Score(request, timeout=1800)
    return response.ByteSize() / work.scored
