"""The hf backend's building blocks checked against independent computations: packed attention in the
variable-length layout against one masked SDPA call, and the LM head's block size against its rules."""

from __future__ import annotations

import pytest
import torch

from klservice.backends.hf import (
    CUDA_HEAD_BLOCK, HEAD_BLOCK_BYTES, HEAD_MIN_TOKENS, _cache_size, flash_varlen, head_chunks,
    last_level_cache_bytes, varlen_sdpa,
)

LENGTHS = [5, 1, 17, 9]


def packed_qkv(heads: int, kv_heads: int, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    total, d = sum(LENGTHS), 16
    q, k, v = (torch.randn(total, n, d, dtype=dtype, device=device) for n in (heads, kv_heads, kv_heads))
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, bounds


def block_diagonal_reference(q, k, v, scale):
    """One SDPA call over the whole row with a [T × T] mask: causal, and only within a sequence."""
    owner = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).to(q.device)
    position = torch.arange(q.shape[0], device=q.device)
    mask = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_varlen_sdpa_is_block_diagonal_causal_attention(heads, kv_heads, scale):
    q, k, v, bounds = packed_qkv(heads, kv_heads)
    got = varlen_sdpa(q, k, v, bounds, max(LENGTHS), scale)
    assert got.shape == q.shape
    torch.testing.assert_close(got, block_diagonal_reference(q, k, v, scale), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen runs on CUDA only")
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_flash_varlen_is_block_diagonal_causal_attention(heads, kv_heads):
    q, k, v, bounds = packed_qkv(heads, kv_heads, torch.bfloat16, "cuda")
    got = flash_varlen(q, k, v, bounds, None, None)
    torch.testing.assert_close(got.float(), block_diagonal_reference(q, k, v, None), atol=2e-2, rtol=0)


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
