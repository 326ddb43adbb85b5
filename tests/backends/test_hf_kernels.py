"""The hf backend's building blocks checked against independent computations: every attention kernel of the packed
forward against one dense masked attention over the whole row, FlexAttention's block mask against the mask it
stands for, the FlashAttention varlen adapter across torch versions, and the LM head's block size."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from klservice.backends.hf.attention import (
    FLEX_BLOCK, FlexKernel, SdpaKernel, TreeCall, UnsupportedAttention, VarlenKernel, reference_varlen, torch_varlen,
)
from klservice.backends.hf.head import (
    CUDA_HEAD_BLOCK, HEAD_BLOCK_BYTES, HEAD_MIN_TOKENS, _cache_size, head_chunks, last_level_cache_bytes,
)
from klservice.backends.hf.layout import build_layout

# (prompt length, [member lengths after the prompt]) of each group, then the lengths of sequences alone. One member
# has a single token after its prompt: it is scored by the prompt's last row and adds no row.
GROUPS = [(7, [5, 1, 9]), (3, [4, 4])]
ALONE = [6, 2, 11]
LONG_GROUPS = [(300, [90, 1, 140]), (40, [200, 60])]
LONG_ALONE = [260, 2, 131]


def make_layout(groups, alone, device="cpu"):
    """A packed layout of random sequences, and for every row (document, is-prompt, member, position): what the
    test's own mask is written from."""
    rng = np.random.default_rng(0)
    sequences, starts, shared = [], [], []
    for prompt_length, members in groups:
        prompt = rng.integers(0, 100, prompt_length)
        shared.append(list(range(len(sequences), len(sequences) + len(members))))
        for n in members:
            sequences.append(np.concatenate([prompt, rng.integers(0, 100, n)]))
            starts.append(prompt_length)
    singles = list(range(len(sequences), len(sequences) + len(alone)))
    for n in alone:
        sequences.append(rng.integers(0, 100, n))
        starts.append(1)
    layout = build_layout(sequences, starts, shared, singles, torch.device(device))
    rows = []  # the row order build_layout documents: sequences alone first, then each group
    for document, n in enumerate(alone):
        rows += [(("alone", document), True, None, p) for p in range(n - 1)]
    for number, (prompt_length, members) in enumerate(groups):
        rows += [(("group", number), True, None, p) for p in range(prompt_length)]
        for member, n in enumerate(members):
            rows += [(("group", number), False, member, prompt_length + p) for p in range(n - 1)]
    return layout, rows


def allowed_pairs(rows, window=None) -> torch.Tensor:
    """[T × T]: row i sees row j if both are of one document, j is not after i, j is the prompt's or i's own
    member's, and (under a window) j's position is less than the window behind i's."""
    n = len(rows)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i, (doc_i, _, member_i, pos_i) in enumerate(rows):
        for j, (doc_j, prompt_j, member_j, pos_j) in enumerate(rows[: i + 1]):
            if doc_i == doc_j and (prompt_j or member_j == member_i) and (not window or pos_i - pos_j < window):
                allowed[i, j] = True
    return allowed


def reference_attention(q, k, v, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=allowed,
        scale=scale,
    )
    return out.transpose(0, 1)


def random_qkv(tokens, heads, kv_heads, dtype=torch.float32, device="cpu", d=16):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(tokens, n, d, generator=generator).to(device, dtype) for n in (heads, kv_heads, kv_heads))
    return q, k, v


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

KERNELS = {
    "sdpa": SdpaKernel,
    "varlen": lambda: VarlenKernel(reference_varlen, devices=("cpu",)),  # the merging, with a written-out kernel
    "flex": lambda: FlexKernel(compiled=False),  # PyTorch's dense reference of FlexAttention
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("chunk", [None, (9, 30)])
def test_every_kernel_attends_the_packed_row_as_the_dense_mask_says(kernel, heads, kv_heads, window, chunk):
    layout, rows = make_layout(GROUPS, ALONE)
    q, k, v = random_qkv(layout.tokens, heads, kv_heads)
    expected = reference_attention(q, k, v, allowed_pairs(rows, window), 0.3)
    q0, q1 = chunk or (0, layout.tokens)
    call = TreeCall(layout, KERNELS[kernel]())
    call.query_rows = (q0, q1)
    if kernel == "varlen" and window:
        with pytest.raises(UnsupportedAttention):
            call.attend(q[q0:q1], k[:q1], v[:q1], 0.3, window)
        return
    got = call.attend(q[q0:q1], k[:q1], v[:q1], 0.3, window)
    assert got.shape == (q1 - q0, heads, 16)
    torch.testing.assert_close(got, expected[q0:q1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 150])
@pytest.mark.parametrize("chunk", [None, (200, 530), (256, 384)])
def test_flex_block_mask_holds_every_allowed_pair_and_its_full_tiles_are_full(window, chunk):
    """Over rows longer than several 128-row blocks: no allowed pair in a skipped tile, no masked pair in a tile
    marked full (whose mask function FlexAttention then skips), and tiles really skipped (the mask is sparse)."""
    layout, rows = make_layout(LONG_GROUPS, LONG_ALONE)
    allowed = allowed_pairs(rows, window)
    q0, q1 = chunk or (0, layout.tokens)
    masked_count, masked_index, full_count, full_index = FlexKernel._blocks(layout, q0, q1, q1, window)
    blocks_q, blocks_k = -(-(q1 - q0) // FLEX_BLOCK), -(-q1 // FLEX_BLOCK)
    kind = torch.zeros(blocks_q, blocks_k, dtype=torch.int64)  # 0 skipped, 1 masked, 2 full
    for b in range(blocks_q):
        kind[b, masked_index[0, 0, b, : masked_count[0, 0, b]].long()] = 1
        kind[b, full_index[0, 0, b, : full_count[0, 0, b]].long()] = 2
    tiles = kind.repeat_interleave(FLEX_BLOCK, 0).repeat_interleave(FLEX_BLOCK, 1)[: q1 - q0, :q1]
    pairs = allowed[q0:q1, :q1]
    assert not (pairs & (tiles == 0)).any()
    assert (pairs | (tiles != 2)).all()
    if chunk is None:
        assert (kind == 0).sum() > blocks_q * blocks_k / 2  # most tiles skipped: other documents, later rows
    if chunk is None and window is None:
        assert (kind == 2).sum() > 0  # the long prompts' tiles below the diagonal are full


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("chunk", [None, (400, 1100)])  # 400: 290 rows into a 300-row prompt
def test_kernels_over_long_rows_and_chunks_match_the_dense_mask(kernel, chunk):
    """Rows longer than FlexAttention's blocks and SDPA's row blocks, whole and in a chunk that cuts segments."""
    layout, rows = make_layout(LONG_GROUPS, LONG_ALONE)
    q, k, v = random_qkv(layout.tokens, 4, 2)
    expected = reference_attention(q, k, v, allowed_pairs(rows), 0.25)
    q0, q1 = chunk or (0, layout.tokens)
    call = TreeCall(layout, KERNELS[kernel]())
    call.query_rows = (q0, q1)
    got = call.attend(q[q0:q1], k[:q1], v[:q1], 0.25, None)
    torch.testing.assert_close(got, expected[q0:q1], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen and compiled FlexAttention run on CUDA")
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_cuda_kernels_attend_the_packed_row_as_the_dense_mask_says(kernel, heads, kv_heads):
    layout, rows = make_layout(LONG_GROUPS, LONG_ALONE, device="cuda")
    q, k, v = random_qkv(layout.tokens, heads, kv_heads, torch.bfloat16, "cuda", d=64)
    expected = reference_attention(q, k, v, allowed_pairs(rows).cuda(), 0.125)
    chosen = VarlenKernel() if kernel == "varlen" else FlexKernel(compiled=True)
    got = TreeCall(layout, chosen).attend(q, k, v, 0.125, None)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)


class _Varlen211:
    """A stand-in with torch 2.11's `varlen_attn` signature (no `enable_gqa`), computing by `reference_varlen`;
    like that kernel's callers must, it is given as many key heads as query heads."""

    def __init__(self):
        self.key_heads = []

    def __call__(self, query, key, value, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
        self.key_heads.append(key.shape[1])
        out, lse = reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale)
        return out, lse.transpose(0, 1)  # the kernel's [heads, Tq]


class _Varlen213(_Varlen211):
    """torch 2.13's signature: grouped-query heads shared by `enable_gqa`."""

    def __call__(self, query, key, value, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
        assert enable_gqa == (key.shape[1] != query.shape[1])
        return super().__call__(query, key, value, cu_q, cu_k, max_q, max_k, return_aux=return_aux, scale=scale,
                                window_size=window_size)


@pytest.mark.parametrize("stand_in, repeated", [(_Varlen211, True), (_Varlen213, False)])
def test_the_varlen_adapter_shares_grouped_heads_on_every_torch(monkeypatch, stand_in, repeated):
    """`torch_varlen` calls the kernel as each torch version allows: with `enable_gqa` where it exists, else with the
    key heads repeated; and returns the log-sum-exp [Tq, heads]. Checked against the written-out kernel."""
    import torch.nn.attention.varlen as varlen_module

    fake = stand_in()
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    attend = torch_varlen()
    q, k, v = random_qkv(12, 6, 2)
    bounds = torch.tensor([0, 5, 12], dtype=torch.int32)
    out, lse = attend(q, k, v, bounds, bounds, 7, 7, True, 0.3)
    want_out, want_lse = reference_varlen(q, k, v, bounds, bounds, 7, 7, True, 0.3)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert fake.key_heads == [6 if repeated else 2]


def test_a_torch_without_the_varlen_kernel_leaves_it_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import fails, as on torch < 2.9
    assert torch_varlen() is None
    assert not VarlenKernel().supports(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("vocab", [49152, 32000, 151936, 256000, 50257])
@pytest.mark.parametrize("cache", [512 << 10, 32 << 20, 1 << 30])
def test_cpu_head_blocks_follow_the_cache_and_cut_the_vocabulary_evenly(vocab, cache):
    tokens, rows = head_chunks(vocab, torch.device("cpu"), cache)
    pieces = -(-vocab // rows)
    assert (pieces - 1) * rows < vocab <= pieces * rows  # equal pieces: the last is short by less than one per piece
    assert vocab - (pieces - 1) * rows > rows - pieces
    block = tokens * rows * 4
    wanted = min(max(cache // 8, HEAD_BLOCK_BYTES[0]), HEAD_BLOCK_BYTES[1])
    assert wanted * 0.9 <= block <= wanted  # the block fills its share of the cache, within rounding
    assert tokens >= HEAD_MIN_TOKENS


def test_a_small_vocabulary_is_one_piece_and_gpus_take_large_blocks():
    tokens, rows = head_chunks(100, torch.device("cpu"), 32 << 20)
    assert rows == 100 and tokens * rows * 4 <= 4 << 20
    assert head_chunks(49152, torch.device("cuda")) == CUDA_HEAD_BLOCK


def test_cache_sizes_are_read_as_sysfs_writes_them():
    assert [_cache_size(text) for text in ("32768K\n", "1M", "512", "2G")] == [32 << 20, 1 << 20, 512, 2 << 30]
    cache = last_level_cache_bytes()
    assert cache is None or cache >= 64 << 10
