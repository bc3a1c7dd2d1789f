"""The `saga web` command: the web console, a process of its own on uvicorn that calls the orchestrator over gRPC."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from sagactl.common import calls_orchestrator, fail, usage
from sagactl.settings import EXIT_USAGE, ClientConfig
from sagactl.web.settings import DEFAULT_LISTEN, ENV_JAEGER_UI_URL, ENV_SECURE_COOKIE, ENV_SESSION_SECRET

__all__ = ["commands"]

# The console itself (Starlette, uvicorn, Jinja2) loads only when the command runs, not for `saga --help`.

commands = typer.Typer()

_HELP = (
    "Serve the web console: list and filter sagas, follow one live (its graph, timeline, history and why it waits), "
    "and operate them after a login with an operator token.\n\n"
    "The console is a process of its own: it calls the orchestrator at --address over its public gRPC API, and "
    "serves every page and asset itself (no CDN, no external font). Without a login it is read-only; the token "
    "entered at its login page is kept in a signed, HttpOnly, SameSite=Strict session cookie, and every form "
    "carries a CSRF token. --token (SAGA_TOKEN), when set, is sent on reads only, for an orchestrator whose "
    "reads need a token (READ_ACCESS=token); operator actions always carry the logged-in operator's own."
)
_EPILOG = (
    "Exits 0 when stopped with Ctrl-C or SIGTERM, 2 when it cannot listen or on a usage error. Once it answers it "
    "prints 'saga web: serving http://HOST:PORT'.\n\n"
    "[bold]Examples[/]\n\n"
    "  saga web\n\n"
    "  saga web --listen 0.0.0.0:8080 --address orchestrator:50050 --jaeger-url http://127.0.0.1:16686\n\n"
    "  SAGA_WEB_SESSION_SECRET=$(cat secret) saga web --secure-cookie"
)

Listen_ = Annotated[
    str, typer.Option("--listen", metavar="HOST:PORT", help="where the console listens; port 0 picks a free one")
]
JaegerUrl_ = Annotated[
    str,
    typer.Option(
        "--jaeger-url",
        envvar=ENV_JAEGER_UI_URL,
        metavar="URL",
        help="the Jaeger UI, e.g. http://127.0.0.1:16686: each saga page links to its trace there",
        show_default=False,
    ),
]
SessionSecret_ = Annotated[
    str,
    typer.Option(
        "--session-secret",
        envvar=ENV_SESSION_SECRET,
        metavar="SECRET",
        help="signs the session cookie (16+ characters); unset: a random one, so logins end when the console stops",
        show_default=False,
    ),
]
SecureCookie_ = Annotated[
    bool,
    typer.Option(
        "--secure-cookie",
        envvar=ENV_SECURE_COOKIE,
        help="mark the session cookie Secure, sent over HTTPS only: for a console behind an HTTPS proxy",
    ),
]


def _web(
    listen: Listen_ = DEFAULT_LISTEN,
    jaeger_url: JaegerUrl_ = "",
    session_secret: SessionSecret_ = "",
    secure_cookie: SecureCookie_ = False,
    *,
    config: ClientConfig,
) -> None:
    from sagactl.client import check_address
    from sagactl.web.server import bind, serve
    from sagactl.web.settings import BadListenAddress, WebSettings, parse_listen

    try:
        host, port = parse_listen(listen)
    except BadListenAddress as error:
        usage(str(error))
    check_address(config.address)
    try:
        settings = WebSettings(client=config, host=host, port=port, jaeger_url=jaeger_url.strip(),
                               secure_cookie=secure_cookie)  # fmt: skip
        if session_secret:
            settings = dataclasses.replace(settings, session_secret=session_secret)
    except ValueError as error:
        usage(str(error))
    try:
        sock = bind(host, port)
    except OSError as error:
        fail(f"cannot listen on {listen}: {error.strerror or error}", EXIT_USAGE)
    serve(settings, sock)


commands.command("web", help=_HELP, epilog=_EPILOG)(calls_orchestrator(_web))
