"""The console's guards: the operator's token in the signed session, a CSRF token on every form, and strict headers."""

from __future__ import annotations

import hmac
import secrets
import string
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CSRF_FIELD",
    "Refused",
    "SecurityHeaders",
    "csrf_token",
    "flash",
    "log_in",
    "log_out",
    "logged_in",
    "operator_token",
    "pop_flash",
    "require_form",
    "safe_next",
    "token_problem",
]

CSRF_FIELD = "csrf_token"
_TOKEN, _CSRF, _FLASH, _SINCE = "token", "csrf", "flash", "since"
# What the orchestrator accepts as a token (orchestrator/auth.py): the console refuses anything else before sending it.
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
_MIN_TOKEN, _MAX_TOKEN = 16, 1024

# No inline script or style anywhere: the console's own files, from its own origin, are all a page may load.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Same-origin only: a saga's address never reaches the Jaeger UI it links to, while forms keep their Origin.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


class Refused(Exception):
    """A request the console will not carry out, with the HTTP status and the sentence that says why."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, made on first use: every form the console renders carries it."""
    token = session.get(_CSRF)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF] = token
    return token


def operator_token(session: Mapping[str, Any]) -> str:
    token = session.get(_TOKEN)
    return token if isinstance(token, str) else ""


def logged_in(session: Mapping[str, Any]) -> bool:
    return bool(operator_token(session))


def token_problem(token: str) -> str | None:
    """Why the orchestrator would never accept this token, or None."""
    if not _MIN_TOKEN <= len(token) <= _MAX_TOKEN or not set(token) <= _TOKEN_CHARS:
        return f"a token is {_MIN_TOKEN} to {_MAX_TOKEN} characters of A-Z a-z 0-9 - . _ ~ + / ="
    return None


def log_in(session: dict[str, Any], token: str) -> None:
    """Start a new session holding the token, with a new CSRF token (a session fixed before the login is dropped)."""
    session.clear()
    session[_TOKEN] = token
    session[_SINCE] = int(time.time())
    session[_CSRF] = secrets.token_urlsafe(32)


def log_out(session: dict[str, Any]) -> None:
    session.clear()
    session[_CSRF] = secrets.token_urlsafe(32)


def flash(session: dict[str, Any], tone: str, text: str) -> None:
    """A message for the next page the browser shows (after a redirect): tone is ok or error."""
    session[_FLASH] = {"tone": tone, "text": text}


def pop_flash(session: dict[str, Any]) -> dict[str, str] | None:
    found = session.pop(_FLASH, None) if _FLASH in session else None
    return found if isinstance(found, dict) else None


def safe_next(path: str) -> str:
    """Where to go after a login: a path of this console only (never another site), else the list."""
    parts = urlsplit(path)
    if not path.startswith("/") or path.startswith("//") or "\\" in path or parts.scheme or parts.netloc:
        return "/"
    return path


def require_form(request: Request, form: Mapping[str, Any], *, operator: bool = True) -> str:
    """Check a POST before it acts: from this console's own pages (its Origin, its CSRF token) and, for an operator
    action, by a logged-in operator. The operator's token; Refused (403) otherwise."""
    origin = request.headers.get("origin")
    # "null" is what a browser sends when it will not say (a privacy setting): the CSRF token still decides then.
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Refused(403, "Refused: another site's form", f"a form from {origin} cannot act on this console")
    token = operator_token(request.session)
    if operator and not token:
        raise Refused(
            403,
            "Refused: the console is read-only",
            "log in with an operator token to retry, pause, resume, cancel, terminate, decide or signal",
        )
    expected = request.session.get(_CSRF)
    sent = form.get(CSRF_FIELD)
    if not isinstance(expected, str) or not isinstance(sent, str) or not hmac.compare_digest(expected, sent):
        raise Refused(
            403,
            "Refused: the form's CSRF token is missing or wrong",
            "nothing was done: reload the page and send the form again",
        )
    return token


class SecurityHeaders:
    """ASGI middleware that gives every response the console's strict headers, and pages no caching."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    # Saga data and session state: never from a cache, never kept by one.
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)
