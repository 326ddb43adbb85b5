"""One call's sequences as one packed row of real tokens: the layout every layer of the forward reads.

A call's sequences are laid out once, before the forward, and the layout is handed to every
attention layer (as vLLM's attention metadata is), so no layer recomputes it:

- a sequence that shares its prompt with no other is one *segment*: its tokens but the last (the
  last token is only ever a target) at positions 0, 1, ...;
- a group of sequences with the same prompt (GRPO's responses to one prompt) is its prompt once,
  then each member's continuation as a segment of its own, at positions that continue from the
  prompt's end. A continuation attends to the prompt and to its own earlier tokens, never to a
  sibling: each member sees exactly what it would see alone, and the prompt is computed once.

No padding and no KV-cache copies: the model's linear layers see each real token once.

Example (two members of one group after a 3-token prompt ``p``, then a sequence ``s`` alone)::

    rows       p0 p1 p2 | a3 a4 | b3 | s0 s1 s2 s3
    positions   0  1  2 |  3  4 |  3 |  0  1  2  3
    segment     0  0  0 |  1  1 |  2 |  3  3  3  3     (segment 1 and 2 also see segment 0's rows)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the packed row, attended causally; `prompt` (rows [prompt[0], prompt[1])) is the
    shared prompt the segment continues, whose rows every token of the segment also sees, or None."""

    start: int
    end: int
    prompt: tuple[int, int] | None = None


@dataclasses.dataclass(eq=False)
class CallLayout:
    """The packed row of one call (`build_layout`) and where each scored token's output is in it."""

    input_ids: torch.Tensor
    """[1, T] token ids of the packed row, on the model's device."""
    position_ids: torch.Tensor
    """[1, T] each row's position in its own sequence."""
    segments: tuple[Segment, ...]
    """The row's segments, in row order, covering it exactly."""
    rows: torch.Tensor
    """[S] the row whose output scores each target (a member's first target is scored by its prompt's last row)."""
    targets: torch.Tensor
    """[S] the scored tokens, sequence after sequence (`order`)."""
    order: list[int]
    """The call's sequences, by index, in the order of `targets`."""
    counts: list[int]
    """Scored tokens of each sequence of `order`."""
    tokens_saved: int
    """Prompt tokens not computed again thanks to sharing: (members - 1) x prompt length, over the groups."""
    positions: np.ndarray
    """[T] `position_ids` on the host (for the kernels' masks)."""
    _token_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        """Rows of the packed row (T)."""
        return int(self.input_ids.shape[1])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def longest_segment(self) -> int:
        return max(segment.end - segment.start for segment in self.segments)

    @functools.cached_property
    def longest_position(self) -> int:
        """The largest position id of the row: a sliding window wider than it slides over nothing."""
        return int(self.positions.max())

    def token_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(document, segment, position) of every row, int32 on the device, for mask functions: two rows may
        attend each other only within a document, and a continuation row sees segment 0 of its document (the
        prompt) and its own segment. Built once per call, on first use."""
        if self._token_tensors is None:
            document = np.empty(self.tokens, dtype=np.int32)
            segment = np.empty(self.tokens, dtype=np.int32)
            documents = 0
            for number, part in enumerate(self.segments):
                if part.prompt is None:
                    documents += 1
                    segment[part.start : part.end] = 0
                else:
                    segment[part.start : part.end] = number + 1  # unique; never 0
                document[part.start : part.end] = documents
            self._token_tensors = tuple(
                torch.from_numpy(x).to(self.device) for x in (document, segment, self.positions.astype(np.int32))
            )
        return self._token_tensors


def build_layout(
    sequences: Sequence[np.ndarray],
    starts: Sequence[int],
    shared: Sequence[Sequence[int]],
    alone: Sequence[int],
    device: torch.device,
) -> CallLayout:
    """The packed layout of `sequences` (1-D int64 ids), each scored from its start: `shared` are groups of indices
    whose members have the same prompt (the tokens before their common start) and at least two members; `alone`
    are the other indices. Every sequence named must have a token to score (len > start >= 1)."""
    pieces: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    segments: list[Segment] = []
    rows: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    order: list[int] = []
    counts: list[int] = []
    saved = 0
    offset = 0

    def add(tokens: np.ndarray, first_position: int, prompt: tuple[int, int] | None) -> int:
        nonlocal offset
        begin = offset
        pieces.append(tokens)
        positions.append(np.arange(first_position, first_position + len(tokens)))
        offset += len(tokens)
        if len(tokens):
            segments.append(Segment(begin, offset, prompt))
        return begin

    for index in alone:
        seq, start = sequences[index], int(starts[index])
        assert 1 <= start < len(seq)
        begin = add(seq[:-1], 0, None)
        rows.append(np.arange(begin + start - 1, begin + len(seq) - 1))
        targets.append(seq[start:])
        order.append(index)
        counts.append(len(seq) - start)
    for group in shared:
        first = sequences[group[0]]
        length = int(starts[group[0]])
        assert length >= 1 and all(int(starts[i]) == length for i in group)
        prompt_begin = add(first[:length], 0, None)
        prompt = (prompt_begin, prompt_begin + length)
        saved += (len(group) - 1) * length
        for index in group:
            seq = sequences[index]
            assert len(seq) > length
            begin = add(seq[length:-1], length, prompt)
            # The first target is scored by the prompt's last row, the others by the continuation's rows.
            rows.append(np.concatenate([[prompt[1] - 1], np.arange(begin, begin + len(seq) - 1 - length)]))
            targets.append(seq[length:])
            order.append(index)
            counts.append(len(seq) - length)
    flat = np.concatenate(pieces).astype(np.int64, copy=False)
    host_positions = np.concatenate(positions)
    return CallLayout(
        input_ids=torch.from_numpy(flat).to(device).unsqueeze(0),
        position_ids=torch.from_numpy(host_positions).to(device).unsqueeze(0),
        segments=tuple(segments),
        rows=torch.from_numpy(np.concatenate(rows).astype(np.int64)).to(device),
        targets=torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device),
        order=order,
        counts=counts,
        tokens_saved=saved,
        positions=host_positions,
    )
