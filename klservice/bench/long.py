"""(d) one long sequence (8k tokens by default), fully scored: time, and the peak extra memory of the
in-process algorithm compared with full-vocabulary float32 logits.

The in-process path runs in a fresh Python process (`FreshProcessScorer`), so its memory rise is what
the sequence needs on top of a loaded model, not blurred by what earlier phases left in this process's
heap. That process stays up for the whole workload and takes turns with the service round by round
(`BenchContext.measure`), so a drift of the machine hits both paths alike: one sample of each, taken
one after the other, differed by up to 15% between runs on a 2-core machine.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.measure import NotMeasured, PeakMemory, TimedPath, max_abs_diff, release_freed_memory, sync
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
    return 2 + 2 * config.long_rounds


def run(ctx: "BenchContext") -> None:
    vocab = ctx.info.vocab_size
    work = long_workload(ctx.config, vocab, ctx.info.max_length, ctx.rng(RANDOM_STREAM))
    sequence = work.sequences[0]
    warm = Workload("d", "", [sequence[: min(WARM_TOKENS, len(sequence))]], [1])
    logits_bytes = len(sequence) * vocab * 4
    entry = ctx.new_entry(work, full_vocab_float32_logits_bytes=logits_bytes)
    alg_flops = ctx.algorithm_flops(work, scheduler_calls(work, ctx.max_batch_tokens, ctx.backend.packs))
    spec = {"folder": str(ctx.folder), "name": ctx.model_name, "dtype": ctx.config.dtype,
            "device": str(ctx.device), "threads": ctx.threads}
    with ctx.bar("(d) in-process: loading a fresh process"):
        fresh = FreshProcessScorer(spec, ctx.out_dir)
    with fresh:
        measured = ctx.measure("d", [
            TimedPath("inprocess", fresh, NotMeasured),
            TimedPath("service", service_scorer(ctx.client), lambda: PeakMemory(ctx.server.pid)),
        ], work, warm, ctx.config.long_rounds)
    inprocess, service = measured["inprocess"], measured["service"]
    inprocess.memory_rise = max((r for r in fresh.rises[1:] if r is not None), default=None)  # timed rounds only
    ctx.record(entry, "inprocess", work, inprocess, alg_flops, ctx.local_memory_kind)
    ctx.record(entry, "service", work, service, alg_flops, "server_rss_hwm")
    rise = inprocess.memory_rise
    entry["extra_memory_fraction_of_logits"] = None if rise is None else rise / logits_bytes
    entry["max_abs_diff"] = {"service_vs_inprocess": max_abs_diff(service.values, inprocess.values)}


class FreshProcessScorer:
    """The in-process algorithm in a new Python process (`fresh_process_main`), called like a scoring path.

    `spec`: the model (``folder``, ``name``, ``dtype``, ``device``) and torch ``threads``. Each call
    scores one workload there and returns its log-probs; the child measures the rise of its own
    memory during the call (RSS high-water mark, or CUDA's allocated peak), kept in `rises`.
    """

    def __init__(self, spec: dict, scratch: Path):
        self.rises: list[int | None] = []
        self._dir = tempfile.TemporaryDirectory(prefix=".bench-long-", dir=scratch)
        # stderr goes to a file: a pipe nobody reads until the end would block a child that writes more than its buffer.
        self._stderr = open(Path(self._dir.name) / "stderr.log", "w+")
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from klservice.bench.long import fresh_process_main; "
             "sys.exit(fresh_process_main(sys.argv[1]))", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        try:
            self._reply()  # "ready": the model is loaded
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "FreshProcessScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, work: Workload) -> np.ndarray:
        tokens, values = Path(self._dir.name) / "tokens.npz", Path(self._dir.name) / "values.npy"
        np.savez(tokens, *work.sequences, starts=np.asarray(work.starts))
        self._process.stdin.write(json.dumps({"tokens": str(tokens), "values": str(values)}) + "\n")
        self._process.stdin.flush()
        self.rises.append(self._reply()["memory_rise"])
        return np.load(values)

    def _reply(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"the fresh in-process run failed:\n{self._stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()  # end of input: the child exits
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._stderr.close()
        self._dir.cleanup()


def fresh_process_main(spec_json: str) -> int:
    """Child side of `FreshProcessScorer`: load the backend, then score what each input line names.

    Prints ``{"ready": true}`` once loaded, then per request (a JSON line naming the ``tokens`` .npz and the
    ``values`` .npy to write) one JSON line with ``memory_rise``; exits at the end of its input.
    """
    spec = json.loads(spec_json)
    import torch

    from klservice.backends.hf import HFBackend

    torch.set_num_threads(spec["threads"])
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device(spec["device"])
    backend = HFBackend(spec["folder"], name=spec["name"], dtype=spec["dtype"], device=str(device), progress=False)
    release_freed_memory()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        with np.load(request["tokens"]) as saved:
            starts = [int(x) for x in saved["starts"]]
            sequences = [saved[f"arr_{i}"] for i in range(len(starts))]
        # Watched by pid, not as "self": the garbage collection and heap trim (~0.15 s) that a measurement of "self"
        # starts with are done after the reply instead, outside the time the bench takes.
        with PeakMemory(os.getpid(), cuda_device=device if device.type == "cuda" else None) as memory:
            values = backend.score(sequences, starts).values
            sync(torch, device)
        np.save(request["values"], np.concatenate(values))
        print(json.dumps({"memory_rise": memory.rise}), flush=True)
        release_freed_memory()
    return 0
