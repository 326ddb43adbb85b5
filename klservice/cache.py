"""The reference cache: reference log-probs are a pure function of (model revision, temperature, tokens, scored range).

PPO-style trainers call ComputeKL several times on the same sequences (epochs,
micro-batches) with new policy log-probs; the reference part does not change, so the
second call skips the forward. Entries are keyed by a sha256 digest of everything the
values depend on and evicted least-recently-used once the cached arrays exceed
``max_bytes``. Used from the event-loop thread only.
"""

from __future__ import annotations

import collections
import hashlib
import struct

import numpy as np


class ReferenceCache:
    """Bounded LRU map from a sequence's scoring key to its float32 reference log-probs."""

    def __init__(self, max_bytes: int, revision: str, metrics=None):
        self._max_bytes = max_bytes
        self._revision = revision.encode()
        self._entries: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._bytes = 0
        self._metrics = metrics

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, tokens: np.ndarray, start: int, temperature: float) -> bytes:
        """Digest of (revision, temperature, scored range start, token ids)."""
        digest = hashlib.sha256(self._revision)
        digest.update(struct.pack("<dq", float(temperature), int(start)))
        digest.update(np.ascontiguousarray(tokens, dtype="<i8").tobytes())
        return digest.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        values = self._entries.get(key)
        if values is not None:
            self._entries.move_to_end(key)
        if self._metrics is not None:
            self._metrics.cache_lookups.labels("hit" if values is not None else "miss").inc()
        return values

    def put(self, key: bytes, values: np.ndarray) -> None:
        size = values.nbytes
        if size > self._max_bytes or key in self._entries:
            return
        values = values.copy()
        values.setflags(write=False)
        self._entries[key] = values
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self._bytes)
