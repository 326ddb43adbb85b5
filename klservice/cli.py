"""The `klservice` command line: serve, info, score, demo, health, bench.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
``klservice --help`` and the client-side commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from klservice import __version__
from klservice.config import ServerConfig

DEFAULT_TARGET = "localhost:50051"

DEMO_TEXTS = (
    ("The capital of France is", " Paris."),
    ("Q: What is 2 + 2?\nA:", " 4"),
    ("def add(a, b):\n   ", " return a + b"),
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klservice",
        description="A shared reference model for RL trainers: reference log-probs, KL values and exact KL "
        "gradient coefficients over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"klservice {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Serve a frozen reference model over gRPC (health + reflection), with Prometheus metrics. "
        "With no --model, serves the embedded SmolLM2-135M-Instruct (converted once into the cache directory).",
    )
    ServerConfig.add_cli_args(serve)
    serve.set_defaults(run=_serve)

    def client_command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return _client_command(commands, name, help, description)

    info = client_command(
        "info", "show the models a running server serves",
        "Print GetModelInfo of a running server's models (the default first), or of --model only.",
    )
    info.add_argument("--model", default=None, help="only this model (default: every served model)")
    info.set_defaults(run=_info)

    score = client_command(
        "score",
        "score text or token ids against a running server",
        "Print each scored token with its reference log-prob. With --logprobs (the policy's log-probs of the "
        "scored tokens) also k1/k2/k3 and the gradient coefficient of --spec.",
    )
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the response text to score (tokenized with --tokenizer)")
    source.add_argument("--tokens", help="comma-separated token ids of the whole sequence (prompt + response)")
    score.add_argument("--prompt", default="", help="with --text: the prompt text before it (not scored)")
    score.add_argument("--prompt-length", type=int, default=1, help="with --tokens: tokens in the prompt (default: 1)")
    score.add_argument("--logprobs", help="comma-separated policy log-probs, one per scored token")
    score.add_argument("--spec", default="principled", help="KL preset for the coefficient column (default: principled)")
    score.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    score.add_argument("--model", default="", help="the served model to score with (default: the server's default)")
    _add_tokenizer_arg(score)
    score.set_defaults(run=_score)

    demo = client_command(
        "demo",
        "send sample sequences to a running server and print what it answers",
        "Score a few sample prompts/responses on a running server and print a table of reference log-probs; "
        "then compute KL against a synthetic policy (reference log-probs plus noise) to show k1/k2/k3 and the "
        "gradient coefficients of the principled and GRPO (k3 as loss) implementations.",
    )
    _add_tokenizer_arg(demo)
    demo.add_argument("--model", default="", help="the served model to ask (default: the server's default)")
    demo.set_defaults(run=_demo)

    health = commands.add_parser(
        "health",
        help="exit 0 if a running server reports SERVING (container health checks)",
        description="Ask a server's grpc.health.v1 service for its status and print it. Exits 0 if SERVING, 1 "
        "otherwise (NOT_SERVING while the model loads or while draining, or no server answering). Used as the "
        "HEALTHCHECK of the Docker images and the docker-compose health check.",
    )
    health.add_argument(
        "--target", default=_health_target(), help="server address (default: localhost:$KLSERVICE_PORT, else localhost:50051)"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="deadline of the check in seconds (default: 5)")
    health.add_argument("--service", default="", help="service name to check (default: '', the whole server)")
    _add_tls_args(health)
    health.set_defaults(run=_health)

    _add_auth_command(commands)
    _add_admin_command(commands)
    _add_bench_command(commands)
    return parser


def _client_command(subparsers, name: str, help: str, description: str, timeout: float = 60.0) -> argparse.ArgumentParser:
    """A command that calls a server: --target, --timeout, --token and the TLS options."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default: {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"deadline per call in seconds (default: {timeout:g})")
    parser.add_argument(
        "--token", default=None,
        help="bearer token for a server with --auth-file (default: $KLSERVICE_TOKEN; prefer the variable: "
        "a flag shows in the process list)",
    )
    _add_tls_args(parser)
    return parser


def _add_tls_args(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS (a server with --tls-cert)")
    tls.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CA roots")
    tls.add_argument("--tls-ca", metavar="PEM", help="CA bundle the server's certificate must chain to (implies --tls)")
    tls.add_argument("--tls-client-cert", metavar="PEM", help="client certificate, for a server with --tls-client-ca")
    tls.add_argument("--tls-client-key", metavar="PEM", help="private key of --tls-client-cert")
    tls.add_argument("--tls-server-name", metavar="NAME", help="name to check the server's certificate against "
                     "when it differs from the target's host")


def _tls_options(args: argparse.Namespace) -> dict:
    """KLClient's TLS keyword arguments from the command line (ValueError naming the flag)."""
    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    return {
        "tls": args.tls,
        "root_certificates": args.tls_ca,
        "client_cert": (args.tls_client_cert, args.tls_client_key) if args.tls_client_cert else None,
        "tls_server_name": args.tls_server_name,
    }


def _add_auth_command(commands) -> None:
    """`klservice auth add-tenant | add-token | reload`: write the --auth-file (a new token is printed once);
    make a running server re-read it."""
    auth = commands.add_parser(
        "auth",
        help="add tenants and tokens to an --auth-file; make a server reload it",
        description="Write the auth file of `klservice serve --auth-file`: tenants and the sha256 hashes of their "
        "bearer tokens, with a role (trainer, or admin for operator RPCs), a weight (the tenant's share of the "
        "model under contention) and a quota (most tokens queued at once). A new token is printed once, on "
        "stdout, and only its hash is stored; a running server picks the change up on SIGHUP or `klservice auth "
        "reload` (an admin tenant's token).",
    )
    actions = auth.add_subparsers(title="actions", metavar="ACTION", required=True)
    tenant = actions.add_parser("add-tenant", help="add a tenant with a new token", description="Add a tenant "
                                "with one new token to FILE (created if missing) and print the token.")
    tenant.add_argument("file", help="the auth file (TOML)")
    tenant.add_argument("name", help="tenant name: 1-64 letters, digits, '_', '.' or '-'")
    tenant.add_argument("--role", choices=("trainer", "admin"), default="trainer", help="default: trainer")
    tenant.add_argument("--weight", type=float, default=1.0, help="share of the model under contention (default: 1)")
    tenant.add_argument(
        "--max-queued-tokens", type=int, default=0,
        help="most tokens the tenant may have waiting for the model; more are refused RESOURCE_EXHAUSTED for this "
        "tenant only (default: 0, no limit)",
    )
    tenant.set_defaults(run=_auth_add_tenant)
    token = actions.add_parser("add-token", help="add a new token to a tenant", description="Add a new token to "
                               "tenant NAME in FILE and print it (its other tokens stay valid).")
    token.add_argument("file", help="the auth file (TOML)")
    token.add_argument("name", help="an existing tenant")
    token.set_defaults(run=_auth_add_token)
    reload = _client_command(
        actions, "reload", "make a running server re-read its auth file (an admin tenant's token)",
        "Call ReloadAuth on a running server: it re-reads its --auth-file, as on SIGHUP, and prints the tenants now "
        "in force. Needs the token of a tenant with role admin.",
    )
    reload.set_defaults(run=_auth_reload)


def _auth_add_tenant(args: argparse.Namespace) -> int:
    from klservice.auth import add_tenant

    return _print_new_token(
        lambda: add_tenant(args.file, args.name, role=args.role, weight=args.weight,
                           max_queued_tokens=args.max_queued_tokens),
        f"tenant {args.name!r} added to {args.file}",
    )


def _auth_add_token(args: argparse.Namespace) -> int:
    from klservice.auth import add_token

    return _print_new_token(lambda: add_token(args.file, args.name), f"new token for {args.name!r} added to {args.file}")


def _print_new_token(write, done: str) -> int:
    """Run `write` (it returns the new token): the token on stdout, once; what was done on stderr."""
    from klservice.auth import AuthFileError

    try:
        token = write()
    except AuthFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(token)
    print(f"{done}; the token above is shown only now", file=sys.stderr)
    return 0


def _on_server(args: argparse.Namespace, call, show) -> int:
    """`call(client)` on the server of `args`, then `show(result)`; a refusal is printed on stderr (exit 1)."""
    from klservice_client import KLServiceError

    try:
        with _client(args) as client:
            result = call(client)
    except KLServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    show(result)
    return 0


def _auth_reload(args: argparse.Namespace) -> int:
    return _on_server(args, lambda client: client.reload_auth(),
                      lambda tenants: print(f"auth file reloaded: {len(tenants)} tenant(s): {', '.join(tenants)}"))


def _add_admin_command(commands) -> None:
    """`klservice admin load | unload | list`: the model lifecycle of a running server (admin role)."""
    admin = commands.add_parser(
        "admin",
        help="load, swap and unload a running server's models (admin role)",
        description="Operator RPCs on a running server. `load` reads a checkpoint folder on the server's file "
        "system under a model name: a new name is added, an existing one moves to the new revision once it is "
        "loaded and checked (requests admitted before finish on the old one; none fails). Needs the token of a "
        "tenant with role admin ($KLSERVICE_TOKEN), or a server started with --allow-admin-from-loopback and no "
        "--auth-file, called from its host.",
    )
    actions = admin.add_subparsers(title="actions", metavar="ACTION", required=True)
    load = _client_command(
        actions, "load", "load a checkpoint under a model name (a new name, or a swap)",
        "Load the Hugging Face folder PATH (as the server sees it) under NAME and print the new revision. A "
        "failed load leaves NAME serving what it served and says why. A load still running when --timeout passes "
        "is given up by the server (as one past its --load-timeout-seconds is).", timeout=600.0,
    )
    load.add_argument("name", help="the model name (1-64 letters, digits, '_', '.' or '-', the first not '.' or '-')")
    load.add_argument("path", help="the checkpoint folder, on the server's file system")
    load.add_argument("--mixup-alpha", type=float, default=None, metavar="ALPHA",
                      help="serve (1 - ALPHA) * current + ALPHA * new weights (TR-DPO-style mixing; 1: a hard reset)")
    load.add_argument("--force", action="store_true", help="load even if the tokenizer differs from NAME's current one")
    load.add_argument("--backend", default="", help="hf or vllm (default: NAME's current backend, else the server's)")
    load.add_argument("--dtype", default="", help="compute dtype (default: NAME's current one, else the server's)")
    load.add_argument("--device", default="", help="device (default: NAME's current one, else the server's)")
    load.add_argument("--max-length", type=int, default=0, help="longest sequence accepted (default: as the name's)")
    load.set_defaults(run=_admin_load)
    unload = _client_command(actions, "unload", "stop serving a model name",
                             "Stop serving NAME (not the default model); its requests in flight finish first.")
    unload.add_argument("name", help="the model name")
    unload.set_defaults(run=_admin_unload)
    listing = _client_command(actions, "list", "list the served models",
                              "One line per served model: name, revision, generation, backend, dtype, device, path.")
    listing.set_defaults(run=_admin_list)


def _admin_load(args: argparse.Namespace) -> int:
    return _on_server(args, lambda client: [client.load_model(
        args.name, args.path, mixup_alpha=args.mixup_alpha, force=args.force, backend=args.backend,
        dtype=args.dtype, device=args.device, max_length=args.max_length, timeout=args.timeout,
    )], _print_models)


def _admin_unload(args: argparse.Namespace) -> int:
    return _on_server(args, lambda client: client.unload_model(args.name),
                      lambda left: print(f"unloaded {args.name!r}; serving {', '.join(repr(name) for name in left)}"))


def _admin_list(args: argparse.Namespace) -> int:
    return _on_server(args, lambda client: client.list_models(), _print_models)


def _print_models(models) -> None:
    """One line per model."""
    for info in models:
        mixed = f"  mixup_alpha {info.mixup_alpha:g}" if info.mixup_alpha is not None else ""
        default = "  (default)" if info.is_default else ""
        print(f"{info.name}  revision {info.revision[:12]}  generation {info.generation}  {info.backend} "
              f"{info.dtype} on {info.device}  {info.path}{mixed}{default}")


def _add_bench_command(commands) -> None:
    """`klservice bench`: one flag per `BenchConfig` field (flags not given stay out of the namespace)."""
    from klservice.bench.config import BenchConfig

    bench = commands.add_parser(
        "bench",
        help="measure throughput, memory and FLOP utilisation against the performance targets",
        description="Benchmark the service against in-process baselines on the same sequences: (a) ragged full "
        "scoring, (b) GRPO-shaped work, (c) concurrent jobs, (d) one long sequence, (e) a small request under another job's flood, with and "
        "without the step bound (--max-step-seconds), and (b) on vLLM: raw "
        "prompt_logprobs against the service's vllm backend (when vLLM is installed). Starts its own servers "
        "(`klservice serve` subprocesses on 127.0.0.1, reference cache off) and prints a table; writes bench.json "
        "and bench.png into --out. Exits 0 if every target is met, 1 if one is missed.",
    )
    BenchConfig.add_cli_args(bench)
    bench.set_defaults(run=_bench)


def _add_tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        help="Hugging Face tokenizer folder matching the served model (default: the embedded SmolLM2 tokenizer)",
    )
    parser.add_argument("--cache-dir", help="cache directory of the embedded model (default: as klservice serve)")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    config = ServerConfig.from_cli_args(args)
    _configure_logging(config.log_level)
    from klservice.server import Server

    try:
        asyncio.run(Server(config).serve_forever())
    except KeyboardInterrupt:
        pass
    except Exception as error:  # noqa: BLE001 - a clear last word instead of a traceback
        logging.getLogger("klservice").error("server failed: %s", error, exc_info=config.log_level == "DEBUG")
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from klservice.bench import BenchConfig, run_bench

    try:
        config = BenchConfig.from_cli_args(args)
        config.workload_list()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        results = run_bench(config)
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130
    return 0 if all(t["met"] for t in results["targets"]) else 1


def _client(args: argparse.Namespace):
    from klservice_client import KLClient

    try:
        return KLClient(
            args.target, timeout=args.timeout, max_retries=2, job_id="klservice-cli", token=args.token,
            model=getattr(args, "model", None) or "", **_tls_options(args),
        )
    except ValueError as error:  # e.g. a --tls-ca that is not a PEM file
        raise SystemExit(f"error: {error}") from None


def _info(args: argparse.Namespace) -> int:
    from klservice_client import KLServiceError

    with _client(args) as client:
        try:
            models = [client.model_info(model=args.model)] if args.model is not None else client.list_models()
        except KLServiceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    for number, info in enumerate(models):
        if number:
            print()
        width = max(len(name) for name in info.__dataclass_fields__)
        for name in info.__dataclass_fields__:
            print(f"{name:<{width}}  {getattr(info, name)}")
    return 0


def _health_target() -> str:
    """localhost at the port `klservice serve` would use: $KLSERVICE_PORT when set (as in the images)."""
    port = os.environ.get("KLSERVICE_PORT", "").strip()
    return f"localhost:{port}" if port and port != "0" else DEFAULT_TARGET


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from klservice_client.credentials import channel_credentials, open_channel

    try:
        options = _tls_options(args)
        server_name = options.pop("tls_server_name")
        channel = open_channel(args.target, channel_credentials(**options), tls_server_name=server_name)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _load_tokenizer(args: argparse.Namespace):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = args.tokenizer
    if path is None:
        from klservice.default_model import ensure_default_model

        path = ensure_default_model(args.cache_dir)
    return AutoTokenizer.from_pretrained(path)


def _score(args: argparse.Namespace) -> int:
    from klservice_client import KLServiceError

    tokenizer = None
    if args.text is not None:
        tokenizer = _load_tokenizer(args)
        prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"] if args.prompt else []
        if not prompt_ids:
            prompt_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        tokens = prompt_ids + tokenizer(args.text, add_special_tokens=False)["input_ids"]
        prompt_length = len(prompt_ids)
    else:
        try:
            tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            print("error: --tokens must be comma-separated integers", file=sys.stderr)
            return 2
        prompt_length = args.prompt_length
        if args.tokenizer:
            tokenizer = _load_tokenizer(args)
    with _client(args) as client:
        try:
            if tokenizer is not None:
                client.check_tokenizer(tokenizer)
            if args.logprobs:
                logprobs = [float(v) for v in args.logprobs.split(",") if v.strip()]
                out = client.compute_kl([tokens], prompt_length, logprobs=logprobs, spec=args.spec, temperature=args.temperature)
            else:
                out = client.score([tokens], prompt_length, temperature=args.temperature)
        except (KLServiceError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"model {out.model} (revision {out.revision[:12]})")
    _print_table(tokens[prompt_length:], out, tokenizer, logprobs=logprobs if args.logprobs else None)
    return 0


def _token_text(tokenizer, token: int) -> str:
    if tokenizer is None:
        return str(token)
    return repr(tokenizer.decode([token]))


def _print_table(tokens, out, tokenizer, logprobs=None) -> None:
    header = f"{'token':<22} {'ref logp':>9}"
    has_kl = hasattr(out, "k1")
    if has_kl:
        header += f" {'policy logp':>11} {'k1':>8} {'k2':>8} {'k3':>8} {'c':>8}"
    print(header)
    print("-" * len(header))
    for i, token in enumerate(tokens):
        line = f"{_token_text(tokenizer, token)[:22]:<22} {out.ref_logprobs[i]:>9.4f}"
        if has_kl:
            line += f" {logprobs[i]:>11.4f} {out.k1[i]:>8.4f} {out.k2[i]:>8.4f} {out.k3[i]:>8.4f} {out.coef[i]:>8.4f}"
        print(line)
    if has_kl:
        d = out.diagnostics
        print(f"spec: {out.spec}; mean k3 per token {d.k3_mean_per_token:.4f}; mean |c - c*| {d.coef_bias_abs_mean:.4f}")


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from klservice_client import KLServiceError

    tokenizer = _load_tokenizer(args)
    sequences, prompt_lengths = [], []
    for prompt, response in DEMO_TEXTS:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"])
        prompt_lengths.append(len(prompt_ids))
    with _client(args) as client:
        try:
            client.wait_ready(timeout=args.timeout)
            client.check_tokenizer(tokenizer)
            info = client.model_info()
            scored = client.score(sequences, prompt_lengths)
            rng = np.random.default_rng(0)
            policy = scored.ref_logprobs + rng.normal(0.0, 0.3, size=scored.ref_logprobs.shape).astype(np.float32)
            policy = np.minimum(policy, 0.0)
            principled = client.compute_kl(sequences, prompt_lengths, logprobs=policy, spec="principled")
            grpo = client.compute_kl(sequences, prompt_lengths, logprobs=policy, spec="grpo_k3_as_loss")
        except KLServiceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"model {info.name} (revision {info.revision[:12]}, {info.backend}, {info.dtype} on {info.device})\n")
    print("Reference log-probs of each response token:\n")
    offset = 0
    for (prompt, _), tokens, start in zip(DEMO_TEXTS, sequences, prompt_lengths):
        print(f"prompt {prompt!r}")
        for token in tokens[start:]:
            print(f"  {_token_text(tokenizer, token):<18} {scored.ref_logprobs[offset]:>9.4f}")
            offset += 1
    print("\nKL against a synthetic policy (reference log-probs + N(0, 0.3) noise):\n")
    header = f"{'token':<18} {'ref':>8} {'policy':>8} {'k1':>8} {'k3':>8} {'c principled':>12} {'c grpo k3':>10}"
    print(header)
    print("-" * len(header))
    flat_tokens = [t for tokens, start in zip(sequences, prompt_lengths) for t in tokens[start:]]
    for i, token in enumerate(flat_tokens):
        print(
            f"{_token_text(tokenizer, token)[:18]:<18} {principled.ref_logprobs[i]:>8.4f} {policy[i]:>8.4f} "
            f"{principled.k1[i]:>8.4f} {principled.k3[i]:>8.4f} {principled.coef[i]:>12.4f} {grpo.coef[i]:>10.4f}"
        )
    d = grpo.diagnostics
    print(
        f"\nmean k3 per token {d.k3_mean_per_token:.4f}; GRPO's k3-as-loss coefficient differs from the principled "
        f"one by {d.coef_bias_abs_mean:.4f} on average (mean |c - c*|)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
