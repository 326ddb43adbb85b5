"""`BenchConfig`: everything `klservice bench` can be told; its fields are the command's flags.

Every field becomes a flag (``ragged_sequences`` → ``--ragged-sequences``) whose help is the
field's ``help`` metadata and its default, as `klservice.config.ServerConfig` does for
``klservice serve``. Unlike the server's, these flags read no environment variables: a
benchmark run is described by its command line alone. Flags not given stay out of the
parsed namespace, so that ``--quick`` can fill in only the sizes that were not given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar

from klservice.backends.base import DTYPES
from klservice.config import config_field, scalar_type

ALL_WORKLOADS = ("a", "b", "f", "teacher", "c", "d", "e", "cache", "vllm")
"""Workload keys in the order they run (`--workloads` picks a subset): those on the main server first."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything `klservice bench` can be told (the CLI flags are these fields).

    Field metadata: ``help`` (the flag's help, followed by its default), ``shown`` (how the
    help names the default where the value would not say it), ``choices``, and for a boolean
    field ``flag`` (its flag when that is not ``--field-name``, e.g. ``--no-progress``).
    """

    model: str | None = config_field(
        None, "Hugging Face folder", shown="the embedded SmolLM2-135M-Instruct"
    )
    model_shape: str | None = config_field(
        None,
        "instead of --model: random weights in the shape of smollm2-1.7b or llama-7b (written once under "
        "--cache-dir in --dtype; GPU figures at real sizes)",
        choices=("smollm2-1.7b", "llama-7b"), shown="none",
    )
    preset: str | None = config_field(
        None,
        "gpu: sizes for one GPU (bfloat16 on cuda, (b) 64 prompts x 8 of 512 + 1024 tokens, (f) 16 prompts x 8 of "
        "4096 + 512, 256 ragged sequences of 256-2048, 65536-token steps, floods of 16 x 2048, an 8192 matmul); "
        "flags given explicitly win",
        choices=("gpu",), shown="none",
    )
    dtype: str = config_field("float32", "compute dtype", choices=DTYPES)
    device: str = config_field("auto", "torch device for the server and the in-process paths")
    cache_dir: str | None = config_field(None, "cache directory of the embedded model", shown="as klservice serve")
    out: str = config_field("bench-out", "output folder for bench.json, bench.png and the server log")
    workloads: str = config_field(
        ",".join(ALL_WORKLOADS),
        f"comma-separated subset of {','.join(ALL_WORKLOADS)}; vllm runs only where vLLM is installed",
    )
    ragged_sequences: int = config_field(32, "(a) number of sequences")
    ragged_min: int = config_field(128, "(a) shortest sequence")
    ragged_max: int = config_field(384, "(a) longest sequence")
    ragged_prompt_fraction: float = config_field(
        0.0, "(a) prompt share of each sequence, not scored; 0 scores every token after the first"
    )
    grpo_prompts: int = config_field(4, "(b) prompts")
    group_size: int = config_field(8, "(b) responses per prompt")
    prompt_len: int = config_field(256, "(b) prompt tokens")
    response_len: int = config_field(128, "(b) response tokens")
    agentic_prompts: int = config_field(1, "(f) prompts")
    agentic_group: int = config_field(8, "(f) responses per prompt")
    agentic_prompt_len: int = config_field(1024, "(f) prompt tokens")
    agentic_response_len: int = config_field(128, "(f) response tokens")
    long_len: int = config_field(8192, "(d) sequence length, capped at the model's context")
    jobs: int = config_field(4, "(c) concurrent client jobs")
    flood_threads: int = config_field(4, "(e) threads of the flooding job")
    flood_sequences: int = config_field(8, "(e) sequences per flood request")
    flood_tokens: int = config_field(1024, "(e) tokens per flood sequence")
    probe_tokens: int = config_field(32, "(e) tokens of the other job's small request")
    flood_probes: int = config_field(3, "(e) small requests, one after the other; the median latency is reported")
    flood_warmup: float = config_field(5.0, "(e) seconds of flood before the first small request")
    flood_window: float = config_field(
        20.0, "(e) seconds over which the flood's throughput is read, from the first small request (at least as long "
        "as the small requests take)"
    )
    max_step_seconds: float | None = config_field(
        None, "(e) the bounded server's --max-step-seconds", shown="the server's"
    )
    naive_batch: int = config_field(8, "batch size of the naive baseline")
    repeats: int = config_field(2, "timed rounds of (a), (b) and the cache hit; the best is reported")
    long_repeats: int = config_field(1, "timed rounds of (c) and (d)")
    seed: int = config_field(0, "seed of the random token ids")
    threads: int | None = config_field(None, "torch threads here and in the server", shown="torch's default")
    max_batch_tokens: int | None = config_field(
        None, "the server's token budget, also used in-process", shown="the server's"
    )
    matmul_size: int = config_field(2048, "side of the square matmul measuring peak FLOP/s")
    vllm_gpu_memory_utilization: float = config_field(
        0.4, "vllm: GPU memory share of each of the two vLLM engines (raw baseline, vllm server)"
    )
    quick: bool = config_field(False, "tiny sizes: a smoke run of every phase")
    progress: bool = config_field(True, "no progress bar", flag="--no-progress", shown="progress bar on")

    QUICK: ClassVar[dict[str, int]] = {
        "ragged_sequences": 4,
        "ragged_min": 24,
        "ragged_max": 48,
        "grpo_prompts": 2,
        "group_size": 4,
        "prompt_len": 32,
        "response_len": 16,
        "agentic_group": 4,
        "agentic_prompt_len": 64,
        "agentic_response_len": 8,
        "long_len": 256,
        "flood_threads": 2,
        "flood_sequences": 2,
        "flood_tokens": 64,
        "flood_probes": 1,
        "flood_warmup": 1.0,
        "flood_window": 2.0,
        "repeats": 1,
        "long_repeats": 1,
        "matmul_size": 256,
    }
    """Sizes --quick uses for fields not given explicitly: a smoke run of every phase in seconds."""

    GPU: ClassVar[dict[str, object]] = {
        "device": "cuda",
        "dtype": "bfloat16",
        "grpo_prompts": 64,
        "group_size": 8,
        "prompt_len": 512,
        "response_len": 1024,
        "agentic_prompts": 16,
        "agentic_group": 8,
        "agentic_prompt_len": 4096,
        "agentic_response_len": 512,
        "ragged_sequences": 256,
        "ragged_min": 256,
        "ragged_max": 2048,
        "max_batch_tokens": 65536,
        "flood_threads": 4,
        "flood_sequences": 16,
        "flood_tokens": 2048,
        "matmul_size": 8192,
        "repeats": 2,
    }
    """Sizes --preset gpu uses for fields not given explicitly: the GRPO workload of docs/benchmarks.md's GPU table
    (64 prompts x 8 completions, prompt 512, completion 1024), each path taking seconds rather than the
    milliseconds the CPU sizes take on a GPU."""

    def __post_init__(self) -> None:
        for name, least in (("flood_threads", 1), ("flood_sequences", 1), ("flood_tokens", 2), ("flood_probes", 1),
                            ("probe_tokens", 2)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected at least {least}")
        if self.flood_warmup < 0 or self.flood_window < 0:
            raise ValueError("--flood-warmup and --flood-window: expected seconds >= 0")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field; a flag not given leaves no attribute in the namespace."""
        for field in dataclasses.fields(cls):
            help = f"{field.metadata['help']} (default: {field.metadata.get('shown', field.default)})"
            if field.type == "bool":
                flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
                action = "store_false" if field.default else "store_true"
                parser.add_argument(flag, dest=field.name, action=action, default=argparse.SUPPRESS, help=help)
            else:
                parser.add_argument(
                    "--" + field.name.replace("_", "-"),
                    type=scalar_type(field),
                    choices=field.metadata.get("choices"),
                    default=argparse.SUPPRESS,
                    help=help,
                )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "BenchConfig":
        """The configuration of the flags given (see `from_options`)."""
        given = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if hasattr(args, field.name)}
        return cls.from_options(**given)

    @classmethod
    def from_options(cls, **given: Any) -> "BenchConfig":
        """Build from explicitly given options; with ``quick=True`` the QUICK sizes fill the rest."""
        values = dict(cls.GPU) if given.get("preset") == "gpu" else {}
        if given.get("quick"):
            values.update(cls.QUICK)
        values.update(given)
        if values.get("model") and values.get("model_shape"):
            raise ValueError("--model and --model-shape: give one of them")
        return cls(**values)

    @property
    def timed_rounds(self) -> int:
        """Timed rounds of (a), (b), the cache hit and the vllm rows (`repeats`, at least one)."""
        return max(1, self.repeats)

    @property
    def long_rounds(self) -> int:
        """Timed rounds of (c) and (d) (`long_repeats`, at least one)."""
        return max(1, self.long_repeats)

    def workload_list(self) -> list[str]:
        """The keys `workloads` names, in run order; ValueError for an unknown one."""
        names = [w.strip().lower() for w in self.workloads.split(",") if w.strip()]
        unknown = sorted(set(names) - set(ALL_WORKLOADS))
        if unknown:
            raise ValueError(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(ALL_WORKLOADS)}")
        return [w for w in ALL_WORKLOADS if w in names]
