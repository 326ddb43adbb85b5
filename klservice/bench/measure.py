"""Measuring one timed run: wall time, peak memory, the CPU other processes took, the machine.

Linux's /proc gives the memory and CPU figures; where it is missing they are None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FOREIGN_CPU_WARNING = 0.05
"""Share of the machine's CPU used by other processes during a timed phase above which the report warns."""


@dataclasses.dataclass
class Measured:
    """Timed runs of one path on one workload."""

    samples: list[float]  # seconds per timed run
    values: np.ndarray | None  # the log-probs of the last run
    memory_rise: int | None  # bytes (see PeakMemory)
    foreign_cpu: float | None  # share of the machine other processes used during the best run
    cpu_s: dict | None = None  # CPU seconds of this process and of the server during the best run
    forward_s: list = dataclasses.field(default_factory=list)  # per run: seconds the server spent in the model


@dataclasses.dataclass
class TimedPath:
    """One way of scoring a workload, timed next to others by `BenchContext.measure`."""

    name: str  # "service": the path answered by the server whose time in the model is read
    run: Callable[[Any], np.ndarray]  # Workload -> the log-probs of every scored token, concatenated
    memory: Callable[[], Any]  # a fresh PeakMemory (or NotMeasured) per timed run


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


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free memory back to the system, so that a resident size measured next
    starts from what is live."""
    gc.collect()
    _malloc_trim()


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
            release_freed_memory()
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


def descendants(pid: int | str) -> list[int]:
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


def sync(torch, device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(torch, device, fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """(wall seconds, result) of `fn()`, the device synchronised before and after."""
    sync(torch, device)
    started = time.perf_counter()
    values = fn()
    sync(torch, device)
    return time.perf_counter() - started, values


def forward_delta(after: float | None, before: float | None, runs: int = 1) -> float | None:
    """Server seconds in the model per run between two `ServiceProcess.forward_seconds` readings (None if
    either is None)."""
    return None if after is None or before is None else (after - before) / max(1, runs)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def machine_info(torch, threads: int) -> dict:
    """CPU, memory and library versions of this machine (the ``machine`` entry of bench.json)."""
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


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), the most bytes of tensors it allocated that were live at once) on the CPU, from the PyTorch
    profiler's allocation events: what ``torch.cuda.max_memory_allocated`` reports on a GPU, without the heap
    noise of a resident size. Tensors that existed before the call are not counted."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak
