"""(d) one long sequence (8k tokens by default), fully scored: time, and the peak extra memory of the
in-process algorithm compared with full-vocabulary float32 logits.

The in-process path runs in a fresh Python process (`run_in_fresh_process`), so its memory
rise is what the sequence needs on top of a loaded model, not blurred by what earlier phases
left in this process's heap.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.measure import ForeignCpu, Measured, PeakMemory, TimedPath, max_abs_diff, sync
from klservice.bench.paths import scheduler_calls, service_scorer
from klservice.bench.workload import Workload

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "d"
ON_MAIN_SERVER = True
RANDOM_STREAM = 4
WARM_TOKENS = 1024  # the warm-up scores this prefix of the sequence


def long_workload(config: BenchConfig, vocab: int, max_length: int, rng: np.random.Generator) -> Workload:
    """One sequence of `long_len` tokens (capped at the model's context), every token after the first scored."""
    length = min(config.long_len, max_length)
    sequence = rng.integers(0, vocab, size=length, dtype=np.int64)
    return Workload("d", f"(d) one sequence of {length} tokens, full scoring", [sequence], [1])


def phase_count(config: BenchConfig) -> int:
    return 2 + config.long_rounds


def run(ctx: "BenchContext") -> None:
    vocab = ctx.info.vocab_size
    work = long_workload(ctx.config, vocab, ctx.info.max_length, ctx.rng(RANDOM_STREAM))
    sequence = work.sequences[0]
    warm = Workload("d", "", [sequence[: min(WARM_TOKENS, len(sequence))]], [1])
    logits_bytes = len(sequence) * vocab * 4
    entry = ctx.new_entry(work, full_vocab_float32_logits_bytes=logits_bytes)
    alg_flops = ctx.algorithm_flops(work, scheduler_calls(work, ctx.max_batch_tokens, ctx.backend.packs))
    with ctx.bar("(d) in-process"):
        spec = {"folder": str(ctx.folder), "name": ctx.model_name, "dtype": ctx.config.dtype,
                "device": str(ctx.device), "threads": ctx.threads, "warm_len": len(warm.sequences[0]),
                "repeats": ctx.config.long_rounds, "watch_pids": [os.getpid(), ctx.server.pid]}
        inprocess = run_in_fresh_process(spec, sequence, ctx.out_dir)
        ctx.record(entry, "inprocess", work, inprocess, alg_flops, ctx.local_memory_kind)
    service = ctx.measure("d", [TimedPath("service", service_scorer(ctx.client), lambda: PeakMemory(ctx.server.pid))],
                          work, warm, ctx.config.long_rounds)["service"]
    ctx.record(entry, "service", work, service, alg_flops, "server_rss_hwm")
    rise = inprocess.memory_rise
    entry["extra_memory_fraction_of_logits"] = None if rise is None else rise / logits_bytes
    entry["max_abs_diff"] = {"service_vs_inprocess": max_abs_diff(service.values, inprocess.values)}


def run_in_fresh_process(spec: dict, sequence: np.ndarray, scratch: Path) -> Measured:
    """Score one full sequence with the in-process algorithm in a new Python process (see `fresh_process_main`).

    `spec`: the model (``folder``, ``name``, ``dtype``, ``device``), torch ``threads``, the warm-up
    prefix length ``warm_len``, timed ``repeats`` and ``watch_pids`` (whose CPU time is not foreign).
    """
    tokens, values = scratch / ".bench-long-tokens.npy", scratch / ".bench-long-values.npy"
    np.save(tokens, sequence)
    spec = dict(spec, tokens=str(tokens), values=str(values))
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from klservice.bench.long import fresh_process_main; "
             "sys.exit(fresh_process_main(sys.argv[1]))", json.dumps(spec)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the fresh in-process run failed:\n{result.stderr[-3000:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        return Measured(report["samples_s"], np.load(values), report["memory_rise"], report["foreign_cpu"])
    finally:
        for path in (tokens, values):
            path.unlink(missing_ok=True)


def fresh_process_main(spec_json: str) -> int:
    """Child side of `run_in_fresh_process`: load the backend, warm up on a prefix, then time and watch memory.

    Prints one JSON line (``samples_s``, ``memory_rise``, ``foreign_cpu``) and saves the values.
    """
    spec = json.loads(spec_json)
    import torch

    from klservice.backends.hf import HFBackend

    torch.set_num_threads(spec["threads"])
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device(spec["device"])
    backend = HFBackend(spec["folder"], name=spec["name"], dtype=spec["dtype"], device=str(device), progress=False)
    sequence = np.load(spec["tokens"])
    backend.score([sequence[: spec["warm_len"]]], [1])
    samples, foreign, values = [], [], None
    memory = PeakMemory(cuda_device=device if device.type == "cuda" else None)
    with memory:
        for _ in range(spec["repeats"]):
            with ForeignCpu(["self", *spec["watch_pids"]]) as watch:
                started = time.perf_counter()
                values = backend.score([sequence], [1]).values[0]
                sync(torch, device)
                samples.append(time.perf_counter() - started)
            foreign.append(watch.fraction)
    np.save(spec["values"], values)
    best = samples.index(min(samples))
    print(json.dumps({"samples_s": samples, "memory_rise": memory.rise, "foreign_cpu": foreign[best]}))
    return 0
