"""The three ways of scoring a workload, and (a)/(b)'s comparison of them.

- ``naive``: what an in-process trainer does: ``AutoModelForCausalLM`` on right-padded
  batches in the order given (with attention mask), full logits -> log_softmax -> gather.
- ``in-process``: the service's algorithm without gRPC: `HFBackend.score` fed exactly as the
  server's scheduler feeds it (`scheduler_calls`).
- ``service``: a real ``klservice serve`` subprocess reached with `KLClient`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from klservice.bench.flops import naive_flops
from klservice.bench.measure import PeakMemory, TimedPath, max_abs_diff
from klservice.bench.workload import Workload
from klservice.scheduler import PlannedCall, plan_calls

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext


def scheduler_calls(workload: Workload, max_batch_tokens: int, packed: bool = False) -> list[PlannedCall]:
    """Backend calls the server's scheduler makes for one request holding `workload` (one job).

    A scheduler step takes sequences in request order while they fit the token budget
    (the first always), then `klservice.scheduler.plan_calls` packs the step into backend calls.
    """
    calls: list[PlannedCall] = []
    n, i = len(workload.sequences), 0
    while i < n:
        step, used = [i], len(workload.sequences[i])
        i += 1
        while i < n and used + len(workload.sequences[i]) <= max_batch_tokens:
            step.append(i)
            used += len(workload.sequences[i])
            i += 1
        sub = plan_calls([workload.sequences[k] for k in step], [workload.starts[k] for k in step], max_batch_tokens,
                         packed=packed)
        calls.extend(PlannedCall([step[k] for k in call.indices], call.prompt_groups) for call in sub)
    return calls


def run_inprocess(backend, workload: Workload, calls: list[PlannedCall]) -> np.ndarray:
    """`backend.score` on `workload` as planned into `calls`; the log-probs in workload order, concatenated."""
    values: list[np.ndarray | None] = [None] * len(workload.sequences)
    for call in calls:
        sequences, starts = [workload.sequences[i] for i in call.indices], [workload.starts[i] for i in call.indices]
        for i, output in zip(call.indices, backend.score(sequences, starts, 1.0, call.prompt_groups).values):
            values[i] = output
    return np.concatenate(values).astype(np.float32, copy=False)


def run_naive(torch, model, workload: Workload, batch_size: int, device) -> np.ndarray:
    """Right-padded batches of `batch_size` in the given order: full logits -> log_softmax -> gather."""
    values = []
    with torch.inference_mode():
        for b0 in range(0, len(workload.sequences), batch_size):
            chunk = workload.sequences[b0 : b0 + batch_size]
            starts = workload.starts[b0 : b0 + batch_size]
            width = max(len(s) for s in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            input_ids = torch.from_numpy(ids).to(device)
            logits = model(input_ids=input_ids, attention_mask=torch.from_numpy(mask).to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu().numpy()
            del logits, logp
            for row, (seq, start) in enumerate(zip(chunk, starts)):
                values.append(picked[row, start - 1 : len(seq) - 1])
    return np.concatenate(values).astype(np.float32, copy=False)


def service_scorer(client) -> Callable[[Workload], np.ndarray]:
    """The service path through `client` (a `KLClient`): one Score request for the whole workload."""
    return lambda work: np.asarray(client.score(work.sequences, work.starts).ref_logprobs)


def compare_paths(ctx: "BenchContext", work: Workload) -> np.ndarray:
    """(a) and (b): naive, in-process and service on `work`, taking turns round by round; records the rows
    and the largest differences between their log-probs. Returns the service's log-probs."""
    calls = scheduler_calls(work, ctx.max_batch_tokens, ctx.backend.packs)
    warm = ctx.warm_slice(work)
    warm_calls = scheduler_calls(warm, ctx.max_batch_tokens, ctx.backend.packs)
    entry = ctx.new_entry(work, backend_calls=[len(c.indices) for c in calls], planner="klservice.scheduler.plan_calls")
    alg_flops = ctx.algorithm_flops(work, calls)

    def local_memory() -> PeakMemory:
        return PeakMemory(cuda_device=ctx.cuda)

    got = ctx.measure(work.key, [
        TimedPath("naive", lambda w: run_naive(ctx.torch, ctx.naive_model, w, ctx.config.naive_batch, ctx.device),
                  local_memory),
        TimedPath("in-process", lambda w: run_inprocess(ctx.backend, w, calls if w is work else warm_calls),
                  local_memory),
        TimedPath("service", service_scorer(ctx.client), lambda: PeakMemory(ctx.server.pid)),
    ], work, warm, ctx.config.timed_rounds)
    naive, inprocess, service = got["naive"], got["in-process"], got["service"]
    ctx.record(entry, "naive", work, naive, naive_flops(ctx.shape, work), ctx.local_memory_kind)
    ctx.record(entry, "inprocess", work, inprocess, alg_flops, ctx.local_memory_kind)
    ctx.record(entry, "service", work, service, alg_flops, "server_rss_hwm")
    entry["max_abs_diff"] = {
        "service_vs_inprocess": max_abs_diff(service.values, inprocess.values),
        "service_vs_naive": max_abs_diff(service.values, naive.values),
    }
    return service.values


def compare_phase_count(config) -> int:
    """Progress-bar phases of one `compare_paths`: a warm-up, then three paths per timed round."""
    return 1 + 3 * config.timed_rounds
