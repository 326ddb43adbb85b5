"""Tenants and their bearer tokens: who may call a shared server, and as whom.

With ``klservice serve --auth-file FILE`` every ReferenceService call must carry
``authorization: Bearer <token>`` (with ``--tls-client-ca``, a verified client certificate
whose common name is a tenant's name will do instead); the token names the caller's
*tenant*, and the caller's ``x-job-id`` becomes a job within that tenant (metric labels
``tenant`` and ``trainer_job``), so no caller can act or be counted as another tenant.
Health and reflection stay open; OperatorService calls (ReloadAuth) need the admin role.

The file is TOML and holds only sha256 hashes of the tokens, never the tokens::

    # klservice auth file
    [tenants.team-a]
    role = "trainer"                 # or "admin"
    weight = 1.0                     # the tenant's share of the model under contention
    max_queued_tokens = 0            # most tokens waiting for the model at once; 0: no limit
    tokens = ["sha256:9f86d081884c7d65..."]

The scheduler divides the model's time between tenants by `weight`, a tenant's jobs taking
turns within its share; a request that would take a tenant past `max_queued_tokens` tokens
waiting for the model is refused RESOURCE_EXHAUSTED (with a retry hint) for that tenant
alone; `role = "admin"` may call the operator RPCs.

`klservice auth add-tenant FILE NAME` and `klservice auth add-token FILE NAME` write it:
they print a new random token once and store its hash. The server re-reads the file on
SIGHUP and on ReloadAuth (`klservice auth reload`); a file that does not parse leaves the
previous one in force.

A presented token is hashed and compared with every stored hash with `hmac.compare_digest`
(no early exit), so the time taken does not depend on which stored token, or how much of
one, it matches. Tokens are never logged and never become metric labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROLES = ("trainer", "admin")
TOKEN_PREFIX = "kls_"
HASH_PREFIX = "sha256:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AuthFileError(ValueError):
    """The auth file is missing or malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    role: str = "trainer"
    weight: float = 1.0
    max_queued_tokens: int = 0
    token_hashes: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclasses.dataclass(frozen=True)
class AuthTable:
    """The tenants of one reading of the auth file."""

    tenants: dict[str, Tenant]

    def identify(self, token: str) -> Tenant | None:
        """The tenant a bearer token belongs to, or None. Every stored hash is compared, in constant time."""
        presented = hash_token(token).encode()
        found = None
        for tenant in self.tenants.values():
            for stored in tenant.token_hashes:
                if hmac.compare_digest(presented, stored.encode()):
                    found = tenant
        return found


def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A new random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def load_auth_file(path: str | Path) -> AuthTable:
    """Read and check an auth file; raises AuthFileError naming the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuthFileError(f"{path}: no such auth file (create it with `klservice auth add-tenant {path} NAME`)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise AuthFileError(f"{path}: {error}") from None
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise AuthFileError(f"{path}: 'tenants' must be a table of tenants")
    unknown = set(data) - {"tenants"}
    if unknown:
        raise AuthFileError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; only [tenants.NAME] tables belong here")
    parsed = {name: _tenant(path, name, fields) for name, fields in tenants.items()}
    owners: dict[str, str] = {}
    for tenant in parsed.values():
        for stored in tenant.token_hashes:
            if stored in owners and owners[stored] != tenant.name:
                raise AuthFileError(f"{path}: one token hash is listed for both {owners[stored]!r} and {tenant.name!r}")
            owners[stored] = tenant.name
    return AuthTable(parsed)


def _tenant(path: Path, name: str, fields) -> Tenant:
    where = f"{path}: tenants.{name}"
    if not NAME_PATTERN.match(name):
        raise AuthFileError(f"{where}: a tenant name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    if not isinstance(fields, dict):
        raise AuthFileError(f"{where}: must be a table")
    unknown = set(fields) - {"role", "weight", "max_queued_tokens", "tokens"}
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    role = fields.get("role", "trainer")
    if role not in ROLES:
        raise AuthFileError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    weight = fields.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
        raise AuthFileError(f"{where}.weight: {weight!r} must be a number in (0, 1000]")
    quota = fields.get("max_queued_tokens", 0)
    if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
        raise AuthFileError(f"{where}.max_queued_tokens: {quota!r} must be an integer >= 0 (0: no limit)")
    tokens = fields.get("tokens", [])
    if not isinstance(tokens, list):
        raise AuthFileError(f"{where}.tokens: must be a list of \"sha256:<hex>\" strings")
    for index, stored in enumerate(tokens):
        if not (isinstance(stored, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", stored)):
            raise AuthFileError(
                f"{where}.tokens[{index}]: not a token hash (\"sha256:\" + 64 hex digits); the file holds hashes, "
                "never tokens: add tokens with `klservice auth add-token`"
            )
    return Tenant(name, role, float(weight), quota, tuple(tokens))


# --- writing the file (`klservice auth`) -----------------------------------------------------


def add_tenant(path: str | Path, name: str, *, role: str = "trainer", weight: float = 1.0, max_queued_tokens: int = 0) -> str:
    """Add a tenant with one new token to the auth file (created if missing); returns the token."""
    path = Path(path)
    table = load_auth_file(path) if path.exists() else AuthTable({})
    if name in table.tenants:
        raise AuthFileError(f"{path}: tenant {name!r} exists already; use `klservice auth add-token`")
    token = new_token()
    tenant = _tenant(path, name, {"role": role, "weight": weight, "max_queued_tokens": max_queued_tokens,
                                  "tokens": [hash_token(token)]})
    _write(path, {**table.tenants, name: tenant})
    return token


def add_token(path: str | Path, name: str) -> str:
    """Add a new token to an existing tenant; returns the token."""
    path = Path(path)
    table = load_auth_file(path)
    if name not in table.tenants:
        raise AuthFileError(f"{path}: no tenant {name!r}; add it with `klservice auth add-tenant`")
    token = new_token()
    tenant = table.tenants[name]
    updated = dataclasses.replace(tenant, token_hashes=tenant.token_hashes + (hash_token(token),))
    _write(path, {**table.tenants, name: updated})
    return token


def _write(path: Path, tenants: dict[str, Tenant]) -> None:
    lines = ["# klservice auth file: tenants and the sha256 hashes of their bearer tokens (never the tokens).",
             "# Edit with `klservice auth add-tenant` / `add-token`; the server re-reads it on SIGHUP.", ""]
    for tenant in tenants.values():
        lines += [
            f"[tenants.{tenant.name}]",
            f'role = "{tenant.role}"',
            f"weight = {tenant.weight!r}",
            f"max_queued_tokens = {tenant.max_queued_tokens}",
            "tokens = [" + ", ".join(f'"{h}"' for h in tenant.token_hashes) + "]",
            "",
        ]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(lines), encoding="utf-8")
    temporary.chmod(0o600)
    temporary.replace(path)  # atomic: a server reading it on SIGHUP sees the old file or the new one
