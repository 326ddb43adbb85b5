"""Request validation: protobuf messages in, checked domain requests out, or an error naming field and sequence.

One pass per request (`parse_score_request`, `parse_kl_request`) checks everything a client
can get wrong, each check in one place, before any model time is spent (the model name was
resolved to one loaded revision before, `klservice.models`): the revision it expects,
tensor dtypes and shapes, lengths, prompt lengths, token ids against the vocabulary,
sequence lengths against the context, the per-request token limit, the size of the
response, temperature, the KL spec, and the policy and behaviour log-probs (count, range,
dtype, presence when the spec needs them). Errors are `InvalidInput` / `OutOfRange` /
`FailedPrecondition` (another revision expected) / `TooLarge` (and the KL library's `KLInputError` for a bad spec), which
`klservice.errors` maps to status codes.

The accepted ranges keep the values the service computes finite: temperature in
[`MIN_TEMPERATURE`, `MAX_TEMPERATURE`] (logits / T neither overflows nor loses the
distribution; compared in float32, the wire's type), log-probs in [`MIN_LOGPROB`,
`MAX_LOGPROB`] (a log-prob is <= 0; the tolerance above 0 absorbs the rounding of a float32
or float16 log-softmax, and k2 = δ²/2 of two log-probs in range is finite in float32). An
importance weight times a large log-ratio can still overflow float32; the service refuses
that result naming the token (`klservice.service`) rather than answer inf.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from klservice.backends.base import MAX_CANDIDATES, MAX_TOP_K
from klservice.errors import FailedPrecondition, InvalidInput, OutOfRange, TooLarge
from klservice_client import kl
from klservice_client.errors import REVISION_MISMATCH_PREFIX
from klservice_client.wire import TensorError, from_tensor, pb, response_bytes, spec_from_proto

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MIN_LOGPROB = -1e4
MAX_LOGPROB = 0.01
MAX_REQUEST_ID_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class Batch:
    """A validated flat batch: all token ids, per-sequence lengths and prompt lengths (int64)."""

    token_ids: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray

    @property
    def scored_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths

    @property
    def num_scored(self) -> int:
        return int(self.scored_lengths.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def sequences(self) -> list[np.ndarray]:
        """Each sequence's token ids (views into token_ids)."""
        return np.split(self.token_ids, np.cumsum(self.lengths)[:-1])


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one loaded revision of a model and the server configuration accept."""

    model_name: str
    vocab_size: int
    max_length: int
    max_request_tokens: int
    max_message_bytes: int = 256 * 1024 * 1024
    revision: str = ""
    generation: int = 1


class _AsksTeacher:
    """What a request's `top_k` and `candidate_ids` fields (Score and ComputeKL alike) say."""

    top_k: int
    """Top tokens asked for at each scored position (0: none)."""
    candidate_ids: np.ndarray | None
    """int64 [num_scored, C] candidate ids, or None."""

    @property
    def teacher(self) -> bool:
        """Whether teacher outputs are asked for."""
        return self.top_k > 0 or self.candidate_ids is not None


@dataclasses.dataclass(frozen=True)
class ScoreRequest(_AsksTeacher):
    """A validated Score request."""

    batch: Batch
    temperature: float
    request_id: str = ""
    top_k: int = 0
    candidate_ids: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class KLRequest(_AsksTeacher):
    """A validated ComputeKL request: the old log-probs are present exactly when given or needed."""

    batch: Batch
    temperature: float
    logprobs: np.ndarray
    old_logprobs: np.ndarray | None
    spec: kl.KLSpec
    #: The preset's name, or "custom" for an explicit spec (a bounded metric label).
    spec_label: str = "custom"
    request_id: str = ""
    top_k: int = 0
    candidate_ids: np.ndarray | None = None


def parse_score_request(message: pb.ScoreRequest, limits: Limits) -> ScoreRequest:
    """Check a Score request in one pass."""
    check_request_id(message.request_id)
    check_revision(message.revision, limits)
    batch = parse_batch(message.batch, limits)
    top_k, candidates = parse_teacher(message, batch, limits)
    check_response_size(batch, limits, kl=False, top_k=top_k, candidates=0 if candidates is None else candidates.shape[1])
    return ScoreRequest(batch=batch, temperature=parse_temperature(message.temperature), request_id=message.request_id,
                        top_k=top_k, candidate_ids=candidates)


def parse_teacher(message: pb.ScoreRequest | pb.KLRequest, batch: Batch, limits: Limits
                  ) -> tuple[int, np.ndarray | None]:
    """A request's `top_k` and candidate ids (`parse_candidate_ids`); InvalidInput naming the field."""
    top_k = int(message.top_k)
    limit = min(MAX_TOP_K, limits.vocab_size)
    if top_k > limit:
        whose = " (the model's vocabulary size)" if limit < MAX_TOP_K else ""
        raise InvalidInput(f"top_k: {top_k} is over the limit of {limit} tokens per position{whose}")
    return top_k, parse_candidate_ids(message, batch, limits)


def parse_candidate_ids(message: pb.ScoreRequest | pb.KLRequest, batch: Batch, limits: Limits) -> np.ndarray | None:
    """The request's candidate ids as int64 [num_scored, C], or None; InvalidInput naming the field (and the
    sequence and scored token of an id outside the vocabulary)."""
    if not message.HasField("candidate_ids"):
        return None
    try:
        ids = from_tensor(message.candidate_ids, "candidate_ids", kinds="i", ndim=2)
    except TensorError as error:
        raise InvalidInput(f"{error} ([num_scored_tokens, C])") from None
    if ids.shape[0] != batch.num_scored:
        raise InvalidInput(f"candidate_ids: has {ids.shape[0]} rows but the batch has {batch.num_scored} scored tokens")
    if not 1 <= ids.shape[1] <= MAX_CANDIDATES:
        raise InvalidInput(f"candidate_ids: {ids.shape[1]} ids per position; expected 1 to {MAX_CANDIDATES}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= limits.vocab_size)
    if bad.any():
        row, column = divmod(int(np.argmax(bad)), ids.shape[1])
        sequence, token = locate(batch.scored_lengths, row)
        raise InvalidInput(
            f"candidate_ids: id {ids[row, column]} at sequence {sequence}, scored token {token} is outside the "
            f"vocabulary [0, {limits.vocab_size})"
        )
    return ids


def parse_kl_request(message: pb.KLRequest, limits: Limits) -> KLRequest:
    """Check a ComputeKL request in one pass."""
    check_request_id(message.request_id)
    check_revision(message.revision, limits)
    batch = parse_batch(message.batch, limits)
    temperature = parse_temperature(message.temperature)
    spec = spec_from_proto(message.spec)
    logprobs = parse_logprobs(message, "logprobs", batch, required=True)
    top_k, candidates = parse_teacher(message, batch, limits)
    check_response_size(batch, limits, kl=True, itemsize=logprobs.dtype.itemsize,  # the outputs' dtype is theirs
                        top_k=top_k, candidates=0 if candidates is None else candidates.shape[1])
    old = parse_logprobs(message, "old_logprobs", batch, required=False)
    if spec.needs_old_logprobs and old is None:
        raise InvalidInput(
            f"old_logprobs: missing; importance_sampling={spec.importance_sampling.value} needs the behaviour policy's log-probs"
        )
    if old is not None and old.dtype != logprobs.dtype:
        raise InvalidInput(f"old_logprobs: dtype {old.dtype} differs from logprobs' {logprobs.dtype}")
    return KLRequest(
        batch=batch,
        temperature=temperature,
        logprobs=logprobs,
        old_logprobs=old,
        spec=spec,
        spec_label=message.spec.preset or "custom",
        request_id=message.request_id,
        top_k=top_k,
        candidate_ids=candidates,
    )


def _tensor(message, field: str, *, kinds: str, required: bool = True) -> np.ndarray | None:
    if not message.HasField(field.rsplit(".", 1)[-1]):
        if required:
            raise InvalidInput(f"{field}: missing")
        return None
    try:
        return from_tensor(getattr(message, field.rsplit(".", 1)[-1]), field, kinds=kinds)
    except TensorError as error:
        raise InvalidInput(str(error)) from None


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidInput(f"request_id: {len(request_id)} characters, at most {MAX_REQUEST_ID_LENGTH} are accepted")


REVISION_PATTERN = re.compile(r"[0-9a-f]{12,64}")
"""A revision a request may pin: a model revision (sha256, lower-case hex) or a prefix of 12 digits or more."""


def check_revision(expected: str, limits: Limits) -> None:
    """Empty: any revision. Otherwise the revision the caller pinned (the full hash, or a prefix of at least 12
    hex digits) must be the one serving the model: FailedPrecondition naming both otherwise."""
    if not expected:
        return
    if not REVISION_PATTERN.fullmatch(expected):
        raise InvalidInput(
            f"revision: {expected[:80]!r}: expected 12 to 64 lower-case hex digits (a revision, or its first 12 or more)"
        )
    if not limits.revision.startswith(expected):
        raise FailedPrecondition(
            f"{REVISION_MISMATCH_PREFIX}the request expects revision {expected[:12]} but model {limits.model_name!r} "
            f"is at revision {limits.revision[:12]} (generation {limits.generation}); send it again pinned to the "
            "new revision, or unpinned"
        )


def parse_temperature(value: float) -> float:
    if value == 0.0:
        return 1.0
    low, high = float(np.float32(MIN_TEMPERATURE)), float(np.float32(MAX_TEMPERATURE))  # the wire's float32
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(
            f"temperature: must be a finite number > 0 within [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
            f"(0 means 1.0), got {value:g}"
        )
    return float(value)


def check_response_size(batch: Batch, limits: Limits, *, kl: bool, itemsize: int = 8, top_k: int = 0,
                        candidates: int = 0) -> None:
    """Refuse up front a request whose answer would exceed the message limit (rather than after its forward),
    sized as it will be sent: ComputeKL's per-token outputs in the log-probs' dtype (`itemsize` bytes), the
    teacher outputs (`top_k`, `candidates` per position)."""
    sizes = dict(kl=kl, itemsize=itemsize, top_k=top_k, candidates=candidates)
    size = response_bytes(len(batch.lengths), batch.num_scored, **sizes)
    if size > limits.max_message_bytes:
        per_token = response_bytes(1, 1, **sizes) - response_bytes(1, 0, **sizes)
        fitting = max(1, (limits.max_message_bytes - response_bytes(0, 0, kl=kl)) // per_token)
        raise TooLarge(
            f"batch: the response to {batch.num_scored} scored tokens would take up to {size} bytes, over this "
            f"server's message limit of {limits.max_message_bytes} bytes (--max-message-mb); send at most "
            f"~{fitting} scored tokens per request (KLClient splits batches to fit by itself)"
        )


def parse_batch(message: pb.SequenceBatch, limits: Limits, field: str = "batch") -> Batch:
    token_ids = _tensor(message, f"{field}.token_ids", kinds="i")
    lengths = _tensor(message, f"{field}.lengths", kinds="i")
    prompt_lengths = _tensor(message, f"{field}.prompt_lengths", kinds="i")
    if lengths.shape[0] == 0:
        raise InvalidInput(f"{field}: empty batch (lengths has no sequences)")
    if prompt_lengths.shape != lengths.shape:
        raise InvalidInput(
            f"{field}.prompt_lengths: has {prompt_lengths.shape[0]} entries but lengths has {lengths.shape[0]} sequences"
        )
    lengths = lengths.astype(np.int64)
    prompt_lengths = prompt_lengths.astype(np.int64)
    _first_bad(lengths < 1, f"{field}.lengths", lambda i: f"length {lengths[i]} must be >= 1")
    total = int(lengths.sum())
    if total != token_ids.shape[0]:
        raise InvalidInput(
            f"{field}.lengths: sum to {total} tokens but {field}.token_ids has {token_ids.shape[0]}"
        )
    if total > limits.max_request_tokens:
        raise InvalidInput(
            f"{field}.token_ids: {total} tokens exceeds this server's limit of {limits.max_request_tokens} per request "
            "(split the batch; KLClient does this automatically)"
        )
    _first_bad(
        lengths > limits.max_length,
        f"{field}.lengths",
        lambda i: f"length {lengths[i]} exceeds the model's maximum of {limits.max_length} tokens",
        error=OutOfRange,
    )
    _first_bad(
        (prompt_lengths < 1) | (prompt_lengths > lengths),
        f"{field}.prompt_lengths",
        lambda i: f"prompt length {prompt_lengths[i]} must be between 1 and the sequence length {lengths[i]}",
    )
    token_ids = token_ids.astype(np.int64)
    bad_tokens = (token_ids < 0) | (token_ids >= limits.vocab_size)
    if bad_tokens.any():
        index = int(np.argmax(bad_tokens))
        sequence, position = locate(lengths, index)
        raise InvalidInput(
            f"{field}.token_ids: token id {token_ids[index]} at sequence {sequence}, position {position} "
            f"is outside the vocabulary [0, {limits.vocab_size})"
        )
    return Batch(token_ids=token_ids, lengths=lengths, prompt_lengths=prompt_lengths)


def parse_logprobs(message, field: str, batch: Batch, *, required: bool) -> np.ndarray | None:
    """Per-scored-token log-probs (float32 or float64): one per scored token, each in [MIN_LOGPROB, MAX_LOGPROB]."""
    values = _tensor(message, field, kinds="f", required=required)
    if values is None:
        return None
    if values.shape[0] != batch.num_scored:
        raise InvalidInput(
            f"{field}: has {values.shape[0]} values but the batch has {batch.num_scored} scored tokens "
            "(sum over sequences of length - prompt_length)"
        )
    bad = ~np.isfinite(values)
    if bad.any():
        index = int(np.argmax(bad))
        sequence, position = locate(batch.scored_lengths, index)
        raise InvalidInput(f"{field}: non-finite value {values[index]} at sequence {sequence}, scored token {position}")
    bad = (values < MIN_LOGPROB) | (values > MAX_LOGPROB)
    if bad.any():
        index = int(np.argmax(bad))
        sequence, position = locate(batch.scored_lengths, index)
        raise InvalidInput(
            f"{field}: value {values[index]:g} at sequence {sequence}, scored token {position} is not a log-prob: "
            f"expected a value in [{MIN_LOGPROB:g}, {MAX_LOGPROB:g}] (<= 0, with {MAX_LOGPROB:g} for rounding)"
        )
    return values


def locate(lengths: np.ndarray, flat_index: int) -> tuple[int, int]:
    """(sequence, position within it) of a flat index."""
    ends = np.cumsum(lengths)
    sequence = int(np.searchsorted(ends, flat_index, side="right"))
    return sequence, flat_index - (int(ends[sequence - 1]) if sequence else 0)


def _first_bad(mask: np.ndarray, field: str, describe, error=InvalidInput) -> None:
    if mask.any():
        index = int(np.argmax(mask))
        raise error(f"{field}: sequence {index}: {describe(index)}")
