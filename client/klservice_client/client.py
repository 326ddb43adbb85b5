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
exponential backoff on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server sends a
retry hint (overload; without one it is a size limit: `TooLarge`). Failures raise
subclasses of `klservice_client.errors.KLServiceError`. torch is imported only when an
input is a torch tensor or ``as_torch=True`` is asked for.

Both clients are thin shells over `_ClientCore`, which holds everything but the waiting
(request building, retry decisions, readiness polling, the tokenizer check, StreamKL
bookkeeping): `KLClient` blocks where `AsyncKLClient` awaits (and runs the parts of a split
batch concurrently).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import grpc

from klservice_client import kl
from klservice_client._requests import (
    Prepared, backoff, check_revisions, chunks, kl_output, kl_requests, prepare, score_output, score_requests,
    with_teacher,
)
from klservice_client.credentials import PEM, bearer_metadata, channel_credentials, open_channel, resolve_token
from klservice_client.errors import (
    DeadlineExceeded, InvalidArgument, KLServiceError, RevisionMismatch, ServerError, TokenizerMismatch, from_rpc_error, from_status,
    is_overload,
)
from klservice_client.results import KLItem, KLOutput, KLStreamResult, ScoreOutput
from klservice_client.wire import JOB_METADATA_KEY, ModelInfo, model_info_from_proto, pb, pb_grpc

__all__ = ["AsyncKLClient", "KLClient", "KLItem", "KLOutput", "KLStreamResult", "ModelInfo", "ScoreOutput", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

#: While waiting for a server to become ready, these mean "not yet" rather than failure.
NOT_READY_YET = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
READY_POLL_SECONDS = 0.2
#: For dns: targets, the shortest interval between two resolutions of the name.
DNS_MIN_RESOLUTION_INTERVAL_MS = 1000


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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The requests of one client call, the stub method they go to, and how their responses become the result.

    `pinned`: every request carries the revision the caller pinned. Otherwise the parts after the first are
    pinned to the revision that answered the first, so that one batch is never scored by two references.
    """

    rpc: str
    requests: list
    finish: Any  # Callable[[list[response]], result]
    model: str = ""
    pinned: bool = False


class _StreamAssembly:
    """StreamKL bookkeeping: items become requests (split to fit the server's limits, ids "<item>.<part>"),
    answers become one `KLStreamResult` per item once all its parts are in (or at its first failed part; the
    answers to its other parts are then dropped as they come).

    Thread-safe: the blocking client feeds items from gRPC's request thread and reads answers in the caller's.
    """

    def __init__(self, parts_of, resolve):
        self._parts_of = parts_of  # Prepared -> list[slice]
        self._resolve = resolve  # KLItem -> (model name, revision to pin or "")
        self._lock = threading.Lock()
        self._items: dict[int, _StreamItem] = {}
        self._answered = 0

    def requests(self, number: int, item: KLItem) -> list[pb.KLRequest] | KLStreamResult:
        """The requests of item `number`, or its result when it fails before anything is sent."""
        key = number if getattr(item, "key", None) is None else item.key
        try:
            if not isinstance(item, KLItem):
                raise InvalidArgument(f"stream item {number}: expected a KLItem, got {type(item).__name__}")
            prepared = _prepare_kl(item.sequences, item.prompt_lengths, item.logprobs, item.old_logprobs,
                                   item.top_k, item.candidate_ids)
            parts = self._parts_of(prepared)
            model, revision = self._resolve(item)
            requests = kl_requests(prepared, parts, model, item.temperature, item.spec, id_prefix=f"{number}.",
                                   revision=revision)
        except KLServiceError as error:
            return KLStreamResult(key=key, error=error)
        except (ValueError, TypeError) as error:  # e.g. an unknown preset, token ids that are not numbers
            return KLStreamResult(key=key, error=InvalidArgument(f"stream item {number}: {error}"))
        with self._lock:
            self._items[number] = _StreamItem(key, prepared, item.as_torch, requests)
        return requests

    def feed(self, items, put, start: int = 0) -> Iterator[pb.KLRequest]:
        """The requests of `items` (numbered from `start`) in order; an item's local failure, or the iterator's
        own exception, goes to `put` (the caller's event queue) instead."""
        try:
            for number, item in enumerate(items, start):
                prepared = self.requests(number, item)
                if isinstance(prepared, KLStreamResult):
                    put(prepared)
                else:
                    yield from prepared
        except Exception as error:  # noqa: BLE001 - the caller's iterator failed: re-raised in the caller
            put(_Raise(error))

    def answer(self, message: pb.StreamKLResponse) -> KLStreamResult | None:
        """The item result an answer completes, if any.

        An UNAVAILABLE error item (the server is draining) leaves its part unanswered: it is sent
        again when the stream is reopened, on the replica the channel then picks.
        """
        failed = message.WhichOneof("result") == "error"
        if failed and message.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and message.request_id:
            return None
        if failed and not message.request_id:  # a request the server could not identify: not one of ours
            error = message.error
            raise from_status(error.code, f"StreamKL item without an id: {error.message}", error.retry_after_ms)
        number, _, part = message.request_id.partition(".")
        with self._lock:
            entry = self._items.get(int(number)) if number.isdigit() and part.isdigit() else None
            if entry is None:
                raise ServerError(f"StreamKL answered a request id this client did not send: {message.request_id!r}")
            entry.answers[int(part)] = None if failed else message.response
            self._answered += 1
            finished = len(entry.answers) == entry.parts
            if finished:
                del self._items[int(number)]
            if entry.reported:
                return None
            if failed:
                entry.reported = True
                error = from_status(message.error.code, message.error.message, message.error.retry_after_ms)
                return KLStreamResult(key=entry.key, error=error)
            if not finished:
                return None
        responses = [entry.answers[k] for k in range(entry.parts)]
        try:
            check_revisions(responses)
            return KLStreamResult(key=entry.key, output=kl_output(responses, entry.prepared, entry.as_torch))
        except KLServiceError as error:
            return KLStreamResult(key=entry.key, error=error)

    def unanswered(self) -> list[pb.KLRequest]:
        """After a stream closed: the requests sent but not answered, to send again on the next stream.

        An item already reported as failed is dropped instead (its other answers would be dropped anyway).
        """
        resend = []
        with self._lock:
            for number in sorted(self._items):
                entry = self._items[number]
                if entry.reported:
                    del self._items[number]
                else:
                    resend += [request for part, request in enumerate(entry.requests) if part not in entry.answers]
        return resend

    @property
    def answered(self) -> int:
        """Answers received so far (a stream that closes after some made progress)."""
        return self._answered

    @property
    def pending(self) -> int:
        """Items sent and not yet fully answered."""
        with self._lock:
            return len(self._items)

    def check_all_answered(self) -> None:
        """At the end of the stream: every item sent has had its answer."""
        with self._lock:
            missing = len(self._items)
        if missing:
            raise ServerError(f"StreamKL ended with {missing} item(s) unanswered")


@dataclasses.dataclass
class _StreamItem:
    key: Any
    prepared: Prepared
    as_torch: bool
    requests: list[pb.KLRequest]  # its parts, in order (kept to resend those a closed stream left unanswered)
    answers: dict[int, pb.KLResponse | None] = dataclasses.field(default_factory=dict)  # None: that part failed
    reported: bool = False  # its result has been returned (it failed before all its parts were in)

    @property
    def parts(self) -> int:
        return len(self.requests)


class _Outbox:
    """The requests of one stream_kl call, handed to one StreamKL stream after another.

    The caller's items are read by a feeder of their own (a thread, or a task) that `put`s their
    requests here; each stream takes them with its attempt number. `reopen` ends the current
    attempt: a request its stream took but never had answered is queued again, first.
    Thread-safe (the blocking client's streams take from gRPC's sending thread).
    """

    def __init__(self, wake=None):
        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._ended = False  # the caller's items are all in
        self._attempt = 0
        self._wake = wake  # called after each change (the asyncio client sets an event)

    def put(self, request) -> None:
        with self._lock:
            self._queue.append(request)
            self._lock.notify_all()
        if self._wake:
            self._wake()

    def end(self) -> None:
        with self._lock:
            self._ended = True
            self._lock.notify_all()
        if self._wake:
            self._wake()

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def drained(self) -> bool:
        """Every item has been read and every request taken."""
        with self._lock:
            return self._ended and not self._queue

    def take_nowait(self, attempt: int):
        """The next request for stream `attempt`; None when that stream is to send no more; _WAIT when none yet."""
        with self._lock:
            if attempt != self._attempt:
                return None
            if self._queue:
                return self._queue.popleft()
            return None if self._ended else _WAIT

    def take(self, attempt: int):
        """`take_nowait`, waiting (blocking) while there is nothing yet."""
        with self._lock:
            while (request := self.take_nowait(attempt)) is _WAIT:
                self._lock.wait()
            return request

    def reopen(self, unanswered: list) -> int:
        """End the current attempt; `unanswered` (the assembly's) go first on the next. Returns its number."""
        with self._lock:
            queued = {id(request) for request in self._queue}
            self._queue.extendleft(reversed([request for request in unanswered if id(request) not in queued]))
            self._attempt += 1
            self._lock.notify_all()
        if self._wake:
            self._wake()
        return self._attempt


_WAIT = object()  # _Outbox.take_nowait: nothing to take yet


def _prepare_kl(sequences, prompt_lengths, logprobs, old_logprobs, top_k: int = 0, candidate_ids=None) -> Prepared:
    prepared = prepare(sequences, prompt_lengths, logprobs, old_logprobs)
    if prepared.logprobs is None:
        raise InvalidArgument("logprobs: required")
    return with_teacher(prepared, top_k, candidate_ids)


_END = object()  # end of a StreamKL answer stream


def _status_lost_to_a_late_write(error: grpc.RpcError) -> bool:
    """True for grpc.aio's local INTERNAL that replaces the server's status when a request is written just as
    the server ends the stream (grpc/grpc#36066): the write fails in Core, and `set_internal_error` overwrites
    the status the server had already sent (OK at its connection age, or its own error). The real status is
    unknown, so the stream is reopened: what had no answer is sent again, and a server error shows itself
    on the new stream.
    """
    if error.code() != grpc.StatusCode.INTERNAL or error.details() != "Internal error from Core":
        return False
    debug = getattr(error, "debug_error_string", None)
    return callable(debug) and "execute_batch" in (debug() or "")


@dataclasses.dataclass(frozen=True)
class _Options:
    job_id: str | None
    timeout: float
    max_retries: int
    initial_backoff: float
    max_backoff: float
    max_message_bytes: int
    token: str | None = dataclasses.field(default=None, repr=False)  # a credential: never in a repr or a log

    def metadata(self):
        job = ((JOB_METADATA_KEY, self.job_id),) if self.job_id else ()
        return job + bearer_metadata(self.token)


class _ClientCore:
    """What KLClient and AsyncKLClient share: channel, stub, options and every decision that is not I/O.

    ``_channel_api`` is grpc or grpc.aio.
    """

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
        token: str | None = None,
        tls: bool = False,
        root_certificates: PEM | None = None,
        client_cert: tuple[PEM, PEM] | None = None,
        tls_server_name: str | None = None,
        model: str = "",
        pin_revision: bool = False,
    ):
        token = resolve_token(token)
        self._model = model
        self._pin_revision = pin_revision
        self._pins: dict[str, str] = {}  # model name as the calls give it ("" = the default) -> pinned revision
        self._infos: dict[str, ModelInfo] = {}
        self._options = _Options(job_id, timeout, max_retries, initial_backoff, max_backoff, max_message_bytes, token)
        tls_credentials = channel_credentials(tls=tls, root_certificates=root_certificates, client_cert=client_cert)
        if credentials is not None and tls_credentials is not None:
            raise ValueError("pass either credentials= or tls=/root_certificates=/client_cert=, not both")
        credentials = credentials if credentials is not None else tls_credentials
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if target.startswith("dns:"):
            if load_balancing is None:
                load_balancing = "round_robin"  # every address the name resolves to (a headless Service's pods)
            # Re-resolve as soon as a connection closes (gRPC's default waits 30 s between resolutions), so an
            # added replica is found within the server's connection age.
            options.append(("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS))
        if load_balancing:
            options.append(("grpc.lb_policy_name", load_balancing))
        self._channel = open_channel(
            target, credentials, tls_server_name=tls_server_name, options=options, api=self._channel_api
        )
        self._stub = pb_grpc.ReferenceServiceStub(self._channel)
        self._operator = pb_grpc.OperatorServiceStub(self._channel)

    # --- decisions both clients share ---------------------------------------------------

    def _retry_delay(self, attempt: int, error: grpc.RpcError) -> float:
        """Seconds to wait before retrying a failed call; raises its typed exception when it is not retried.

        Retried: UNAVAILABLE, and RESOURCE_EXHAUSTED when the server says it is overloaded (its retry
        hint); RESOURCE_EXHAUSTED without one is a size limit, raised at once as `TooLarge`.
        """
        options = self._options
        retryable = error.code() == grpc.StatusCode.UNAVAILABLE or is_overload(error)
        if retryable and attempt < options.max_retries:
            return backoff(attempt, options.initial_backoff, options.max_backoff, error)
        raise from_rpc_error(error) from error

    def _stream_closed(self, event, assembly: _StreamAssembly, outbox: _Outbox, progress: tuple[int, int],
                       deadline: float) -> tuple[float, tuple[int, int]] | None:
        """A StreamKL stream ended (`event`: _END, or its grpc.RpcError): None when the call is complete;
        else (seconds to wait, the new progress mark) before reopening it, resending what had no answer.

        A stream is reopened when it ended at the server's connection age (OK, work left), became
        UNAVAILABLE (connection closed, replica gone) or lost the server's status to a request written
        as the stream ended (`_status_lost_to_a_late_write`); `max_retries` bounds reopenings in a row
        without an answer between them. Any other failure is raised.
        """
        if event is _END and outbox.drained and not assembly.pending:
            return None
        failures = 0 if assembly.answered > progress[0] else progress[1] + 1
        if isinstance(event, grpc.RpcError):
            reopenable = event.code() == grpc.StatusCode.UNAVAILABLE or _status_lost_to_a_late_write(event)
            if not reopenable or failures > self._options.max_retries:
                raise from_rpc_error(event) from event
            delay = backoff(failures, self._options.initial_backoff, self._options.max_backoff, event)
        elif failures > self._options.max_retries:
            raise ServerError(f"StreamKL ended {failures} times in a row without answering; "
                              f"{assembly.pending} item(s) unanswered")
        else:
            delay = 0.0
        if time.monotonic() + delay >= deadline:
            raise DeadlineExceeded(f"StreamKL: the stream's timeout passed with {assembly.pending} item(s) unanswered")
        resend = assembly.unanswered()
        outbox.reopen(resend)
        log.debug("StreamKL reopened after %s: %d request(s) sent again, %d item(s) unanswered",
                  "its end" if event is _END else event.code().name, len(resend), assembly.pending)
        return delay, (assembly.answered, failures)

    @staticmethod
    def _ready_timeout(deadline: float) -> float:
        """Deadline of one GetModelInfo attempt while waiting for readiness."""
        return max(0.1, min(5.0, deadline - time.monotonic()))

    def _not_ready_yet(self, error: grpc.RpcError, deadline: float, timeout: float) -> None:
        """Return if the server may still become ready; raise otherwise."""
        if error.code() not in NOT_READY_YET:
            raise from_rpc_error(error) from error
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {timeout} s")

    def _remember(self, model: str, reply: pb.ModelInfo) -> ModelInfo:
        info = self._infos[model] = model_info_from_proto(reply)
        return info

    @property
    def job_id(self) -> str | None:
        """The job id this client's calls carry (``x-job-id``), if any."""
        return self._options.job_id

    # --- models and revisions -----------------------------------------------------------------

    def _name(self, model: str | None) -> str:
        """The model a call means: its `model=`, else the client's, else "" (the server's default)."""
        return self._model if model is None else model

    def pin(self, revision: str, model: str | None = None) -> None:
        """Pin `model` (default: the client's) to `revision`: its calls carry it, and the server refuses them
        (`RevisionMismatch`) once the model serves another revision, e.g. after a LoadModel."""
        self._pins[self._name(model)] = revision

    def unpin(self, model: str | None = None) -> None:
        """Forget the pin of `model`; with ``pin_revision=True`` the next answer pins it again."""
        self._pins.pop(self._name(model), None)

    def pinned_revision(self, model: str | None = None) -> str | None:
        """The revision `model`'s calls are pinned to, if any."""
        return self._pins.get(self._name(model))

    def _revision(self, model: str, revision: str | None) -> str:
        return revision if revision is not None else self._pins.get(model, "")

    def _answered(self, plan: _Plan, responses) -> None:
        """With ``pin_revision=True``, pin a model to the revision that first answered for it."""
        if self._pin_revision and responses and plan.model not in self._pins:
            self._pins[plan.model] = responses[0].model.revision

    @staticmethod
    def _pin_rest(plan: _Plan, first) -> list:
        """The requests after the first, pinned to the revision that answered it (unless the caller pinned)."""
        rest = plan.requests[1:]
        if not plan.pinned and 12 <= len(first.model.revision) <= 64:  # a revision a request may be pinned to
            for request in rest:
                request.revision = first.model.revision
        return rest

    def _retry_batch(self, plan: _Plan, attempt: int, error: RevisionMismatch) -> None:
        """A swap fell between the parts of an unpinned batch: send it again whole (raise if pinned, or too often)."""
        if plan.pinned or attempt >= self._options.max_retries:
            raise error

    @staticmethod
    def _check_fingerprint(info: ModelInfo, tokenizer) -> None:
        expected, actual = info.tokenizer_fingerprint, tokenizer_fingerprint(tokenizer)
        if actual != expected:
            raise TokenizerMismatch(
                f"tokenizer fingerprint {actual[:16]}… differs from the server model's {expected[:16]}…: "
                "token ids would mean different tokens to the reference model"
            )

    def _parts(self, info: ModelInfo, prepared: Prepared) -> list[slice]:
        return chunks(prepared, info.max_request_tokens, min(info.max_message_bytes, self._options.max_message_bytes))

    def _score_plan(self, info: ModelInfo, sequences, prompt_lengths, temperature, model, revision, as_torch,
                    top_k: int = 0, candidate_ids=None) -> _Plan:
        prepared = with_teacher(prepare(sequences, prompt_lengths), top_k, candidate_ids)
        revision = self._revision(model, revision)
        requests = score_requests(prepared, self._parts(info, prepared), model, temperature, revision)
        finish = lambda responses: _finish(score_output, responses, prepared, as_torch)  # noqa: E731
        return _Plan("Score", requests, finish, model, bool(revision))

    def _kl_plan(self, info: ModelInfo, sequences, prompt_lengths, logprobs, old_logprobs, spec, temperature, model,
                 revision, as_torch, top_k: int = 0, candidate_ids=None) -> _Plan:
        prepared = _prepare_kl(sequences, prompt_lengths, logprobs, old_logprobs, top_k, candidate_ids)
        revision = self._revision(model, revision)
        requests = kl_requests(prepared, self._parts(info, prepared), model, temperature, spec, revision=revision)
        finish = lambda responses: _finish(kl_output, responses, prepared, as_torch)  # noqa: E731
        return _Plan("ComputeKL", requests, finish, model, bool(revision))

    def _stream_assembly(self, info: ModelInfo) -> _StreamAssembly:
        def resolve(item: KLItem) -> tuple[str, str]:
            model = self._name(item.model)
            return model, self._revision(model, item.revision)

        return _StreamAssembly(lambda prepared: self._parts(info, prepared), resolve)

    @staticmethod
    def _load_request(name, path, backend, dtype, device, max_length, force, mixup_alpha) -> pb.LoadModelRequest:
        request = pb.LoadModelRequest(name=name, path=str(path), backend=backend, dtype=dtype, device=device,
                                      max_length=max_length, force=force)
        if mixup_alpha is not None:
            request.mixup_alpha = float(mixup_alpha)
        return request

    def _stream_timeout(self, timeout: float | None) -> float:
        return self._options.timeout if timeout is None else timeout


def _finish(assemble, responses, prepared: Prepared, as_torch: bool):
    responses = list(responses)
    check_revisions(responses)
    return assemble(responses, prepared, as_torch)


class KLClient(_ClientCore):
    """Blocking client. Thread-safe; one per process is enough.

    Args:
        target: ``host:port``, or any gRPC target. A ``dns:`` target (on Kubernetes the headless
            Service, ``dns:///klservice-headless.NAMESPACE.svc:50051``) is balanced round-robin over
            every address the name resolves to, re-resolved whenever a connection closes (the
            server's ``--max-connection-age-seconds``), unless ``load_balancing`` says otherwise.
        job_id: sent as ``x-job-id`` metadata: the server's fairness and metric label (with authentication,
            a job within the token's tenant).
        token: bearer token for a server with ``--auth-file`` (default: the KLSERVICE_TOKEN environment
            variable); sent as ``authorization: Bearer <token>``, never logged.
        tls: connect over TLS, trusting the system's CA roots (a server with ``--tls-cert``).
        root_certificates: the CA bundle (PEM bytes or a path) the server's certificate must chain to;
            implies TLS.
        client_cert: (certificate, private key), PEM bytes or paths, for a server with ``--tls-client-ca``
            (mutual TLS); implies TLS.
        tls_server_name: the name to check the server's certificate against, when it differs from the
            target's host (e.g. connecting to an IP address).
        credentials: ready-made ``grpc.ChannelCredentials`` instead of the three above.
        model: the served model this client's calls use when they name none (default "": the server's
            default model); every method also takes ``model=``.
        pin_revision: pin each model to the revision that first answers for it: later calls carry it, and
            once the server serves another revision (a LoadModel swapped it) they fail with
            `RevisionMismatch` instead of silently mixing two references. `pin` / `unpin` move the pin
            (e.g. to the revision a LoadModel returned). Without pinning, the parts of one split batch are
            still pinned to the revision that answered its first part (a swap in between resends the batch).
        timeout: deadline of each call in seconds.
        max_retries: retries on UNAVAILABLE and overload (RESOURCE_EXHAUSTED with a retry hint), with
            exponential backoff.
    """

    _channel_api = grpc

    def __enter__(self) -> "KLClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: str, request, stub=None, *, retry: bool = True, timeout: float | None = None):
        method = getattr(stub or self._stub, rpc)
        for attempt in itertools.count():
            try:
                return method(request, timeout=timeout or self._options.timeout, metadata=self._options.metadata())
            except grpc.RpcError as error:
                if not retry:
                    raise from_rpc_error(error) from error
                time.sleep(self._retry_delay(attempt, error))

    def _run(self, plan: _Plan):
        for attempt in itertools.count():
            first = self._call(plan.rpc, plan.requests[0])
            try:
                responses = [first] + [self._call(plan.rpc, request) for request in self._pin_rest(plan, first)]
            except RevisionMismatch as error:
                self._retry_batch(plan, attempt, error)
                continue
            self._answered(plan, responses)
            return plan.finish(responses)

    def wait_ready(self, timeout: float = 120.0, model: str | None = None) -> ModelInfo:
        """Block until the server answers GetModelInfo (its models are loaded); returns `model`'s info (default:
        the client's model)."""
        name = self._name(model)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(model=name), timeout=self._ready_timeout(deadline),
                    metadata=self._options.metadata(),
                )
                return self._remember(name, reply)
            except grpc.RpcError as error:
                self._not_ready_yet(error, deadline, timeout)
            time.sleep(READY_POLL_SECONDS)

    def model_info(self, refresh: bool = False, model: str | None = None) -> ModelInfo:
        """A served model (default: the client's model, else the server's default; cached after the first call)."""
        name = self._name(model)
        if name not in self._infos or refresh:
            self._remember(name, self._call("GetModelInfo", pb.GetModelInfoRequest(model=name)))
        return self._infos[name]

    def list_models(self) -> list[ModelInfo]:
        """Every model the server serves, the default first."""
        return [model_info_from_proto(info) for info in self._call("ListModels", pb.ListModelsRequest()).models]

    def reload_auth(self) -> list[str]:
        """Operator RPC (admin tenants only): make the server re-read its auth file; returns its tenants."""
        return list(self._call("ReloadAuth", pb.ReloadAuthRequest(), self._operator).tenants)

    def load_model(
        self, name: str, path: str, *, backend: str = "", dtype: str = "", device: str = "", max_length: int = 0,
        force: bool = False, mixup_alpha: float | None = None, timeout: float | None = None,
    ) -> ModelInfo:
        """Operator RPC (admin only): load the checkpoint folder `path` (on the server's file system) under `name`.

        A new name is added; an existing one moves to the new revision once it is loaded and checked, and
        requests admitted before finish on the old one. ``mixup_alpha``: serve (1 - alpha) * current + alpha *
        new weights; the server reads the current weights again from the folder they were loaded from, so that
        folder must stay as it was until then (a changed one is refused). Another tokenizer is refused unless
        ``force``. Not retried (a mixing load must not run twice); `FailedPrecondition` says why a load failed,
        and the name then serves what it served. `timeout` (default: the client's) bounds the whole load: give
        large checkpoints more (when it passes, the server gives the load up; so it does past its own
        ``--load-timeout-seconds``). Returns the new revision's info (its ``generation`` is one more than before).
        """
        request = self._load_request(name, path, backend, dtype, device, max_length, force, mixup_alpha)
        info = model_info_from_proto(self._call("LoadModel", request, self._operator, retry=False, timeout=timeout))
        self._infos.clear()  # the name may be one this client has cached, or the default
        return info

    def unload_model(self, name: str) -> list[str]:
        """Operator RPC (admin only): stop serving `name` (not the default model); returns the names left."""
        reply = self._call("UnloadModel", pb.UnloadModelRequest(name=name), self._operator, retry=False)
        self._infos.pop(name, None)
        return list(reply.models)

    def check_tokenizer(self, tokenizer, model: str | None = None) -> None:
        """Raise TokenizerMismatch unless `tokenizer` has the model's vocabulary and special tokens."""
        self._check_fingerprint(self.model_info(model=model), tokenizer)

    def score(
        self, sequences, prompt_lengths, *, temperature: float = 1.0, model: str | None = None,
        revision: str | None = None, as_torch: bool = False, top_k: int = 0, candidate_ids=None,
    ) -> ScoreOutput:
        """Reference log-probs of every token after its sequence's prompt.

        `model`: a served model's name (default: the client's model, else the server's default); `revision`:
        the revision it must be at (default: the client's pin for that model, if any), else `RevisionMismatch`.

        Teacher outputs (distillation), exact over the whole vocabulary at `temperature`: `top_k` (at most 256)
        asks for the most likely tokens at each scored position (`ScoreOutput.top_ids`, `.top_logprobs`);
        `candidate_ids`, C token ids per scored position (flat [num_scored, C], per-sequence [scored, C] arrays,
        or padded [batch, >= max scored, C]; for example the student's own top tokens), for their log-probs
        (`.candidate_logprobs`). With either comes `.rest_logmass`, the log of the mass outside them.
        """
        name = self._name(model)
        plan = self._score_plan(self.model_info(model=name), sequences, prompt_lengths, temperature, name, revision,
                                as_torch, top_k, candidate_ids)
        return self._run(plan)

    def compute_kl(
        self,
        sequences,
        prompt_lengths,
        *,
        logprobs,
        old_logprobs=None,
        spec: kl.KLSpec | str | None = None,
        temperature: float = 1.0,
        model: str | None = None,
        revision: str | None = None,
        as_torch: bool = False,
        top_k: int = 0,
        candidate_ids=None,
    ) -> KLOutput:
        """Reference log-probs, k1/k2/k3, the gradient coefficient of `spec` and diagnostics.

        ``logprobs`` (and ``old_logprobs``) hold one value per scored token: flat, a list of
        per-sequence arrays, or padded [batch, >= max scored]. ``spec`` is a preset name from
        `klservice_client.kl.PRESETS` or a `KLSpec` (default: ``principled``). `model` and
        `revision` as in `score`; `top_k` and `candidate_ids` ask for teacher outputs with the KL
        values, as in `score` (a KL penalty and a distillation term from one forward).
        """
        name = self._name(model)
        plan = self._kl_plan(
            self.model_info(model=name), sequences, prompt_lengths, logprobs, old_logprobs, spec, temperature, name,
            revision, as_torch, top_k, candidate_ids,
        )
        return self._run(plan)

    def stream_kl(self, items: Iterable[KLItem], *, timeout: float | None = None) -> Iterator[KLStreamResult]:
        """ComputeKL for each `KLItem` of `items` over one StreamKL stream; results in completion order.

        Items are sent as `items` yields them (it is read from gRPC's sending thread, so it may
        block, e.g. on a queue that rollout workers fill), so a trainer can have micro-batches
        scored while it still generates the next ones. Each result carries its item's `key`;
        an item that fails (bad input, ...) gives a result whose `error` is the typed
        exception and the stream goes on. Items larger than one request are split and
        reassembled like `compute_kl`'s. `timeout` (default: the client's) bounds the whole
        call. A stream that the server ends at its connection age, or that becomes
        UNAVAILABLE (connection closed, replica gone), is reopened (for a headless-Service
        target, possibly on another replica) and the requests it left unanswered are sent
        again, so no item is lost; `max_retries` bounds reopenings in a row without an
        answer. Any other failure of the stream itself is raised: results already yielded stand.
        """
        assembly = self._stream_assembly(self.model_info())
        events: queue.Queue = queue.Queue()
        outbox = _Outbox()
        stop = threading.Event()  # the caller left: the feeder reads no more items

        def feed():
            for request in assembly.feed(items, events.put):
                if stop.is_set():
                    return
                outbox.put(request)
            outbox.end()

        def requests(attempt: int):
            while (request := outbox.take(attempt)) is not None:
                yield request

        def read(call):
            try:
                for message in call:
                    events.put(message)
                events.put(_END)
            except grpc.RpcError as error:
                events.put(error)

        threading.Thread(target=feed, name="klservice-stream-kl-items", daemon=True).start()
        deadline = time.monotonic() + self._stream_timeout(timeout)
        progress, call = (0, 0), None
        try:
            while True:
                call = self._stub.StreamKL(requests(outbox.attempt), timeout=max(0.001, deadline - time.monotonic()),
                                           metadata=self._options.metadata())
                threading.Thread(target=read, args=(call,), name="klservice-stream-kl", daemon=True).start()
                while not ((event := events.get()) is _END or isinstance(event, grpc.RpcError)):
                    result = _stream_event(assembly, event)
                    if result is not None:
                        yield result
                closed = self._stream_closed(event, assembly, outbox, progress, deadline)
                if closed is None:
                    break
                delay, progress = closed
                time.sleep(delay)
            assembly.check_all_answered()
        finally:
            stop.set()
            outbox.reopen([])  # a stream still open sends no more
            if call is not None:
                call.cancel()


class AsyncKLClient(_ClientCore):
    """asyncio client with the same methods as `KLClient` (awaitable); parts of a split batch run concurrently."""

    _channel_api = grpc.aio

    async def __aenter__(self) -> "AsyncKLClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, rpc: str, request, stub=None, *, retry: bool = True, timeout: float | None = None):
        method = getattr(stub or self._stub, rpc)
        for attempt in itertools.count():
            try:
                return await method(request, timeout=timeout or self._options.timeout, metadata=self._options.metadata())
            except grpc.RpcError as error:
                if not retry:
                    raise from_rpc_error(error) from error
                await asyncio.sleep(self._retry_delay(attempt, error))

    async def _run(self, plan: _Plan):
        for attempt in itertools.count():  # the first part alone, then the rest at once, pinned to its revision
            first = await self._call(plan.rpc, plan.requests[0])
            try:
                rest = await asyncio.gather(*(self._call(plan.rpc, request) for request in self._pin_rest(plan, first)))
            except RevisionMismatch as error:
                self._retry_batch(plan, attempt, error)
                continue
            responses = [first, *rest]
            self._answered(plan, responses)
            return plan.finish(responses)

    async def wait_ready(self, timeout: float = 120.0, model: str | None = None) -> ModelInfo:
        """Wait until the server answers GetModelInfo (its models are loaded); returns `model`'s info."""
        name = self._name(model)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(model=name), timeout=self._ready_timeout(deadline),
                    metadata=self._options.metadata(),
                )
                return self._remember(name, reply)
            except grpc.RpcError as error:
                self._not_ready_yet(error, deadline, timeout)
            await asyncio.sleep(READY_POLL_SECONDS)

    async def model_info(self, refresh: bool = False, model: str | None = None) -> ModelInfo:
        """A served model (`KLClient.model_info`)."""
        name = self._name(model)
        if name not in self._infos or refresh:
            self._remember(name, await self._call("GetModelInfo", pb.GetModelInfoRequest(model=name)))
        return self._infos[name]

    async def list_models(self) -> list[ModelInfo]:
        """Every model the server serves, the default first."""
        reply = await self._call("ListModels", pb.ListModelsRequest())
        return [model_info_from_proto(info) for info in reply.models]

    async def reload_auth(self) -> list[str]:
        """Operator RPC (admin tenants only): make the server re-read its auth file; returns its tenants."""
        return list((await self._call("ReloadAuth", pb.ReloadAuthRequest(), self._operator)).tenants)

    async def load_model(
        self, name: str, path: str, *, backend: str = "", dtype: str = "", device: str = "", max_length: int = 0,
        force: bool = False, mixup_alpha: float | None = None, timeout: float | None = None,
    ) -> ModelInfo:
        """Operator RPC (admin only): `KLClient.load_model`."""
        request = self._load_request(name, path, backend, dtype, device, max_length, force, mixup_alpha)
        reply = await self._call("LoadModel", request, self._operator, retry=False, timeout=timeout)
        self._infos.clear()
        return model_info_from_proto(reply)

    async def unload_model(self, name: str) -> list[str]:
        """Operator RPC (admin only): `KLClient.unload_model`."""
        reply = await self._call("UnloadModel", pb.UnloadModelRequest(name=name), self._operator, retry=False)
        self._infos.pop(name, None)
        return list(reply.models)

    async def check_tokenizer(self, tokenizer, model: str | None = None) -> None:
        """Raise TokenizerMismatch unless `tokenizer` has the model's vocabulary and special tokens."""
        self._check_fingerprint(await self.model_info(model=model), tokenizer)

    async def score(
        self, sequences, prompt_lengths, *, temperature: float = 1.0, model: str | None = None,
        revision: str | None = None, as_torch: bool = False, top_k: int = 0, candidate_ids=None,
    ) -> ScoreOutput:
        """Reference log-probs of every token after its sequence's prompt, and teacher outputs (`KLClient.score`)."""
        name = self._name(model)
        info = await self.model_info(model=name)
        return await self._run(self._score_plan(info, sequences, prompt_lengths, temperature, name, revision, as_torch,
                                                top_k, candidate_ids))

    async def compute_kl(
        self,
        sequences,
        prompt_lengths,
        *,
        logprobs,
        old_logprobs=None,
        spec: kl.KLSpec | str | None = None,
        temperature: float = 1.0,
        model: str | None = None,
        revision: str | None = None,
        as_torch: bool = False,
        top_k: int = 0,
        candidate_ids=None,
    ) -> KLOutput:
        """Reference log-probs, k1/k2/k3, the coefficient of `spec`, diagnostics and the teacher outputs asked for
        (`KLClient.compute_kl`)."""
        name = self._name(model)
        info = await self.model_info(model=name)
        plan = self._kl_plan(info, sequences, prompt_lengths, logprobs, old_logprobs, spec, temperature, name, revision,
                             as_torch, top_k, candidate_ids)
        return await self._run(plan)

    async def stream_kl(
        self, items: Iterable[KLItem] | AsyncIterable[KLItem], *, timeout: float | None = None
    ) -> AsyncIterator[KLStreamResult]:
        """`KLClient.stream_kl` for asyncio. `items` may be an async iterable (for items that arrive over time)
        or a plain iterable, which is read on the event loop and so must not block."""
        assembly = self._stream_assembly(await self.model_info())
        events: asyncio.Queue = asyncio.Queue()
        wake = asyncio.Event()
        outbox = _Outbox(wake=wake.set)

        async def feed():  # each item through the same feeder as the blocking client's
            number = 0
            try:
                async for item in _aiter(items):
                    for request in assembly.feed([item], events.put_nowait, start=number):
                        outbox.put(request)
                    number += 1
            except Exception as error:  # noqa: BLE001 - the caller's iterator failed: re-raised to the caller
                events.put_nowait(_Raise(error))
            outbox.end()

        async def requests(attempt: int):
            while (request := outbox.take_nowait(attempt)) is not None:
                if request is _WAIT:
                    wake.clear()
                    if (request := outbox.take_nowait(attempt)) is _WAIT:
                        await wake.wait()
                        continue
                    if request is None:
                        return
                yield request

        async def read(call):
            try:
                async for message in call:
                    events.put_nowait(message)
                events.put_nowait(_END)
            except grpc.RpcError as error:
                events.put_nowait(error)

        feeder = asyncio.ensure_future(feed())
        deadline = time.monotonic() + self._stream_timeout(timeout)
        progress, call, reader = (0, 0), None, None
        try:
            while True:
                call = self._stub.StreamKL(requests(outbox.attempt), timeout=max(0.001, deadline - time.monotonic()),
                                           metadata=self._options.metadata())
                reader = asyncio.ensure_future(read(call))
                while not ((event := await events.get()) is _END or isinstance(event, grpc.RpcError)):
                    result = _stream_event(assembly, event)
                    if result is not None:
                        yield result
                closed = self._stream_closed(event, assembly, outbox, progress, deadline)
                if closed is None:
                    break
                delay, progress = closed
                await asyncio.sleep(delay)
            assembly.check_all_answered()
        finally:
            feeder.cancel()
            outbox.reopen([])
            if call is not None:
                call.cancel()
            if reader is not None:
                reader.cancel()


@dataclasses.dataclass(frozen=True)
class _Raise:
    """The caller's item iterator raised `error` (in the sending thread or task)."""

    error: BaseException


def _stream_event(assembly: _StreamAssembly, event) -> KLStreamResult | None:
    """One event of a stream (an answer, a local item failure, a stream failure) as a result, or raise."""
    if isinstance(event, KLStreamResult):
        return event
    if isinstance(event, _Raise):
        raise event.error
    if isinstance(event, grpc.RpcError):
        raise from_rpc_error(event) from event
    return assembly.answer(event)


async def _aiter(items):
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
