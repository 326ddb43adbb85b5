"""KLClient and AsyncKLClient: reference log-probs and KL coefficients from a klservice server.

Example::

    from klservice_client import KLClient

    with KLClient("localhost:50051", job_id="grpo-run-7") as client:
        out = client.compute_kl(
            sequences,                 # list of token-id sequences (prompt + response)
            prompt_lengths,            # int or one per sequence; the rest is scored
            logprobs=policy_logprobs,  # one per scored token: flat, per sequence, or padded
            spec="principled",
        )
        coef, mask = out.padded("coef")     # [batch, max_response] + mask

Batches larger than the server's per-request limits are split into several requests and
reassembled in order. Calls carry a deadline (``timeout``) and are retried with
exponential backoff on UNAVAILABLE and RESOURCE_EXHAUSTED only. Failures raise
subclasses of `klservice_client.errors.KLServiceError`. torch is imported only when an
input is a torch tensor or ``as_torch=True`` is asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import time
from typing import Any

import grpc
import numpy as np

from klservice_client import kl
from klservice_client._arrays import is_torch
from klservice_client.errors import InvalidArgument, KLServiceError, TokenizerMismatch, from_rpc_error
from klservice_client.wire import (
    ModelInfo, diagnostics_from_proto, from_tensor, model_info_from_proto, pb, pb_grpc, spec_to_proto, to_tensor,
)

__all__ = ["AsyncKLClient", "KLClient", "KLOutput", "ModelInfo", "ScoreOutput", "tokenizer_fingerprint"]

JOB_METADATA_KEY = "x-job-id"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
#: Bytes a scored token costs on the wire in the largest message (ComputeKL response: 7 float arrays).
_BYTES_PER_TOKEN = 8 + 7 * 8


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of a tokenizer's vocabulary and special tokens.

    Works on any object with ``get_vocab()`` (Hugging Face tokenizers); the server computes
    the same for its model, so `KLClient.check_tokenizer` can tell whether a trainer's token
    ids mean the same thing to the reference model.
    """
    vocab = sorted((str(token), int(index)) for token, index in tokenizer.get_vocab().items())
    special = sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", []) or [])
    payload = json.dumps({"vocab": vocab, "special": special}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------
# Results


class _Ragged:
    """Flat per-token arrays over scored tokens plus `scored_lengths`, viewable ragged or padded."""

    scored_lengths: np.ndarray

    def ragged(self, name: str) -> list:
        """The array `name` split per sequence."""
        values = getattr(self, name)
        offsets = np.cumsum(np.asarray(self.scored_lengths))[:-1].tolist()
        if is_torch(values):
            return list(values.tensor_split(offsets))
        return np.split(values, offsets)

    def padded(self, name: str, pad_value: float = 0.0):
        """(values [num_sequences, max_scored], mask) with right padding; torch if the array is torch."""
        values = getattr(self, name)
        lengths = np.asarray(self.scored_lengths)
        width = int(lengths.max()) if lengths.size else 0
        mask = np.arange(width)[None, :] < lengths[:, None]
        if is_torch(values):
            import torch

            mask_t = torch.as_tensor(mask, device=values.device)
            out = torch.full(mask.shape, pad_value, dtype=values.dtype, device=values.device)
            out[mask_t] = values
            return out, mask_t
        out = np.full(mask.shape, pad_value, dtype=values.dtype)
        out[mask] = values
        return out, mask


@dataclasses.dataclass(frozen=True)
class ScoreOutput(_Ragged):
    """Reference log-probs of the scored tokens (flat; `ragged()` / `padded()` to reshape)."""

    ref_logprobs: Any
    scored_lengths: np.ndarray
    model: str
    revision: str


@dataclasses.dataclass(frozen=True)
class KLOutput(_Ragged):
    """ComputeKL results: per-token arrays (flat over scored tokens) and batch diagnostics."""

    ref_logprobs: Any
    k1: Any
    k2: Any
    k3: Any
    coef: Any
    coef_principled: Any
    scored_lengths: np.ndarray
    diagnostics: kl.KLDiagnostics
    spec: str
    model: str
    revision: str


# ---------------------------------------------------------------------------------------
# Request building (shared by both clients)


@dataclasses.dataclass
class _Prepared:
    tokens: list[np.ndarray]
    prompt_lengths: np.ndarray
    scored_lengths: np.ndarray
    logprobs: np.ndarray | None
    old_logprobs: np.ndarray | None
    torch_like: Any  # a torch tensor among the inputs (outputs follow its device), or None


def _as_numpy(value) -> np.ndarray:
    if is_torch(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _prepare(sequences, prompt_lengths, logprobs=None, old_logprobs=None) -> _Prepared:
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
    return _Prepared(
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


def _chunks(prepared: _Prepared, max_tokens: int, max_bytes: int) -> list[slice]:
    """Consecutive sequence ranges whose tokens fit the request limits (a too-long single sequence goes alone)."""
    token_budget = max(1, min(max_tokens, max_bytes // _BYTES_PER_TOKEN))
    ranges, start, used = [], 0, 0
    for i, tokens in enumerate(prepared.tokens):
        if i > start and used + len(tokens) > token_budget:
            ranges.append(slice(start, i))
            start, used = i, 0
        used += len(tokens)
    ranges.append(slice(start, len(prepared.tokens)))
    return ranges


def _batch_message(prepared: _Prepared, part: slice) -> pb.SequenceBatch:
    tokens = prepared.tokens[part]
    return pb.SequenceBatch(
        token_ids=to_tensor(np.concatenate(tokens)),
        lengths=to_tensor(np.array([len(t) for t in tokens], dtype=np.int64)),
        prompt_lengths=to_tensor(prepared.prompt_lengths[part]),
    )


def _token_slice(prepared: _Prepared, part: slice) -> slice:
    offsets = np.concatenate([[0], np.cumsum(prepared.scored_lengths)])
    return slice(int(offsets[part.start]), int(offsets[part.stop]))


def _score_requests(prepared, parts, model, temperature) -> list[pb.ScoreRequest]:
    return [
        pb.ScoreRequest(request_id=f"part-{i}", model=model, batch=_batch_message(prepared, part), temperature=temperature)
        for i, part in enumerate(parts)
    ]


def _kl_requests(prepared, parts, model, temperature, spec) -> list[pb.KLRequest]:
    spec_message = spec_to_proto(spec)
    requests = []
    for i, part in enumerate(parts):
        tokens = _token_slice(prepared, part)
        request = pb.KLRequest(
            request_id=f"part-{i}",
            model=model,
            batch=_batch_message(prepared, part),
            temperature=temperature,
            logprobs=to_tensor(prepared.logprobs[tokens]),
            spec=spec_message,
        )
        if prepared.old_logprobs is not None:
            request.old_logprobs.CopyFrom(to_tensor(prepared.old_logprobs[tokens]))
        requests.append(request)
    return requests


def _to_output(values: np.ndarray, prepared: _Prepared, as_torch: bool):
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


def _score_output(responses: list[pb.ScoreResponse], prepared: _Prepared, as_torch: bool) -> ScoreOutput:
    ref = np.concatenate([from_tensor(r.ref_logprobs, "ref_logprobs") for r in responses])
    return ScoreOutput(
        ref_logprobs=_to_output(ref, prepared, as_torch),
        scored_lengths=prepared.scored_lengths,
        model=responses[0].model.name,
        revision=responses[0].model.revision,
    )


def _kl_output(responses: list[pb.KLResponse], prepared: _Prepared, as_torch: bool) -> KLOutput:
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
    )


def _check_revisions(responses) -> None:
    revisions = {r.model.revision for r in responses}
    if len(revisions) > 1:
        raise KLServiceError(f"parts of one batch were answered by different model revisions: {sorted(revisions)}")


def _backoff(attempt: int, initial: float, maximum: float, error: grpc.RpcError | None = None) -> float:
    """Exponential backoff with jitter, at least the server's retry-after-ms hint (capped at 30 s)."""
    delay = min(maximum, initial * 2**attempt) * (0.5 + random.random() / 2)
    try:
        metadata = dict(error.trailing_metadata() or ()) if error is not None else {}
        hint = float(metadata.get(RETRY_AFTER_METADATA_KEY, 0)) / 1000.0
    except (TypeError, ValueError, AttributeError):
        hint = 0.0
    return max(delay, min(hint, 30.0))


@dataclasses.dataclass(frozen=True)
class _Options:
    job_id: str | None
    timeout: float
    max_retries: int
    initial_backoff: float
    max_backoff: float
    max_message_bytes: int

    def metadata(self):
        return ((JOB_METADATA_KEY, self.job_id),) if self.job_id else ()


def _channel_options(max_message_bytes: int, load_balancing: str | None):
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if load_balancing:
        options.append(("grpc.lb_policy_name", load_balancing))
    return options


# ---------------------------------------------------------------------------------------
# Clients


class _ClientBase:
    """Channel, stub and call options shared by KLClient and AsyncKLClient (``_channel_api``: grpc or grpc.aio)."""

    _channel_api: Any = grpc

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        job_id: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        load_balancing: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self._options = _Options(job_id, timeout, max_retries, initial_backoff, max_backoff, max_message_bytes)
        options = _channel_options(max_message_bytes, load_balancing)
        api = self._channel_api
        self._channel = (
            api.secure_channel(target, credentials, options=options)
            if credentials is not None
            else api.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.ReferenceServiceStub(self._channel)
        self._info: ModelInfo | None = None


class KLClient(_ClientBase):
    """Blocking client. Thread-safe; one per process is enough.

    Args:
        target: ``host:port``, or any gRPC target (``dns:///klservice.ns.svc:50051`` with
            ``load_balancing="round_robin"`` to spread work over replicas).
        job_id: sent as ``x-job-id`` metadata: the server's fairness and metric label.
        timeout: deadline of each call in seconds.
        max_retries: retries on UNAVAILABLE / RESOURCE_EXHAUSTED, with exponential backoff.
    """

    _channel_api = grpc

    def __enter__(self) -> "KLClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        options = self._options
        for attempt in range(options.max_retries + 1):
            try:
                return method(request, timeout=options.timeout, metadata=options.metadata())
            except grpc.RpcError as error:
                if error.code() in RETRYABLE and attempt < options.max_retries:
                    time.sleep(_backoff(attempt, options.initial_backoff, options.max_backoff, error))
                    continue
                raise from_rpc_error(error) from error

    def wait_ready(self, timeout: float = 120.0) -> ModelInfo:
        """Block until the server answers GetModelInfo (the model is loaded); returns the model info."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
                )
                self._info = model_info_from_proto(reply)
                return self._info
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(error) from error
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout} s")
            time.sleep(0.2)

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model (cached after the first call)."""
        if self._info is None or refresh:
            self._info = model_info_from_proto(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        return self._info

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenizerMismatch unless `tokenizer` has the server model's vocabulary and special tokens."""
        expected = self.model_info().tokenizer_fingerprint
        actual = tokenizer_fingerprint(tokenizer)
        if actual != expected:
            raise TokenizerMismatch(
                f"tokenizer fingerprint {actual[:16]}… differs from the server model's {expected[:16]}…: "
                "token ids would mean different tokens to the reference model"
            )

    def _parts(self, prepared: _Prepared) -> list[slice]:
        info = self.model_info()
        return _chunks(prepared, info.max_request_tokens, min(info.max_message_bytes, self._options.max_message_bytes))

    def score(
        self, sequences, prompt_lengths, *, temperature: float = 1.0, model: str = "", as_torch: bool = False
    ) -> ScoreOutput:
        """Reference log-probs of every token after its sequence's prompt."""
        prepared = _prepare(sequences, prompt_lengths)
        requests = _score_requests(prepared, self._parts(prepared), model, temperature)
        responses = [self._call(self._stub.Score, r) for r in requests]
        _check_revisions(responses)
        return _score_output(responses, prepared, as_torch)

    def compute_kl(
        self,
        sequences,
        prompt_lengths,
        *,
        logprobs,
        old_logprobs=None,
        spec: kl.KLSpec | str | None = None,
        temperature: float = 1.0,
        model: str = "",
        as_torch: bool = False,
    ) -> KLOutput:
        """Reference log-probs, k1/k2/k3, the gradient coefficient of `spec` and diagnostics.

        ``logprobs`` (and ``old_logprobs``) hold one value per scored token: flat, a list of
        per-sequence arrays, or padded [batch, >= max scored]. ``spec`` is a preset name from
        `klservice_client.kl.PRESETS` or a `KLSpec` (default: ``principled``).
        """
        prepared = _prepare(sequences, prompt_lengths, logprobs, old_logprobs)
        if prepared.logprobs is None:
            raise InvalidArgument("logprobs: required")
        requests = _kl_requests(prepared, self._parts(prepared), model, temperature, spec)
        responses = [self._call(self._stub.ComputeKL, r) for r in requests]
        _check_revisions(responses)
        return _kl_output(responses, prepared, as_torch)


class AsyncKLClient(_ClientBase):
    """asyncio client with the same methods as `KLClient` (awaitable); parts of a split batch run concurrently."""

    _channel_api = grpc.aio

    async def __aenter__(self) -> "AsyncKLClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        options = self._options
        for attempt in range(options.max_retries + 1):
            try:
                return await method(request, timeout=options.timeout, metadata=options.metadata())
            except grpc.RpcError as error:
                if error.code() in RETRYABLE and attempt < options.max_retries:
                    await asyncio.sleep(_backoff(attempt, options.initial_backoff, options.max_backoff, error))
                    continue
                raise from_rpc_error(error) from error

    async def wait_ready(self, timeout: float = 120.0) -> ModelInfo:
        """Wait until the server answers GetModelInfo (the model is loaded); returns the model info."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
                )
                self._info = model_info_from_proto(reply)
                return self._info
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(error) from error
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout} s")
            await asyncio.sleep(0.2)

    async def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model (cached after the first call)."""
        if self._info is None or refresh:
            self._info = model_info_from_proto(await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        return self._info

    async def check_tokenizer(self, tokenizer) -> None:
        expected = (await self.model_info()).tokenizer_fingerprint
        if tokenizer_fingerprint(tokenizer) != expected:
            raise TokenizerMismatch("tokenizer fingerprint differs from the server model's")

    async def _parts(self, prepared: _Prepared) -> list[slice]:
        info = await self.model_info()
        return _chunks(prepared, info.max_request_tokens, min(info.max_message_bytes, self._options.max_message_bytes))

    async def score(
        self, sequences, prompt_lengths, *, temperature: float = 1.0, model: str = "", as_torch: bool = False
    ) -> ScoreOutput:
        prepared = _prepare(sequences, prompt_lengths)
        requests = _score_requests(prepared, await self._parts(prepared), model, temperature)
        responses = await asyncio.gather(*(self._call(self._stub.Score, r) for r in requests))
        _check_revisions(responses)
        return _score_output(list(responses), prepared, as_torch)

    async def compute_kl(
        self,
        sequences,
        prompt_lengths,
        *,
        logprobs,
        old_logprobs=None,
        spec: kl.KLSpec | str | None = None,
        temperature: float = 1.0,
        model: str = "",
        as_torch: bool = False,
    ) -> KLOutput:
        prepared = _prepare(sequences, prompt_lengths, logprobs, old_logprobs)
        requests = _kl_requests(prepared, await self._parts(prepared), model, temperature, spec)
        responses = await asyncio.gather(*(self._call(self._stub.ComputeKL, r) for r in requests))
        _check_revisions(responses)
        return _kl_output(list(responses), prepared, as_torch)
