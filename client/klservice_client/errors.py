"""The client's exceptions: one root, a subclass per failure kind, mapped from gRPC status codes in one place."""

from __future__ import annotations

import grpc

from klservice_client.wire import RETRY_AFTER_METADATA_KEY

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "KLServiceError",
    "ModelNotFound",
    "PermissionDenied",
    "ServerError",
    "ServiceOverloaded",
    "ServiceUnavailable",
    "TokenizerMismatch",
    "TooLarge",
    "Unauthenticated",
    "from_rpc_error",
]


class KLServiceError(Exception):
    """Root of every error the client raises. ``code`` is the gRPC status code, when there is one."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(KLServiceError, ValueError):
    """The request was malformed; the message names the field and sequence (INVALID_ARGUMENT, OUT_OF_RANGE)."""


class ModelNotFound(KLServiceError):
    """The requested model is not the one served (NOT_FOUND)."""


class FailedPrecondition(KLServiceError):
    """The server cannot do this with its current model or backend (FAILED_PRECONDITION)."""


class RevisionMismatch(FailedPrecondition):
    """The request was pinned to a revision and the model now serves another (FAILED_PRECONDITION whose message
    begins "revision: "): the reference changed, e.g. by a LoadModel, between two calls of one trainer."""


REVISION_MISMATCH_PREFIX = "revision: "
"""How the server's message for `RevisionMismatch` begins (klservice.validation.check_revision)."""


class ServiceOverloaded(KLServiceError):
    """The server's queue is full (RESOURCE_EXHAUSTED with the server's retry-after-ms hint); retried with
    backoff before this is raised."""


class TooLarge(KLServiceError):
    """A request, its response or its metadata exceeds a size limit (RESOURCE_EXHAUSTED without a retry hint):
    splitting helps, waiting does not, so it is not retried. The message says which limit."""


class ServiceUnavailable(KLServiceError):
    """The server is loading, draining or unreachable (UNAVAILABLE); retried before this is raised."""


class DeadlineExceeded(KLServiceError, TimeoutError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class Unauthenticated(KLServiceError):
    """Missing or invalid credentials (UNAUTHENTICATED)."""


class PermissionDenied(KLServiceError):
    """Credentials valid but not allowed (PERMISSION_DENIED)."""


class ServerError(KLServiceError):
    """The server failed (INTERNAL or any other status)."""


class TokenizerMismatch(KLServiceError):
    """The trainer's tokenizer is not the one the server's model uses."""


_BY_CODE: dict[grpc.StatusCode, type[KLServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServiceOverloaded,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def retry_hint(error: grpc.RpcError) -> float | None:
    """Seconds the server asked the caller to wait (its retry-after-ms trailing metadata), or None."""
    try:
        metadata = dict(error.trailing_metadata() or ())
        value = metadata.get(RETRY_AFTER_METADATA_KEY)
        return None if value is None else float(value) / 1000.0
    except (TypeError, ValueError, AttributeError):
        return None


def is_overload(error: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED because the server is busy (it sent a retry hint), not because something is too large."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_hint(error) is not None


def from_rpc_error(error: grpc.RpcError) -> KLServiceError:
    """The typed exception for a failed call (the original is kept as ``__cause__`` by the caller)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    kind = _BY_CODE.get(code, ServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_overload(error):
        kind = TooLarge
    if code == grpc.StatusCode.FAILED_PRECONDITION and (details or "").startswith(REVISION_MISMATCH_PREFIX):
        kind = RevisionMismatch
    name = code.name if code is not None else "UNKNOWN"
    return kind(f"{name}: {details}", code)


def from_status(code: int, message: str, retry_after_ms: int = 0) -> KLServiceError:
    """The typed exception for an error item of a StreamKL stream (numeric status code, retry hint or 0)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    kind = _BY_CODE.get(status, ServerError)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms <= 0:
        kind = TooLarge
    if status == grpc.StatusCode.FAILED_PRECONDITION and message.startswith(REVISION_MISMATCH_PREFIX):
        kind = RevisionMismatch
    return kind(f"{status.name}: {message}", status)
