"""The gRPC server's life cycle: listen at once, load the model in the background, serve, drain.

Health (grpc.health.v1) reports NOT_SERVING while the model loads and again while the
server drains on shutdown, so load balancers and `docker compose` health checks see the
truth; server reflection is on, so grpcurl and similar tools work without the .proto.
With --tls-cert/--tls-key the port speaks TLS only (--tls-client-ca: mutual TLS); health
and reflection are served on the same port, so they need TLS then too, but never a token.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from klservice.config import ServerConfig, bare_host
from klservice.errors import FailedPrecondition
from klservice.http import HttpRoute
from klservice.metrics import Metrics
from klservice.service import ReferenceService
from klservice.servicer import OperatorServicer, ReferenceServicer, add_to_server
from klservice_client.wire import pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReferenceService"].full_name
OPERATOR_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OperatorService"].full_name
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
FLUSH_SECONDS = 1.0
"""On stop, how long answers already decided get to reach their callers before the port closes."""


class Server:
    """One klservice server: gRPC + health + reflection + metrics around its models (`klservice.models`).

    Usage (inside a running event loop)::

        server = Server(ServerConfig(port=0, metrics_port=-1))
        await server.start()          # listening; health NOT_SERVING
        await server.wait_ready()     # model loaded; health SERVING
        ...
        await server.stop()
    """

    def __init__(self, config: ServerConfig, *, registry: CollectorRegistry | None = None, backend=None):
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, max_jobs=config.max_jobs)
        self._backend = backend  # preloaded backend (tests, embedding); else loaded from config
        config.check_tls()
        config.connection_options()  # a negative age fails here, naming the flag
        if not config.max_step_seconds >= 0:
            raise ValueError(f"--max-step-seconds {config.max_step_seconds}: expected a number of seconds >= 0 (0: no bound)")
        config.check_hosts()  # a host that does not resolve fails here, naming the flag
        self._credentials = _server_credentials(config)  # unreadable files fail the start, before listening
        self.service = ReferenceService(config, self.metrics)  # so does a bad --auth-file
        self._health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None  # --health-port
        self.health_port: int | None = None
        self._metrics_http = None
        self._http: HttpRoute | None = None  # --http-port
        self.http_port: int | None = None
        self._loading: asyncio.Task | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics_host: str | None = None  # the address /metrics listens on, once started

    def reload_auth(self) -> bool:
        """Re-read --auth-file (SIGHUP). A file that does not load leaves the previous one in force."""
        try:
            table = self.service.reload_auth()
        except FailedPrecondition as error:
            log.error("SIGHUP: %s", error)
            return False
        log.info("auth file reloaded: %d tenant(s)", len(table.tenants))
        return True

    def _warn_if_exposed(self) -> None:
        """Say loudly what a caller beyond this host can do that the operator may not intend."""
        config = self.config
        if bare_host(config.host) not in LOOPBACK_HOSTS:
            if not config.auth_file and not config.tls_client_ca:
                log.warning(
                    "SERVING WITHOUT AUTHENTICATION on %s: anyone who can reach port %s can use this server and "
                    "write its per-job metrics under any job id. Pass --auth-file (see `klservice auth --help`) or "
                    "--host 127.0.0.1.", config.host, self.port,
                )
            if not config.tls_cert:
                log.warning(
                    "NO TLS on %s:%s: %s and reference log-probs travel in clear. Pass --tls-cert and --tls-key.",
                    config.host, self.port, "bearer tokens" if config.auth_file else "requests",
                )
        if config.allow_admin_from_loopback and not config.auth_file:
            log.warning(
                "OPERATOR RPCs OPEN ON LOOPBACK (--allow-admin-from-loopback): any process on this host can load, "
                "replace and unload the served models. Use --auth-file with an admin tenant instead where others "
                "share the host."
            )
        for sentence in config.ignored_flags():
            log.warning("%s", sentence)
        if self._metrics_http is not None and config.metrics_address not in LOOPBACK_HOSTS and config.auth_file:
            log.warning(
                "/metrics on %s:%s is plain HTTP without authentication: tenant names and their KL figures are "
                "visible to anyone who can reach it (--metrics-host 127.0.0.1 keeps them on this host).",
                config.metrics_address, self.metrics_port,
            )

    async def start(self) -> int:
        """Start listening (health NOT_SERVING) and begin loading the model. Returns the gRPC port."""
        limit = self.config.max_message_bytes
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                *self.config.connection_options(),
            ]
        )
        add_to_server(ReferenceServicer(self.service), self._grpc)
        add_to_server(OperatorServicer(self.service), self._grpc, "OperatorService")
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OPERATOR_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._grpc,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = self.config.grpc_address
        if self._credentials is None:
            self.port = self._grpc.add_insecure_port(address)
        else:
            self.port = self._grpc.add_secure_port(address, self._credentials)
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {address}")
        await self._grpc.start()
        if self.config.health_port >= 0:
            await self._start_health_port()
        if self.config.metrics_port >= 0:
            self._start_metrics_http()
        if self.config.http_port >= 0:
            self._http = HttpRoute(self.service, self.config)
            self.http_port = await self._http.start()
        transport = "gRPC" if self._credentials is None else "gRPC over TLS"
        if self.config.tls_client_ca:
            transport += ", client certificates required"
        log.info("listening on %s:%d (%s)%s%s%s", _url_host(bare_host(self.config.host)), self.port, transport,
                 f", metrics on {_url_host(self.config.metrics_address)}:{self.metrics_port}/metrics"
                 if self.metrics_port else "",
                 f", health on {self.health_port} (plain gRPC)" if self.health_port else "",
                 f", vLLM-compatible HTTP on {self.http_port}" if self.http_port is not None else "")
        self._warn_if_exposed()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="klservice-load")
        return self.port

    async def _start_health_port(self) -> None:
        """--health-port: grpc.health.v1 alone, plain, sharing the main port's health status."""
        self._health_grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(self.config.health_address)
        if self.health_port == 0:
            raise OSError(f"could not bind the health port to {self.config.health_address}")
        await self._health_grpc.start()

    def _start_metrics_http(self) -> None:
        from prometheus_client import start_http_server

        httpd, _thread = start_http_server(self.config.metrics_port, addr=self.config.metrics_address, registry=self.registry)
        self._metrics_http = httpd
        self.metrics_host, self.metrics_port = httpd.server_address[:2]

    async def _load(self) -> None:
        await self.service.start(self._backend)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        for served in self.service.models.list():
            info = served.info
            log.info("serving %r%s (revision %s, %s, %s on %s)", info.name, " (default)" if info.is_default else "",
                     info.revision[:12], info.backend, info.dtype, info.device)

    async def wait_ready(self) -> None:
        """Wait until the model is loaded; re-raises a loading failure."""
        await asyncio.shield(self._loading)

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain, bounded: health NOT_SERVING at once (and until the port closes), new work refused UNAVAILABLE,
        queued and running work given `grace` seconds, then answered UNAVAILABLE (a running forward stops
        within one step), answers flushed for at most FLUSH_SECONDS, the model released."""
        grace = self.config.grace_seconds if grace is None else grace
        self.service.drain()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        started = time.perf_counter()
        finished = await self.service.stop(grace)
        if not finished:
            log.warning("work still running after the %.1f s grace: answered UNAVAILABLE", grace)
        if self._grpc is not None:
            await self._grpc.stop(FLUSH_SECONDS)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._http is not None:
            await self._http.stop()
        log.info("stopped in %.1f s", time.perf_counter() - started)
        if self._backend is not None:  # handed in: closed with the models if it was served; closing again is a no-op
            self._backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def serve_forever(self) -> None:
        """Start, serve until SIGINT/SIGTERM, then drain. Raises if the model fails to load."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_auth)
        await self.start()
        stop_wait = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({self._loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if self._loading.done() and self._loading.exception() is not None:
                raise self._loading.exception()
            await stop_wait
            log.info("shutting down (grace %.1fs)", self.config.grace_seconds)
        finally:
            stop_wait.cancel()
            await self.stop()


def _url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port from --tls-cert/--tls-key (and --tls-client-ca: client certificates
    required), or None for a plain port."""
    if not config.tls_cert:
        return None
    pem = {}
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key), ("--tls-client-ca", config.tls_client_ca)):
        if path:
            try:
                pem[flag] = open(path, "rb").read()
            except OSError as error:
                raise ValueError(f"{flag}: cannot read {path}: {error.strerror}") from None
            if b"-----BEGIN" not in pem[flag]:
                raise ValueError(f"{flag}: {path} is not a PEM file")
    try:  # gRPC would only say "could not bind" for a key that does not fit the certificate
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as error:
        raise ValueError(
            f"--tls-key: {config.tls_key} does not match --tls-cert {config.tls_cert}, or is encrypted (an unencrypted "
            f"PEM key is needed): {error.reason or error}"
        ) from None
    client_ca = pem.get("--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(pem["--tls-key"], pem["--tls-cert"])], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
