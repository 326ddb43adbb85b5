"""Long rows, layer by layer in chunks of rows, so that what grows with a call stays a small share of it.

A decoder layer's temporaries grow with the rows it computes at once: the MLP's [rows × intermediate]
activations, the norms' float32 copies, the attention's queries, keys, values and outputs. For one
8,192-token sequence of a 7B Llama in bfloat16 they are several hundred MB, a third or more of the
full-vocabulary float32 logits the service exists to avoid. So a long packed row runs each decoder
layer over chunks of rows, in order: a chunk's keys and values join those of the rows before it (one
buffer per call, reused by every layer), its queries attend over them (`TreeCall.keys_through`), and
its output overwrites its own rows of the layer's input, which nothing reads afterwards. What stays
is one [T × hidden] row of hidden states and one layer's keys and values; the final norm runs in
chunks too, in place.

Everything but attention in a decoder layer works row by row, so the chunked layer computes the same
values; the backend checks that at load (forcing tiny chunks on its probe) and serves unchunked,
with a warning, where it does not hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from klservice.backends.hf.attention import TreeCall

log = logging.getLogger(__name__)

CHUNK_SHARE = 1 / 32
"""A chunk's layer temporaries are at most this share of the call's full-vocabulary float32 logits (rows x vocab x 4
bytes), the memory the service exists to avoid."""
MIN_CHUNK_ROWS = 256
"""Fewest rows a chunk has: smaller matmuls waste the device more than they save."""
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm")
"""Attribute names of the body's last norm, across architectures."""


def decoder_layers(body) -> list[torch.nn.Module]:
    """The body's decoder layers: its longest ModuleList."""
    lists = [m for m in body.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else [body]


class LayerChunker:
    """Wraps a model's decoder layers (and its final norm) so that, inside `chunks(call)`, a long packed row runs
    in chunks of rows. Outside, and for rows that fit one chunk, the layers run as they are.

    `rows` fixes the chunk size (tests, and the load-time check); by default `chunk_rows` sizes it per call."""

    def __init__(self, model, rows: int | None = None):
        self.layers = decoder_layers(model.base_model)
        self.enabled = True  # the load-time check turns it off where chunked layers differ from whole ones
        self._rows = rows
        self._active: tuple[TreeCall, int] | None = None
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        width = next(model.parameters()).element_size()
        # Per row: the MLP's three [intermediate] activations, the norms' two float32 copies, and queries, keys,
        # values, attention output and projection in the model's dtype.
        self.bytes_per_row = 3 * intermediate * width + 2 * hidden * 4 + 5 * hidden * width
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else 0
        for layer in self.layers:
            layer.forward = _ChunkedForward(self, layer.forward)
        norm = next((getattr(model.base_model, name) for name in FINAL_NORMS
                     if isinstance(getattr(model.base_model, name, None), torch.nn.Module)), None)
        if norm is not None:
            norm.forward = _ChunkedNorm(self, norm.forward)

    def chunk_rows(self, tokens: int) -> int:
        """Rows per chunk for a call of `tokens` rows: `CHUNK_SHARE` of its full-vocab logits' bytes over the layer
        temporaries of one row, at least `MIN_CHUNK_ROWS` (or the fixed size given)."""
        if self._rows is not None:
            return self._rows
        budget = tokens * self.vocab_size * 4 * CHUNK_SHARE
        return max(MIN_CHUNK_ROWS, int(budget // self.bytes_per_row))

    @contextlib.contextmanager
    def chunks(self, call: TreeCall, rows: int | None = None) -> Iterator[None]:
        """Run the forward inside in chunks of `rows` (default `chunk_rows`) when the row is longer."""
        rows = rows or self.chunk_rows(call.layout.tokens)
        if not self.enabled or rows >= call.layout.tokens:
            yield
            return
        self._active = (call, rows)
        call.chunked = True
        try:
            yield
        finally:
            self._active = None
            call.chunked = False
            call.query_rows = (0, call.layout.tokens)

    @property
    def active(self) -> tuple[TreeCall, int] | None:
        return self._active


class _ChunkedForward:
    """A decoder layer's forward that, while its chunker is active, runs its row in chunks (see the module)."""

    def __init__(self, chunker: LayerChunker, forward):
        self.chunker, self.forward = chunker, forward

    def __call__(self, *args, **kwargs):
        active = self.chunker.active
        if active is None:
            return self.forward(*args, **kwargs)
        call, rows = active
        hidden = args[0] if args else kwargs["hidden_states"]
        total = hidden.shape[1]
        result = None
        for q0 in range(0, total, rows):
            q1 = min(q0 + rows, total)
            call.query_rows = (q0, q1)
            out = self.forward(*_rows(args, total, q0, q1), **{
                name: value if name == "attention_mask" else _rows(value, total, q0, q1) for name, value in kwargs.items()
            })
            result = out
            hidden[:, q0:q1] = out[0] if isinstance(out, tuple) else out
        call.query_rows = (0, total)
        return (hidden, *result[1:]) if isinstance(result, tuple) else hidden


class _ChunkedNorm:
    """The body's final norm, in place chunk by chunk while the chunker is active."""

    def __init__(self, chunker: LayerChunker, forward):
        self.chunker, self.forward = chunker, forward

    def __call__(self, hidden, *args, **kwargs):
        active = self.chunker.active
        if active is None or hidden.dim() != 3:
            return self.forward(hidden, *args, **kwargs)
        rows = active[1]
        for q0 in range(0, hidden.shape[1], rows):
            hidden[:, q0 : q0 + rows] = self.forward(hidden[:, q0 : q0 + rows], *args, **kwargs)
        return hidden


def _rows(value, total: int, q0: int, q1: int):
    """`value` restricted to rows [q0, q1) where it has one entry per row of the packed row (a [1, T, ...] tensor,
    a [T] tensor, or a tuple or list of them: hidden states, position ids and embeddings), else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == total:
            return value[:, q0:q1]
        if value.dim() == 1 and value.shape[0] == total:
            return value[q0:q1]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(item, total, q0, q1) for item in value)
    return value
