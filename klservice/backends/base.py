"""The one interface every model backend implements.

The server only ever talks to a `ReferenceBackend`: it asks for `info()` once after loading
and then calls `score()` from a single worker thread. Nothing here imports torch, so the
server, the CLI and tests of the request path can use these types without a model.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
"""Compute dtypes every backend accepts (the `--dtype` choices)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a backend serves; every response quotes `name` and `revision`.

    Example::

        ModelInfo(name="SmolLM2-135M-Instruct (embedded)", revision="3f0c…", tokenizer_fingerprint="9a1e…",
                  backend="hf", dtype="float32", device="cpu", vocab_size=49152, max_length=8192,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    """

    name: str
    """What the operator asked for: a folder, a hub id, or "SmolLM2-135M-Instruct (embedded)"."""
    revision: str
    """sha256 hex over the weights, config and tokenizer files: equal revisions give equal log-probs."""
    tokenizer_fingerprint: str
    """sha256 hex of the tokenizer's vocabulary and special tokens (`klservice_client.tokenizer_fingerprint`),
    so a trainer can check that its token ids mean the same to the reference model."""
    backend: str
    """Backend name, e.g. "hf"."""
    dtype: str
    """Compute dtype: "float32", "bfloat16" or "float16"."""
    device: str
    """Where the model runs: "cpu", "cuda:0", ..."""
    vocab_size: int
    """Rows of the LM head: valid token ids are 0 .. vocab_size - 1 (may exceed the tokenizer's size)."""
    max_length: int
    """Longest sequence accepted, in tokens."""
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @classmethod
    def describe(
        cls, *, name: str, revision: str, tokenizer, model_config, backend: str, dtype: str, device: str,
        vocab_size: int, max_length: int,
    ) -> "ModelInfo":
        """The info of a loaded model; special token ids from the tokenizer, else the model config."""
        from klservice_client import tokenizer_fingerprint

        def token(field: str) -> int | None:
            return first_int(getattr(tokenizer, field, None), getattr(model_config, field, None))

        return cls(
            name=name,
            revision=revision,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),  # what KLClient.check_tokenizer compares
            backend=backend,
            dtype=dtype,
            device=device,
            vocab_size=int(vocab_size),
            max_length=int(max_length),
            bos_token_id=token("bos_token_id"),
            eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"),
        )


class ReferenceBackend(abc.ABC):
    """Frozen reference model. Thread-compatible: the server calls score() from ONE worker thread at a time."""

    #: Running count of prompt tokens a backend did not recompute thanks to prefix sharing (for metrics).
    tokens_saved: int = 0

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Describe the loaded model (cheap; computed at load time)."""

    @abc.abstractmethod
    def score(
        self, sequences: Sequence[np.ndarray], starts: Sequence[int], temperature: float = 1.0
    ) -> list[np.ndarray]:
        """Reference log-probs of every token from its start on.

        For each sequence (1-D int64 token ids, length L) and start s (1 <= s <= L) return a float32
        array of length L - s: entry j is log softmax(logits_{s+j-1} / temperature)[token_{s+j}], i.e. the
        reference log-prob of every token from position s on given its prefix. Inputs are assumed valid
        (the server validates requests before calling).
        """

    def check_temperature(self, temperature: float) -> None:
        """Raise klservice.errors.FailedPrecondition if this backend cannot score at `temperature`.

        The scheduler calls it before queueing a request, so a refusal costs no queue slot.
        """

    def close(self) -> None:
        """Release the model's memory; the backend is unusable afterwards."""


def first_int(*candidates: object) -> int | None:
    """The first candidate that is an int (or a non-empty list of ints, e.g. Llama 3's eos ids).

    Special token ids come from the tokenizer or the model config, in either form.
    """
    for value in candidates:
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def shared_prompt_groups(
    sequences: Sequence[np.ndarray], starts: Sequence[int], min_prompt: int | None
) -> tuple[list[list[int]], list[int]]:
    """(groups, alone): indices of sequences with the same prompt (the tokens before their start, at least
    `min_prompt` of them), groups of two or more, and the indices of the rest; both in order of first
    appearance. `min_prompt=None`: no sharing, every sequence alone.

    Example::

        shared_prompt_groups([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]), np.array([9, 9])], [3, 3, 1], 2)
        # -> ([[0, 1]], [2])
    """
    by_prompt: dict[bytes | int, list[int]] = {}  # a sequence that shares nothing is keyed by its index
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        shareable = min_prompt is not None and start >= min_prompt
        by_prompt.setdefault(np.asarray(seq[:start], dtype="<i8").tobytes() if shareable else i, []).append(i)
    groups = [group for group in by_prompt.values() if len(group) > 1]
    alone = [group[0] for group in by_prompt.values() if len(group) == 1]
    return groups, alone


def probe_tokens(vocab_size: int) -> np.ndarray:
    """12 fixed, spread-out token ids for a backend's load-time self-checks."""
    return (np.arange(12, dtype=np.int64) * 7919 + 3) % vocab_size
