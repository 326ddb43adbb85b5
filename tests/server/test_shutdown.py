"""Stopping a server with work running: bounded by the grace period plus one step of the forward.

The backend here is the real `hf` backend on the tiny Llama with every decoder layer slowed
down to LAYER_SECONDS, so a forward is long next to the grace period and the test can count
how far it got.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from klservice.backends.hf import HFBackend
from klservice_client import KLClient, ServiceUnavailable

LAYER_SECONDS = 1.5


class SlowLayers(HFBackend):
    """Each decoder layer waits LAYER_SECONDS before it runs; `layers_entered` counts them."""

    def __init__(self, folder, **kwargs):
        super().__init__(folder, **kwargs)
        self.layers_entered = 0
        self.slow = False
        for layer in self._model.base_model.layers:  # registered after the backend's own interrupt check
            layer.register_forward_pre_hook(self._slow_down)

    def _slow_down(self, module, args):
        if self.slow:
            self.layers_entered += 1
            time.sleep(LAYER_SECONDS)


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


def call_in_thread(target, *args):
    outcome = {}

    def run():
        try:
            with KLClient(target, max_retries=0, timeout=120) as client:
                outcome["value"] = client.score(*args)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_stop_interrupts_a_running_forward_within_one_layer(start_server, tiny_model_dir, record_property):
    backend = SlowLayers(tiny_model_dir, device="cpu", progress=False)
    layers = len(backend._model.base_model.layers)
    server = start_server(backend=backend, cache_mb=0)
    backend.slow = True
    running, running_outcome = call_in_thread(server.target, [[5, 6, 7, 8, 9]], 2)
    assert wait_for(lambda: backend.layers_entered >= 1)  # the forward is inside its first layer
    queued, queued_outcome = call_in_thread(server.target, [[9, 10, 11]], 1)
    assert wait_for(lambda: server.server.service.scheduler.queued_requests == 1)

    statuses = []
    with grpc.insecure_channel(server.target) as channel:  # an existing channel, as a load balancer has
        health = health_pb2_grpc.HealthStub(channel)
        stopping = threading.Thread(target=server.stop, args=(0.2,))
        started = time.perf_counter()
        stopping.start()
        while stopping.is_alive():
            try:
                statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError:
                pass  # the port closes at the very end
            time.sleep(0.05)
        stopping.join()
        seconds = time.perf_counter() - started
    running.join(30)
    queued.join(30)
    record_property("stop_seconds", round(seconds, 2))
    print(f"\nstop took {seconds:.2f} s with a {layers * LAYER_SECONDS:.1f} s forward running, grace 0.2 s")

    # The forward never reached its second layer: it was stopped, not waited for.
    assert backend.layers_entered == 1 < layers
    for outcome in (running_outcome, queued_outcome):
        assert isinstance(outcome.get("error"), ServiceUnavailable), outcome
        assert "shutting down" in str(outcome["error"])
    assert statuses and set(statuses) == {health_pb2.HealthCheckResponse.NOT_SERVING}


def test_work_that_finishes_within_the_grace_is_answered_and_new_work_refused(start_server, tiny_model_dir):
    backend = SlowLayers(tiny_model_dir, device="cpu", progress=False)
    server = start_server(backend=backend, cache_mb=0)
    backend.slow = True
    running, running_outcome = call_in_thread(server.target, [[5, 6, 7, 8, 9]], 2)
    assert wait_for(lambda: backend.layers_entered >= 1)
    stopping = threading.Thread(target=server.stop, args=(60.0,))
    stopping.start()
    assert wait_for(lambda: not server.server.service.ready)
    with KLClient(server.target, max_retries=0) as late:
        with pytest.raises(ServiceUnavailable, match="draining"):
            late.score([[1, 2, 3]], 1)
    stopping.join(60)
    running.join(30)
    assert running_outcome["value"].ref_logprobs.shape == (3,)  # finished during the drain, answered OK
