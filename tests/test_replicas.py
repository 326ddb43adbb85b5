"""Replicas behind one DNS name, as a Kubernetes headless Service gives them, with a replica killed and one added.

Three `klservice serve` processes listen on distinct loopback addresses (127.0.0.2-4, one
port). A real DNS server (dnsmasq, Debian's `dnsmasq-base`) on 127.0.0.1 answers the name
`klservice-headless.test.svc` with their addresses, as the cluster DNS answers for a headless
Service, and the clients resolve `dns://127.0.0.1:PORT/klservice-headless.test.svc:PORT` through
it (round-robin, the client's default for dns: targets). Under a continuous load from several
client threads (Score, and one StreamKL stream), one replica is killed with SIGKILL and taken
out of DNS (as the endpoints controller does), then a fourth is started and put in DNS. The
servers close connections after --max-connection-age-seconds, so the clients re-resolve and
reach the added one. No request may be lost or answered wrongly.
"""

from __future__ import annotations

import getpass
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest

from tests.framework_support import launch

NAME = "klservice-headless.test.svc"
CONNECTION_AGE = 2.0  # seconds
CLIENT_THREADS = 4
DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    """dnsmasq on 127.0.0.1, answering NAME from a hosts file; `set(addresses)` rewrites it and reloads."""
    if DNSMASQ is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI=true but dnsmasq is missing: scripts/ci-system-deps.sh installs dnsmasq-base")
        pytest.skip("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")
    folder = tmp_path_factory.mktemp("dns")
    hosts = folder / "hosts"
    hosts.write_text("")
    port = _free_port(socket.SOCK_DGRAM, "127.0.0.1")
    process = subprocess.Popen(
        [DNSMASQ, "--keep-in-foreground", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
         "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--local=/svc/", "--local-ttl=1",
         "--conf-file=/dev/null", "--pid-file=", "--log-facility=-",
         f"--user={getpass.getuser()}"],  # as root it would switch to nobody, who cannot read pytest's tmp folders
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)
    assert process.poll() is None, process.stderr.read()

    class Dns:
        def __init__(self):
            self.port = port

        def set(self, addresses: list[str]) -> None:
            hosts.write_text("".join(f"{address} {NAME}\n" for address in addresses))
            process.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files

    yield Dns()
    process.kill()
    process.wait(10)


def _free_port(kind: int, *hosts: str) -> int:
    """A port free on every one of `hosts`."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                for host in hosts[1:]:
                    with socket.socket(socket.AF_INET, kind) as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def _served_count(replica) -> float:
    """Requests the replica has answered OK (Score calls and StreamKL items), from its /metrics."""
    text = urllib.request.urlopen(f"http://{replica.host}:{replica.metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("klservice_requests_total{") and 'code="OK"' in line and (
                'method="Score"' in line or 'method="StreamKL"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_replicas_behind_dns_lose_nothing_when_one_is_killed_and_one_is_added(dns, tiny_model_dir):
    from klservice_client import KLClient, KLItem

    addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    port = _free_port(socket.SOCK_STREAM, *addresses)
    age_flags = ("--max-connection-age-seconds", str(CONNECTION_AGE), "--max-connection-age-grace-seconds", "10")

    def start(address: str):
        return launch({"tiny": tiny_model_dir}, *age_flags, "--metrics-host", address, host=address, port=port)

    replicas = {address: start(address) for address in addresses[:3]}
    stop = threading.Event()
    try:
        for replica in replicas.values():
            with KLClient(replica.target) as direct:
                direct.wait_ready(timeout=300)
        dns.set(addresses[:3])
        target = f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"

        rng = np.random.default_rng(0)
        sequences = [rng.integers(0, 49152, size=int(n)).tolist() for n in rng.integers(8, 40, size=16)]
        with KLClient(replicas[addresses[0]].target) as direct:
            expected = [direct.score([sequence], 4).ref_logprobs[0] for sequence in sequences]

        lock = threading.Lock()
        tally = {"sent": 0, "ok": 0, "wrong": 0, "failed": 0, "stream_ok": 0}
        errors: list[str] = []

        def check(index: int, values) -> None:
            right = np.allclose(values, expected[index], rtol=1e-5, atol=1e-5)
            with lock:
                tally["ok" if right else "wrong"] += 1

        def score_load(seed: int) -> None:
            pick = np.random.default_rng(seed)
            with KLClient(target, timeout=60, max_retries=10, max_backoff=1.0) as client:
                while not stop.is_set():
                    index = int(pick.integers(len(sequences)))
                    with lock:
                        tally["sent"] += 1
                    try:
                        check(index, client.score([sequences[index]], 4).ref_logprobs[0])
                    except Exception as error:  # noqa: BLE001 - counted: a lost request
                        with lock:
                            tally["failed"] += 1
                            errors.append(repr(error))

        def stream_load() -> None:
            def items():
                number = 0
                while not stop.is_set():
                    index = number % len(sequences)
                    scored = len(sequences[index]) - 4
                    with lock:
                        tally["sent"] += 1
                    yield KLItem([sequences[index]], 4, np.full(scored, -10.0, np.float32), key=(number, index))
                    number += 1
                    time.sleep(0.02)

            with KLClient(target, timeout=600, max_retries=10, max_backoff=1.0) as client:
                try:
                    for result in client.stream_kl(items()):
                        if result.error is not None:
                            with lock:
                                tally["failed"] += 1
                                errors.append(repr(result.error))
                        else:
                            check(result.key[1], result.output.ref_logprobs[0])
                            with lock:
                                tally["stream_ok"] += 1
                except Exception as error:  # noqa: BLE001 - the stream itself failed: everything on it is lost
                    with lock:
                        tally["failed"] += 1
                        errors.append("stream: " + repr(error))

        threads = [threading.Thread(target=score_load, args=(seed,), daemon=True) for seed in range(CLIENT_THREADS)]
        threads.append(threading.Thread(target=stream_load, daemon=True))
        for thread in threads:
            thread.start()

        def shares(phase: str, live: list[str], before: dict[str, float]) -> dict[str, float]:
            now = {address: _served_count(replicas[address]) for address in live}
            done = {address: now[address] - before.get(address, 0.0) for address in live}
            total = sum(done.values()) or 1.0
            print(f"{phase}: " + ", ".join(f"{a} {100 * d / total:.0f}% ({d:.0f})" for a, d in done.items()))
            return now

        start_counts = {address: _served_count(replicas[address]) for address in addresses[:3]}
        time.sleep(3 * CONNECTION_AGE)
        counts = shares("three replicas", addresses[:3], start_counts)
        assert all(counts[a] > start_counts[a] for a in addresses[:3]), "every replica serves before the kill"

        killed = replicas[addresses[0]]
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(30)
        dns.set(addresses[1:3])
        time.sleep(3 * CONNECTION_AGE)
        counts = shares("after SIGKILL of 127.0.0.2", addresses[1:3], counts)

        replicas[addresses[3]] = start(addresses[3])
        with KLClient(replicas[addresses[3]].target) as direct:
            direct.wait_ready(timeout=300)
        added_before = _served_count(replicas[addresses[3]])
        counts = {address: _served_count(replicas[address]) for address in addresses[1:3]}
        dns.set(addresses[1:])
        added_at = time.monotonic()
        reached = None
        while time.monotonic() - added_at < 10 * CONNECTION_AGE:
            if _served_count(replicas[addresses[3]]) > added_before:
                reached = time.monotonic() - added_at
                break
            time.sleep(0.1)
        time.sleep(3 * CONNECTION_AGE)
        counts = shares("after adding 127.0.0.5", addresses[1:], {**counts, addresses[3]: added_before})

        stop.set()
        for thread in threads:
            thread.join(120)
        print(f"requests sent {tally['sent']}, answered right {tally['ok']}, wrong {tally['wrong']}, "
              f"failed {tally['failed']} (StreamKL items {tally['stream_ok']}); the added replica got traffic "
              f"{reached if reached is None else f'{reached:.1f} s'} after it entered DNS "
              f"(connection age {CONNECTION_AGE} s)")
        assert not any(thread.is_alive() for thread in threads)
        assert tally["failed"] == 0, errors[:5]
        assert tally["wrong"] == 0
        assert tally["ok"] == tally["sent"]
        assert tally["stream_ok"] > 0
        assert reached is not None, "the added replica never got traffic"
        assert counts[addresses[3]] > added_before
    finally:
        stop.set()  # a failed assertion must not leave the load threads running
        for replica in replicas.values():
            replica.stop()
