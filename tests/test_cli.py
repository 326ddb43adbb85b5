"""End to end through the installed `klservice` command: serve the embedded SmolLM2, ask it, stop it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

KLSERVICE = shutil.which("klservice") or os.path.join(os.path.dirname(sys.executable), "klservice")


def test_help_is_light_and_complete():
    code = (
        "import sys\n"
        "from klservice.cli import build_parser\n"
        "build_parser().format_help()\n"
        "assert not {'torch', 'transformers', 'vllm'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ([], ["serve"], ["info"], ["score"], ["demo"]):
        result = subprocess.run([KLSERVICE, *command, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage: klservice" in result.stdout
    serve_help = subprocess.run([KLSERVICE, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in ("--model", "--backend", "--port", "--metrics-port", "--dtype", "--device", "--max-request-tokens"):
        assert flag in serve_help


@pytest.fixture(scope="module")
def cli_server(default_model_dir, model_cache_dir):
    """`klservice serve` on the embedded model (already converted into model_cache_dir)."""
    env = dict(os.environ, KLSERVICE_CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [KLSERVICE, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    port, lines = None, []
    deadline = time.time() + 120
    while port is None and time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
    assert port, "server did not report its port:\n" + "".join(lines)
    yield process, f"127.0.0.1:{port}", env
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_serve_embedded_model_answers_health_score_and_demo(cli_server):
    from klservice_client import KLClient

    process, target, env = cli_server
    with KLClient(target, timeout=60) as client:
        info = client.wait_ready(timeout=120)
        assert info.name.startswith("SmolLM2-135M-Instruct") and info.vocab_size == 49152
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        from transformers import AutoTokenizer

        from klservice.default_model import ensure_default_model

        tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(env["KLSERVICE_CACHE_DIR"], progress=False))
        client.check_tokenizer(tokenizer)
        prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
        paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
        out = client.score([prompt + paris], len(prompt))
        assert out.ref_logprobs[0] == pytest.approx(-0.258, abs=0.05)

    demo = subprocess.run([KLSERVICE, "demo", "--target", target], capture_output=True, text=True, timeout=120, env=env)
    assert demo.returncode == 0, demo.stderr
    assert "Paris" in demo.stdout and "c grpo k3" in demo.stdout
    values = [float(v) for v in re.findall(r"'\s?Paris'\s+(-?\d+\.\d+)", demo.stdout)]
    assert values and values[0] == pytest.approx(-0.258, abs=0.05)

    info_out = subprocess.run([KLSERVICE, "info", "--target", target], capture_output=True, text=True, timeout=60, env=env)
    assert info_out.returncode == 0 and "revision" in info_out.stdout

    score = subprocess.run(
        [KLSERVICE, "score", "--target", target, "--prompt", "The capital of France is", "--text", " Paris",
         "--logprobs=-0.5", "--spec", "grpo_k3_as_loss"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert score.returncode == 0, score.stderr
    row = next(line for line in score.stdout.splitlines() if "Paris" in line).split()[-6:]  # after the token text
    ref, policy, k1, coef = float(row[0]), float(row[1]), float(row[2]), float(row[5])
    assert ref == pytest.approx(-0.258, abs=0.05) and policy == -0.5
    assert k1 == pytest.approx(policy - ref, abs=1e-3)
    assert coef == pytest.approx(1 - np.exp(-(policy - ref)), abs=1e-3)  # k3 as loss
    bad = subprocess.run([KLSERVICE, "score", "--target", target, "--tokens", "1,99999999"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 1 and "outside the vocabulary" in bad.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_docs_document_every_serve_flag():
    import dataclasses
    import pathlib

    from klservice.config import ENV_PREFIX, ServerConfig

    readme = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        assert f"`{flag}`" in readme and f"`{ENV_PREFIX}{field.name.upper()}`" in readme, flag


def test_sigterm_with_a_long_forward_running_exits_within_the_grace_and_one_layer(model_cache_dir, record_property):
    """`klservice serve --grace-seconds 1` scoring one 8192-token sequence (tens of seconds on a CPU) gets
    SIGTERM: health turns NOT_SERVING on an existing channel, the caller gets UNAVAILABLE, the process exits 0
    after the grace plus what remains of one decoder layer (the time is recorded, not asserted)."""
    import threading

    from klservice_client import KLClient, ServiceUnavailable
    from tests.server.test_metrics_and_health import scrape

    env = dict(os.environ, KLSERVICE_CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [KLSERVICE, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--grace-seconds", "1",
         "--cache-mb", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    try:
        assert wait_until(lambda: any("listening on" in line for line in lines), 120), "".join(lines)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(gRPC\), metrics on \S*:(\d+)/metrics", "".join(lines))
        target, metrics_url = f"127.0.0.1:{match.group(1)}", f"http://127.0.0.1:{match.group(2)}/metrics"
        outcome = {}

        def long_score():
            with KLClient(target, max_retries=0, timeout=300) as client:
                client.wait_ready(timeout=120)
                sequence = (np.arange(8192) * 7919 + 3) % 49152
                try:
                    outcome["value"] = client.score([sequence], 1)
                except Exception as error:  # noqa: BLE001 - inspected below
                    outcome["error"] = error

        caller = threading.Thread(target=long_score)
        caller.start()

        def forward_running() -> bool:
            samples = scrape(metrics_url)
            batches = sum(v for (name, _), v in samples.items() if name == "klservice_batch_tokens_count")
            finished = sum(v for (name, labels), v in samples.items()
                           if name == "klservice_requests_total" and ("method", "Score") in labels)
            depths = [v for (name, _), v in samples.items() if name == "klservice_queue_depth"]
            return depths == [0] and batches == 0 and finished == 0 and samples.get(("klservice_ready", ()), 0) == 1

        assert wait_until(lambda: "value" not in outcome and forward_running(), 180)
        time.sleep(0.5)  # well inside the forward
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            process.send_signal(signal.SIGTERM)
            started = time.perf_counter()
            statuses = []
            while process.poll() is None:
                try:
                    statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            seconds = time.perf_counter() - started
        caller.join(60)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    record_property("sigterm_exit_seconds", round(seconds, 2))
    print(f"\nexited {seconds:.2f} s after SIGTERM (grace 1 s) with an 8192-token forward running")
    assert process.returncode == 0, "".join(lines[-30:])
    assert isinstance(outcome.get("error"), ServiceUnavailable), outcome
    assert "answered UNAVAILABLE" in "".join(lines)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert health_pb2.HealthCheckResponse.SERVING not in statuses


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
