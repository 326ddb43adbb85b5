"""Work the process must not wait for when it exits.

A load that blocks in the kernel (a checkpoint on a hung network mount, a FIFO opened for reading)
cannot be interrupted from Python. Run in a `concurrent.futures.ThreadPoolExecutor` (as
``asyncio.to_thread`` does) it would also hold the process at exit: both asyncio's shutdown and the
interpreter's wait for such threads. `in_daemon_thread` runs it in a daemon thread instead, whose
result arrives as a future like the executor's, and which a stopping process leaves behind.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any


def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str = "klservice-worker") -> concurrent.futures.Future:
    """Start ``fn(*args)`` in a new daemon thread; its result (or exception) in the returned future."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
