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
from pathlib import PurePath
from typing import Any

from klservice.backends.base import DTYPES
from klservice_client.wire import MODEL_NAME_PATTERN, MODEL_NAME_RULE

ENV_PREFIX = "KLSERVICE_"
EMBEDDED = "embedded"
"""The PATH of `--model NAME=embedded`: the embedded SmolLM2-135M-Instruct (write ./embedded for a folder of that name)."""
MODEL_OPTIONS = ("backend", "dtype", "device", "max_length")
"""Per-model options of --model NAME=PATH,OPTION=VALUE,...; each defaults to the server-wide flag."""


def config_field(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata holds its flag's `help` (and any `extra`, e.g. ``choices``, or ``shown``:
    how a default of None is described).

    Used by `ServerConfig` and by `klservice.bench.BenchConfig`.
    """
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `klservice serve` can be told."""

    model: str | tuple[str, ...] | None = config_field(
        None,
        "A model to serve: PATH (a local Hugging Face folder, or a hub id already in the local HF cache; served "
        "under the folder's name) or NAME=PATH[,backend=B][,dtype=D][,device=X][,max_length=N] (PATH 'embedded': "
        "the embedded model; the options default to the server-wide flags). Repeat the flag to serve several "
        "models; the first is the default, which requests naming no model get. In the environment, separate "
        "several with ';'. Default: the embedded SmolLM2-135M-Instruct.",
        shown="the embedded model", repeatable=True,
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
    health_port: int = config_field(
        -1,
        "A second gRPC port on --host, always plain (no TLS, no authentication), that serves only grpc.health.v1: "
        "for probes that cannot speak TLS, such as Kubernetes' grpc probes. -1: none (health is on --port).",
    )
    http_port: int = config_field(
        -1,
        "Port of the vLLM-compatible HTTP route for trainers that take a teacher as a vLLM server's URL (GET /health, "
        "GET /v1/models, POST /v1/completions with prompt_logprobs; the same engine, scheduler and authentication as "
        "gRPC, TLS where --tls-cert is given). -1: off; 0: a free port, logged.",
    )
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
    max_batch_tokens: int = config_field(
        16_384,
        "Token budget of one forward batch: the tokens it computes where the backend packs (hf: no padding, a "
        "group's prompt once), else sequences × the longest of them.",
    )
    max_wait_ms: float = config_field(2.0, "How long the scheduler waits for more requests before starting a forward batch.")
    max_step_seconds: float = config_field(
        2.0,
        "Longest forward step the scheduler forms, in seconds of model time: a step takes at most the budget "
        "tokens (as --max-batch-tokens counts them) per second measured over recent calls times this (and at most "
        "--max-batch-tokens), so a request of a job with nothing queued waits about one such step behind other "
        "jobs' work. A GRPO group larger than that is still taken whole, as one call (its prompt computed once), "
        "up to --max-batch-tokens: such a step takes longer. 0: steps are sized by --max-batch-tokens only.",
    )
    share_prompts: bool = config_field(
        True,
        "Compute a prompt shared by several sequences of a forward call once (GRPO's group of responses to one "
        "prompt): hf lays the group out as its prompt followed by each member's continuation in its one packed "
        "forward; vllm uses its prefix cache. --no-share-prompts forwards every sequence whole.",
    )
    attention_kernel: str = config_field(
        "auto",
        "hf: how a packed call is attended: sdpa (one SDPA call per sequence or continuation; any device), varlen "
        "(two FlashAttention variable-length passes; CUDA, float16/bfloat16), flex (FlexAttention with a block mask, "
        "compiled on CUDA), or auto: of those that run on the device and reproduce the model's own forward at load, "
        "the fastest there (timed at load; on a CPU, sdpa); none: no packing, each call one padded batch without "
        "prompt sharing.",
        choices=("auto", "sdpa", "varlen", "flex", "none"),
    )
    call_padding: float = config_field(
        0.25,
        "Most padding one forward call may carry, as a share of its real tokens, before the scheduler splits it "
        "(calls are not split below --max-batch-tokens / 8 real tokens). Raise it where small forwards are "
        "launch-bound (small models on GPUs).",
    )
    max_queue: int = config_field(1024, "Most requests waiting for the model; more are answered RESOURCE_EXHAUSTED.")
    cache_mb: int = config_field(
        512, "Reference-cache size in MiB per model (log-probs of recently scored sequences); 0 disables it."
    )
    max_models: int = config_field(
        8, "Most model names served at once (--model ones and those LoadModel adds); bounds the `model` metric label."
    )
    memory_budget_mb: int = config_field(
        0,
        "Memory the models of one device may take together, in MiB, checked when they load (weights at their "
        "compute dtype, plus vLLM's --gpu-memory-utilization share of a GPU). 0: the device's free memory when a model "
        "loads (CUDA's free memory, or the host's available memory on CPU). A swap needs room for both revisions.",
    )
    load_timeout_seconds: float = config_field(
        3600.0,
        "Longest a model load may take (reading and hashing its files, mixing, the probe forward), at start and by "
        "LoadModel: past it the load fails with DEADLINE_EXCEEDED naming the file it was reading, and its name is "
        "free again. The default suits a 70B checkpoint (140 GB in bfloat16) read at 100 MB/s. 0: no limit.",
    )
    allow_admin_from_loopback: bool = config_field(
        False,
        "Without --auth-file, let callers on 127.0.0.1/::1 use the operator RPCs (LoadModel, UnloadModel): anyone "
        "with a shell on this host can then replace the served models. Ignored with --auth-file, where only the "
        "admin role may. The server warns at start.",
    )
    max_jobs: int = config_field(
        64, "Distinct x-job-id values per tenant kept as trainer_job metric labels; a tenant's later ones are 'other'."
    )
    grace_seconds: float = config_field(
        10.0,
        "On SIGTERM/SIGINT: how long queued and running work may take to finish (health is NOT_SERVING and new "
        "work refused meanwhile); what is left is then answered UNAVAILABLE and a running forward stops within "
        "one step (hf: one decoder layer, ~2 s at 16k tokens on a 2-core CPU).",
    )
    max_connection_age_seconds: float = config_field(
        0.0,
        "Close each client connection after this many seconds (gRPC's max connection age: the server sends GOAWAY, "
        "the client reconnects and re-resolves its target, so clients of a headless Service spread onto replicas "
        "added since). StreamKL streams end at the same age from their start, after answering what they read; "
        "the client reopens them and resends what was not answered. 0: never.",
    )
    max_connection_age_grace_seconds: float = config_field(
        60.0,
        "After --max-connection-age-seconds: how long calls already running on the old connection may take to "
        "finish before it is closed.",
    )
    log_level: str = config_field("INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def metrics_address(self) -> str:
        """Where /metrics listens: --metrics-host, else 127.0.0.1 with --auth-file, else --host (an IPv6 literal
        without brackets, as sockets take it)."""
        if self.metrics_host:
            return bare_host(self.metrics_host)
        return "127.0.0.1" if self.auth_file else bare_host(self.host)

    @property
    def grpc_address(self) -> str:
        """The gRPC listening address: host:port, an IPv6 literal in brackets ([::1]:50051)."""
        host = bare_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def health_address(self) -> str:
        """The --health-port listening address (as grpc_address)."""
        host = bare_host(self.host)
        return f"[{host}]:{self.health_port}" if ":" in host else f"{host}:{self.health_port}"

    def check_hosts(self) -> None:
        """Raise ValueError naming the flag when --host or --metrics-host does not resolve to an address."""
        import socket

        for flag, host in (("--host", self.host), ("--metrics-host", self.metrics_host)):
            if not host:
                continue
            try:
                socket.getaddrinfo(bare_host(host), None)
            except (socket.gaierror, UnicodeError) as error:
                raise ValueError(f"{flag} {host!r}: not an address this host can listen on ({error})") from None

    def connection_options(self) -> list[tuple[str, int]]:
        """gRPC server options of the connection age (none when it is off); a negative value fails naming its flag."""
        for flag, value in (("--max-connection-age-seconds", self.max_connection_age_seconds),
                            ("--max-connection-age-grace-seconds", self.max_connection_age_grace_seconds)):
            if not value >= 0:
                raise ValueError(f"{flag} {value}: expected a number of seconds >= 0")
        if not self.max_connection_age_seconds:
            return []
        return [("grpc.max_connection_age_ms", max(1, round(self.max_connection_age_seconds * 1000))),
                ("grpc.max_connection_age_grace_ms", round(self.max_connection_age_grace_seconds * 1000))]

    def check_tls(self) -> None:
        """Raise ValueError naming the flag when the TLS flags do not go together."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS)")

    def ignored_flags(self) -> list[str]:
        """What this configuration gives that another setting makes moot, one sentence each (logged at start)."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        ignored = []
        if self.allow_admin_from_loopback and self.auth_file:
            ignored.append("--allow-admin-from-loopback is ignored: with --auth-file, only tenants with the admin role "
                           "may call operator RPCs, from any host")
        if not self.max_connection_age_seconds and (
                self.max_connection_age_grace_seconds != defaults["max_connection_age_grace_seconds"]):
            ignored.append("--max-connection-age-grace-seconds is ignored: --max-connection-age-seconds is 0 "
                           "(connections have no age limit)")
        if self.metrics_port < 0 and self.metrics_host:
            ignored.append("--metrics-host is ignored: --metrics-port -1 turns /metrics off")
        try:
            backends = {spec.backend for spec in self.model_specs()}
        except ValueError:
            return ignored
        if "vllm" not in backends:
            for name in ("tensor_parallel_size", "gpu_memory_utilization"):
                if getattr(self, name) != defaults[name]:
                    ignored.append(f"--{name.replace('_', '-')} is ignored: no model is served by the vllm backend")
        if "hf" not in backends and self.attention_kernel != defaults["attention_kernel"]:
            ignored.append("--attention-kernel is ignored: no model is served by the hf backend")
        return ignored

    def model_specs(self) -> list["ModelSpec"]:
        """The models to serve, the default first (ValueError naming the flag for a malformed --model)."""
        models = self.model
        if models is None or models == ():
            models = (None,)
        elif isinstance(models, str):
            models = (models,)
        specs = [ModelSpec.parse(text, self) for text in models]
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"--model: the name {duplicates[0]!r} is given twice; write NAME=PATH to tell them apart")
        if len(specs) > self.max_models:
            raise ValueError(f"--model: {len(specs)} models, over --max-models {self.max_models}")
        return specs

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field, defaults from the environment when set."""
        for field in dataclasses.fields(cls):
            env = ENV_PREFIX + field.name.upper()
            flag = "--" + field.name.replace("_", "-")
            if field.metadata.get("repeatable"):
                value = os.environ.get(env)
                default = tuple(part.strip() for part in value.split(";") if part.strip()) if value else field.default
                parser.add_argument(
                    flag, action="append", default=None, metavar=field.name.upper(),
                    help=f"{field.metadata['help']} [env {env}; default: {field.metadata['shown']}]",
                )
                parser.set_defaults(**{f"_{field.name}_default": default})
                continue
            kind = scalar_type(field)
            default = os.environ.get(env, field.default)
            if kind is bool and isinstance(default, str):
                default = default.strip().lower() in ("1", "true", "yes", "on")
            elif default is not None and not isinstance(default, kind):
                default = kind(default)
            shown = field.metadata.get("shown", default) if default is None else default
            extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
            parser.add_argument(
                flag,
                default=default,
                choices=field.metadata.get("choices"),
                help=f"{field.metadata['help']} [env {env}; default: {shown}]",
                **extra,
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(args, field.name)
            if field.metadata.get("repeatable"):
                value = tuple(value) if value else getattr(args, f"_{field.name}_default", field.default)
            values[field.name] = value
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name, where its weights are, and how to load them."""

    name: str
    path: str | None
    """A local Hugging Face folder or a cached hub id; None: the embedded model."""
    backend: str
    dtype: str
    device: str
    max_length: int | None

    @classmethod
    def parse(cls, text: str | None, config: "ServerConfig") -> "ModelSpec":
        """`--model` text: PATH or NAME=PATH[,OPTION=VALUE...] (None: the embedded model under its own name)."""
        defaults = {"backend": config.backend, "dtype": config.dtype, "device": config.device,
                    "max_length": config.max_length}
        if text is None:  # the server-wide flags as they are (load_backend names an unknown backend itself)
            from klservice.default_model import EMBEDDED_MODEL_NAME

            return cls(name=EMBEDDED_MODEL_NAME, path=None, **defaults)
        head, *options = text.split(",") if "=" in text.split(",")[0] else [text]
        name, _, path = head.partition("=") if "=" in head else ("", "", head)
        for option in options:
            key, _, value = option.partition("=")
            key = key.strip().replace("-", "_")
            if key not in MODEL_OPTIONS or not value:
                raise ValueError(
                    f"--model {text!r}: {option!r} is not OPTION=VALUE with OPTION one of {', '.join(MODEL_OPTIONS)}"
                )
            defaults[key] = value
        if not path:
            raise ValueError(f"--model {text!r}: no PATH (write NAME=PATH, or NAME=embedded for the embedded model)")
        return cls.of(name or None, None if path == EMBEDDED else path, **defaults)

    @classmethod
    def of(cls, name: str | None, path: str | None, *, backend: str, dtype: str, device: str,
           max_length: int | str | None) -> "ModelSpec":
        """A checked spec (ValueError naming what is wrong); `name` None: named after the folder."""
        from klservice.backends import KNOWN_BACKENDS
        from klservice.default_model import EMBEDDED_MODEL_NAME

        if name is None:
            name = EMBEDDED_MODEL_NAME if path is None else PurePath(path.rstrip("/")).name or path
        elif not MODEL_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"model name {name[:80]!r}: {MODEL_NAME_RULE}")
        if backend not in KNOWN_BACKENDS:
            raise ValueError(f"model {name!r}: backend {backend!r} is not one of {', '.join(KNOWN_BACKENDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"model {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            max_length = None if max_length in (None, "", 0) else int(max_length)
        except ValueError:
            raise ValueError(f"model {name!r}: max_length {max_length!r} is not a whole number") from None
        if max_length is not None and max_length < 2:
            raise ValueError(f"model {name!r}: max_length {max_length} must be at least 2")
        return cls(name=name, path=path, backend=backend, dtype=dtype, device=device, max_length=max_length)


def bare_host(host: str) -> str:
    """A host as sockets take it: an IPv6 literal without its brackets ("[::1]" → "::1")."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def scalar_type(field: dataclasses.Field) -> type:
    """The argparse ``type`` of a config field annotated ``int``, ``float`` or ``str`` (optionally ``| None``)."""
    text = str(field.type)
    for name, kind in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported config field type {field.type!r}")
