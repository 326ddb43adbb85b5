"""The reference service without gRPC: readiness, draining, scoring, KL, the served model.

`ReferenceService` is what the gRPC servicer calls and what a program embedding klservice (or
a test) can call directly: validated requests in (`klservice.validation.ScoreRequest`,
`KLRequest`), numpy results out, domain exceptions (`klservice.errors`) for everything that
goes wrong. It owns the scheduler, the reference cache and the per-job metrics; it never
imports grpc. Example::

    service = ReferenceService(config, metrics)
    await service.start(backend)                      # cache + scheduler on a loaded backend
    served = service.require_ready()                  # NotReady while loading or draining
    request = parse_score_request(message, served.limits)
    result = await service.score(request, service.job("grpo-run-7", peer=None), deadline=None)
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from klservice import __version__
from klservice.backends.base import ModelInfo, ReferenceBackend
from klservice.cache import ReferenceCache
from klservice.config import ServerConfig
from klservice.auth import AuthFileError, AuthTable, Tenant, bearer_token, load_auth_file
from klservice.errors import FailedPrecondition, InvalidInput, NotReady, PermissionDenied, Unauthenticated
from klservice.metrics import JobLabels, Metrics
from klservice.scheduler import TokenBudgetScheduler
from klservice.validation import KLRequest, Limits, ScoreRequest, locate
from klservice_client import kl

MAX_JOB_ID_LENGTH = 128
"""Longest accepted x-job-id, in characters."""


@dataclasses.dataclass(frozen=True)
class Job:
    """Who sent a request: `key` for fairness, `labels` (tenant, trainer_job; bounded) for metrics, and with
    authentication the `tenant` its token belongs to, with that tenant's weight and quota."""

    key: str
    labels: tuple[str, str]
    tenant: str | None = None
    weight: float = 1.0
    """The tenant's share of the model under contention (1 without authentication)."""
    quota: int = 0
    """Most tokens the tenant may have queued at once (0: no limit)."""


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The loaded model and what requests to it may contain."""

    info: ModelInfo
    """The backend's info with the serving limits filled in: what GetModelInfo answers."""
    limits: Limits


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    ref_logprobs: np.ndarray
    scored_lengths: np.ndarray
    model: ModelInfo


@dataclasses.dataclass(frozen=True)
class KLComputation:
    ref_logprobs: np.ndarray
    scored_lengths: np.ndarray
    kl: kl.KLResult
    spec: kl.KLSpec
    model: ModelInfo


class ReferenceService:
    """One served reference model: loading → serving → draining (see the module docstring)."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.scheduler: TokenBudgetScheduler | None = None
        self._served: ServedModel | None = None
        self._draining = False
        self.auth: AuthTable | None = load_auth_file(config.auth_file) if config.auth_file else None
        """The tenants of --auth-file (None: no authentication); a bad file fails here, before the server listens."""

    async def start(self, backend: ReferenceBackend) -> ServedModel:
        """Put a loaded backend into service: reference cache, scheduler, limits, metrics."""
        info = await asyncio.to_thread(backend.info)
        config = self.config
        cache = None
        if config.cache_mb > 0:
            cache = ReferenceCache(config.cache_mb * 1024 * 1024, info.revision, metrics=self.metrics)
        scheduler = TokenBudgetScheduler(
            backend,
            max_batch_tokens=config.max_batch_tokens,
            max_queue=config.max_queue,
            max_wait_s=config.max_wait_ms / 1000.0,
            call_padding=config.call_padding,
            cache=cache,
            metrics=self.metrics,
        )
        await scheduler.start()
        limits = Limits(
            model_name=info.name,
            vocab_size=info.vocab_size,
            max_length=info.max_length,
            max_request_tokens=config.max_request_tokens,
            max_message_bytes=config.max_message_bytes,
        )
        self.scheduler = scheduler
        served_info = dataclasses.replace(
            info,
            max_length=limits.max_length,
            max_request_tokens=limits.max_request_tokens,
            max_message_bytes=config.max_message_bytes,
            server_version=__version__,
        )
        self._served = ServedModel(info=served_info, limits=limits)
        self.metrics.model_info.info(
            {"name": info.name, "revision": info.revision, "backend": info.backend, "dtype": info.dtype, "device": info.device}
        )
        self.metrics.ready.set(1)
        return self._served

    @property
    def ready(self) -> bool:
        return self._served is not None and not self._draining

    def require_ready(self) -> ServedModel:
        """The served model, or NotReady while it loads or once the service drains."""
        if self._draining:
            raise NotReady("server is draining; retry on another replica or later")
        if self._served is None:
            raise NotReady("model is still loading; retry shortly")
        return self._served

    def drain(self) -> None:
        """Refuse new work from now on (work already queued still runs)."""
        self._draining = True
        self.metrics.ready.set(0)

    async def stop(self, grace: float = 0.0) -> bool:
        """Drain: refuse new work, give queued and running work up to `grace` seconds, then answer what is left
        UNAVAILABLE (a running forward stops within one step). True if everything finished in time."""
        self.drain()
        if self.scheduler is None:
            return True
        finished = await self.scheduler.drain(grace)
        await self.scheduler.stop()
        return finished

    def job(self, job_id: str | None, peer: str | None, authorization: str | None = None,
            certificate_name: str | None = None) -> Job:
        """The caller's job. Without authentication: its job id, else its connection for fairness, and tenant
        'anonymous' in metrics. With it: the tenant of the bearer token (or, with mTLS, of the client
        certificate's common name), and the job id within it ("tenant/job"); `authenticate` says what fails."""
        if job_id is not None and len(job_id) > MAX_JOB_ID_LENGTH:
            raise InvalidInput(f"x-job-id: {len(job_id)} characters, at most {MAX_JOB_ID_LENGTH} are accepted")
        if self.auth is None:
            return Job(key=job_id or f"peer:{peer}", labels=self.metrics.jobs.labels(None, job_id))
        tenant = self.authenticate(authorization, certificate_name)
        return Job(
            key=f"{tenant.name}/{job_id or JobLabels.DEFAULT_JOB}",
            labels=self.metrics.jobs.labels(tenant.name, job_id),
            tenant=tenant.name,
            weight=tenant.weight,
            quota=tenant.max_queued_tokens,
        )

    def authenticate(self, authorization: str | None, certificate_name: str | None = None) -> Tenant:
        """The caller's tenant: the one its bearer token belongs to; without a token, the one its verified client
        certificate's common name names (mTLS). Unauthenticated if neither names a tenant of the auth file."""
        auth = self.auth
        if auth is None:
            raise Unauthenticated("this server has no --auth-file: there are no tenants to authenticate as")
        token = bearer_token(authorization)
        if token is not None:
            tenant = auth.identify(token)
            if tenant is None:
                raise Unauthenticated("authorization: the bearer token is not one of this server's")
            return tenant
        if authorization:
            raise Unauthenticated("authorization: expected `Bearer <token>`")
        if certificate_name is not None:
            tenant = auth.tenants.get(certificate_name)
            if tenant is None:
                raise Unauthenticated(
                    f"client certificate: its common name {certificate_name[:64]!r} is no tenant of this server, and "
                    "the call carries no `authorization: Bearer <token>`"
                )
            return tenant
        raise Unauthenticated(
            "authorization: missing; this server needs `authorization: Bearer <token>` metadata "
            "(KLClient(token=...) or the KLSERVICE_TOKEN environment variable)"
        )

    def operator(self, rpc: str, authorization: str | None, certificate_name: str | None = None) -> Tenant:
        """The admin tenant calling an operator RPC; PermissionDenied for any other caller, and for every caller
        of a server without --auth-file (nobody is an admin there)."""
        if self.auth is None:
            raise PermissionDenied(
                f"{rpc}: operator RPCs need the admin role, and this server has no --auth-file (start it with one "
                "that lists a tenant with role = \"admin\")"
            )
        tenant = self.authenticate(authorization, certificate_name)
        if not tenant.is_admin:
            raise PermissionDenied(f"{rpc}: tenant {tenant.name!r} has the role {tenant.role!r}; this RPC needs 'admin'")
        return tenant

    def reload_auth(self) -> AuthTable:
        """Re-read --auth-file and put it in force. FailedPrecondition (the previous file stays in force) if
        there is none or it does not load."""
        path = self.config.auth_file
        if not path:
            raise FailedPrecondition("no --auth-file to reload")
        try:
            table = load_auth_file(path)
        except AuthFileError as error:
            raise FailedPrecondition(f"auth file not reloaded, the previous one stays in force: {error}") from None
        self.auth = table
        return table

    async def score(self, request: ScoreRequest, job: Job, deadline: float | None) -> ScoreResult:
        """Reference log-probs of every scored token (`deadline`: a time.monotonic() value, or None)."""
        served = self.require_ready()
        ref = await self._reference(request.batch, request.temperature, job, deadline)
        self.metrics.tokens_scored.labels(*job.labels).inc(request.batch.num_scored)
        return ScoreResult(ref_logprobs=ref, scored_lengths=request.batch.scored_lengths, model=served.info)

    async def compute_kl(self, request: KLRequest, job: Job, deadline: float | None) -> KLComputation:
        """Reference log-probs, k1/k2/k3, the spec's coefficient and diagnostics."""
        served = self.require_ready()
        batch = request.batch
        ref = await self._reference(batch, request.temperature, job, deadline)
        result = await asyncio.to_thread(
            kl.compute_kl, request.logprobs, ref, batch.scored_lengths, request.spec, request.old_logprobs
        )
        _check_finite(result, request, ref)
        self.metrics.tokens_scored.labels(*job.labels).inc(batch.num_scored)
        self.metrics.record_kl(job.labels, request.spec_label, result.diagnostics)
        return KLComputation(
            ref_logprobs=ref, scored_lengths=batch.scored_lengths, kl=result, spec=request.spec, model=served.info
        )

    async def _reference(self, batch, temperature: float, job: Job, deadline: float | None) -> np.ndarray:
        return await self.scheduler.score(
            batch, temperature, job.key, deadline, share=job.tenant, weight=job.weight, quota=job.quota
        )

    def model_info(self, job: Job | None = None) -> ModelInfo:
        """What GetModelInfo answers `job` (NotReady while loading or draining): the served model and its limits,
        with `max_request_tokens` lowered to the job's tenant quota, so that clients split their batches into
        requests the quota can take."""
        info = self.require_ready().info
        if job is not None and 0 < job.quota < info.max_request_tokens:
            info = dataclasses.replace(info, max_request_tokens=job.quota)
        return info


def _check_finite(result: kl.KLResult, request: KLRequest, ref: np.ndarray) -> None:
    """Refuse, naming the token, a result that is not finite: validated log-probs keep the k-values finite,
    but an importance weight (up to e^80) times a large log-ratio can still overflow float32."""
    for name in ("k1", "k2", "k3", "coef", "coef_principled"):
        values = getattr(result, name)
        bad = ~np.isfinite(values)
        if bad.any():
            index = int(np.argmax(bad))
            sequence, position = locate(request.batch.scored_lengths, index)
            old = "" if request.old_logprobs is None else f", behaviour {float(request.old_logprobs[index]):g}"
            raise InvalidInput(
                f"logprobs: {name} is not finite at sequence {sequence}, scored token {position} (policy "
                f"{float(request.logprobs[index]):g}, reference {float(ref[index]):g}{old}): the values overflow "
                f"{request.logprobs.dtype}; send float64 log-probs or check this token"
            )
