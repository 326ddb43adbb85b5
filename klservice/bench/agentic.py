"""(f) agentic work: a long shared context (by default 1024 tokens; 4096 with --preset gpu), each with a group
of short responses (128; 512 on a GPU).

Tool-using agents and long-context RL score many short continuations of one long prompt. The
prompt is most of the tokens, so computing it once per group (the service's packed forward) is
worth most here: the FLOP ratio against the naive path is about (prompt + response) x group /
(prompt + response x group). Naive, in-process and service take turns round by round, as in (b).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from klservice.bench.config import BenchConfig
from klservice.bench.grpo import grouped_workload
from klservice.bench.paths import compare_paths, compare_phase_count
from klservice.bench.workload import Workload

if TYPE_CHECKING:
    from klservice.bench.context import BenchContext

KEY = "f"
ON_MAIN_SERVER = True
RANDOM_STREAM = 6


def workload(ctx: "BenchContext") -> Workload:
    config = ctx.config
    return grouped_workload(KEY, "agentic", config.agentic_prompts, config.agentic_group, config.agentic_prompt_len,
                            config.agentic_response_len, ctx.info.vocab_size, ctx.rng(RANDOM_STREAM))


def phase_count(config: BenchConfig) -> int:
    return compare_phase_count(config)


def run(ctx: "BenchContext") -> None:
    ctx.service_values[KEY] = compare_paths(ctx, workload(ctx))
