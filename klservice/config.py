"""Server configuration: one dataclass whose fields feed the CLI flags, environment variables and defaults.

Every field of `ServerConfig` becomes a ``klservice serve`` flag (``max_batch_tokens`` →
``--max-batch-tokens``) whose default comes from the environment variable
``KLSERVICE_MAX_BATCH_TOKENS`` when set, else from the field's default. The help text is
the field's ``help`` metadata, so defaults are written in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from klservice.backends.base import DTYPES

ENV_PREFIX = "KLSERVICE_"


def _field(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `klservice serve` can be told."""

    model: str | None = _field(
        None, "Local Hugging Face folder (or hub id already in the local HF cache). Default: the embedded SmolLM2-135M-Instruct."
    )
    backend: str = _field(
        "hf",
        "Model backend: hf (transformers; applies temperature, shares GRPO prompts) or vllm (a vLLM engine; "
        "refuses temperature != 1, which vLLM's prompt log-probs ignore).",
        choices=("hf", "vllm"),
    )
    host: str = _field("0.0.0.0", "Address to listen on (gRPC).")
    port: int = _field(50051, "gRPC port (0 picks a free port and logs it).")
    metrics_port: int = _field(9400, "Prometheus /metrics HTTP port (0 picks a free port, -1 disables).")
    dtype: str = _field("float32", "Compute dtype of the model.", choices=DTYPES)
    device: str = _field("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    cache_dir: str | None = _field(
        None, "Where the embedded model is converted to (default: $XDG_CACHE_HOME/klservice or ~/.cache/klservice)."
    )
    max_length: int | None = _field(None, "Longest sequence accepted, in tokens (default: the model's context length).")
    tensor_parallel_size: int = _field(1, "vllm backend: GPUs to split the model over (vLLM tensor parallelism).")
    gpu_memory_utilization: float = _field(
        0.9,
        "vllm backend: fraction of GPU memory vLLM may take for weights and KV cache (on CPU the KV cache is "
        "VLLM_CPU_KVCACHE_SPACE GiB instead, default 1).",
    )
    max_request_tokens: int = _field(262_144, "Most tokens in one request; clients split larger batches.")
    max_message_mb: int = _field(256, "Largest gRPC message accepted or sent, in MiB.")
    max_batch_tokens: int = _field(16_384, "Token budget of one forward batch (padded tokens).")
    max_wait_ms: float = _field(2.0, "How long the scheduler waits for more requests before starting a forward batch.")
    max_queue: int = _field(1024, "Most requests waiting for the model; more are answered RESOURCE_EXHAUSTED.")
    cache_mb: int = _field(512, "Reference-cache size in MiB (log-probs of recently scored sequences); 0 disables it.")
    max_jobs: int = _field(64, "Distinct x-job-id values tracked in metric labels; later ones are labelled 'other'.")
    grace_seconds: float = _field(10.0, "On SIGTERM/SIGINT: time given to in-flight requests before stopping.")
    log_level: str = _field("INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field, defaults from the environment when set."""
        for field in dataclasses.fields(cls):
            env = ENV_PREFIX + field.name.upper()
            kind = _scalar_type(field)
            default = os.environ.get(env, field.default)
            if default is not None and not isinstance(default, kind):
                default = kind(default)
            shown = "the embedded model" if field.name == "model" and default is None else default
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                type=kind,
                default=default,
                choices=field.metadata.get("choices"),
                help=f"{field.metadata['help']} [env {env}; default: {shown}]",
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerConfig":
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def _scalar_type(field: dataclasses.Field) -> type:
    text = str(field.type)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported config field type {field.type!r}")
