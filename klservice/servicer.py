"""The gRPC servicer: protobuf in, domain objects to `ReferenceService`, protobuf out; nothing else.

Validation is `klservice.validation` (one pass per request), the service logic is
`klservice.service`, and status codes come from `klservice.errors.status_for` — the only
place exceptions become codes. `add_to_server` registers the servicer with deserializers
that turn an undecodable message into INVALID_ARGUMENT (gRPC's own would answer UNKNOWN,
and on StreamKL end the whole stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from google.protobuf.message import DecodeError

from klservice.errors import DEADLINE_SLACK_S, InvalidInput, TooLarge, Unauthenticated, logged_status
from klservice.auth import Tenant
from klservice.models import LoadRequest
from klservice.service import Job, KLComputation, ReferenceService, ScoreResult
from klservice.validation import parse_kl_request, parse_score_request
from klservice_client.wire import (
    JOB_METADATA_KEY, RETRY_AFTER_METADATA_KEY, diagnostics_to_proto, model_info_to_proto, pb, pb_grpc, to_tensor,
)

log = logging.getLogger(__name__)



class Undecodable:
    """Stands in for a request message that did not parse, so that its error gets a status of ours."""

    request_id = ""

    def __init__(self, message_type: str, error: DecodeError):
        self.message_type = message_type
        self.error = error

    def refuse(self):
        raise InvalidInput(f"request: not a valid {self.message_type} message ({self.error})")


def _decoded(request):
    if isinstance(request, Undecodable):
        request.refuse()
    return request


def _tolerant_parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Undecodable(message_class.DESCRIPTOR.full_name, error)

    return parse


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer, server, service_name: str = "ReferenceService") -> None:
    """Register every method of the klservice.v1 service `service_name` (like the generated
    ``add_<Service>Servicer_to_server``, with `_tolerant_parser` as the request deserializer)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {
        method.name: _HANDLER_KINDS[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=_tolerant_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class _Servicer:
    """What both servicers share: the unary call wrapper (deadline, status mapping, retry hint, size backstop,
    request metrics). `_caller` says who calls: a Job for ReferenceService, an admin Tenant for OperatorService."""

    def __init__(self, service: ReferenceService):
        self._service = service

    def _caller(self, context, method: str):
        raise NotImplementedError

    @staticmethod
    def _deadline(context) -> float | None:
        """The call's deadline as a time.monotonic() value (None without one)."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        metrics = self._service.metrics
        metrics.requests.labels(method, code.name).inc()
        metrics.latency.labels(method).observe(time.perf_counter() - started)

    def _check_size(self, response) -> None:
        """The backstop behind validation's up-front estimate: never hand gRPC a message it would refuse to send."""
        limit = self._service.config.max_message_bytes
        size = response.ByteSize()
        if size > limit:
            raise TooLarge(
                f"response: {size} bytes, over this server's message limit of {limit} bytes (--max-message-mb); "
                "split the batch"
            )

    async def _unary(self, method: str, context, handler, request):
        started, code = time.perf_counter(), grpc.StatusCode.OK
        deadline = self._deadline(context)
        try:
            response = await handler(_decoded(request), self._caller(context, method), deadline)
            self._check_size(response)
            return response
        except asyncio.CancelledError:
            code = _cancelled_status(deadline)
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status in one place
            code, message = logged_status(error)
            retry_after = _retry_after_ms(error)
            if retry_after is not None:
                context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(retry_after)),))
        finally:
            self._record(method, code, started)
        await context.abort(code, message)


class ReferenceServicer(_Servicer, pb_grpc.ReferenceServiceServicer):
    # --- RPCs -----------------------------------------------------------------------

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._unary("Score", context, self._score, request)

    async def ComputeKL(self, request: pb.KLRequest, context) -> pb.KLResponse:
        return await self._unary("ComputeKL", context, self._compute_kl, request)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", context, self._model_info, request)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return await self._unary("ListModels", context, self._list_models, request)

    async def StreamKL(self, request_iterator, context) -> AsyncIterator[pb.StreamKLResponse]:
        """Each request is handled as it arrives; answers are sent as they complete, tagged with request_id.

        A request that cannot be told apart from the others (undecodable, no request_id, or one
        already used on this stream) is answered by an error item with an empty request_id. The
        caller is authenticated again whenever the auth file is reloaded, so a revoked token's
        open stream gets UNAUTHENTICATED error items from then on.

        With --max-connection-age-seconds the stream ends (OK) at that age from its start: it stops
        reading, answers every request it has read, and returns. The client reopens it (on a new
        connection, so possibly another replica) and resends the requests that had no answer.
        """
        try:
            job = self._job(context)
        except Exception as error:  # noqa: BLE001 - e.g. an x-job-id over the length limit
            code, message = logged_status(error)
            self._record("StreamKL", code, time.perf_counter())
            await context.abort(code, message)
        deadline = self._deadline(context)
        auth_in_force = self._service.auth
        seen: set[str] = set()
        pending: set[asyncio.Task] = set()
        requests = aiter(request_iterator)
        reading = asyncio.ensure_future(anext(requests, None))
        age = self._service.config.max_connection_age_seconds
        aging = asyncio.ensure_future(asyncio.sleep(age)) if age else None
        try:
            while reading is not None or pending:
                waiting = pending | ({reading} if reading is not None else set()) | ({aging} if aging else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if aging in done:  # the stream's age: answer what was read, read no more
                    aging = None
                    if reading is not None and not reading.done():
                        reading.cancel()
                        reading = None
                if reading is not None and reading in done:
                    request = reading.result()  # raises a transport error of the request stream
                    if request is None:
                        reading = None
                    else:
                        if self._service.auth is not auth_in_force:  # reloaded: the caller may have been revoked
                            auth_in_force = self._service.auth
                            try:
                                job = self._job(context)
                            except Exception as error:  # noqa: BLE001 - answered as this and later items' error
                                job = error
                        pending.add(asyncio.ensure_future(self._stream_item(request, job, deadline, seen)))
                        reading = asyncio.ensure_future(anext(requests, None)) if aging or not age else None
                for task in done:
                    if task in pending:
                        pending.discard(task)
                        yield task.result()
        finally:
            for task in pending | {task for task in (reading, aging) if task is not None}:
                task.cancel()

    async def _stream_item(
        self, request: pb.KLRequest, job: Job | Exception, deadline, seen: set[str]
    ) -> pb.StreamKLResponse:
        """One StreamKL answer: the response, or an error item with its status (the stream goes on). `job` is an
        exception when the caller no longer authenticates."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        answer_id = ""  # until the request is known to be identifiable
        try:
            _decoded(request)
            if not request.request_id:
                raise InvalidInput("request_id: required on StreamKL to match answers to requests")
            if request.request_id in seen:
                raise InvalidInput(f"request_id: {request.request_id!r} was already used on this stream")
            seen.add(request.request_id)
            answer_id = request.request_id
            if isinstance(job, Exception):
                raise job
            answer = pb.StreamKLResponse(request_id=answer_id, response=await self._compute_kl(request, job, deadline))
            self._check_size(answer)
            return answer
        except asyncio.CancelledError:  # the stream ended or was cancelled, or its deadline passed
            code = _cancelled_status(deadline)
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes an error item
            code, message = logged_status(error)
            item = pb.RequestError(code=code.value[0], message=message, retry_after_ms=_retry_after_ms(error) or 0)
            return pb.StreamKLResponse(request_id=answer_id, error=item)
        finally:
            self._record("StreamKL", code, started)

    # --- handlers: protobuf <-> domain ----------------------------------------------

    async def _score(self, request: pb.ScoreRequest, job: Job, deadline: float | None) -> pb.ScoreResponse:
        with self._service.lease(request.model) as served:  # the revision admitted now answers, swap or not
            parsed = parse_score_request(request, served.limits)
            result: ScoreResult = await self._service.score(parsed, job, deadline, served)
        response = pb.ScoreResponse(
            request_id=request.request_id,
            model=_model_ref(result.model),
            ref_logprobs=to_tensor(result.ref_logprobs),
            scored_lengths=to_tensor(result.scored_lengths),
        )
        _set_teacher(response, parsed, result.teacher)
        return response

    async def _compute_kl(self, request: pb.KLRequest, job: Job, deadline: float | None) -> pb.KLResponse:
        with self._service.lease(request.model) as served:
            parsed = parse_kl_request(request, served.limits)
            result: KLComputation = await self._service.compute_kl(parsed, job, deadline, served)
        values = result.kl
        response = pb.KLResponse(
            request_id=request.request_id,
            model=_model_ref(result.model),
            ref_logprobs=to_tensor(result.ref_logprobs),
            k1=to_tensor(values.k1),
            k2=to_tensor(values.k2),
            k3=to_tensor(values.k3),
            coef=to_tensor(values.coef),
            coef_principled=to_tensor(values.coef_principled),
            scored_lengths=to_tensor(result.scored_lengths),
            diagnostics=diagnostics_to_proto(values.diagnostics),
            spec=result.spec.describe(),
        )
        _set_teacher(response, parsed, result.teacher)
        return response

    async def _model_info(self, request: pb.GetModelInfoRequest, job: Job, deadline: float | None) -> pb.ModelInfo:
        return model_info_to_proto(self._service.model_info(job, request.model))

    async def _list_models(self, request: pb.ListModelsRequest, job: Job, deadline: float | None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info_to_proto(info) for info in self._service.list_models(job)])

    # --- plumbing -------------------------------------------------------------------

    def _job(self, context) -> Job:
        metadata = _metadata(context)
        credentials = _credentials(context, metadata, self._service.config)
        return self._service.job(metadata.get(JOB_METADATA_KEY), context.peer(), *credentials)

    def _caller(self, context, method: str) -> Job:
        return self._job(context)


class OperatorServicer(_Servicer, pb_grpc.OperatorServiceServicer):
    """klservice.v1.OperatorService: operator RPCs, each for admin tenants only (`ReferenceService.operator`)."""

    async def ReloadAuth(self, request: pb.ReloadAuthRequest, context) -> pb.ReloadAuthResponse:
        return await self._unary("ReloadAuth", context, self._reload_auth, request)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelInfo:
        return await self._unary("LoadModel", context, self._load_model, request)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        return await self._unary("UnloadModel", context, self._unload_model, request)

    def _caller(self, context, method: str) -> Tenant:
        metadata = _metadata(context)
        return self._service.operator(method, *_credentials(context, metadata, self._service.config), context.peer())

    async def _load_model(self, request: pb.LoadModelRequest, tenant: Tenant, deadline) -> pb.ModelInfo:
        log.info("LoadModel %r from %s by tenant %r%s", request.name, request.path, tenant.name,
                 f" (mixup_alpha {request.mixup_alpha:g})" if request.HasField("mixup_alpha") else "")
        served = await self._service.load_model(LoadRequest(
            name=request.name, path=request.path, backend=request.backend, dtype=request.dtype, device=request.device,
            max_length=request.max_length, force=request.force,
            mixup_alpha=request.mixup_alpha if request.HasField("mixup_alpha") else None,
        ))
        return model_info_to_proto(served.info)

    async def _unload_model(self, request: pb.UnloadModelRequest, tenant: Tenant, deadline) -> pb.UnloadModelResponse:
        log.info("UnloadModel %r by tenant %r", request.name, tenant.name)
        return pb.UnloadModelResponse(models=await self._service.unload_model(request.name))

    async def _reload_auth(self, request: pb.ReloadAuthRequest, tenant: Tenant, deadline) -> pb.ReloadAuthResponse:
        table = await asyncio.to_thread(self._service.reload_auth)
        log.info("auth file reloaded by tenant %r: %d tenant(s)", tenant.name, len(table.tenants))
        return pb.ReloadAuthResponse(tenants=sorted(table.tenants))


def _set_teacher(response: pb.ScoreResponse | pb.KLResponse, parsed, taught) -> None:
    """Put the teacher outputs a request asked for (`parsed.top_k`, `parsed.candidate_ids`) into its response."""
    if taught is None:
        return
    if parsed.top_k:
        response.top_ids.CopyFrom(to_tensor(taught.top_ids))
        response.top_logprobs.CopyFrom(to_tensor(taught.top_logprobs))
    if parsed.candidate_ids is not None:
        response.candidate_logprobs.CopyFrom(to_tensor(taught.candidate_logprobs))
    response.rest_logmass.CopyFrom(to_tensor(taught.rest_logmass))


def _model_ref(info) -> pb.ModelRef:
    return pb.ModelRef(name=info.name, revision=info.revision, generation=info.generation or 0)


SINGLE_METADATA = {"authorization": Unauthenticated, JOB_METADATA_KEY: InvalidInput}
"""Metadata keys a call may carry once at most, and what carrying one twice is (which copy would win is not
the caller's to choose: a proxy adding one must not let a caller's own override it, or the reverse)."""


def _metadata(context) -> dict[str, str]:
    """The call's metadata as a dict; a key of `SINGLE_METADATA` given more than once is refused."""
    pairs = list(context.invocation_metadata() or ())
    metadata = dict(pairs)
    for key, error in SINGLE_METADATA.items():
        count = sum(1 for name, _ in pairs if name == key)
        if count > 1:
            raise error(f"{key}: the call carries {count} of them; send exactly one")
    return metadata


def _credentials(context, metadata: dict, config) -> tuple[str | None, str | None]:
    """What the caller presents: its authorization metadata and its verified client certificate's common name."""
    return metadata.get("authorization"), _certificate_name(context, config)


def _certificate_name(context, config) -> str | None:
    """The common name of the caller's client certificate, on a port that requires client certificates signed by
    --tls-client-ca (the handshake verified it); None on any other port."""
    if not (config.tls_cert and config.tls_client_ca):
        return None
    auth_context = context.auth_context() or {}
    names = auth_context.get("x509_common_name") or ()
    for name in names:
        return name.decode("utf-8", "replace")
    return None


def _retry_after_ms(error: BaseException) -> int | None:
    """The retry hint of an overload refusal (`klservice.errors.Overloaded`), in milliseconds (at least 1)."""
    retry_after = getattr(error, "retry_after", None)
    return None if retry_after is None else max(1, int(retry_after * 1000))


def _cancelled_status(deadline: float | None) -> grpc.StatusCode:
    """What a cancelled call is recorded as: DEADLINE_EXCEEDED if its deadline had (all but) passed."""
    expired = deadline is not None and time.monotonic() + DEADLINE_SLACK_S >= deadline
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
