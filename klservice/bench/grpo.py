"""(b) GRPO-shaped work: prompts x responses (by default 4 x 8, prompt 256 + response 128 tokens).

The responses to one prompt share it, so the service's algorithm can compute it once per
group. Naive, in-process and service take turns round by round (`compare_paths`); the cache
and vllm workloads score the same sequences, and (c) gives each job work of this shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.paths import compare_paths, compare_phase_count
from klservice.bench.workload import Workload

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "b"
ON_MAIN_SERVER = True
RANDOM_STREAM = 2


def grouped_workload(key: str, kind: str, prompts: int, group_size: int, prompt_len: int, response_len: int,
                     vocab: int, rng: np.random.Generator) -> Workload:
    """`prompts` prompts of `prompt_len` random tokens, each followed by `group_size` responses of `response_len`."""
    sequences, starts, groups = [], [], []
    for _ in range(prompts):
        prompt = rng.integers(0, vocab, size=prompt_len, dtype=np.int64)
        group = []
        for _ in range(group_size):
            response = rng.integers(0, vocab, size=response_len, dtype=np.int64)
            group.append(len(sequences))
            sequences.append(np.concatenate([prompt, response]))
            starts.append(prompt_len)
        groups.append(group)
    title = f"({key}) {kind}, {prompts} prompts x {group_size}, prompt {prompt_len} + response {response_len}"
    return Workload(key, title, sequences, starts, groups)


def grpo_workload(config: BenchConfig, vocab: int, rng: np.random.Generator, key: str = "b") -> Workload:
    """`grpo_prompts` prompts of `prompt_len` tokens, each followed by `group_size` responses of `response_len`."""
    return grouped_workload(key, "GRPO", config.grpo_prompts, config.group_size, config.prompt_len,
                            config.response_len, vocab, rng)


def workload(ctx: "BenchContext") -> Workload:
    """(b)'s sequences (the same whichever workloads run)."""
    return grpo_workload(ctx.config, ctx.info.vocab_size, ctx.rng(RANDOM_STREAM))


def phase_count(config: BenchConfig) -> int:
    return compare_phase_count(config)


def run(ctx: "BenchContext") -> None:
    ctx.service_values[KEY] = compare_paths(ctx, workload(ctx))
