"""The connection options every integration's ``klservice`` group takes, and the client they make."""

from __future__ import annotations

import dataclasses

from klservice_client.client import KLClient


@dataclasses.dataclass(frozen=True)
class ServerConnection:
    """Where the reference is served and how to reach it (``klservice.<field>`` in a trainer's options).

    `client_cert` and `client_key` (files, PEM) go together: mutual TLS. `timeout`: seconds per call.
    Raises ValueError naming the option when a value does not fit.
    """

    target: str
    job_id: str | None = None
    model: str = ""
    token: str | None = dataclasses.field(default=None, repr=False)  # a credential: never in a repr or a log
    tls: bool = False
    root_certificates: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None
    timeout: float = 300.0

    def __post_init__(self):
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"klservice.target: required, a gRPC target such as HOST:PORT (got {self.target!r})")
        if bool(self.client_cert) != bool(self.client_key):
            missing = "client_key" if self.client_cert else "client_cert"
            raise ValueError(f"klservice.{missing}: client_cert and client_key go together (mutual TLS)")
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"klservice.timeout: expected a number of seconds > 0, got {timeout!r}")

    def client(self, default_job_id: str | None = None) -> KLClient:
        """A new `KLClient` for these options; its job id is ``job_id``, else `default_job_id`."""
        return KLClient(
            self.target,
            job_id=self.job_id or default_job_id,
            model=self.model,
            timeout=float(self.timeout),
            token=self.token,
            tls=self.tls,
            root_certificates=self.root_certificates,
            client_cert=(self.client_cert, self.client_key) if self.client_cert else None,
            tls_server_name=self.tls_server_name,
        )
