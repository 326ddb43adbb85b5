"""`klservice bench`: the benchmark that checks the performance targets of docs/design.md.

What it measures, in one run, on the same model and the same (seeded random) token ids; one
module per workload (`--workloads` picks a subset):

- (a) `ragged`: sequences of 128-384 tokens, every token after the first scored.
- (b) `grpo`: GRPO-shaped work, prompts x 8 responses, prompt 256 and response 128 tokens.
- (c) `jobs`: four concurrent client jobs (distinct ``x-job-id``), each sending its own
  (b)-shaped work as one request per prompt group, against one job sending all of it.
- (d) `long`: one 8k-token sequence, fully scored: time, and the peak extra memory of the
  in-process algorithm compared with full-vocabulary float32 logits.
- (e) `flood`: one job floods the server while another sends small requests, on a server with
  the step bound (``--max-step-seconds``) and one without (two servers of its own): the small
  request's latency and the flood's throughput on each.
- `cache`: (b) again on a server with the reference cache on (a second server), once to
  fill the cache and once timed.
- `vllm`: (b) on vLLM engines, only when vLLM is installed: raw vLLM ``prompt_logprobs``
  against the service on ``--backend vllm`` (a third server), rounds interleaved.

Three paths (`paths`), run one after the other, never overlapping (on a 2-core machine two
models computing at once would fight for the cores): ``naive`` (what an in-process trainer
does: full logits of ``AutoModelForCausalLM`` on padded batches of 8), ``in-process`` (the
service's algorithm without gRPC, fed as the server's scheduler feeds it) and ``service``
(a real ``klservice serve`` subprocess on 127.0.0.1, `ServiceProcess`, reached with
`KLClient` / `AsyncKLClient`, started with ``--cache-mb 0`` so repeated runs are not
answered from the cache).

Conventions (also written into bench.json):

- tokens/s counts every token of the sequences (prompt + response) for every path: the
  same denominator everywhere, so the ratios compare wall time on identical work.
- Every path is warmed up once per workload (on a small slice of it) before it is timed;
  the best of ``--repeats`` timed rounds is reported (all samples are in the JSON); in (a)
  and (b) the paths take turns round by round, so a slow drift of the machine's speed (seen
  here: +-10% over minutes, with no other process running) hits them alike. Every timed
  run also records the share of the machine's CPU that other processes used; above 5% the
  report warns that the numbers are low.
- Service rows also give the server's own time in the model (``klservice_forward_seconds``
  from its /metrics, on a free loopback port) and the rest of the wall time, "outside the
  model": what gRPC, (de)serialisation and scheduling cost. Unlike the service ÷ in-process
  ratio, which compares two runs on a machine whose speed drifts, this split comes from one
  run.
- (d) in-process runs in a fresh Python process, so its memory rise is what the sequence
  needs on top of a loaded model, not blurred by what earlier phases left in the heap.
- torch uses ``--threads`` intra-op threads (default: torch's own default, the number of
  cores) in this process and in the server (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``).
- Peak memory is the rise of the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/PID/clear_refs``) over the resident size at the start of the phase; this process
  first returns freed heap to the OS (``malloc_trim``), the server's rise is measured as is.
  On CUDA the in-process paths report ``torch.cuda.max_memory_allocated`` instead.
- (c) fairness and (d) memory: see `jobs` and `long`; model FLOPs: see `flops`. Utilisation
  is the model FLOPs over the wall time, divided by the best of several ``matmul_size``^3
  matmuls in the model dtype measured in this process.

Modules: `config` (`BenchConfig`, whose fields are the command's flags), `context` (what the
phases of a run share), `run` (`run_bench`), `measure` (time, memory, CPU), `flops`, `paths`,
`service` (`ServiceProcess`), `report` (targets, table, plot), and one per workload. Importing
this package imports none of them (each export loads its module on first use), and none
imports torch at import time: the command's ``--help`` stays fast.

Example::

    from klservice.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig.from_options(quick=True, workloads="a,b", out="/tmp/bench"))
    [(t["name"], t["value"], t["met"]) for t in results["targets"]]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exported name -> the module that defines it, imported on first use: the CLI imports
# `klservice.bench.config` for its flags without loading the rest of the package.
_EXPORTS = {
    "ALL_WORKLOADS": "klservice.bench.config",
    "BenchConfig": "klservice.bench.config",
    "ModelShape": "klservice.bench.flops",
    "ServiceProcess": "klservice.bench.service",
    "Workload": "klservice.bench.workload",
    "algorithm_flops": "klservice.bench.flops",
    "evaluate_targets": "klservice.bench.report",
    "format_report": "klservice.bench.report",
    "naive_flops": "klservice.bench.flops",
    "run_bench": "klservice.bench.run",
    "scheduler_calls": "klservice.bench.paths",
    "write_plot": "klservice.bench.report",
}

__all__ = [
    "ALL_WORKLOADS",
    "BenchConfig",
    "ModelShape",
    "ServiceProcess",
    "Workload",
    "algorithm_flops",
    "evaluate_targets",
    "format_report",
    "naive_flops",
    "run_bench",
    "scheduler_calls",
    "write_plot",
]

if TYPE_CHECKING:
    from klservice.bench.config import ALL_WORKLOADS, BenchConfig
    from klservice.bench.flops import ModelShape, algorithm_flops, naive_flops
    from klservice.bench.paths import scheduler_calls
    from klservice.bench.report import evaluate_targets, format_report, write_plot
    from klservice.bench.run import run_bench
    from klservice.bench.service import ServiceProcess
    from klservice.bench.workload import Workload


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
