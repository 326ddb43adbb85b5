"""Raw vLLM ``prompt_logprobs`` throughput: the baseline the service is compared with.

"Raw" is what a trainer does with vLLM alone: every sequence is a prompt, scored with
``SamplingParams(max_tokens=1, prompt_logprobs=0)`` in one ``LLM.generate`` call, and the
scored tokens' log-probs are read out into numpy. The engine gets the same settings as the
service's vllm backend (`klservice.backends.vllm.engine_kwargs`: on CPU the KV-cache size,
OpenMP threads bound to every CPU, eager mode; only the prefix cache is off, which prompt
log-prob requests skip anyway), so the comparison is about the scoring
path, not the engine's configuration.

vLLM starts its engine in child processes with *spawn*: call this under
``if __name__ == "__main__":`` (the ``klservice`` command is). Needs vLLM installed.

`RawPromptLogprobs` holds such an engine (the bench times it next to the service);
`raw_prompt_logprobs_throughput` is a stand-alone measurement.

Example::

    from klservice.bench.raw_vllm import raw_prompt_logprobs_throughput
    result = raw_prompt_logprobs_throughput("/models/SmolLM2", sequences, prompt_lengths=256)
    result["tokens_per_second"], result["scored_tokens_per_second"]
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class RawPromptLogprobs:
    """A vLLM engine scoring sequences the raw way: every sequence a prompt with ``prompt_logprobs=0``.

    The `klservice bench` baseline for the vllm comparison; `close()` (or leaving a ``with``
    block) shuts the engine down. `gpu_memory_utilization` is vLLM's (lower it when another
    engine shares the GPU).

    Example::

        with RawPromptLogprobs("/models/SmolLM2", dtype="float32") as raw:
            values = raw.score(sequences, starts)   # per sequence: float32 log-probs of tokens start .. L-1
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: str = "float32",
        *,
        max_length: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        from klservice.backends.vllm import platform_device_type, start_llm, engine_kwargs

        kwargs = engine_kwargs(
            dtype=dtype,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        started = time.perf_counter()
        self._llm = start_llm(LLM, model=str(Path(model_dir)), **kwargs)
        self.startup_seconds = time.perf_counter() - started
        self._params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True
        )
        self._TokensPrompt = TokensPrompt
        self.device = platform_device_type()
        self.vllm_version = vllm.__version__

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[np.ndarray]:
        """One ``LLM.generate`` over all `sequences`; per sequence the float32 log-probs of tokens start .. L-1."""
        prompts = [self._TokensPrompt(prompt_token_ids=[int(t) for t in seq]) for seq in sequences]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False)
        # FlatLogprobs: position 0 has no entry, positions 1 .. L-1 one each (the token itself).
        return [np.asarray(o.prompt_logprobs.logprobs[s - 1 :], dtype=np.float32) for o, s in zip(outputs, starts)]

    def close(self) -> None:
        from klservice.backends.vllm import shutdown_llm

        llm, self._llm = self._llm, None
        if llm is not None:
            shutdown_llm(llm)

    def __enter__(self) -> "RawPromptLogprobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_prompt_logprobs_throughput(
    model_dir: str | os.PathLike,
    sequences: Sequence[Sequence[int]],
    dtype: str = "float32",
    *,
    prompt_lengths: int | Sequence[int] = 1,
    repeats: int = 3,
    max_length: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    return_values: bool = False,
) -> dict[str, Any]:
    """Start a vLLM engine on `model_dir`, time scoring `sequences` with ``prompt_logprobs`` `repeats` times.

    `prompt_lengths` (one int for all, or one per sequence) only decides which log-probs are read
    out and counted as scored; vLLM computes every position either way. One untimed warm-up
    call on a short sequence comes first. The engine is shut down before returning.

    Returns a dict: ``tokens`` (all tokens of one pass), ``scored_tokens``, ``seconds`` (median
    pass), ``seconds_all`` (every pass), ``tokens_per_second`` and ``scored_tokens_per_second``
    (from the median), ``startup_seconds`` (engine start), ``sequences``, ``dtype``, ``device``,
    ``vllm_version``; with `return_values`, also ``values``: per sequence the float32 log-probs
    of tokens prompt_length .. L-1 from the last pass.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    token_lists = [[int(t) for t in seq] for seq in sequences]
    if not token_lists or min(len(s) for s in token_lists) < 2:
        raise ValueError("need at least one sequence, each of at least 2 tokens")
    starts = [int(prompt_lengths)] * len(token_lists) if isinstance(prompt_lengths, int) else [int(p) for p in prompt_lengths]
    if len(starts) != len(token_lists) or any(not 1 <= s <= len(t) for s, t in zip(starts, token_lists)):
        raise ValueError("prompt_lengths: one per sequence, each between 1 and the sequence's length")
    with RawPromptLogprobs(
        model_dir,
        dtype,
        max_length=max_length,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
    ) as raw:
        raw.score([token_lists[0][:16]], [1])  # warm-up
        times, values = [], []
        for _ in range(repeats):
            begin = time.perf_counter()
            values = raw.score(token_lists, starts)
            times.append(time.perf_counter() - begin)
    tokens = sum(len(t) for t in token_lists)
    scored = sum(len(t) - s for t, s in zip(token_lists, starts))
    seconds = statistics.median(times)
    result: dict[str, Any] = {
        "tokens": tokens,
        "scored_tokens": scored,
        "sequences": len(token_lists),
        "seconds": seconds,
        "seconds_all": times,
        "tokens_per_second": tokens / seconds,
        "scored_tokens_per_second": scored / seconds,
        "startup_seconds": raw.startup_seconds,
        "dtype": dtype,
        "device": raw.device,
        "vllm_version": raw.vllm_version,
    }
    if return_values:
        result["values"] = values
    return result
