"""The gRPC servicer: translates protobuf to domain objects and back; the logic lives elsewhere.

Validation is `klservice.validation`, batching is `klservice.scheduler`, the KL math is
`klservice_client.kl`, and status codes come from `klservice.errors.status_for` — the
only place exceptions become codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

import grpc
import numpy as np

from klservice import __version__
from klservice.errors import InvalidInput, NotReady, status_for
from klservice.validation import Limits, check_model, parse_batch, parse_logprobs, parse_temperature
from klservice_client import kl
from klservice_client._convert import diagnostics_to_proto, spec_from_proto
from klservice_client._proto import klservice_pb2 as pb
from klservice_client._proto import klservice_pb2_grpc as pb_grpc
from klservice_client.tensors import to_tensor

log = logging.getLogger(__name__)

JOB_METADATA_KEY = "x-job-id"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"


@dataclasses.dataclass(frozen=True)
class Job:
    """Who sent a request: `key` for fairness, `label` (bounded) for metrics."""

    key: str
    label: str


class ServingState:
    """What the servicer needs once the model is loaded (None before)."""

    def __init__(self, config, metrics):
        self.config = config
        self.metrics = metrics
        self.info = None  # klservice.backends.base.ModelInfo
        self.engine = None  # klservice.scheduler.TokenBudgetScheduler
        self.limits: Limits | None = None
        self.draining = False

    def require_ready(self):
        if self.draining:
            raise NotReady("server is draining; retry on another replica or later")
        if self.engine is None:
            raise NotReady("model is still loading; retry shortly")
        return self.engine


class ReferenceServicer(pb_grpc.ReferenceServiceServicer):
    def __init__(self, state: ServingState):
        self._state = state

    # --- RPCs -----------------------------------------------------------------------

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._unary("Score", context, self._score, request)

    async def ComputeKL(self, request: pb.KLRequest, context) -> pb.KLResponse:
        return await self._unary("ComputeKL", context, self._compute_kl, request)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", context, self._model_info, request)

    async def StreamKL(self, request_iterator, context) -> AsyncIterator[pb.StreamKLResponse]:
        """Each request is handled as it arrives; answers are sent as they complete, tagged with request_id."""
        job = self._job(context)
        deadline = self._deadline(context)
        answers: asyncio.Queue = asyncio.Queue()
        done = object()
        seen: set[str] = set()

        async def answer(request: pb.KLRequest) -> None:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if not request.request_id:
                    raise InvalidInput("request_id: required on StreamKL to match answers to requests")
                if request.request_id in seen:
                    raise InvalidInput(f"request_id: {request.request_id!r} was already used on this stream")
                seen.add(request.request_id)
                response = await self._compute_kl(request, job, deadline)
                item = pb.StreamKLResponse(request_id=request.request_id, response=response)
            except Exception as error:  # noqa: BLE001 - every failure becomes an error item
                code, message = self._status(error)
                item = pb.StreamKLResponse(
                    request_id=request.request_id, error=pb.RequestError(code=code.value[0], message=message)
                )
            self._record("StreamKL", code, started)
            await answers.put(item)

        async def read() -> None:
            tasks = []
            try:
                async for request in request_iterator:
                    tasks.append(asyncio.ensure_future(answer(request)))
                await asyncio.gather(*tasks)
            finally:
                await answers.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await answers.get()) is not done:
                yield item
            await reader  # surfaces a transport error of the request stream
        finally:
            reader.cancel()

    # --- handlers -------------------------------------------------------------------

    async def _score(self, request: pb.ScoreRequest, job: "Job", deadline: float | None) -> pb.ScoreResponse:
        engine = self._state.require_ready()
        check_model(request.model, self._state.info.name)
        batch = parse_batch(request.batch, self._state.limits)
        temperature = parse_temperature(request.temperature)
        ref = await engine.score(batch, temperature, job.key, deadline)
        self._state.metrics.tokens_scored.labels(job.label).inc(batch.num_scored)
        return pb.ScoreResponse(
            request_id=request.request_id,
            model=self._model_ref(),
            ref_logprobs=to_tensor(ref),
            scored_lengths=to_tensor(batch.scored_lengths),
        )

    async def _compute_kl(self, request: pb.KLRequest, job: "Job", deadline: float | None) -> pb.KLResponse:
        engine = self._state.require_ready()
        check_model(request.model, self._state.info.name)
        batch = parse_batch(request.batch, self._state.limits)
        temperature = parse_temperature(request.temperature)
        spec = spec_from_proto(request.spec)
        logprobs = parse_logprobs(request, "logprobs", batch, required=True)
        old = parse_logprobs(request, "old_logprobs", batch, required=False)
        if spec.needs_old_logprobs and old is None:
            raise InvalidInput(
                f"old_logprobs: missing; importance_sampling={spec.importance_sampling.value} needs the behaviour policy's log-probs"
            )
        if old is not None and old.dtype != logprobs.dtype:
            raise InvalidInput(f"old_logprobs: dtype {old.dtype} differs from logprobs' {logprobs.dtype}")
        ref = await engine.score(batch, temperature, job.key, deadline)
        result = await asyncio.to_thread(kl.compute_kl, logprobs, ref, batch.scored_lengths, spec, old)
        metrics = self._state.metrics
        metrics.tokens_scored.labels(job.label).inc(batch.num_scored)
        metrics.record_kl(job.label, request.spec.preset or "custom", result.diagnostics)
        return pb.KLResponse(
            request_id=request.request_id,
            model=self._model_ref(),
            ref_logprobs=to_tensor(ref),
            k1=to_tensor(result.k1),
            k2=to_tensor(result.k2),
            k3=to_tensor(result.k3),
            coef=to_tensor(result.coef),
            coef_principled=to_tensor(result.coef_principled),
            scored_lengths=to_tensor(batch.scored_lengths),
            diagnostics=diagnostics_to_proto(result.diagnostics),
            spec=spec.describe(),
        )

    async def _model_info(self, request: pb.GetModelInfoRequest, job: "Job", deadline: float | None) -> pb.ModelInfo:
        self._state.require_ready()
        info, config = self._state.info, self._state.config
        message = pb.ModelInfo(
            name=info.name,
            revision=info.revision,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            backend=info.backend,
            dtype=info.dtype,
            device=info.device,
            vocab_size=info.vocab_size,
            max_length=self._state.limits.max_length,
            max_request_tokens=config.max_request_tokens,
            max_message_bytes=config.max_message_bytes,
            server_version=__version__,
        )
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(info, field) is not None:
                setattr(message, field, int(getattr(info, field)))
        return message

    # --- plumbing -------------------------------------------------------------------

    def _model_ref(self) -> pb.ModelRef:
        return pb.ModelRef(name=self._state.info.name, revision=self._state.info.revision)

    def _job(self, context) -> "Job":
        """The caller's job: x-job-id metadata, else its connection (peer) for fairness, 'anonymous' in metrics."""
        metadata = dict(context.invocation_metadata() or ())
        job_id = metadata.get(JOB_METADATA_KEY)
        return Job(key=job_id or f"peer:{context.peer()}", label=self._state.metrics.jobs.label(job_id))

    @staticmethod
    def _deadline(context) -> float | None:
        """The call's deadline as a time.monotonic() value (None without one)."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @staticmethod
    def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("internal error", exc_info=error)
        return code, message

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._state.metrics.requests.labels(method, code.name).inc()
        self._state.metrics.latency.labels(method).observe(time.perf_counter() - started)

    async def _unary(self, method: str, context, handler, request):
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await handler(request, self._job(context), self._deadline(context))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status in one place
            code, message = self._status(error)
            retry_after = getattr(error, "retry_after", None)
            if retry_after is not None:
                context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(int(retry_after * 1000))),))
        finally:
            self._record(method, code, started)
        await context.abort(code, message)
