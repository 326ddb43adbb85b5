#!/usr/bin/env python3
"""How long a small request of one job waits while another job floods the server.

Starts `klservice serve` (embedded model, CPU, reference cache off) on 127.0.0.1, lets FLOOD_THREADS
threads of one job send Score requests of --flood-sequences x --flood-tokens random tokens without
pause, and once the flood has filled the queue sends --probes single --probe-tokens requests from a
second job, one after the other, printing each one's latency. The flood's requests are all alike, so
every step is as long as --max-batch-tokens allows; without a flood the same request takes a fraction
of a second. Bounded: the flood stops after the probes, and the server with it.

    python scripts/flood_wait.py                          # 4 x (8 x 1024 tokens), steps of 16384 tokens
    python scripts/flood_wait.py --max-batch-tokens 4096  # shorter steps, a quicker run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood-threads", type=int, default=4, help="threads of the flooding job (default: 4)")
    parser.add_argument("--flood-sequences", type=int, default=8, help="sequences per flood request (default: 8)")
    parser.add_argument("--flood-tokens", type=int, default=1024, help="tokens per flood sequence (default: 1024)")
    parser.add_argument("--probe-tokens", type=int, default=32, help="tokens of the small request (default: 32)")
    parser.add_argument("--probes", type=int, default=3, help="small requests, one after the other (default: 3)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="the server's token budget per step")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of flood before the first probe")
    args = parser.parse_args()

    from klservice_client import KLClient

    command = [sys.executable, "-m", "klservice", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--device", "cpu", "--cache-mb", "0", "--max-batch-tokens", str(args.max_batch_tokens)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(server.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any("listening on" in line for line in lines):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start:\n" + "".join(lines))
            time.sleep(0.1)
        target = "127.0.0.1:" + re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1)
        with KLClient(target, job_id="probe", timeout=600) as probe:
            probe.wait_ready(300)
            rng = np.random.default_rng(0)
            small = [rng.integers(0, 49152, size=args.probe_tokens).tolist()]
            started = time.perf_counter()
            probe.score(small, 1)
            print(f"idle server: small request {time.perf_counter() - started:.2f} s", flush=True)
            stop = threading.Event()

            def flood(seed: int) -> None:
                generator = np.random.default_rng(seed)
                with KLClient(target, job_id="flood", timeout=600, max_retries=0) as client:
                    while not stop.is_set():
                        batch = [generator.integers(0, 49152, size=args.flood_tokens).tolist()
                                 for _ in range(args.flood_sequences)]
                        try:
                            client.score(batch, 1)
                        except Exception:  # noqa: BLE001 - the server stops under it at the end
                            return

            threads = [threading.Thread(target=flood, args=(seed,), daemon=True) for seed in range(args.flood_threads)]
            for thread in threads:
                thread.start()
            time.sleep(args.warmup)
            waits = []
            for number in range(args.probes):
                small = [rng.integers(0, 49152, size=args.probe_tokens).tolist()]
                started = time.perf_counter()
                probe.score(small, 1)
                waits.append(time.perf_counter() - started)
                print(f"under the flood: small request {number + 1}: {waits[-1]:.2f} s", flush=True)
            stop.set()
            print(f"median {float(np.median(waits)):.2f} s over {len(waits)} small requests "
                  f"(flood: {args.flood_threads} x {args.flood_sequences} x {args.flood_tokens} tokens, "
                  f"--max-batch-tokens {args.max_batch_tokens})")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
