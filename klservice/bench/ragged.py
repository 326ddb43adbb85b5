"""(a) ragged scoring: sequences of random lengths, by default every token after the first scored.

Naive, in-process and service take turns round by round on the same sequences (`compare_paths`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.paths import compare_paths, compare_phase_count
from klservice.bench.workload import Workload

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "a"
ON_MAIN_SERVER = True
RANDOM_STREAM = 1


def ragged_workload(config: BenchConfig, vocab: int, max_length: int, rng: np.random.Generator) -> Workload:
    """`ragged_sequences` sequences of ragged_min .. ragged_max tokens (capped at the model's context)."""
    high = min(config.ragged_max, max_length)
    low = min(config.ragged_min, high)
    lengths = rng.integers(low, high + 1, size=config.ragged_sequences)
    sequences = [rng.integers(0, vocab, size=int(n), dtype=np.int64) for n in lengths]
    starts = [max(1, min(int(round(len(s) * config.ragged_prompt_fraction)), len(s) - 1)) for s in sequences]
    scoring = "full scoring" if config.ragged_prompt_fraction <= 0 else f"prompt {config.ragged_prompt_fraction:.0%}"
    title = f"(a) ragged, {len(sequences)} seq of {low}-{high} tokens, {scoring}"
    return Workload("a", title, sequences, starts)


def phase_count(config: BenchConfig) -> int:
    return compare_phase_count(config)


def run(ctx: "BenchContext") -> None:
    info = ctx.info
    compare_paths(ctx, ragged_workload(ctx.config, info.vocab_size, info.max_length, ctx.rng(RANDOM_STREAM)))
