"""Request building and result assembly shared by `KLClient` and `AsyncKLClient` (no I/O here).

A batch is `prepare`d once (inputs of any accepted form to flat numpy arrays, checked), split
into `chunks` that fit the server's limits, turned into messages (`score_requests`,
`kl_requests`), and the responses are reassembled in order (`score_output`, `kl_output`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import grpc
import numpy as np

from klservice_client import kl
from klservice_client._arrays import is_torch
from klservice_client.errors import InvalidArgument, KLServiceError, retry_hint
from klservice_client.results import KLOutput, ScoreOutput
from klservice_client.wire import (
    diagnostics_from_proto, from_tensor, pb, request_bytes, response_bytes, spec_to_proto,
    to_tensor,
)



@dataclasses.dataclass
class Prepared:
    tokens: list[np.ndarray]
    prompt_lengths: np.ndarray
    scored_lengths: np.ndarray
    logprobs: np.ndarray | None
    old_logprobs: np.ndarray | None
    torch_like: Any  # a torch tensor among the inputs (outputs follow its device), or None
    top_k: int = 0  # teacher outputs asked for (Score)
    candidate_ids: np.ndarray | None = None  # int64 [num_scored, C]

    @property
    def candidates(self) -> int:
        return 0 if self.candidate_ids is None else int(self.candidate_ids.shape[1])


def with_teacher(prepared: Prepared, top_k: int, candidate_ids) -> Prepared:
    """`prepared` asking for teacher outputs: `top_k` top tokens per scored position, and the log-probs of
    `candidate_ids`: one row of C ids per scored token, flat [num_scored, C], a list of per-sequence
    [scored, C] arrays, or padded [batch, >= max scored, C]. Without either, `prepared` as it is."""
    if not top_k and candidate_ids is None:
        return prepared
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InvalidArgument(f"top_k: {top_k!r} must be a whole number >= 0")
    ids = None
    if candidate_ids is not None:
        scored = prepared.scored_lengths
        if isinstance(candidate_ids, (list, tuple)):
            parts = [_as_numpy(part) for part in candidate_ids]
            if len(parts) != len(scored):
                raise InvalidArgument(f"candidate_ids: {len(parts)} sequences given for a batch of {len(scored)}")
            for i, (part, n) in enumerate(zip(parts, scored)):
                if part.ndim != 2 or part.shape[0] != n:
                    raise InvalidArgument(f"candidate_ids: sequence {i} has shape {part.shape}, expected [{n}, C]")
            widths = {part.shape[1] for part in parts}
            if len(widths) > 1:
                raise InvalidArgument(f"candidate_ids: sequences give {sorted(widths)} ids per position; give one C")
            ids = np.concatenate(parts) if parts else np.zeros((0, 1), np.int64)
        else:
            ids = _as_numpy(candidate_ids)
            if ids.ndim == 3:
                if ids.shape[0] != len(scored) or ids.shape[1] < (scored.max() if scored.size else 0):
                    raise InvalidArgument(f"candidate_ids: padded shape {ids.shape} does not fit {len(scored)} sequences "
                                          f"of up to {scored.max()} scored tokens")
                ids = ids[np.arange(ids.shape[1])[None, :] < scored[:, None]]
            elif ids.ndim != 2 or ids.shape[0] != scored.sum():
                raise InvalidArgument(f"candidate_ids: shape {ids.shape}, expected [{int(scored.sum())}, C] (a row per "
                                      "scored token)")
        if ids.dtype.kind not in "iu":
            raise InvalidArgument(f"candidate_ids: dtype {ids.dtype}; expected integer token ids")
        ids = ids.astype(np.int64)
    return dataclasses.replace(prepared, top_k=int(top_k), candidate_ids=ids)


def _as_numpy(value) -> np.ndarray:
    if is_torch(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def prepare(sequences, prompt_lengths, logprobs=None, old_logprobs=None) -> Prepared:
    torch_like = next((v for v in (logprobs, sequences, old_logprobs) if is_torch(v)), None)
    if is_torch(sequences) or isinstance(sequences, np.ndarray):
        array = _as_numpy(sequences)
        if array.ndim != 2:
            raise InvalidArgument(f"sequences: an array must be 2-D [batch, length], got shape {array.shape}")
        tokens = list(array.astype(np.int64))
    else:
        tokens = [_as_numpy(s).astype(np.int64).reshape(-1) for s in sequences]
    if not tokens:
        raise InvalidArgument("sequences: empty batch")
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    if np.isscalar(prompt_lengths) or (isinstance(prompt_lengths, np.ndarray) and prompt_lengths.ndim == 0):
        prompts = np.full(len(tokens), int(prompt_lengths), dtype=np.int64)
    else:
        prompts = _as_numpy(prompt_lengths).astype(np.int64).reshape(-1)
        if prompts.shape[0] != len(tokens):
            raise InvalidArgument(f"prompt_lengths: {prompts.shape[0]} values for {len(tokens)} sequences")
    bad = np.flatnonzero((prompts < 1) | (prompts > lengths))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(f"prompt_lengths: sequence {i}: {prompts[i]} must be between 1 and its length {lengths[i]}")
    scored = lengths - prompts
    return Prepared(
        tokens=tokens,
        prompt_lengths=prompts,
        scored_lengths=scored,
        logprobs=_flat_logprobs(logprobs, scored, "logprobs"),
        old_logprobs=_flat_logprobs(old_logprobs, scored, "old_logprobs"),
        torch_like=torch_like,
    )


def _flat_logprobs(values, scored: np.ndarray, name: str) -> np.ndarray | None:
    """Accept flat [num_scored], a list of per-sequence arrays, or padded [batch, >= max scored]."""
    if values is None:
        return None
    if isinstance(values, (list, tuple)) and values and not np.isscalar(values[0]):
        parts = [_as_numpy(v).reshape(-1) for v in values]
        if len(parts) != len(scored):
            raise InvalidArgument(f"{name}: {len(parts)} sequences given for a batch of {len(scored)}")
        for i, (part, n) in enumerate(zip(parts, scored)):
            if part.shape[0] != n:
                raise InvalidArgument(f"{name}: sequence {i} has {part.shape[0]} values but {n} scored tokens")
        array = np.concatenate(parts) if parts else np.zeros(0)
    else:
        array = _as_numpy(values)
        if array.ndim == 2:
            if array.shape[0] != len(scored) or array.shape[1] < (scored.max() if scored.size else 0):
                raise InvalidArgument(
                    f"{name}: padded shape {array.shape} does not fit {len(scored)} sequences of up to {scored.max()} scored tokens"
                )
            array = array[np.arange(array.shape[1])[None, :] < scored[:, None]]
        elif array.ndim != 1 or array.shape[0] != scored.sum():
            raise InvalidArgument(f"{name}: shape {array.shape}, expected {int(scored.sum())} values (one per scored token)")
    if array.dtype != np.float64:
        array = array.astype(np.float32)
    return array


def chunks(prepared: Prepared, max_tokens: int, max_bytes: int) -> list[slice]:
    """Consecutive sequence ranges that fit the server's limits: at most `max_tokens` tokens, and a request and a
    response of at most `max_bytes` each (`wire.request_bytes` / `wire.response_bytes`, ComputeKL's being the
    larger). A single sequence over a limit goes alone, for the server to refuse with its reason."""
    arrays = int(prepared.logprobs is not None) + int(prepared.old_logprobs is not None)
    itemsize = prepared.logprobs.dtype.itemsize if prepared.logprobs is not None else 8

    def fits(sequences: int, tokens: int, scored: int) -> bool:
        return (
            tokens <= max_tokens
            and request_bytes(sequences, tokens, scored, logprob_arrays=arrays,
                              candidates=prepared.candidates) <= max_bytes
            # ComputeKL's response is Score's plus its KL arrays: the larger of the two
            and response_bytes(sequences, scored, kl=True, itemsize=itemsize, top_k=prepared.top_k,
                               candidates=prepared.candidates) <= max_bytes
        )

    ranges, start, tokens, scored = [], 0, 0, 0
    for i, (sequence, n_scored) in enumerate(zip(prepared.tokens, prepared.scored_lengths.tolist())):
        if i > start and not fits(i - start + 1, tokens + len(sequence), scored + n_scored):
            ranges.append(slice(start, i))
            start, tokens, scored = i, 0, 0
        tokens += len(sequence)
        scored += n_scored
    ranges.append(slice(start, len(prepared.tokens)))
    return ranges


def _batch_message(prepared: Prepared, part: slice) -> pb.SequenceBatch:
    tokens = prepared.tokens[part]
    return pb.SequenceBatch(
        token_ids=to_tensor(np.concatenate(tokens)),
        lengths=to_tensor(np.array([len(t) for t in tokens], dtype=np.int64)),
        prompt_lengths=to_tensor(prepared.prompt_lengths[part]),
    )


def _token_slice(prepared: Prepared, part: slice) -> slice:
    offsets = np.concatenate([[0], np.cumsum(prepared.scored_lengths)])
    return slice(int(offsets[part.start]), int(offsets[part.stop]))


def score_requests(prepared, parts, model, temperature, revision: str = "") -> list[pb.ScoreRequest]:
    requests = []
    for i, part in enumerate(parts):
        request = pb.ScoreRequest(request_id=f"part-{i}", model=model, batch=_batch_message(prepared, part),
                                  temperature=temperature, revision=revision)
        _ask_teacher(request, prepared, part)
        requests.append(request)
    return requests


def _ask_teacher(request: pb.ScoreRequest | pb.KLRequest, prepared: Prepared, part: slice) -> None:
    """The teacher outputs `prepared` asks for, on the request of its sequences `part`."""
    request.top_k = prepared.top_k
    if prepared.candidate_ids is not None:
        request.candidate_ids.CopyFrom(to_tensor(prepared.candidate_ids[_token_slice(prepared, part)]))


def kl_requests(prepared, parts, model, temperature, spec, id_prefix: str = "part-", revision: str = "") -> list[pb.KLRequest]:
    """One KLRequest per part, with request ids `id_prefix` + the part's number, pinned to `revision` if given."""
    spec_message = spec_to_proto(spec)
    requests = []
    for i, part in enumerate(parts):
        tokens = _token_slice(prepared, part)
        request = pb.KLRequest(
            request_id=f"{id_prefix}{i}",
            model=model,
            batch=_batch_message(prepared, part),
            temperature=temperature,
            logprobs=to_tensor(prepared.logprobs[tokens]),
            spec=spec_message,
            revision=revision,
        )
        if prepared.old_logprobs is not None:
            request.old_logprobs.CopyFrom(to_tensor(prepared.old_logprobs[tokens]))
        _ask_teacher(request, prepared, part)
        requests.append(request)
    return requests


def _to_output(values: np.ndarray, prepared: Prepared, as_torch: bool):
    if not as_torch and prepared.torch_like is None:
        return values
    import torch

    device = prepared.torch_like.device if prepared.torch_like is not None else "cpu"
    return torch.from_numpy(np.array(values)).to(device)


def _merge_diagnostics(parts: list[kl.KLDiagnostics]) -> kl.KLDiagnostics:
    """Combine per-request diagnostics exactly: token means weighted by tokens, sequence means by sequences."""
    if len(parts) == 1:
        return parts[0]
    tokens = sum(p.num_tokens for p in parts)
    sequences = sum(p.num_sequences for p in parts)

    def mean(name: str, weight: str, total: int) -> float:
        return sum(getattr(p, name) * getattr(p, weight) for p in parts) / total if total else 0.0

    fields = {
        "num_sequences": sequences,
        "num_tokens": tokens,
        "is_weight_max": max(p.is_weight_max for p in parts),
        "num_clamped": sum(p.num_clamped for p in parts),
    }
    for field in dataclasses.fields(kl.KLDiagnostics):
        if field.name not in fields:
            per_sequence = field.name.endswith("_per_sequence")
            fields[field.name] = mean(field.name, "num_sequences" if per_sequence else "num_tokens", sequences if per_sequence else tokens)
    return kl.KLDiagnostics(**fields)


def _teacher_outputs(responses: list[pb.ScoreResponse] | list[pb.KLResponse], prepared: Prepared,
                     as_torch: bool) -> dict[str, Any]:
    """The teacher outputs `prepared` asked for, gathered over the responses (None where not asked for)."""

    def gather(name: str, asked: bool, ndim: int):
        if not asked:
            return None
        values = np.concatenate([from_tensor(getattr(r, name), name, kinds="fi", ndim=ndim) for r in responses])
        return _to_output(values, prepared, as_torch)

    teacher = prepared.top_k > 0 or prepared.candidate_ids is not None
    return dict(
        top_ids=gather("top_ids", prepared.top_k > 0, 2),
        top_logprobs=gather("top_logprobs", prepared.top_k > 0, 2),
        candidate_logprobs=gather("candidate_logprobs", prepared.candidate_ids is not None, 2),
        rest_logmass=gather("rest_logmass", teacher, 1),
    )


def score_output(responses: list[pb.ScoreResponse], prepared: Prepared, as_torch: bool) -> ScoreOutput:
    ref = np.concatenate([from_tensor(r.ref_logprobs, "ref_logprobs") for r in responses])
    return ScoreOutput(
        ref_logprobs=_to_output(ref, prepared, as_torch),
        scored_lengths=prepared.scored_lengths,
        model=responses[0].model.name,
        revision=responses[0].model.revision,
        generation=responses[0].model.generation,
        **_teacher_outputs(responses, prepared, as_torch),
    )


def kl_output(responses: list[pb.KLResponse], prepared: Prepared, as_torch: bool) -> KLOutput:
    def gather(name: str):
        values = np.concatenate([from_tensor(getattr(r, name), name) for r in responses])
        return _to_output(values, prepared, as_torch)

    return KLOutput(
        ref_logprobs=gather("ref_logprobs"),
        k1=gather("k1"),
        k2=gather("k2"),
        k3=gather("k3"),
        coef=gather("coef"),
        coef_principled=gather("coef_principled"),
        scored_lengths=prepared.scored_lengths,
        diagnostics=_merge_diagnostics([diagnostics_from_proto(r.diagnostics) for r in responses]),
        spec=responses[0].spec,
        model=responses[0].model.name,
        revision=responses[0].model.revision,
        generation=responses[0].model.generation,
        **_teacher_outputs(responses, prepared, as_torch),
    )


def check_revisions(responses) -> None:
    revisions = {r.model.revision for r in responses}
    if len(revisions) > 1:
        raise KLServiceError(f"parts of one batch were answered by different model revisions: {sorted(revisions)}")


def backoff(attempt: int, initial: float, maximum: float, error: grpc.RpcError | None = None) -> float:
    """Exponential backoff with jitter, at least the server's retry-after-ms hint (capped at 30 s)."""
    delay = min(maximum, initial * 2**attempt) * (0.5 + random.random() / 2)
    hint = retry_hint(error) if error is not None else None
    return max(delay, min(hint or 0.0, 30.0))
