"""(c) concurrent jobs: each of `jobs` clients (its own ``x-job-id``) sends (b)-shaped work of its own,
one request per prompt group, all starting together; against one job sending all of it.

Fairness: job j's share is its throughput (its tokens / the time its last request finished)
over the sum of all jobs' throughputs; with equal work that is (1/T_j) / sum(1/T_k). Equal
shares (1/jobs) mean no job waited for the others; the target is every share within +-20% of
equal. The share of tokens done by the time the first job finished is reported too (coarser:
it moves in whole requests).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from klservice.bench.config import BenchConfig
from klservice.bench.grpo import grpo_workload
from klservice.bench.measure import ForeignCpu, forward_delta
from klservice.bench.report import PATH_LABELS
from klservice.bench.workload import Workload

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "c"
ON_MAIN_SERVER = True
RANDOM_STREAM = 1000  # job j draws from stream 1000 + j

SHARE_DEFINITION = (
    "share_j = (tokens_j / T_j) / sum_k (tokens_k / T_k), T_j = when job j's last request finished "
    "(all jobs start together); progress_share_j = tokens of job j's finished requests when the first "
    "job finished / all tokens finished by then"
)


def phase_count(config: BenchConfig) -> int:
    return 2


def run(ctx: "BenchContext") -> None:
    config = ctx.config
    jobs = [grpo_workload(config, ctx.info.vocab_size, ctx.rng(RANDOM_STREAM + j), key="c") for j in range(config.jobs)]
    requests = [[Workload("c", "", [job.sequences[i] for i in group], [job.starts[i] for i in group])
                 for group in job.groups] for job in jobs]
    total = sum(job.tokens for job in jobs)
    entry = ctx.new_entry(jobs[0], requests_per_job=len(requests[0]))
    entry.update(title=f"(c) {config.jobs} jobs x {jobs[0].title[4:]}", tokens=total,
                 sequences=sum(len(j.sequences) for j in jobs), scored_tokens=sum(j.scored for j in jobs))
    one = _run_jobs(ctx, "(c) 1 job", [[r for job in requests for r in job]], ["bench-one-job"])
    entry["paths"]["one_job"] = _jobs_row("one_job", total, *one)
    job_ids = [f"bench-job-{j}" for j in range(config.jobs)]
    many = _run_jobs(ctx, f"(c) {config.jobs} jobs", requests, job_ids)
    entry["paths"]["jobs"] = _jobs_row("jobs", total, *many)
    entry["paths"]["jobs"]["label"] = f"service, {config.jobs} jobs aggregate"
    entry["jobs"] = many[0]["jobs"]
    entry["share_definition"] = SHARE_DEFINITION


def _run_jobs(ctx: "BenchContext", phase: str, requests: list[list[Workload]], job_ids: list[str]):
    """(best run, foreign CPU share, server seconds in the model per run) of `_concurrent_jobs` on the main server."""
    from klservice_client import AsyncKLClient

    target = ctx.server.target()
    before = ctx.server.forward_seconds()
    rounds = ctx.config.long_rounds
    with ctx.bar(phase), ForeignCpu(ctx.main_server_pids()) as watch:
        best = asyncio.run(_concurrent_jobs(AsyncKLClient, target, requests, job_ids, rounds))
    return best, watch.fraction, forward_delta(ctx.server.forward_seconds(), before, rounds)


async def _concurrent_jobs(
    client_class, target: str, jobs: list[list[Workload]], job_ids: list[str], repeats: int
) -> dict:
    """All jobs start together; each sends its requests concurrently. Best of `repeats` by wall time.

    The calls are issued job by job (job 0's requests first): a scheduler serving requests first come, first
    served would finish job 0 long before the others, which the shares then show.
    """
    best = None
    for _ in range(repeats):
        clients = [client_class(target, job_id=job_id, timeout=1800) for job_id in job_ids]
        try:
            for c in clients:
                await c.model_info()
            began = time.perf_counter()

            async def one(j: int, work: Workload) -> tuple[int, int, float]:
                await clients[j].score(work.sequences, work.starts)
                return j, work.tokens, time.perf_counter() - began

            tasks = [asyncio.ensure_future(one(j, work)) for j, job in enumerate(jobs) for work in job]
            finished = await asyncio.gather(*tasks)
        finally:
            for c in clients:
                await c.close()
        wall = max(t for _, _, t in finished)
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "finished": finished}
    return {"wall_s": best["wall_s"], "jobs": _per_job(best["finished"], job_ids, best["wall_s"])}


def _per_job(finished: list[tuple[int, int, float]], job_ids: list[str], wall: float) -> list[dict]:
    """Per job: its tokens, when its requests finished, its throughput and its shares (see the module docstring)."""
    per_job = []
    for j, job_id in enumerate(job_ids):
        mine = [(tokens, t) for k, tokens, t in finished if k == j]
        per_job.append({"job_id": job_id, "tokens": sum(n for n, _ in mine), "finished_s": max(t for _, t in mine),
                        "request_finish_s": sorted(t for _, t in mine)})
    rates = [job["tokens"] / job["finished_s"] for job in per_job]
    # Requests answered from one forward step reach the client microseconds apart: count those too.
    first = min(job["finished_s"] for job in per_job) + 0.02 * wall
    done = [sum(tokens for k, tokens, t in finished if k == j and t <= first) for j in range(len(job_ids))]
    for j, job in enumerate(per_job):
        job["tokens_per_s"] = rates[j]
        job["share"] = rates[j] / sum(rates)
        job["progress_share_at_first_finish"] = done[j] / sum(done)
    return per_job


def _jobs_row(path: str, total: int, run: dict, foreign: float | None, in_model: float | None) -> dict:
    row = {"label": PATH_LABELS[path], "seconds": run["wall_s"], "samples_s": [run["wall_s"]],
           "tokens_per_s": total / run["wall_s"], "peak_memory_rise_bytes": None, "peak_memory_kind": "none",
           "foreign_cpu_fraction": foreign}
    if in_model is not None:  # mean over the runs (all of them are in the reading)
        row["server_forward_s"] = in_model
        row["outside_model_s"] = run["wall_s"] - in_model
    return row
