"""Bounded model loads, on real `klservice serve` processes: a folder whose files would block the load (a FIFO) or
never end it (a link to /dev/zero, a file that keeps growing) is refused before it blocks, naming the file; a load
past --load-timeout-seconds is given up and its name freed, its caller there or not; and SIGTERM ends the process
within the grace period whatever a load is doing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from klservice_client import DeadlineExceeded, FailedPrecondition, KLClient
from tests.framework_support import launch

GRACE = 1.0
EXIT_MARGIN = 20.0
"""Seconds past the grace period a SIGTERMed server may take to be gone (flushing answers, releasing the model,
the interpreter's exit); a server held by a load never goes at all."""
PADDING_BYTES = 64 << 30
"""A sparse file of this size takes the load a minute or more to hash (and no disk)."""
LOAD_TIMEOUT = 10.0
"""--load-timeout-seconds of the deadline test: room for the server's own start, far less than hashing the padding."""


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def fifo_weights(source: Path, folder: Path) -> Path:
    copy_model(source, folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")  # opening it for reading blocks until a writer comes
    return folder


def dev_zero_weights(source: Path, folder: Path) -> Path:
    copy_model(source, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").symlink_to("/dev/zero")  # reads for ever
    return folder


def slow_folder(source: Path, folder: Path) -> Path:
    """The model, plus a tokenizer file that its revision hashes but transformers does not read (a SentencePiece
    model beside a GPT-2 tokenizer), sparse: tens of seconds to hash, no disk, no memory."""
    copy_model(source, folder)
    padding = folder / "spiece.model"
    with open(padding, "wb") as handle:
        handle.truncate(PADDING_BYTES)
    if padding.stat().st_blocks * 512 > PADDING_BYTES // 2:
        shutil.rmtree(folder)
        pytest.skip("this file system does not keep sparse files")
    return folder


class Growing:
    """Appends a space to a file every millisecond until stopped (JSON stays valid)."""

    def __init__(self, path: Path):
        self.path, self.stopped = path, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with open(self.path, "ab") as handle:
            while not self.stopped.wait(0.001):
                handle.write(b" ")
                handle.flush()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def start(tiny_model_dir, *flags: str):
    server = launch({"base": tiny_model_dir}, "--allow-admin-from-loopback", "--grace-seconds", str(GRACE), *flags)
    with KLClient(server.target, timeout=120) as client:
        client.wait_ready(timeout=120)
    return server


def stop_and_time(server) -> float:
    """SIGTERM, then the seconds until the process is gone (TimeoutExpired past the grace and the margin)."""
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=GRACE + EXIT_MARGIN)
    return time.monotonic() - sent


def load_in_thread(target: str, name: str, path: Path, timeout: float = 120.0) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            with KLClient(target, max_retries=0, timeout=timeout) as client:
                outcome["value"] = client.load_model(name, str(path), timeout=timeout)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("fifo", r"model\.safetensors: a FIFO, not a regular file"),
    ("dev-zero", r"pytorch_model\.bin: a character device, not a regular file"),
    ("growing", r"tokenizer\.json: changed while it was read"),
])
def test_a_folder_that_would_hold_a_load_is_refused_naming_the_file_and_sigterm_still_ends_the_server(
        tiny_model_dir, tmp_path, kind, message, capsys):
    folder = tmp_path / kind
    growing = None
    if kind == "fifo":
        fifo_weights(tiny_model_dir, folder)
    elif kind == "dev-zero":
        dev_zero_weights(tiny_model_dir, folder)
    else:
        growing = Growing(copy_model(tiny_model_dir, folder) / "tokenizer.json")
    server = start(tiny_model_dir)
    try:
        thread, outcome = load_in_thread(server.target, "other", folder)
        thread.join(60)  # an answer, not a hang (the RPC's own timeout is 120 s)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), FailedPrecondition), outcome
        assert re.search(message, str(outcome["error"])), outcome["error"]
        with KLClient(server.target, timeout=120) as client:  # the name is free, the server serves on
            assert client.load_model("other", str(tiny_model_dir)).generation == 1
        # SIGTERM while a load of the same folder is running (or has just been refused)
        thread, outcome = load_in_thread(server.target, "again", folder)
        time.sleep(0.3)
        took = stop_and_time(server)
        thread.join(30)
        print(f"{kind}: refused with {outcome.get('error')!r}; SIGTERM ended the server in {took:.1f} s")
    finally:
        if growing is not None:
            growing.stop()
        server.stop()


@pytest.mark.slow
def test_a_load_past_its_deadline_is_given_up_naming_the_file_whether_its_caller_waits_or_not(tiny_model_dir, tmp_path):
    """A caller that gives up after 1.5 s: the load runs on (a half-done load would hold what nobody releases) until
    --load-timeout-seconds gives it up, and the name is free again. A caller that waits: DEADLINE_EXCEEDED at the
    deadline, naming the file being read. Nothing was put into service either time."""
    folder = slow_folder(tiny_model_dir, tmp_path / "slow")
    server = start(tiny_model_dir, "--load-timeout-seconds", f"{LOAD_TIMEOUT:g}")
    try:
        with KLClient(server.target, timeout=120, max_retries=0) as client:
            began = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.load_model("slow", str(folder), timeout=1.5)  # the client's own deadline: the caller leaves
            with pytest.raises(FailedPrecondition, match="a load is already running"):
                client.load_model("slow", str(tiny_model_dir))
            while True:  # free once the load's own deadline has passed
                try:
                    with pytest.raises(DeadlineExceeded, match=rf"took longer than --load-timeout-seconds "
                                                                rf"\({LOAD_TIMEOUT:g} s\); it was reading .*spiece\.model"):
                        client.load_model("slow", str(folder))  # this caller waits
                    break
                except FailedPrecondition as error:
                    assert "a load is already running" in str(error)
                    assert time.monotonic() - began < LOAD_TIMEOUT + 30
                    time.sleep(0.2)
            print(f"two loads given up at their deadline, {time.monotonic() - began:.1f} s in all")
            assert [info.name for info in client.list_models()] == ["base"]
            assert client.load_model("slow", str(tiny_model_dir)).generation == 1  # the name is free
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_during_a_long_load_ends_the_server_within_the_grace_period(tiny_model_dir, tmp_path):
    folder = slow_folder(tiny_model_dir, tmp_path / "slow")
    server = start(tiny_model_dir)
    try:
        thread, outcome = load_in_thread(server.target, "slow", folder)
        time.sleep(2.0)  # hashing 64 GiB takes far longer
        assert thread.is_alive()
        took = stop_and_time(server)
        thread.join(30)
        assert not thread.is_alive() and "error" in outcome  # answered (UNAVAILABLE), not left hanging
        print(f"SIGTERM mid-load ended the server in {took:.1f} s; the load got {outcome['error']!r}")
    finally:
        server.stop()
