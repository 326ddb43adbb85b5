"""vllm: (b) on vLLM engines, where vLLM is installed: raw vLLM ``prompt_logprobs`` (a trainer
scoring with vLLM alone: `klservice.bench.raw_vllm.RawPromptLogprobs`, an engine in this process)
against the service on ``--backend vllm`` (a server of its own), rounds interleaved.

Both engines are up at once (on a GPU each gets ``--vllm-gpu-memory-utilization`` of it);
the in-process models are freed first.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import numpy as np

from klservice.bench import grpo
from klservice.bench.config import BenchConfig
from klservice.bench.context import NO_CACHE
from klservice.bench.measure import NotMeasured, TimedPath, max_abs_diff
from klservice.bench.paths import service_scorer

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "vllm"
ON_MAIN_SERVER = False


def available() -> bool:
    """Whether vLLM is installed (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def phase_count(config: BenchConfig) -> int:
    return 2 + 2 * config.timed_rounds


def run(ctx: "BenchContext") -> None:
    from klservice.bench.raw_vllm import RawPromptLogprobs

    config = ctx.config
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the raw engine runs below this process
    ctx.release_models()
    work = grpo.workload(ctx)
    vllm_args = ["--backend", "vllm", "--gpu-memory-utilization", str(config.vllm_gpu_memory_utilization)]
    with ctx.bar("vllm: start engines"):
        server, client = ctx.start_service(ctx.server_args + NO_CACHE + vllm_args, "server-vllm.log", "bench-vllm")
        ctx.wait_ready(server, client, timeout=900)  # a vLLM engine starts slowly
        raw = RawPromptLogprobs(ctx.folder, config.dtype, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    try:
        entry = ctx.new_entry(work, KEY, vllm_version=raw.vllm_version, vllm_startup_s=raw.startup_seconds)
        entry["title"] = f"(vllm) {work.title[4:]}, on vLLM engines"
        got = ctx.measure(KEY, [
            TimedPath("raw", lambda w: np.concatenate(raw.score(w.sequences, w.starts)), NotMeasured),
            TimedPath("service", service_scorer(client), NotMeasured),
        ], work, ctx.warm_slice(work), config.timed_rounds, service=server)
    finally:
        raw.close()
        client.close()
        server.stop()
    ctx.record(entry, "vllm_raw", work, got["raw"], None, "none")
    ctx.record(entry, "service_vllm", work, got["service"], None, "none")
    entry["max_abs_diff"] = {"service_vllm_vs_raw": max_abs_diff(got["service"].values, got["raw"].values)}
    if grpo.KEY in ctx.service_values:  # the hf server's values for the same sequences
        entry["max_abs_diff"]["service_vllm_vs_service_hf"] = max_abs_diff(got["service"].values,
                                                                          ctx.service_values[grpo.KEY])
