"""The reference service without gRPC: readiness, draining, scoring, KL, the served models.

`ReferenceService` is what the gRPC servicer calls and what a program embedding klservice (or
a test) can call directly: validated requests in (`klservice.validation.ScoreRequest`,
`KLRequest`), numpy results out, domain exceptions (`klservice.errors`) for everything that
goes wrong. It owns the models (`klservice.models.ModelRegistry`: per model a backend, a
scheduler and a reference cache), authentication and the per-job metrics; it never imports
grpc. Example::

    service = ReferenceService(config, metrics)
    await service.start()                             # every --model loaded (or start(backend))
    with service.lease("") as served:                 # the default model's serving revision
        request = parse_score_request(message, served.limits)
        result = await service.score(request, service.job("grpo-run-7", peer=None), None, served)
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from klservice.backends.base import ModelInfo, ReferenceBackend, TeacherAsk, TeacherOutput
from klservice.config import ServerConfig
from klservice.auth import AuthFileError, AuthTable, Tenant, bearer_token, load_auth_file
from klservice.errors import (
    BackendFault, FailedPrecondition, InvalidInput, NotReady, PermissionDenied, Unauthenticated,
)
from klservice.metrics import JobLabels, Metrics
from klservice.models import LoadRequest, ModelRegistry, ServedModel
from klservice.scheduler import TokenBudgetScheduler
from klservice.validation import KLRequest, ScoreRequest, locate
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
class ScoreResult:
    ref_logprobs: np.ndarray
    scored_lengths: np.ndarray
    model: ModelInfo
    teacher: TeacherOutput | None = None
    """The teacher outputs the request asked for (top_k, candidate_ids), concatenated over its scored tokens."""


@dataclasses.dataclass(frozen=True)
class KLComputation:
    ref_logprobs: np.ndarray
    scored_lengths: np.ndarray
    kl: kl.KLResult
    spec: kl.KLSpec
    model: ModelInfo
    teacher: TeacherOutput | None = None
    """As `ScoreResult.teacher`."""


class ReferenceService:
    """The served models: loading → serving → draining (see the module docstring)."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.models = ModelRegistry(config, metrics)
        self._draining = False
        self.auth: AuthTable | None = load_auth_file(config.auth_file) if config.auth_file else None
        """The tenants of --auth-file (None: no authentication); a bad file fails here, before the server listens."""

    async def start(self, backend: ReferenceBackend | None = None) -> ServedModel:
        """Load every --model (the default one may be handed in loaded, as `backend`) and put them into service;
        returns the default model's serving revision."""
        await self.models.start(backend)
        self.metrics.ready.set(1)
        return self.models.get()

    @property
    def ready(self) -> bool:
        return self.models.ready and not self._draining

    @property
    def scheduler(self) -> TokenBudgetScheduler:
        """The default model's scheduler."""
        return self.models.get().scheduler

    def require_ready(self) -> ModelRegistry:
        """The models, or NotReady while they load or once the service drains."""
        if self._draining:
            raise NotReady("server is draining; retry on another replica or later")
        if not self.models.ready:
            raise NotReady("models are still loading; retry shortly")
        return self.models

    def lease(self, model: str = ""):
        """Context manager: the serving revision of `model` (empty: the default), held while a request uses it, so
        that a swap meanwhile leaves it to finish there. NotReady while loading or draining; ModelNotFound for a
        name not served."""
        return self.require_ready().lease(model)

    def drain(self) -> None:
        """Refuse new work from now on (work already queued still runs)."""
        self._draining = True
        self.metrics.ready.set(0)

    async def stop(self, grace: float = 0.0) -> bool:
        """Drain: refuse new work, give queued and running work up to `grace` seconds, then answer what is left
        UNAVAILABLE (a running forward stops within one step) and release the models. True if everything
        finished in time."""
        self.drain()
        return await self.models.stop(grace)

    async def load_model(self, request: LoadRequest) -> ServedModel:
        """Operator: load a checkpoint under a name (`ModelRegistry.load`). The load runs to its end even if the
        caller goes away meanwhile (a half-done load would hold memory nobody releases): it is served, or fails,
        by --load-timeout-seconds at the latest, and its name is free again either way."""
        self.require_ready()
        task = asyncio.ensure_future(self.models.load(request))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning if abandoned
        return await asyncio.shield(task)

    async def unload_model(self, name: str) -> list[str]:
        """Operator: stop serving a model name (`ModelRegistry.unload`)."""
        return await self.require_ready().unload(name)

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

    def operator(self, rpc: str, authorization: str | None, certificate_name: str | None = None,
                 peer: str | None = None) -> Tenant:
        """The admin tenant calling an operator RPC; PermissionDenied for any other caller, and for every caller
        of a server without --auth-file (nobody is an admin there), except, with --allow-admin-from-loopback,
        callers on this host's loopback (a stand-in tenant "loopback" with the admin role)."""
        if self.auth is None:
            if self.config.allow_admin_from_loopback and _on_loopback(peer):
                return LOOPBACK_ADMIN
            loopback = (" or, from this host, --allow-admin-from-loopback" if not self.config.allow_admin_from_loopback
                        else "; --allow-admin-from-loopback admits only callers on 127.0.0.1 or ::1")
            raise PermissionDenied(
                f"{rpc}: operator RPCs need the admin role, and this server has no --auth-file (start it with one "
                f"that lists a tenant with role = \"admin\"{loopback})"
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

    async def score(
        self, request: ScoreRequest, job: Job, deadline: float | None, served: ServedModel | None = None
    ) -> ScoreResult:
        """Reference log-probs of every scored token by the `served` revision (held by the caller's `lease`;
        default: the default model's, leased for the call; `deadline`: a time.monotonic() value, or None)."""
        if served is None:
            with self.lease() as served:
                return await self.score(request, job, deadline, served)
        self.require_ready()
        ref, teacher = await self._reference(served, request, job, deadline)
        self.metrics.tokens_scored.labels(served.name, *job.labels).inc(request.batch.num_scored)
        return ScoreResult(ref_logprobs=ref, scored_lengths=request.batch.scored_lengths, model=served.info,
                           teacher=teacher)

    async def compute_kl(
        self, request: KLRequest, job: Job, deadline: float | None, served: ServedModel | None = None
    ) -> KLComputation:
        """Reference log-probs by the `served` revision (as in `score`), k1/k2/k3, the spec's coefficient and
        diagnostics."""
        if served is None:
            with self.lease() as served:
                return await self.compute_kl(request, job, deadline, served)
        self.require_ready()
        batch = request.batch
        ref, teacher = await self._reference(served, request, job, deadline)
        try:
            result = await asyncio.to_thread(
                kl.compute_kl, request.logprobs, ref, batch.scored_lengths, request.spec, request.old_logprobs
            )
        except kl.KLInputError as error:  # the request was validated: what is wrong came from the server's side
            raise BackendFault(f"the KL computation refused the reference values: {error}") from error
        _check_finite(result, request, ref)
        self.metrics.tokens_scored.labels(served.name, *job.labels).inc(batch.num_scored)
        self.metrics.record_kl(served.name, job.labels, request.spec_label, result.diagnostics)
        return KLComputation(
            ref_logprobs=ref, scored_lengths=batch.scored_lengths, kl=result, spec=request.spec, model=served.info,
            teacher=teacher,
        )

    async def _reference(self, served: ServedModel, request: ScoreRequest | KLRequest, job: Job,
                         deadline: float | None) -> tuple[np.ndarray, TeacherOutput | None]:
        """The request's reference log-probs, and its teacher outputs where it asks for them."""
        fairness = dict(share=job.tenant, weight=job.weight, quota=job.quota)
        if request.teacher:
            ask = TeacherAsk(request.top_k, request.candidate_ids)
            return await served.scheduler.teach(request.batch, request.temperature, ask, job.key, deadline, **fairness)
        return await served.scheduler.score(request.batch, request.temperature, job.key, deadline, **fairness), None

    def model_info(self, job: Job | None = None, model: str = "") -> ModelInfo:
        """What GetModelInfo answers `job` about `model` (empty: the default; NotReady while loading or draining):
        the serving revision and its limits, with `max_request_tokens` lowered to the job's tenant quota, so that
        clients split their batches into requests the quota can take."""
        return self._for_job(self.require_ready().get(model).info, job)

    def list_models(self, job: Job | None = None) -> list[ModelInfo]:
        """What ListModels answers: every serving revision, the default first (limits as in `model_info`)."""
        return [self._for_job(served.info, job) for served in self.require_ready().list()]

    @staticmethod
    def _for_job(info: ModelInfo, job: Job | None) -> ModelInfo:
        if job is not None and 0 < job.quota < info.max_request_tokens:
            info = dataclasses.replace(info, max_request_tokens=job.quota)
        return info


LOOPBACK_ADMIN = Tenant(name="loopback", token_hashes=(), role="admin")
"""Who calls an operator RPC from loopback on a server started with --allow-admin-from-loopback."""


def _on_loopback(peer: str | None) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000"; "ipv6:%5B::1%5D:5000", as grpc writes it) is on this host's
    loopback (an IPv4-mapped IPv6 loopback address included)."""
    import ipaddress
    import urllib.parse

    if not peer:
        return False
    kind, _, address = urllib.parse.unquote(peer).partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _check_finite(result: kl.KLResult, request: KLRequest, ref: np.ndarray) -> None:
    """Refuse, naming the token, a result that is not finite: validated log-probs keep the k-values finite,
    but an importance weight (up to e^80) times a large log-ratio can still overflow float32. The diagnostics
    are float64 sums of those values and stay finite; should one not, it is refused too, by name: no OK answer
    and no metric sample carries an infinity."""
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
    for field in dataclasses.fields(result.diagnostics):
        value = getattr(result.diagnostics, field.name)
        if not np.isfinite(value):
            raise InvalidInput(
                f"logprobs: the batch's {field.name} is not finite ({value}); send float64 log-probs or a smaller batch"
            )
