"""`ServiceProcess`: a real `klservice serve` subprocess on loopback, as the bench's service path uses it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path


class ServiceProcess:
    """`klservice serve` as a subprocess on 127.0.0.1, port 0; its log goes to a file.

    Its Prometheus endpoint (also on a free loopback port) tells how long the server spent in
    the model (`forward_seconds`), so the bench can split a service call's wall time into the
    model's time and what gRPC and scheduling added.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "a")
        self._port: int | None = None
        self._metrics_port: int | None = None
        self._found = threading.Event()
        command = [sys.executable, "-m", "klservice", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--grace-seconds", "2", "--log-level", "INFO", *args]
        self._log.write("$ " + " ".join(command) + "\n")
        self._log.flush()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
            start_new_session=True,  # Ctrl-C reaches the bench, which then stops the server itself
        )
        self._reader = threading.Thread(target=self._read, name="klservice-bench-server-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            match = re.search(r"listening on \S*?:(\d+)", line)
            if match and self._port is None:
                metrics = re.search(r"metrics on \S*:(\d+)/metrics", line)
                self._metrics_port = int(metrics.group(1)) if metrics else None
                self._port = int(match.group(1))
                self._found.set()
        self._found.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def target(self, timeout: float = 180.0) -> str:
        self._found.wait(timeout)
        if self._port is None:
            raise RuntimeError(f"klservice serve did not report its port; log:\n{self.log_tail()}")
        return f"127.0.0.1:{self._port}"

    def forward_seconds(self) -> float | None:
        """Total seconds the server has spent in backend forwards so far (None if it does not say)."""
        return self.metric_sum("klservice_forward_seconds_sum")

    def metric_sum(self, name: str) -> float | None:
        """The sum of the series of the metric `name` on the server's /metrics (one per served model, the `model`
        label); None if it does not say."""
        if self._metrics_port is None:
            return None
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self._metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        values = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", text, re.M)
        return sum(float(value) for value in values) if values else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(5)
        self._log.close()
