"""`Workload`: seeded random token ids that every path of one workload scores."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Workload:
    """Sequences (1-D int64 token ids) with the position each one's scoring starts at."""

    key: str
    title: str
    sequences: list[np.ndarray]
    starts: list[int]
    groups: list[list[int]] | None = None  # prompt groups (one request each in (c))

    @property
    def tokens(self) -> int:
        """All tokens of the sequences (prompt + response): the tokens/s numerator of every path."""
        return int(sum(len(s) for s in self.sequences))

    @property
    def scored(self) -> int:
        return int(sum(len(s) - st for s, st in zip(self.sequences, self.starts)))

    def subset(self, count: int) -> "Workload":
        """The first `count` sequences (a warm-up slice; for GRPO work, of the first prompt group)."""
        return Workload(self.key, self.title, self.sequences[:count], self.starts[:count])
