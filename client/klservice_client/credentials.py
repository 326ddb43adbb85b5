"""Transport security of a connection to klservice: TLS, mutual TLS, and the bearer token.

`channel_credentials` builds the gRPC channel credentials `KLClient` and `AsyncKLClient` use
(and ``klservice info/score/demo/health``)::

    channel_credentials(tls=True)                                  # TLS, the system's CA roots
    channel_credentials(root_certificates="ca.pem")                # TLS, trusting this CA (a path or PEM bytes)
    channel_credentials(root_certificates="ca.pem", client_cert=("client.pem", "client.key"))  # mutual TLS

The bearer token of a server with ``--auth-file`` travels as ``authorization: Bearer <token>``
metadata on every call (`bearer_metadata`); over a plain channel it travels in clear, so a
server reachable beyond its host should be given ``--tls-cert``.
"""

from __future__ import annotations

import os
from typing import Union

import grpc

PEM = Union[bytes, str, "os.PathLike[str]"]
"""A PEM document: its bytes or text (e.g. from a secret store), or the path of a file holding it."""

TOKEN_ENVIRONMENT_VARIABLE = "KLSERVICE_TOKEN"
"""Where the clients read a bearer token from when none is passed."""


def read_pem(value: PEM, what: str) -> bytes:
    """The bytes of a PEM document given as bytes, as text, or as a path; ValueError naming `what` otherwise.

    The message never quotes the value: it may be a private key.
    """
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str) and "-----BEGIN" in value:
        data = value.encode("ascii", "replace")
    else:
        try:
            with open(value, "rb") as file:
                data = file.read()
        except (OSError, TypeError, ValueError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ValueError(f"{what}: not PEM data and not a readable file ({reason})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: not a PEM document (expected '-----BEGIN ...')")
    return data


def channel_credentials(
    *, tls: bool = False, root_certificates: PEM | None = None, client_cert: tuple[PEM, PEM] | None = None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials, or None for a plain channel.

    TLS is on when `tls` is true or either of the others is given. `root_certificates`: the CA
    bundle the server's certificate must chain to (default: the system's roots). `client_cert`:
    (certificate, private key) presented to a server that requires client certificates.
    """
    if not (tls or root_certificates is not None or client_cert is not None):
        return None
    roots = read_pem(root_certificates, "root_certificates") if root_certificates is not None else None
    key = chain = None
    if client_cert is not None:
        if not (isinstance(client_cert, (tuple, list)) and len(client_cert) == 2):
            raise ValueError("client_cert: expected a (certificate, private key) pair")
        chain = read_pem(client_cert[0], "client_cert certificate")
        key = read_pem(client_cert[1], "client_cert private key")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None, *, tls_server_name: str | None = None,
                 options=(), api=grpc):
    """A gRPC channel (`api`: grpc or grpc.aio) to `target`: over TLS with `credentials`, else plain text.
    `tls_server_name` is the name the server's certificate is checked against, when not the target's host."""
    options = list(options)
    if tls_server_name:
        if credentials is None:
            raise ValueError("tls_server_name: only means something over TLS (KLClient: pass tls=True or "
                             "root_certificates=; klservice: --tls or --tls-ca with --tls-server-name)")
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if credentials is None:
        return api.insecure_channel(target, options=options)
    return api.secure_channel(target, credentials, options=options)


def resolve_token(token: str | None) -> str | None:
    """The token to send: `token`, else $KLSERVICE_TOKEN, else None."""
    return token if token is not None else os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
