"""Who may call the orchestrator: bearer tokens for operator calls, and optionally for reads and starts, audited."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from svckit.errors import DomainError, PermissionDenied, RetryableError, Unauthenticated

__all__ = [
    "AUTHORIZATION_HEADER",
    "ROLES",
    "AccessControl",
    "Credential",
    "TokenSource",
    "audit",
    "bearer",
    "parse_tokens",
]

AUTHORIZATION_HEADER = "authorization"
# The two roles with a fixed meaning. Any other role name (e.g. fraud_reviewer) is a client that may
# also decide the approvals that name it.
ROLES = ("operator", "client")
_ROLE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MIN_TOKEN_LENGTH = 16
Kind = Literal["operate", "read", "start"]

audit_log = logging.getLogger("sagasuite.audit")
log = logging.getLogger("sagasuite.orchestrator")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
_SAFE_ID = frozenset(string.ascii_letters + string.digits + "-_.:/")


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that carries `token`, for clients: `authorization: Bearer <token>`."""
    return ((AUTHORIZATION_HEADER, f"Bearer {token}"),)


@dataclass(frozen=True)
class Credential:
    """One configured token, kept only as its SHA-256 digest, with the name and role it stands for."""

    name: str
    digest: bytes
    role: str

    def allows(self, kind: Kind) -> bool:
        return self.role == "operator" or kind != "operate"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, *, source: str, separator: str = ",") -> list[Credential]:
    """Parse `name:token[:role]` entries split by `separator`; ValueError names the bad entry (never the token)."""
    credentials: list[Credential] = []
    seen: dict[bytes, str] = {}
    for number, raw in enumerate(text.split(separator), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{source} entry {number}"
        parts = entry.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{where}: expected name:token or name:token:role")
        name, token = parts[0].strip(), parts[1].strip()
        role = parts[2].strip() if len(parts) == 3 else "operator"
        if not _NAME.match(name):
            raise ValueError(
                f"{where}: name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
            )
        if len(token) < MIN_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
            raise ValueError(
                f"{where} ({name}): the token must be at least {MIN_TOKEN_LENGTH} characters of "
                "A-Z a-z 0-9 - . _ ~ + / = "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if not _ROLE.match(role):
            raise ValueError(
                f"{where} ({name}): role {role!r} must be operator, client, or an approval role of 1-40 of "
                "a-z 0-9 _ starting with a letter"
            )
        digest = _digest(token)
        if digest in seen and seen[digest] != name:
            raise ValueError(f"{where}: {name} and {seen[digest]} share one token; each token must name one caller")
        seen[digest] = name
        credentials.append(Credential(name, digest, role))
    return credentials


class TokenSource:
    """The tokens of OPERATOR_TOKENS plus those of OPERATOR_TOKENS_FILE, the file re-read when it changes.

    The file is checked (one stat) on every call that needs a token. A file that can no longer be
    read counts as holding no tokens (so deleting it revokes them); a file that cannot be parsed
    keeps the tokens read last (a half-written edit must not lock everyone out). Both are logged
    as errors. At start, either problem is a configuration error.
    """

    def __init__(self, inline: str = "", path: str = "") -> None:
        self._inline = parse_tokens(inline, source="OPERATOR_TOKENS")
        self._path = path
        self._signature: tuple[int, ...] | None = None
        self._from_file: list[Credential] = []
        if path:
            self._signature = self._stat()
            if self._signature is None:
                raise ValueError(f"OPERATOR_TOKENS_FILE={path!r} cannot be read")
            self._from_file = self._parse_file()
        self._all: tuple[Credential, ...] = (*self._inline, *self._from_file)

    def _stat(self) -> tuple[int, ...] | None:
        try:
            info = os.stat(self._path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_dev)

    def _parse_file(self) -> list[Credential]:
        with open(self._path, encoding="utf-8") as handle:
            return parse_tokens(handle.read(), source="OPERATOR_TOKENS_FILE", separator="\n")

    def _refresh(self) -> None:
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        if signature is None:
            log.error("OPERATOR_TOKENS_FILE %s cannot be read: its tokens are no longer accepted", self._path)
            self._from_file = []
        else:
            try:
                self._from_file = self._parse_file()
            except (OSError, UnicodeDecodeError, ValueError) as error:
                log.error(
                    "OPERATOR_TOKENS_FILE %s was changed but is invalid, keeping the tokens read last: %s",
                    self._path,
                    error,
                )
                return
            names = sorted({c.name for c in self._from_file})
            log.info(
                "OPERATOR_TOKENS_FILE %s re-read: %d token(s) for %s",
                self._path,
                len(self._from_file),
                ", ".join(names) or "nobody",
            )
        self._all = (*self._inline, *self._from_file)

    def credentials(self) -> Sequence[Credential]:
        if self._path:
            self._refresh()
        return self._all

    def match(self, token: str) -> Credential | None:
        """The entry holding `token`; every entry is compared, in constant time, whatever matches."""
        digest = _digest(token)
        found: Credential | None = None
        for credential in self.credentials():
            if hmac.compare_digest(credential.digest, digest) and found is None:
                found = credential
        return found


def _quoted(value: str, limit: int = 100) -> str:
    """A request value fit for one audit line, never mistaken for another field or line.

    An id of safe characters is written as it is; anything else (empty, a space, "=", a newline...)
    as a JSON string, every character past printable ASCII escaped, and cut to limit characters
    with an ellipsis outside the quotes.
    """
    if value and len(value) <= limit and all(c in _SAFE_ID for c in value):
        return value
    return json.dumps(value[:limit], ensure_ascii=True).replace("\x7f", "\\u007f") + (
        "\u2026" if len(value) > limit else ""
    )


def audit(
    actor: str,
    action: str,
    saga_id: str,
    outcome: str,
    *,
    peer: str = "",
    error: DomainError | RetryableError | None = None,
) -> None:
    """One audit line: who, what, on which saga, and how it ended (with the refusal's code and reason)."""
    detail = ""
    if error is not None:
        reason = getattr(error, "reason", "")
        detail = f" code={error.code.name}" + (f" reason={reason}" if reason else "")
    audit_log.info(
        "audit actor=%s action=%s saga=%s outcome=%s%s peer=%s",
        actor or "-",
        action,
        _quoted(saga_id),
        outcome,
        detail,
        _quoted(peer, 80),
    )


class AccessControl:
    """Decides per call whether it may go ahead, and names the caller for the history and the audit.

    Tokens are configured as `name:token[:role]` entries, comma-separated in OPERATOR_TOKENS and one per
    line in OPERATOR_TOKENS_FILE (blank lines and `#` comments allowed). The file is re-read whenever it
    changes, so a token is added or revoked without a restart. The name is who the audit log and the
    saga history record; the role is `operator` (the default: every call) or `client` (starting sagas
    and reads, where those need a token, but no operator call). One name may hold several tokens at
    once, which is how a token is rotated.

    Callers send the token as gRPC metadata `authorization: Bearer <token>`. Refusals:

    | situation | status | reason |
    |---|---|---|
    | operator call and no token is configured at all | PERMISSION_DENIED | OPERATOR_CALLS_DISABLED |
    | no `authorization` metadata | UNAUTHENTICATED | TOKEN_REQUIRED |
    | metadata that is not `Bearer <token>` | UNAUTHENTICATED | MALFORMED_AUTHORIZATION |
    | a token no entry has | UNAUTHENTICATED | INVALID_TOKEN |
    | a `client` token on an operator call | PERMISSION_DENIED | OPERATOR_ROLE_REQUIRED |

    Every operator call, carried out or not, and every refused call writes one line to the
    `sagasuite.audit` logger: `audit actor=<name> action=<call> saga=<id> outcome=<ok|refused|failed> ...`.
    """

    def __init__(self, tokens: TokenSource, *, read_access: str = "open", place_order_access: str = "open") -> None:
        for setting, value in (("READ_ACCESS", read_access), ("PLACE_ORDER_ACCESS", place_order_access)):
            if value not in ("open", "token"):
                raise ValueError(f"{setting}={value!r}: expected open or token")
        self.tokens = tokens
        self.read_access = read_access
        self.place_order_access = place_order_access
        if not tokens.credentials() and "token" in (read_access, place_order_access):
            raise ValueError(
                "READ_ACCESS=token or PLACE_ORDER_ACCESS=token needs tokens: "
                "set OPERATOR_TOKENS or OPERATOR_TOKENS_FILE"
            )

    @classmethod
    def from_settings(cls, settings: object) -> AccessControl:
        return cls(
            TokenSource(getattr(settings, "operator_tokens", ""), getattr(settings, "operator_tokens_file", "")),
            read_access=getattr(settings, "read_access", "open"),
            place_order_access=getattr(settings, "place_order_access", "open"),
        )

    def needs_token(self, kind: Kind) -> bool:
        if kind == "operate":
            return True
        return (self.read_access if kind == "read" else self.place_order_access) == "token"

    def authorize(self, context: grpc.aio.ServicerContext[Any, Any], kind: Kind, action: str, saga_id: str = "") -> str:
        """The caller's name when the call may proceed; otherwise audits and raises the refusal.

        Open calls return "anonymous" without looking at any metadata.
        """
        if not self.needs_token(kind):
            return "anonymous"
        credential: Credential | None = None
        try:
            credential = self._authenticate(context, kind)
            if not credential.allows(kind):
                raise PermissionDenied(
                    "OPERATOR_ROLE_REQUIRED",
                    f"{credential.name} holds a {credential.role} token; {action} needs an operator token",
                    {"action": action, "role": credential.role},
                )
        except DomainError as error:
            audit(credential.name if credential else "-", action, saga_id, "refused", peer=_peer(context), error=error)
            raise
        return credential.name

    def authorize_decision(self, context: grpc.aio.ServicerContext[Any, Any], action: str, saga_id: str) -> Credential:
        """The caller of an approval decision: a token is always needed; its role is checked against the step's."""
        try:
            if not self.tokens.credentials():
                raise PermissionDenied(
                    "OPERATOR_CALLS_DISABLED",
                    "approval decisions are disabled: no token is configured (set OPERATOR_TOKENS or "
                    "OPERATOR_TOKENS_FILE)",
                )
            return self._authenticate(context, "read")
        except DomainError as error:
            audit("-", action, saga_id, "refused", peer=_peer(context), error=error)
            raise

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any], kind: Kind) -> Credential:
        if kind == "operate" and not self.tokens.credentials():
            raise PermissionDenied(
                "OPERATOR_CALLS_DISABLED",
                "operator calls are disabled: no token is configured (set OPERATOR_TOKENS or OPERATOR_TOKENS_FILE)",
            )
        header = _metadata(context, AUTHORIZATION_HEADER)
        hint = {"header": AUTHORIZATION_HEADER, "scheme": "Bearer"}
        if header is None:
            raise Unauthenticated(
                "TOKEN_REQUIRED",
                f"this call needs a token: send metadata '{AUTHORIZATION_HEADER}: Bearer <token>'",
                hint,
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "MALFORMED_AUTHORIZATION", f"'{AUTHORIZATION_HEADER}' metadata must be 'Bearer <token>'", hint
            )
        credential = self.tokens.match(token)
        if credential is None:
            raise Unauthenticated("INVALID_TOKEN", "the bearer token is not valid", hint)
        return credential


def _metadata(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return context.peer() or ""
    except Exception:
        return ""
