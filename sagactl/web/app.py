"""The console's Starlette app: its routes, the session and header middleware, templates, static files and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from sagactl.client import ClientError
from sagactl.render import age, status_name
from sagactl.web.pages import Pages
from sagactl.web.security import CSRF_FIELD, Refused, SecurityHeaders
from sagactl.web.settings import WebSettings
from sagactl.web.views import ago, clock, short_id, took, when

__all__ = ["SESSION_COOKIE", "create_app"]

SESSION_COOKIE = "saga_console"


def _templates() -> Jinja2Templates:
    # Autoescape everywhere: every value a saga carries (business keys, messages, results) is text, never markup.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sagactl.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        when=when, clock=clock, age=age, ago=ago, short_id=short_id, took=took, status=status_name
    )
    environment.globals["CSRF_FIELD"] = CSRF_FIELD
    return Jinja2Templates(env=environment)


def create_app(settings: WebSettings) -> ASGIApp:
    """The console as an ASGI app, for uvicorn; its channel to the orchestrator opens when it starts."""
    pages = Pages(settings, _templates())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pages.open()
        try:
            yield
        finally:
            await pages.close()

    routes = [
        Route("/", pages.list_page),
        Route("/lookup", pages.lookup),
        Route("/batch", pages.batch_confirm, methods=["GET"]),
        Route("/batch", pages.batch_run, methods=["POST"]),
        Route("/sagas/{saga_id}", pages.saga_page),
        Route("/sagas/{saga_id}/live", pages.saga_live),
        Route("/sagas/{saga_id}/events", pages.saga_events),
        Route("/sagas/{saga_id}/operate", pages.operate, methods=["POST"]),
        Route("/sagas/{saga_id}/decide", pages.decide, methods=["POST"]),
        Route("/sagas/{saga_id}/signal", pages.signal, methods=["POST"]),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/healthz", pages.health),
        Mount("/static", StaticFiles(packages=[("sagactl.web", "static")]), name="static"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=settings.session_secret,
            session_cookie=SESSION_COOKIE,
            max_age=settings.session_seconds,
            same_site="strict",
            https_only=settings.secure_cookie,
        )
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ClientError: pages.client_error,
            Refused: pages.refused,
            HTTPException: pages.http_error,
            Exception: pages.server_error,
        },
    )
    # Outside everything, so the error pages of the outermost middleware get the headers too.
    return SecurityHeaders(app)
