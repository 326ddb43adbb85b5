"""The client's exceptions: one root, a subclass per failure kind, mapped from gRPC status codes in one place."""

from __future__ import annotations

import grpc

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


class ServiceOverloaded(KLServiceError):
    """The server's queue is full (RESOURCE_EXHAUSTED); retried with backoff before this is raised."""


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


def from_rpc_error(error: grpc.RpcError) -> KLServiceError:
    """The typed exception for a failed call (the original is kept as ``__cause__`` by the caller)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    kind = _BY_CODE.get(code, ServerError)
    name = code.name if code is not None else "UNKNOWN"
    return kind(f"{name}: {details}", code)


def from_status(code: int, message: str) -> KLServiceError:
    """The typed exception for an error item of a StreamKL stream (numeric status code)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(status, ServerError)(f"{status.name}: {message}", status)
