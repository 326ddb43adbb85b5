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


def config_field(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata holds its flag's `help` (and any `extra`, e.g. ``choices``, or ``shown``:
    how a default of None is described).

    Used by `ServerConfig` and by `klservice.bench.BenchConfig`.
    """
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `klservice serve` can be told."""

    model: str | None = config_field(
        None, "Local Hugging Face folder (or hub id already in the local HF cache). Default: the embedded SmolLM2-135M-Instruct.",
        shown="the embedded model",
    )
    backend: str = config_field(
        "hf",
        "Model backend: hf (transformers; applies temperature, shares GRPO prompts) or vllm (a vLLM engine; "
        "refuses temperature != 1, which vLLM's prompt log-probs ignore).",
        choices=("hf", "vllm"),
    )
    host: str = config_field(
        "0.0.0.0",
        "Address to listen on (gRPC). Beyond loopback without --auth-file anyone who can reach the port is served, "
        "and without --tls-cert tokens and data travel in clear; the server warns at start.",
    )
    auth_file: str | None = config_field(
        None,
        "TOML file of tenants and the sha256 hashes of their bearer tokens (write it with `klservice auth`). With it, "
        "every ReferenceService call needs `authorization: Bearer <token>` (or, with --tls-client-ca, a client "
        "certificate whose common name is a tenant), x-job-id names a job within the tenant, tenants share the "
        "model by weight and queue at most their max_queued_tokens, and operator RPCs (ReloadAuth) need the admin "
        "role; health and reflection stay open. Re-read on SIGHUP and on ReloadAuth.",
    )
    tls_cert: str | None = config_field(
        None, "PEM certificate (chain) of the gRPC port; with --tls-key the port speaks TLS only."
    )
    tls_key: str | None = config_field(None, "PEM private key of --tls-cert.")
    tls_client_ca: str | None = config_field(
        None,
        "PEM CA bundle: require a client certificate signed by it (mutual TLS). With --auth-file, a call without a "
        "token is the tenant named by its certificate's common name.",
    )
    port: int = config_field(50051, "gRPC port (0 picks a free port and logs it).")
    metrics_port: int = config_field(9400, "Prometheus /metrics HTTP port (0 picks a free port, -1 disables).")
    metrics_host: str | None = config_field(
        None,
        "Address /metrics listens on (plain HTTP, no authentication). Default: 127.0.0.1 with --auth-file (tenant "
        "names and their KL figures stay on the host), else --host.",
        shown="127.0.0.1 with --auth-file, else --host",
    )
    dtype: str = config_field("float32", "Compute dtype of the model.", choices=DTYPES)
    device: str = config_field("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    cache_dir: str | None = config_field(
        None, "Where the embedded model is converted to (default: $XDG_CACHE_HOME/klservice or ~/.cache/klservice)."
    )
    max_length: int | None = config_field(
        None, "Longest sequence accepted, in tokens (default: the model's context length).", shown="the model's context"
    )
    tensor_parallel_size: int = config_field(1, "vllm backend: GPUs to split the model over (vLLM tensor parallelism).")
    gpu_memory_utilization: float = config_field(
        0.9,
        "vllm backend: fraction of GPU memory vLLM may take for weights and KV cache (on CPU the KV cache is "
        "VLLM_CPU_KVCACHE_SPACE GiB instead, default 1).",
    )
    max_request_tokens: int = config_field(262_144, "Most tokens in one request; clients split larger batches.")
    max_message_mb: int = config_field(256, "Largest gRPC message accepted or sent, in MiB.")
    max_batch_tokens: int = config_field(16_384, "Token budget of one forward batch (padded tokens).")
    max_wait_ms: float = config_field(2.0, "How long the scheduler waits for more requests before starting a forward batch.")
    call_padding: float = config_field(
        0.25,
        "Most padding one forward call may carry, as a share of its real tokens, before the scheduler splits it "
        "(calls are not split below --max-batch-tokens / 8 real tokens). Raise it where small forwards are "
        "launch-bound (small models on GPUs).",
    )
    max_queue: int = config_field(1024, "Most requests waiting for the model; more are answered RESOURCE_EXHAUSTED.")
    cache_mb: int = config_field(512, "Reference-cache size in MiB (log-probs of recently scored sequences); 0 disables it.")
    max_jobs: int = config_field(
        64, "Distinct x-job-id values per tenant kept as trainer_job metric labels; a tenant's later ones are 'other'."
    )
    grace_seconds: float = config_field(
        10.0,
        "On SIGTERM/SIGINT: how long queued and running work may take to finish (health is NOT_SERVING and new "
        "work refused meanwhile); what is left is then answered UNAVAILABLE and a running forward stops within "
        "one step (hf: one decoder layer, ~2 s at 16k tokens on a 2-core CPU).",
    )
    log_level: str = config_field("INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def metrics_address(self) -> str:
        """Where /metrics listens: --metrics-host, else 127.0.0.1 with --auth-file, else --host."""
        if self.metrics_host:
            return self.metrics_host
        return "127.0.0.1" if self.auth_file else self.host

    def check_tls(self) -> None:
        """Raise ValueError naming the flag when the TLS flags do not go together."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS)")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field, defaults from the environment when set."""
        for field in dataclasses.fields(cls):
            env = ENV_PREFIX + field.name.upper()
            kind = scalar_type(field)
            default = os.environ.get(env, field.default)
            if default is not None and not isinstance(default, kind):
                default = kind(default)
            shown = field.metadata.get("shown", default) if default is None else default
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


def scalar_type(field: dataclasses.Field) -> type:
    """The argparse ``type`` of a config field annotated ``int``, ``float`` or ``str`` (optionally ``| None``)."""
    text = str(field.type)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported config field type {field.type!r}")
