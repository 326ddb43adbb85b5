"""Attention over a packed call (`layout.CallLayout`): each segment causally, a continuation also over its prompt.

`tree_attention` is a transformers attention function (registered as `TREE_ATTENTION`). Called with a
`TreeCall` (keyword `TREE_KWARG`, which transformers passes from the model's forward down to every
attention layer) it attends the packed row by the call's kernel; called without one (the padded
forward of the fallback and the self-checks) it is transformers' own SDPA attention.

Three kernels compute the same thing:

- `SdpaKernel`: one `scaled_dot_product_attention` per segment, a continuation's keys being its prompt's
  rows then its own. Any device and dtype, sliding windows included; the CPU's kernel.
- `VarlenKernel`: two FlashAttention variable-length passes (`torch.nn.attention.varlen`) over the whole
  row: every segment causally over itself, then every continuation over its prompt, merged by their
  log-sum-exps. CUDA in float16/bfloat16; no compilation, no mask.
- `FlexKernel`: FlexAttention with a block mask built from the layout's block structure (no [T × T]
  evaluation), compiled on CUDA. Any device (uncompiled, it is PyTorch's dense reference).

On CUDA the backend times the kernels that pass its load-time check and keeps the fastest
(`checks.choose_kernel`).

Query rows may be a chunk [q0, q1) of the row, with keys and values for rows [0, q1) (the long-sequence
path, `chunking.py`); without chunking q0 = 0 and q1 = T.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from klservice.backends.hf.layout import CallLayout

TREE_ATTENTION = "klservice_tree"
"""The attention implementation the backend sets on its model (registered with transformers' AttentionInterface)."""
TREE_KWARG = "klservice_tree"
"""The forward keyword that carries a `TreeCall` to every attention layer."""


class UnsupportedAttention(Exception):
    """A layer asks for something the tree kernels do not do (logit soft-capping, attention sinks, a batch);
    raised during the load-time check, which then serves the model padded."""


class TreeCall:
    """What every attention layer of one packed forward shares: the layout, the kernel, and each kernel's plan for
    a query chunk (built by the first layer that needs it, reused by the others)."""

    def __init__(self, layout: CallLayout, kernel: "Kernel"):
        self.layout = layout
        self.kernel = kernel
        self.query_rows = (0, layout.tokens)  # the chunk being computed (`chunking.py` moves it)
        self.chunked = False  # layers run chunk by chunk: keys and values gather in `_buffers`
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # by (key shape, value shape, dtype)
        self._plans: dict[Any, Any] = {}

    def keys_through(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's keys and values [rows, kv_heads, d] written into the call's buffers at its rows; returns the
        buffers' rows [0, end of the chunk). One buffer per shape serves every layer: layers run one after the
        other, and a layer's chunk reads only rows its earlier chunks have written."""
        q0, q1 = self.query_rows
        shapes = ((self.layout.tokens, *key.shape[1:]), (self.layout.tokens, *value.shape[1:]), key.dtype)
        buffers = self._buffers.get(shapes)
        if buffers is None:
            buffers = self._buffers[shapes] = (key.new_empty(shapes[0]), value.new_empty(shapes[1]))
        buffers[0][q0:q1], buffers[1][q0:q1] = key, value
        return buffers[0][:q1], buffers[1][:q1]

    def attend(self, query, key, value, scale: float, window: int | None) -> torch.Tensor:
        """query [Tq, heads, d] for rows `query_rows`; key and value [Tk, kv_heads, d] for rows [0, Tk).
        Returns [Tq, heads, d]."""
        q0, q1 = self.query_rows
        assert query.shape[0] == q1 - q0 and key.shape[0] >= q1
        if window and window > self.layout.longest_position:  # it reaches every row: no window at all
            window = None
        plan_key = (q0, q1, key.shape[0], window)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = self._plans[plan_key] = self.kernel.plan(self.layout, q0, q1, key.shape[0], window)
        return self.kernel.attend(query, key, value, plan, scale)


def tree_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   sliding_window=None, softcap=None, **kwargs):
    """A transformers attention function: the packed row's attention when a `TreeCall` is passed (`TREE_KWARG`),
    transformers' SDPA attention otherwise.

    query [1, heads, T, d]; key and value [1, kv_heads, T, d]. Returns ([1, T, heads, d], None), as SDPA's does.
    """
    call = kwargs.pop(TREE_KWARG, None)
    if call is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if softcap is not None or kwargs.get("s_aux") is not None or query.shape[0] != 1:
        raise UnsupportedAttention(f"{type(module).__name__}: soft-capped or sink attention, or a batch")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, d]
    if call.chunked:  # a chunk of a long row: its keys join those of the rows before it
        key, value = call.keys_through(key, value)
    out = call.attend(query, key, value, scale, sliding_window or None)
    return out.unsqueeze(0), None


class Kernel:
    """A way to attend a packed row. `plan` prepares what a query chunk needs (once per call and window), `attend`
    runs it."""

    name = "?"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def plan(self, layout: CallLayout, q0: int, q1: int, kv_rows: int, window: int | None) -> Any:
        raise NotImplementedError

    def attend(self, query, key, value, plan, scale: float) -> torch.Tensor:
        raise NotImplementedError


def _clipped(layout: CallLayout, q0: int, q1: int):
    """(segment, first query row, end) of each segment with rows in [q0, q1)."""
    for segment in layout.segments:
        a, b = max(segment.start, q0), min(segment.end, q1)
        if a < b:
            yield segment, a, b


def _sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA shares grouped-query heads itself (`enable_gqa`, torch >= 2.5)."""
    try:
        q = torch.zeros(1, 2, 1, 4)
        k = torch.zeros(1, 1, 1, 4)
        torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except TypeError:
        return False


class SdpaKernel(Kernel):
    """One `scaled_dot_product_attention` per segment (per clipped segment of a chunk): a segment alone is plain
    causal attention (a chunk of it: causal aligned at the bottom right, PyTorch's `causal_lower_right`); a
    continuation's keys are its prompt's rows then its own, with a mask [rows × keys] that lets a row see the whole
    prompt and its own rows up to itself (and, under a sliding window, only positions less than the window behind
    it)."""

    name = "sdpa"

    def __init__(self) -> None:
        self._gqa = _sdpa_has_gqa()

    def plan(self, layout, q0, q1, kv_rows, window):
        parts = []
        positions = layout.positions
        for segment, a, b in _clipped(layout, q0, q1):
            keys = [(segment.start, b)] if segment.prompt is None else [segment.prompt, (segment.start, b)]
            if segment.prompt is None and not window:
                mask = None if a == segment.start else ("lower right", b - a, b - segment.start)
            else:
                key_rows = np.concatenate([np.arange(x, y) for x, y in keys])
                allowed = key_rows[None, :] <= np.arange(a, b)[:, None]
                if window:
                    allowed &= positions[a:b, None] - positions[key_rows][None, :] < window
                mask = torch.from_numpy(allowed).to(layout.device)
            parts.append((a - q0, b - q0, keys, mask))
        return parts

    def attend(self, query, key, value, plan, scale):
        from torch.nn.attention.bias import causal_lower_right

        out = torch.empty_like(query)
        groups = query.shape[1] // key.shape[1]
        extra = {"enable_gqa": True} if groups > 1 and self._gqa else {}
        for a, b, keys, mask in plan:
            # [1, heads, n, d]: the layout transformers' own SDPA call has, so that the same kernel runs.
            q = query[a:b].transpose(0, 1).unsqueeze(0)
            if len(keys) == 1:
                k, v = (x[keys[0][0] : keys[0][1]].transpose(0, 1).unsqueeze(0) for x in (key, value))
            else:
                k, v = (torch.cat([x[s:e] for s, e in keys]).transpose(0, 1).unsqueeze(0) for x in (key, value))
            if groups > 1 and not self._gqa:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            if not isinstance(mask, tuple):
                out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **extra
                )[0].transpose(0, 1)
                continue
            # A chunk of a long segment: its rows are the last of their keys. In blocks of rows, so that the mask SDPA
            # builds on a CPU (rows × keys) stays small; each block sees the keys up to its last row.
            rows, keys_count = mask[1], mask[2]
            for r0 in range(0, rows, SDPA_ROW_BLOCK):
                r1 = min(r0 + SDPA_ROW_BLOCK, rows)
                seen = keys_count - (rows - r1)
                out[a + r0 : a + r1] = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, r0:r1], k[:, :, :seen], v[:, :, :seen], attn_mask=causal_lower_right(r1 - r0, seen),
                    scale=scale, **extra,
                )[0].transpose(0, 1)
        return out


SDPA_ROW_BLOCK = 256
"""Query rows per SDPA call over a chunk of a long segment (`SdpaKernel`)."""


# -- FlashAttention varlen -------------------------------------------------------------------------

VarlenFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(query [Tq, h, d], key, value [Tk, kv_h, d], cu_q, cu_k (int32), max_q, max_k, causal, scale) ->
(out [Tq, h, d], lse [Tq, h] float32): attention of each query sequence over its key sequence, causal aligned at
the bottom right (a query chunk's last row sees its sequence's last key)."""


def torch_varlen() -> VarlenFn | None:
    """PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9) as a
    `VarlenFn`, across its versions: grouped-query heads are shared by ``enable_gqa`` where it exists (torch 2.13)
    and repeated where it does not (torch 2.11); the log-sum-exp, [heads, Tq] from the kernel, is returned
    [Tq, heads]. None where this torch has no such kernel."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    has_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def attend(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
        heads, kv_heads = query.shape[1], key.shape[1]
        extra = {}
        if heads != kv_heads and has_gqa:
            extra["enable_gqa"] = True
        elif heads != kv_heads:
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
        out, lse = varlen_attn(
            query.contiguous(), key.contiguous(), value.contiguous(), cu_q, cu_k, max_q, max_k,
            return_aux=AuxRequest(lse=True), scale=scale, window_size=(-1, 0) if causal else (-1, -1), **extra,
        )
        if lse.shape[0] == heads and lse.shape[1] == query.shape[0] and heads != query.shape[0]:
            lse = lse.transpose(0, 1)
        elif lse.shape[0] == heads == query.shape[0] != 1:  # ambiguous square: the kernel's own layout is [h, Tq]
            lse = lse.transpose(0, 1)
        return out, lse.float()

    return attend


def reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
    """A `VarlenFn` written out with matmuls and softmax, sequence by sequence: what `VarlenKernel`'s merging is
    tested with where FlashAttention is missing (the CPU)."""
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[0], query.shape[1], dtype=torch.float32, device=query.device)
    groups = query.shape[1] // key.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (qa, qb), (ka, kb) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        q = query[qa:qb].float().transpose(0, 1)
        k = key[ka:kb].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        v = value[ka:kb].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) * scale  # [h, nq, nk]
        if causal:
            nq, nk = qb - qa, kb - ka
            allowed = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
            scores = scores.masked_fill(~allowed, float("-inf"))
        total = torch.logsumexp(scores, dim=-1)  # [h, nq]
        out[qa:qb] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).to(out.dtype)
        lse[qa:qb] = total.transpose(0, 1)
    return out, lse


class VarlenKernel(Kernel):
    """Two variable-length passes over the packed row, merged: (1) every segment (a prompt, a sequence alone, a
    continuation) causally over its own rows, in one call; (2) the continuations of each group over their prompt,
    all groups in one call, without a mask. A continuation row's output is the two partial attentions weighted by
    their softmax mass: out = (o1·e^lse1 + o2·e^lse2) / (e^lse1 + e^lse2). No mask, no compilation, no padding.

    `varlen` is the kernel (`torch_varlen()` on CUDA; `reference_varlen` in tests). Sliding windows are not
    supported (the load-time check then keeps another kernel)."""

    name = "varlen"

    def __init__(self, varlen: VarlenFn | None = None, devices: tuple[str, ...] = ("cuda",)):
        self._varlen = varlen if varlen is not None else torch_varlen()
        self._devices = devices

    def supports(self, device, dtype):
        return self._varlen is not None and device.type in self._devices and (
            dtype in (torch.float16, torch.bfloat16) or self._varlen is reference_varlen
        )

    def plan(self, layout, q0, q1, kv_rows, window):
        if window:
            raise UnsupportedAttention("the varlen kernel does not apply sliding windows")
        device = layout.device
        clipped = list(_clipped(layout, q0, q1))
        # Pass 1: each clipped segment's rows over its own keys [segment.start, b). The chunk's rows tile its
        # segments' query rows, and their key ranges tile [first segment's start, q1): one view of the keys.
        first_key = clipped[0][0].start
        cu_q = np.cumsum([0] + [b - a for _, a, b in clipped])
        cu_k = np.cumsum([0] + [b - segment.start for segment, _, b in clipped])
        # Pass 2: the continuation rows of each prompt (contiguous in the row), over the prompt's rows.
        by_prompt: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for segment, a, b in clipped:
            if segment.prompt is not None:
                by_prompt.setdefault(segment.prompt, []).append((a, b))
        cross = None
        if by_prompt:
            query_rows = np.concatenate([np.arange(a, b) for spans in by_prompt.values() for a, b in spans]) - q0
            prompt_rows = np.concatenate([np.arange(*prompt) for prompt in by_prompt])
            cross_q = np.cumsum([0] + [sum(b - a for a, b in spans) for spans in by_prompt.values()])
            cross_k = np.cumsum([0] + [e - s for s, e in by_prompt])
            cross = (
                torch.from_numpy(query_rows).to(device), torch.from_numpy(prompt_rows).to(device),
                _int32(cross_q, device), _int32(cross_k, device), int(np.diff(cross_q).max()), int(np.diff(cross_k).max()),
            )
        return (first_key, q1, _int32(cu_q, device), _int32(cu_k, device), int(np.diff(cu_q).max()),
                int(np.diff(cu_k).max()), cross)

    def attend(self, query, key, value, plan, scale):
        first_key, last_key, cu_q, cu_k, max_q, max_k, cross = plan
        k, v = key[first_key:last_key], value[first_key:last_key]
        out, lse = self._varlen(query, k, v, cu_q, cu_k, max_q, max_k, True, scale)
        if cross is None:
            return out
        rows, prompt_rows, cross_q, cross_k, max_cq, max_ck = cross
        cross_out, cross_lse = self._varlen(
            query.index_select(0, rows), key.index_select(0, prompt_rows), value.index_select(0, prompt_rows),
            cross_q, cross_k, max_cq, max_ck, False, scale,
        )
        own_out, own_lse = out.index_select(0, rows).float(), lse.index_select(0, rows)
        top = torch.maximum(own_lse, cross_lse)
        own_weight, cross_weight = torch.exp(own_lse - top), torch.exp(cross_lse - top)
        merged = (own_out * own_weight[..., None] + cross_out.float() * cross_weight[..., None]) / (
            own_weight + cross_weight
        )[..., None]
        out = out.clone() if out is query else out
        out.index_copy_(0, rows, merged.to(out.dtype))
        return out


def _int32(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int32)).to(device)


# -- FlexAttention -------------------------------------------------------------------------------

FLEX_BLOCK = 128
"""FlexAttention's block size: the block mask says, per 128 x 128 tile of (query, key) rows, skip, full or masked."""


class FlexKernel(Kernel):
    """FlexAttention over the packed row. The mask is a function of each row's document, segment and position
    (`CallLayout.token_tensors`): a row sees earlier rows of its document that are its prompt's or its own
    segment's (and, under a sliding window, less than the window behind it). The block mask is built from per-block
    minima and maxima of those (no [T × T] evaluation): a tile is skipped where no document or order allows a pair,
    full where one document's prompt (or one segment) lies wholly before the queries, and masked otherwise.

    `compiled` compiles `flex_attention` (required for speed on CUDA: uncompiled it is PyTorch's dense reference);
    the first two calls of different lengths compile it (the second with dynamic shapes), which the backend does at
    load."""

    name = "flex"

    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self.compiled = compiled
        self._flex = torch.compile(flex_attention, fullgraph=True) if compiled else flex_attention

    def plan(self, layout, q0, q1, kv_rows, window):
        from torch.nn.attention.flex_attention import BlockMask

        device = layout.device
        document, segment, position = layout.token_tensors()
        rows = torch.arange(document.shape[0], dtype=torch.int32, device=device)
        # Key-side tensors padded to whole blocks (padding: document -1, never a real one).
        padded = -(-kv_rows // FLEX_BLOCK) * FLEX_BLOCK
        k_doc = _pad(document[:kv_rows], padded, -1)
        k_seg, k_pos = _pad(segment[:kv_rows], padded, 0), _pad(position[:kv_rows], padded, 0)
        q_doc, q_seg, q_pos, q_row = (x[q0:q1] for x in (document, segment, position, rows))
        q_doc, q_seg, q_pos = (_pad(x, -(-(q1 - q0) // FLEX_BLOCK) * FLEX_BLOCK, -2) for x in (q_doc, q_seg, q_pos))
        q_row = _pad(q_row, q_doc.shape[0], -1)
        limit = torch.tensor(window or 0, dtype=torch.int32, device=device)

        def mask_mod(b, h, q, kv):
            allowed = (kv <= q_row[q]) & (q_doc[q] == k_doc[kv]) & ((k_seg[kv] == 0) | (q_seg[q] == k_seg[kv]))
            return allowed & ((limit == 0) | (q_pos[q] - k_pos[kv] < limit))

        kv_count, kv_index, full_count, full_index = self._blocks(layout, q0, q1, kv_rows, window)
        block_mask = BlockMask.from_kv_blocks(
            kv_count, kv_index, full_count, full_index, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
            seq_lengths=(q1 - q0, kv_rows), compute_q_blocks=False,
        )
        return block_mask

    @staticmethod
    def _blocks(layout: CallLayout, q0: int, q1: int, kv_rows: int, window: int | None):
        """The block mask's (masked count, masked indices, full count, full indices), [1, 1, q blocks(, k blocks)]."""
        document, segment = (x.cpu().numpy() for x in layout.token_tensors()[:2])

        def stats(first: int, end: int):
            starts = np.arange(first, end, FLEX_BLOCK)
            ends = np.minimum(starts + FLEX_BLOCK, end)
            doc_min, doc_max = np.minimum.reduceat(document[first:end], starts - first), \
                np.maximum.reduceat(document[first:end], starts - first)
            seg_min, seg_max = np.minimum.reduceat(segment[first:end], starts - first), \
                np.maximum.reduceat(segment[first:end], starts - first)
            whole = ends - starts == FLEX_BLOCK
            return starts, ends, doc_min, doc_max, seg_min, seg_max, whole

        qs, qe, qd0, qd1, qs0, qs1, q_whole = stats(q0, q1)
        ks, ke, kd0, kd1, ks0, ks1, k_whole = stats(0, kv_rows)
        # A tile can hold an allowed pair only where the documents overlap and some key is not after every query.
        reachable = (qd0[:, None] <= kd1[None, :]) & (kd0[None, :] <= qd1[:, None]) & (ks[None, :] <= (qe - 1)[:, None])
        one_document = (qd0 == qd1)[:, None] & (kd0 == kd1)[None, :] & (qd0[:, None] == kd0[None, :])
        before = ke[None, :] <= qs[:, None]
        prompt_keys = (ks1 == 0)[None, :]
        same_segment = (qs0 == qs1)[:, None] & (ks0 == ks1)[None, :] & (qs0[:, None] == ks0[None, :])
        full = reachable & one_document & before & (prompt_keys | same_segment) & q_whole[:, None] & k_whole[None, :]
        if window:  # a window cuts into any tile: every reachable tile is masked
            full[:] = False
        masked = reachable & ~full

        def indices(chosen: np.ndarray):
            count = chosen.sum(axis=1).astype(np.int32)
            order = np.argsort(~chosen, axis=1, kind="stable").astype(np.int32)  # chosen blocks first, in order
            return (torch.from_numpy(count)[None, None].to(layout.device),
                    torch.from_numpy(np.ascontiguousarray(order))[None, None].to(layout.device))

        return (*indices(masked), *indices(full))

    def attend(self, query, key, value, plan, scale):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, T, d]
        gqa = q.shape[1] != k.shape[1]
        out = self._flex(q, k, v, block_mask=plan, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)


def _pad(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.shape[0] >= length:
        return x
    return torch.cat([x, torch.full((length - x.shape[0],), value, dtype=x.dtype, device=x.device)])


def kernels_for(device: torch.device, dtype: torch.dtype) -> list[Kernel]:
    """The kernels worth trying on `device` in `dtype`, best guess first: on CUDA in half precision the varlen
    kernel and compiled FlexAttention (the load-time check times both), else FlexAttention compiled; on a CPU one
    SDPA call per segment. Every list ends with `SdpaKernel`, which runs everywhere."""
    kernels: list[Kernel] = []
    if device.type == "cuda":
        varlen = VarlenKernel()
        if varlen.supports(device, dtype):
            kernels.append(varlen)
        try:
            kernels.append(FlexKernel(compiled=True))
        except ImportError:
            pass
    kernels.append(SdpaKernel())
    return kernels


def dense_tree_mask(layout: CallLayout, window: int | None = None) -> torch.Tensor:
    """[T × T] boolean: which rows each row attends (the definition the kernels are tested against)."""
    document, segment, position = (x.long() for x in layout.token_tensors())
    rows = torch.arange(layout.tokens, device=layout.device)
    allowed = (rows[None, :] <= rows[:, None]) & (document[:, None] == document[None, :])
    allowed &= (segment[None, :] == 0) | (segment[:, None] == segment[None, :])
    if window:
        allowed &= position[:, None] - position[None, :] < window
    return allowed


__all__ = [
    "FLEX_BLOCK", "FlexKernel", "Kernel", "SdpaKernel", "TREE_ATTENTION", "TREE_KWARG", "TreeCall",
    "UnsupportedAttention", "VarlenKernel", "dense_tree_mask", "kernels_for", "reference_varlen", "torch_varlen",
    "tree_attention",
]
