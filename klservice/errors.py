"""Domain exceptions of the server and the one table that maps them to gRPC status codes.

Code below the servicer raises these (or `klservice_client.kl.KLInputError` for bad input
found by the KL library); `status_for` is the only place that decides which status a client
sees. Anything else, a `ValueError` raised inside torch, numpy or a backend included, is an
internal failure: INTERNAL with a generic message, the traceback in the server log, never
on the wire and never blamed on the client.
"""

from __future__ import annotations

import logging

import grpc

from klservice_client.kl import KLInputError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Root of the server's domain exceptions; the message is safe to send to the client."""


class InvalidInput(ServiceError):
    """The request is malformed: the message names the field and the sequence."""


class OutOfRange(ServiceError):
    """A value lies outside what the served model supports (e.g. a sequence longer than its context)."""


class ModelNotFound(ServiceError):
    """The request names a model this server does not serve."""


class FailedPrecondition(ServiceError):
    """The request is valid but the backend cannot honour it (e.g. an option it does not support)."""


class Overloaded(ServiceError):
    """The queue is full; the client should retry after `retry_after` seconds (sent as retry-after-ms metadata)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(ServiceError):
    """The request or its response would exceed the message limit (RESOURCE_EXHAUSTED without a retry hint:
    splitting helps, waiting does not)."""


class NotReady(ServiceError):
    """The model is loading or the server is draining."""


class Unauthenticated(ServiceError):
    """Authentication is on and the call carries no valid bearer token."""


class PermissionDenied(ServiceError):
    """The caller's tenant may not do this (an operator RPC without the admin role)."""


class DeadlineExpired(ServiceError):
    """The request's deadline passed before its work ran."""


class BackendFault(RuntimeError):
    """The backend failed, or answered something other than what was asked (a count, a dtype, a non-finite value).
    Not a ServiceError: it is INTERNAL with the generic message, whatever exception caused it (a ValueError or a
    KLInputError raised inside a backend included); the detail goes to the server log."""


DEADLINE_SLACK_S = 0.1
"""gRPC cancels a call at its deadline give or take its timer's slack: a call cancelled this close to its
deadline is accounted as DEADLINE_EXCEEDED (and dropped for the deadline), not as CANCELLED."""


_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    KLInputError: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

INTERNAL_MESSAGE = "internal error in the reference service (details are in the server log)"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-facing message for an exception."""
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind], str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def logged_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """`status_for`, with the traceback of an internal failure in the server log (gRPC and HTTP alike)."""
    code, message = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=error)
    return code, message
