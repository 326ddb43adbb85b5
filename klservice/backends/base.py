"""The one interface every model backend implements.

The server only ever talks to a `ReferenceBackend`: it asks for `info()` once after loading
(a `ModelInfo`, the class GetModelInfo answers with, from `klservice_client.wire`) and then
calls `score()` from a single worker thread. Nothing here imports torch, so the
server, the CLI and tests of the request path can use these types without a model.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klservice_client.wire import ModelInfo

__all__ = [
    "DTYPES", "Interrupted", "LOGPROB_SLACK", "MAX_CANDIDATES", "MAX_TOP_K", "ModelInfo", "ReferenceBackend", "Scored",
    "TeacherAsk", "TeacherOutput", "describe_model", "group_by_prompt", "split_shared",
]

DTYPES = ("float32", "bfloat16", "float16")
"""Compute dtypes every backend accepts (the `--dtype` choices)."""
LOGPROB_SLACK = 1e-3
"""How far above 0 a log-prob from a backend may be (float rounding of a probability near 1); beyond, it is not a
log-probability, and the backend is at fault."""


def describe_model(
    *, name: str, revision: str, tokenizer, model_config, backend: str, dtype: str, device: str,
    vocab_size: int, max_length: int,
) -> ModelInfo:
    """The `ModelInfo` of a loaded model (the serving limits are the server's to fill in); special token ids
    from the tokenizer, else the model config."""
    from klservice_client import tokenizer_fingerprint

    def token(field: str) -> int | None:
        return first_int(getattr(tokenizer, field, None), getattr(model_config, field, None))

    return ModelInfo(
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


MAX_TOP_K = 256
"""Most top tokens a request may ask for at each scored position."""
MAX_CANDIDATES = 256
"""Most candidate ids a request may give at each scored position."""


@dataclass(frozen=True)
class TeacherAsk:
    """What a sequence asks beyond its tokens' log-probs (distillation's teacher side): at each scored position the
    `top_k` most likely tokens, and the log-probs of `candidates` ([scored, C] int64 token ids, or None)."""

    top_k: int = 0
    candidates: np.ndarray | None = None

    @property
    def width(self) -> int:
        return 0 if self.candidates is None else int(self.candidates.shape[1])


@dataclass(frozen=True)
class TeacherOutput:
    """A sequence's teacher outputs, one row per scored token; every log-prob over the whole vocabulary at the
    call's temperature."""

    top_ids: np.ndarray
    """int32 [scored, top_k]: the most likely token ids, most likely first."""
    top_logprobs: np.ndarray
    """float32 [scored, top_k]."""
    candidate_logprobs: np.ndarray
    """float32 [scored, C]: the log-probs of the asked candidate ids."""
    rest_logmass: np.ndarray
    """float32 [scored]: log of the probability mass outside the top ids and the candidates (each id counted once);
    -inf where they hold all of it."""

    @classmethod
    def empty(cls, ask: TeacherAsk) -> "TeacherOutput":
        """The outputs of a sequence with no token to score."""
        return cls(np.zeros((0, ask.top_k), np.int32), np.zeros((0, ask.top_k), np.float32),
                   np.zeros((0, ask.width), np.float32), np.zeros(0, np.float32))


@dataclass(frozen=True)
class Scored:
    """What `ReferenceBackend.score` returns."""

    values: list[np.ndarray]
    """Per sequence, float32 log-probs of its tokens from its start on."""
    tokens_saved: int = 0
    """Prompt tokens this call did not compute thanks to prefix sharing (the `klservice_tokens_saved` metric)."""
    positions: int | None = None
    """Token positions the model computed in this call, padding included (the `klservice_batch_tokens` metric);
    None: not reported, taken as (sequences) × (longest sequence)."""
    teacher: list[TeacherOutput | None] | None = None
    """Per sequence, its teacher outputs where it asked for them (`score(teacher=...)`)."""


class ReferenceBackend(abc.ABC):
    """Frozen reference model. Thread-compatible: the server calls score() from ONE worker thread at a time."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Describe the loaded model (cheap; computed at load time)."""

    @abc.abstractmethod
    def score(
        self,
        sequences: Sequence[np.ndarray],
        starts: Sequence[int],
        temperature: float = 1.0,
        prompt_groups: Sequence[Sequence[int]] | None = None,
        teacher: Sequence[TeacherAsk | None] | None = None,
    ) -> Scored:
        """Reference log-probs of every token from its start on.

        For each sequence (1-D int64 token ids, length L) and start s (1 <= s <= L) the result holds a
        float32 array of length L - s: entry j is log softmax(logits_{s+j-1} / temperature)[token_{s+j}],
        i.e. the reference log-prob of every token from position s on given its prefix. Inputs are assumed
        valid (the server validates requests before calling).

        `prompt_groups` is `group_by_prompt(sequences, starts)` when the caller has computed it already
        (the scheduler has, to keep groups in one call); a backend that shares prompts computes it
        otherwise. A backend may share any group's prompt, or none.

        `teacher` (per sequence, or None) asks for teacher outputs (`TeacherAsk`), returned in `Scored.teacher`; a
        backend that cannot compute them refuses in `check_teacher`, before the request is queued.
        """

    @property
    def packs(self) -> bool:
        """Whether `score()` runs sequences without padding, so a call costs its real tokens rather than (sequences)
        × (longest): the scheduler then sizes calls by real tokens (`plan_calls`)."""
        return False

    def check_teacher(self, ask: TeacherAsk) -> None:
        """Raise klservice.errors.FailedPrecondition if this backend cannot compute `ask` (the default: it computes
        no teacher outputs at all)."""
        from klservice.errors import FailedPrecondition

        raise FailedPrecondition(
            f"top_k and candidate_ids: the {self.info().backend} backend does not compute teacher outputs; serve "
            "this model with the hf backend"
        )

    def check_temperature(self, temperature: float) -> None:
        """Raise klservice.errors.FailedPrecondition if this backend cannot score at `temperature`.

        The scheduler calls it before queueing a request, so a refusal costs no queue slot.
        """

    def interrupt(self) -> None:
        """Make a running `score()` give up soon by raising `Interrupted`, and every later one at once.

        Called from another thread when the server stops with work still running, so that shutdown
        takes at most one bounded step of a forward (for `hf`, one decoder layer); the backend is
        closed next and not used again. A backend that cannot stop a forward part-way keeps this
        no-op: its step is one whole `score()` call.
        """

    def close(self) -> None:
        """Release the model's memory; the backend is unusable afterwards."""


class Interrupted(Exception):
    """`score()` stopped part-way because `ReferenceBackend.interrupt()` was called."""


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


def group_by_prompt(sequences: Sequence[np.ndarray], starts: Sequence[int]) -> list[list[int]]:
    """Indices of the sequences, grouped by prompt (same start, same tokens before it), in order of first
    appearance; a sequence that shares its prompt with no other is a group of one.

    Example::

        group_by_prompt([np.array([1, 2, 3, 4]), np.array([9, 9]), np.array([1, 2, 3, 5])], [3, 1, 3])
        # -> [[0, 2], [1]]
    """
    by_prompt: dict[bytes, list[int]] = {}
    for index, (tokens, start) in enumerate(zip(sequences, starts)):
        key = int(start).to_bytes(8, "little") + np.asarray(tokens[:start], dtype="<i8").tobytes()
        by_prompt.setdefault(key, []).append(index)
    return list(by_prompt.values())


def split_shared(
    groups: Sequence[Sequence[int]], starts: Sequence[int], min_prompt: int | None
) -> tuple[list[list[int]], list[int]]:
    """(shared, alone): the groups of `group_by_prompt` worth sharing (two or more sequences, a prompt of at
    least `min_prompt` tokens), and the indices of every other sequence. `min_prompt=None`: share nothing.

    Example::

        split_shared([[0, 2], [1], [3, 4]], starts=[3, 1, 3, 1, 1], min_prompt=2)  # -> ([[0, 2]], [1, 3, 4])
    """
    shared: list[list[int]] = []
    alone: list[int] = []
    for group in groups:
        if min_prompt is not None and len(group) > 1 and starts[group[0]] >= min_prompt:
            shared.append(list(group))
        else:
            alone.extend(group)
    return shared, alone


def probe_tokens(vocab_size: int) -> np.ndarray:
    """12 fixed, spread-out token ids for a backend's load-time self-checks."""
    return (np.arange(12, dtype=np.int64) * 7919 + 3) % vocab_size
