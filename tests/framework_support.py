"""What the verl and OpenRLHF suites share: a real klservice server in a process of its own.

Those suites run in their framework's own virtual environment (`.venv-verl`,
`.venv-openrlhf`, built by `make test`), which holds the framework and the light client
only, as a trainer's environment would. The server runs from the main environment
(`.venv`, or $KLSERVICE_SERVER_PYTHON), as a separate process on a free loopback port, and
the embedded model is converted there too. Nothing here imports the server's packages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- fixtures both suites' conftests import (pytest registers the fixtures a conftest's namespace holds) ---


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> pathlib.Path:
    """Where the embedded model is converted: $KLSERVICE_CACHE_DIR, or a folder of the session."""
    configured = os.environ.get("KLSERVICE_CACHE_DIR")
    return pathlib.Path(configured) if configured else tmp_path_factory.mktemp("klservice-cache")


@pytest.fixture(scope="session")
def embedded_dir(model_cache_dir) -> pathlib.Path:
    """The embedded SmolLM2-135M as a transformers folder (converted by the server's environment)."""
    return embedded_model_dir(model_cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, embedded_dir) -> pathlib.Path:
    """A tiny random Llama (seed 0, float32) with the SmolLM2 tokenizer: the reference of most tests."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_dir, seed=0)


def server_python() -> str:
    """The interpreter of the environment the server is installed in."""
    configured = os.environ.get("KLSERVICE_SERVER_PYTHON")
    python = pathlib.Path(configured) if configured else ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        raise RuntimeError(
            f"no klservice server environment at {python}: run `make install` first, "
            "or set KLSERVICE_SERVER_PYTHON to a Python that has klservice installed"
        )
    return str(python)


def embedded_model_dir(cache_dir: str | os.PathLike) -> pathlib.Path:
    """The embedded default model as a transformers folder, converted by the server's environment."""
    code = (
        "import sys; from klservice.default_model import ensure_default_model; "
        "print(ensure_default_model(sys.argv[1], progress=False))"
    )
    result = subprocess.run(
        [server_python(), "-c", code, str(cache_dir)], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if result.returncode != 0:
        raise RuntimeError(f"converting the embedded model failed:\n{result.stderr}")
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


def build_tiny_llama(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """A tiny random Llama (fixed seed, float32) with the SmolLM2 tokenizer, saved to `path`.

    The same shape as the main suite's `tiny_model_dir`: real transformers code, fast forwards.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 64 / 4 = 16)
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    path = pathlib.Path(path)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen
    host: str
    port: int
    metrics_port: int  # 0: none

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def launch(models: Mapping[str, str | os.PathLike], *extra_args: str, host: str = "127.0.0.1", port: int = 0,
           startup_timeout: float = 300.0) -> ServerProcess:
    """Start `klservice serve` on `models` (name → folder; the first is the default), on CPU in float32.

    Returns the process and its ports once the server has logged them (the model may still
    be loading: wait with `KLClient.wait_ready`). The rest of its log is copied to this
    process's stderr, prefixed, so a failing test shows it. The caller stops the process.
    """
    args = [server_python(), "-m", "klservice", "serve", "--host", host, "--port", str(port),
            "--metrics-port", "0", "--device", "cpu", "--dtype", "float32"]
    for name, folder in models.items():
        args += ["--model", f"{name}={folder}"]
    args += list(extra_args)
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    listening = re.compile(r"listening on " + re.escape(host) + r":(\d+).*?(?:metrics on \S+?:(\d+)/metrics)?$")
    bound, metrics_port, lines = None, 0, []
    deadline = time.monotonic() + startup_timeout
    while bound is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = listening.search(line)
        if match:
            bound, metrics_port = int(match.group(1)), int(match.group(2) or 0)
    if bound is None:
        process.kill()
        process.wait(30)
        raise RuntimeError("klservice serve did not report its port:\n" + "".join(lines))
    _forward_stderr(process, f"[klservice {host}:{bound}] ")
    return ServerProcess(process, host, bound, metrics_port)


@contextlib.contextmanager
def served(models: Mapping[str, str | os.PathLike], *extra_args: str, startup_timeout: float = 300.0) -> Iterator[str]:
    """`launch` on 127.0.0.1 and a free port; yields the target ("127.0.0.1:PORT"), kills the server on exit."""
    server = launch(models, *extra_args, startup_timeout=startup_timeout)
    try:
        yield server.target
    finally:
        server.stop()


def _forward_stderr(process: subprocess.Popen, prefix: str) -> None:
    """Copy the server's remaining log to our stderr, in a thread of its own."""
    import threading

    def pump() -> None:
        for line in process.stderr:
            sys.stderr.write(prefix + line)

    threading.Thread(target=pump, daemon=True).start()
