"""`BenchContext`: what the phases of one `klservice bench` run share, and the helpers they time with.

One context holds the configuration, the loaded in-process models, the main server (reference
cache off) and its client, every server started (all stopped by `close`, whatever happens) and
the results being written. Each workload module's ``run(context)`` reads and adds to it.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.flops import ModelShape, algorithm_flops, measure_matmul_peak
from klservice.bench.measure import ForeignCpu, Measured, TimedPath, descendants, forward_delta, timed
from klservice.bench.report import PATH_LABELS
from klservice.bench.service import ServiceProcess
from klservice.bench.workload import Workload
from klservice.scheduler import PlannedCall

NO_CACHE = ["--cache-mb", "0"]
"""Server flags that turn the reference cache off, so repeated rounds are computed, not looked up."""


class Phases:
    """A tqdm bar over the run's phases (stderr)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, file=sys.stderr, disable=not enabled, unit="phase",
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._bar.set_description(name)
        yield
        self._bar.update(1)

    def close(self) -> None:
        self._bar.set_description("done")
        self._bar.close()


class BenchContext:
    """The state of one run (see the module docstring); `start` loads the models and the main server."""

    def __init__(self, config: BenchConfig, out_dir: Path, bar: Phases):
        import torch

        from klservice.backends.hf import resolve_device
        from klservice.config import ServerConfig

        self.config, self.out_dir, self.bar, self.torch = config, out_dir, bar, torch
        self.threads = config.threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.device = resolve_device(config.device)
        self.cuda = self.device if self.device.type == "cuda" else None
        self.max_batch_tokens = config.max_batch_tokens or ServerConfig.max_batch_tokens
        self.results: dict[str, Any] = {"workloads": {}, "targets": []}
        self.servers: list[ServiceProcess] = []
        self.service_values: dict[str, np.ndarray] = {}  # per workload, the (hf) service's log-probs
        self.server: ServiceProcess | None = None
        self.client = self.backend = self.naive_model = None

    # -- models and servers ----------------------------------------------------------------

    def start(self) -> None:
        """Start the main server and, while it loads, the in-process models; then measure the matmul peak."""
        from klservice.backends.hf import TORCH_DTYPES, HFBackend

        config = self.config
        self.folder, self.model_name = self._model_folder()
        self.env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                        HF_HUB_OFFLINE="1")
        if config.cache_dir:
            self.env["KLSERVICE_CACHE_DIR"] = str(config.cache_dir)
        self.server_args = ["--dtype", config.dtype, "--device", config.device,
                            "--max-batch-tokens", str(self.max_batch_tokens)]
        if config.model is not None or config.model_shape is not None:
            self.server_args += ["--model", str(self.folder)]
        with self.bar("start server, load model"):
            self.server, self.client = self.start_service(self.server_args + NO_CACHE, "server.log", "bench")
            self.backend = HFBackend(self.folder, name=self.model_name, dtype=config.dtype, device=str(self.device),
                                     progress=False)
            self.naive_model = self._load_naive_model()
            self.info = self.backend.info()
            served = self.wait_ready(self.server, self.client)
            if served.revision != self.info.revision:
                raise RuntimeError(f"server serves revision {served.revision[:12]}, in-process {self.info.revision[:12]}")
        self.shape = ModelShape.of(self.naive_model)
        # The server's hf backend uses HFBackend's default minimum, and so does the one loaded here.
        self.min_shared_prompt = inspect.signature(HFBackend).parameters["min_shared_prompt"].default
        self.share_prompts = self._backend_shares_prompts()
        with self.bar("matmul peak"):
            self.peak_flops = measure_matmul_peak(self.torch, self.device, TORCH_DTYPES[config.dtype],
                                                  config.matmul_size)

    def _model_folder(self) -> tuple[Path, str]:
        """(local folder, display name) of the model: --model, or the embedded one (converted if needed)."""
        from klservice.backends._files import resolve_model_dir
        from klservice.default_model import EMBEDDED_MODEL_NAME, ensure_default_model

        config = self.config
        if config.model_shape is not None:
            from klservice.bench.shapes import shaped_model

            folder = shaped_model(config.model_shape, config.cache_dir, config.dtype, progress=config.progress,
                                  device=str(self.device))
            return folder, f"random {config.model_shape}"
        if config.model is None:
            return ensure_default_model(config.cache_dir, progress=config.progress), EMBEDDED_MODEL_NAME
        return resolve_model_dir(config.model), config.model

    def _load_naive_model(self):
        """The model as an in-process trainer holds it: `AutoModelForCausalLM`, frozen, in eval mode."""
        from klservice.backends.hf.loading import load_model, transformers_progress

        with transformers_progress(False):
            return load_model(self.folder, self.config.dtype, self.device)[1]

    def _backend_shares_prompts(self) -> bool:
        """Whether the in-process backend computes a shared prompt once (its `Scored.tokens_saved` on a probe).

        The backend decides at load time (on by default, off where its self-check fails); the FLOP model counts a
        shared prompt once only where it is.
        """
        prompt = np.arange(1, self.min_shared_prompt + 1, dtype=np.int64) % self.info.vocab_size
        pair = [np.append(prompt, token) for token in (0, 1)]
        return self.backend.score(pair, [len(prompt)] * 2).tokens_saved > 0

    def start_service(self, args: list[str], log_name: str, job_id: str) -> tuple[ServiceProcess, Any]:
        """A `klservice serve` subprocess (stopped by `close` whatever happens) and a `KLClient` for it."""
        from klservice_client import KLClient

        service = ServiceProcess(args, self.env, self.out_dir / log_name)
        self.servers.append(service)
        return service, KLClient(service.target(), job_id=job_id, timeout=1800)

    def wait_ready(self, service: ServiceProcess, client, timeout: float = 600):
        """The served model's info once `service` is ready; RuntimeError with its log's tail if it does not get there."""
        try:
            return client.wait_ready(timeout=timeout)
        except Exception as error:
            raise RuntimeError(f"server did not become ready ({error}); log:\n{service.log_tail()}") from error

    def stop_main_server(self) -> None:
        """Done with the main server (the workloads after (d) start their own)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()

    def release_models(self) -> None:
        """Free the in-process models (their GPU memory goes to the vLLM engines)."""
        if self.backend is not None:
            self.backend.close()
        self.backend = self.naive_model = None
        gc.collect()
        if self.cuda is not None:
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.bar.close()

    # -- workloads and results -------------------------------------------------------------

    def rng(self, stream: int) -> np.random.Generator:
        """One random stream per workload: the same token ids whatever --workloads."""
        return np.random.default_rng([self.config.seed, stream])

    def warm_slice(self, work: Workload) -> Workload:
        return work.subset(min(len(work.sequences), max(2, self.config.naive_batch // 2)))

    def algorithm_flops(self, work: Workload, calls: list[PlannedCall]) -> float:
        return algorithm_flops(self.shape, work, calls, self.share_prompts, self.min_shared_prompt)

    @property
    def local_memory_kind(self) -> str:
        """How the in-process paths' peak memory is measured (see PeakMemory)."""
        return "cuda_allocated" if self.cuda is not None else "rss_hwm"

    def main_server_pids(self) -> list[int | str]:
        """This process and the main server: whose CPU time is not foreign."""
        return ["self", self.server.pid]

    def new_entry(self, work: Workload, key: str | None = None, **extra) -> dict:
        """The results entry of a workload (under `key`, default the workload's), its paths to be recorded."""
        entry = {"title": work.title, "sequences": len(work.sequences), "tokens": work.tokens,
                 "scored_tokens": work.scored, "paths": {}, **extra}
        self.results["workloads"][key or work.key] = entry
        return entry

    def record(self, entry: dict, path: str, work: Workload, measured: Measured, flops: float | None,
               memory_kind: str) -> None:
        """Add the row of `path` to `entry`: its best run, throughput, memory, server time and FLOP utilisation."""
        samples = measured.samples
        seconds = min(samples)
        row = {
            "label": PATH_LABELS[path],
            "seconds": seconds,
            "samples_s": samples,
            "tokens_per_s": work.tokens / seconds,
            "scored_tokens_per_s": work.scored / seconds,
            "peak_memory_rise_bytes": measured.memory_rise,
            "peak_memory_kind": memory_kind,
            "foreign_cpu_fraction": measured.foreign_cpu,
            "cpu_seconds": measured.cpu_s,
        }
        in_model = measured.forward_s[samples.index(seconds)] if measured.forward_s else None
        if in_model is not None:
            row["server_forward_s"] = in_model
            row["outside_model_s"] = seconds - in_model
        if flops is not None:
            row["model_flops"] = flops
            row["achieved_flops_per_s"] = flops / seconds
            row["flop_utilisation"] = flops / seconds / self.peak_flops
        entry["paths"][path] = row

    def timed(self, fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
        return timed(self.torch, self.device, fn)

    def measure(self, key: str, paths: list[TimedPath], work: Workload, warm: Workload, repeats: int,
                service: ServiceProcess | None = None) -> dict[str, Measured]:
        """Warm every path up once on `warm`, then time them in turn on `work`, `repeats` rounds (interleaved,
        so a slow drift of the machine hits every path alike). `service`: the server behind the path named
        "service" (default: the main server)."""
        service = service or self.server
        # This process and the server, each with its children (vLLM's engine processes, where there are any).
        theirs = [service.pid, *descendants(service.pid)]
        ours = ["self", *(pid for pid in descendants("self") if pid not in theirs)]
        with self.bar(f"({key}) warm-up"):
            for path in paths:
                path.run(warm)
        measured = {path.name: Measured([], None, None, None) for path in paths}
        foreign: dict[str, list] = {path.name: [] for path in paths}
        cpu: dict[str, list] = {path.name: [] for path in paths}
        for round_ in range(repeats):
            for path in paths:
                with self.bar(f"({key}) {path.name}" + (f" {round_ + 1}/{repeats}" if repeats > 1 else "")):
                    memory = path.memory()
                    before = service.forward_seconds() if path.name == "service" else None
                    with memory, ForeignCpu(ours + theirs) as watch:
                        seconds, values = self.timed(lambda: path.run(work))
                    in_model = None if before is None else forward_delta(service.forward_seconds(), before)
                got = measured[path.name]
                got.samples.append(seconds)
                got.values = values
                if memory.rise is not None:
                    got.memory_rise = max(got.memory_rise or 0, memory.rise)
                got.forward_s.append(in_model)
                foreign[path.name].append(watch.fraction)
                cpu[path.name].append(None if watch.cpu_s is None else
                                      (sum(watch.cpu_s[:len(ours)]), sum(watch.cpu_s[len(ours):])))
        for name, got in measured.items():
            best = got.samples.index(min(got.samples))
            got.foreign_cpu = foreign[name][best]
            got.cpu_s = dict(zip(("bench", "server"), cpu[name][best] or ()))
        return measured
