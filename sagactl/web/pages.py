"""The console's pages and form handlers: the list, one saga with its live parts and events, operator actions, login."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from markupsafe import Markup
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.templating import Jinja2Templates

from sagactl.client import STATUS_WORDS, ClientError
from sagactl.definition_graph import definition_svg
from sagactl.render import status_name
from sagactl.settings import EXIT_UNREACHABLE
from sagactl.web.grpc_calls import SAGA_ID, Orchestrator
from sagactl.web.security import (
    Refused,
    csrf_token,
    flash,
    log_in,
    log_out,
    logged_in,
    operator_token,
    pop_flash,
    require_form,
    safe_next,
    token_problem,
)
from sagactl.web.settings import WebSettings
from sagactl.web.timeline import gantt_svg
from sagactl.web.views import (
    ENDED,
    OPERATION_SPECS,
    BadFilter,
    ListFilter,
    ReasonRule,
    attempts_of,
    fallback_definition,
    history_rows,
    node_states,
    operations_for,
    pretty_json,
    status_counts,
    step_results,
    why_stuck,
)

__all__ = ["Pages"]

log = logging.getLogger("sagactl.web")

# How long a live page's event stream may stay quiet before a comment line keeps it (and its proxies) open.
_KEEPALIVE_SECONDS = 15.0
# The most sagas one batch acts on: what the confirmation lists.
_BATCH_LIMIT = 500
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Refusals that concern the token, not the saga: a batch stops at the first, since every other call would get it too.
_TOKEN_REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_PER_SAGA_PERMISSION = frozenset({"APPROVAL_ROLE_REQUIRED"})


def _field(form: FormData | Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _query(request: Request) -> dict[str, list[str]]:
    return {name: request.query_params.getlist(name) for name in request.query_params}


def _saga_id(request: Request) -> str:
    saga_id = str(request.path_params["saga_id"])
    if not SAGA_ID.fullmatch(saga_id):
        raise HTTPException(404, f"{saga_id[:40]!r} is not a saga id")
    return saga_id


def _back_to(saga_id: str) -> RedirectResponse:
    return RedirectResponse(f"/sagas/{saga_id}", status_code=303)


@dataclass(frozen=True)
class BatchResult:
    """What one call of a batch did to one saga."""

    saga_id: str
    ok: bool
    text: str


class Pages:
    """The console's endpoints; the orchestrator channel is opened when the app starts (in its event loop)."""

    def __init__(self, settings: WebSettings, templates: Jinja2Templates) -> None:
        self.settings = settings
        self.templates = templates
        self._orchestrator: Orchestrator | None = None

    # -- plumbing ------------------------------------------------------------------------------

    async def open(self) -> None:
        self._orchestrator = Orchestrator(self.settings.client)

    async def close(self) -> None:
        if self._orchestrator is not None:
            await self._orchestrator.close()
            self._orchestrator = None

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            raise RuntimeError("the console's orchestrator channel is not open (the app has not started)")
        return self._orchestrator

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        """A page, with what every page shows: the login state, the CSRF token for its forms and the flash message."""
        session: dict[str, Any] = request.session if "session" in request.scope else {}
        signed_in = logged_in(session)
        context.update(
            logged_in=signed_in,
            csrf=csrf_token(session) if signed_in else "",
            flash=pop_flash(session) if session else None,
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            orchestrator_address=self.settings.client.address,
        )
        return self.templates.TemplateResponse(request, template, context, status_code=status_code)

    def _token(self, request: Request) -> str:
        return operator_token(request.session)

    # -- errors --------------------------------------------------------------------------------

    def error_page(self, request: Request, status_code: int, title: str, message: str) -> Response:
        return self.render(request, "error.html", status_code, title=title, message=message)

    async def client_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, ClientError)
        status_code = _HTTP_STATUS.get(error.code, 502) if error.code is not None else 400
        if error.exit_code == EXIT_UNREACHABLE:
            status_code = 503
        return self.error_page(request, status_code, "The orchestrator refused or did not answer", error.message)

    async def refused(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, Refused)
        return self.error_page(request, error.status, error.title, error.message)

    async def http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        titles = {404: "Not found", 405: "Method not allowed", 400: "Bad request"}
        return self.error_page(request, error.status_code, titles.get(error.status_code, "Error"), str(error.detail))

    async def server_error(self, request: Request, error: Exception) -> Response:
        log.exception("the console failed on %s %s", request.method, request.url.path, exc_info=error)
        return self.error_page(
            request, 500, "The console failed", f"{type(error).__name__}: the console's log has the details"
        )

    # -- the list ------------------------------------------------------------------------------

    async def list_page(self, request: Request) -> Response:
        return await self._list(request, _query(request))

    async def _list(
        self, request: Request, query: Mapping[str, list[str]], problem: str = "", status_code: int = 200
    ) -> Response:
        token = self._token(request)
        try:
            chosen = ListFilter.parse(query)
        except BadFilter as error:
            chosen, problem, status_code = ListFilter(), f"{error.field_name}: {error.message}", 400
        now = time.time()
        stats, page, definitions = await asyncio.gather(
            self.orchestrator.stats(token),
            self.orchestrator.list_sagas(chosen.request(now), token),
            self.orchestrator.definitions(token),
        )
        return self.render(
            request,
            "list.html",
            status_code,
            filter=chosen,
            problem=problem,
            counts=status_counts(stats),
            stats=stats,
            sagas=list(page.sagas),
            next_page=page.next_page_token,
            now=now,
            types=sorted({definition.name for definition in definitions}),
            status_words=[word for word in STATUS_WORDS if word != "attention"],
            operations=list(OPERATION_SPECS.values()),
        )

    async def lookup(self, request: Request) -> Response:
        """A saga by id, unique id prefix or business key: its page, or the list saying why not."""
        reference = request.query_params.get("q", "")
        try:
            saga_id = await self.orchestrator.resolve(reference, self._token(request))
        except ClientError as error:
            status_code = 404 if error.code == grpc.StatusCode.NOT_FOUND else 400
            return await self._list(request, {}, problem=f"lookup {reference[:80]!r}: {error.message}",
                                    status_code=status_code)  # fmt: skip
        return _back_to(saga_id)

    # -- one saga ------------------------------------------------------------------------------

    async def saga_page(self, request: Request) -> Response:
        reference = str(request.path_params["saga_id"])
        token = self._token(request)
        if not SAGA_ID.fullmatch(reference):
            # A short id or a business key in the address: the saga's own page.
            return _back_to(await self.orchestrator.resolve(reference, token))
        return self.render(request, "saga.html", **await self._saga_context(reference, token))

    async def saga_live(self, request: Request) -> Response:
        """The parts of the saga page that change, for the page's script to put in place."""
        context = await self._saga_context(_saga_id(request), self._token(request))
        return self.render(request, "_saga_parts.html", **context)

    async def _saga_context(self, saga_id: str, token: str) -> dict[str, Any]:
        saga = await self.orchestrator.saga(saga_id, token)
        try:
            definition = await self.orchestrator.definition(saga.saga_type, saga.definition_version, token)
        except ClientError:
            definition = None
        now = time.time()
        status = status_name(saga.status)
        jaeger = self.settings.jaeger_url.rstrip("/")
        drawn = definition or fallback_definition(saga)
        return {
            "saga": saga,
            "status": status,
            "ended": status in ENDED,
            "now": now,
            "definition": definition,
            "graph": Markup(definition_svg(drawn, node_states(saga), id_prefix="graph")),
            "gantt": gantt_svg(saga, now),
            "facts": why_stuck(saga, now),
            "history": history_rows(saga),
            "results": step_results(saga),
            "steps": [(step, attempts_of(step)) for step in saga.steps],
            "input_text": pretty_json(saga.input_json) if saga.input_json else "",
            "operations": operations_for(saga),
            "approvals": [wait for wait in saga.waits if wait.kind == "approval"],
            "signal_waits": [wait for wait in saga.waits if wait.kind == "signal"],
            "last_seq": saga.history[-1].seq if saga.history else 0,
            "trace_link": f"{jaeger}/trace/{saga.trace_id}" if jaeger and saga.trace_id else "",
            # Made when the form is drawn: sending the same form twice is one delivery.
            "signal_id": f"console-{uuid.uuid4().hex}",
        }

    async def saga_events(self, request: Request) -> Response:
        """The saga's history events as server-sent events, from WatchSaga, until it ends."""
        saga_id = _saga_id(request)
        after = max(_number(request.query_params.get("after", "")), _number(request.headers.get("last-event-id", "")))
        return StreamingResponse(
            self._event_stream(saga_id, after, self._token(request)),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _event_stream(self, saga_id: str, after: int, token: str) -> AsyncIterator[str]:
        # The browser reconnects after this many milliseconds when the stream breaks, sending the last id it saw.
        yield "retry: 3000\n\n"
        try:
            async for response in self.orchestrator.watch(saga_id, after, token, _KEEPALIVE_SECONDS):
                if response is None:
                    yield ": keep-alive\n\n"
                    continue
                event = response.event
                status = status_name(response.status)
                data = {"seq": event.seq, "type": event.type, "step": event.step, "status": status}
                yield f"id: {event.seq}\nevent: history\ndata: {json.dumps(data)}\n\n"
        except ClientError as error:
            yield f"event: problem\ndata: {json.dumps({'message': error.message})}\n\n"
            if error.exit_code == EXIT_UNREACHABLE:
                return  # no end: the browser reconnects and the stream goes on from the last event
        yield "event: end\ndata: {}\n\n"

    # -- operator actions on one saga ----------------------------------------------------------

    async def operate(self, request: Request) -> Response:
        saga_id = _saga_id(request)
        form = await request.form()
        token = require_form(request, form)
        spec = OPERATION_SPECS.get(_field(form, "operation"))
        if spec is None:
            raise Refused(400, "Unknown operation", f"use one of {', '.join(OPERATION_SPECS)}")
        reason = _field(form, "reason")
        if spec.reason is ReasonRule.REQUIRED and not reason:
            flash(request.session, "error", f"{spec.name} needs a reason: it is recorded in the saga's history")
            return _back_to(saga_id)
        try:
            saga = await self.orchestrator.operate(spec.name, saga_id, reason, token)
        except ClientError as error:
            flash(request.session, "error", f"{spec.name} was not done: {error.message}")
        else:
            text = f"{spec.name}: done; the saga is {status_name(saga.status)}"
            if saga.steps_maybe_applied:
                text += f"; effects that may still stand (not compensated): {', '.join(saga.steps_maybe_applied)}"
            flash(request.session, "ok", text)
        return _back_to(saga_id)

    async def decide(self, request: Request) -> Response:
        saga_id = _saga_id(request)
        form = await request.form()
        token = require_form(request, form)
        decision, step, reason = _field(form, "decision"), _field(form, "step"), _field(form, "reason")
        if decision not in ("approve", "reject") or not step:
            raise Refused(400, "Bad decision", "a decision is approve or reject, of a named approval step")
        try:
            answer = await self.orchestrator.decide(saga_id, step, approve=decision == "approve", reason=reason,
                                                    token=token)  # fmt: skip
        except ClientError as error:
            flash(request.session, "error", f"{decision} of {step} was not recorded: {error.message}")
        else:
            done = "approved" if decision == "approve" else "rejected"
            again = " (it had been before: that decision stands)" if answer.duplicate else ""
            flash(request.session, "ok", f"{step} {done}{again}; the saga is {status_name(answer.saga.status)}")
        return _back_to(saga_id)

    async def signal(self, request: Request) -> Response:
        saga_id = _saga_id(request)
        form = await request.form()
        token = require_form(request, form)
        name, signal_id = _field(form, "name"), _field(form, "signal_id") or f"console-{uuid.uuid4().hex}"
        text = _field(form, "payload") or "{}"
        try:
            payload = json.loads(text)
        except ValueError as error:
            flash(request.session, "error", f"signal {name} was not sent: the payload is not JSON ({error})")
            return _back_to(saga_id)
        if not isinstance(payload, dict):
            flash(request.session, "error", f"signal {name} was not sent: the payload must be a JSON object")
            return _back_to(saga_id)
        try:
            answer = await self.orchestrator.signal(saga_id, name, signal_id, payload, token)
        except ClientError as error:
            flash(request.session, "error", f"signal {name} was not delivered: {error.message}")
        except ValueError as error:  # a payload a Struct cannot hold
            flash(request.session, "error", f"signal {name} was not sent: {error}")
        else:
            again = " (a repeat of an earlier delivery)" if answer.duplicate else ""
            flash(request.session, "ok", f"signal {name} delivered{again}")
        return _back_to(saga_id)

    # -- batches over a filter -----------------------------------------------------------------

    async def batch_confirm(self, request: Request) -> Response:
        """The sagas a batch would act on, for the operator to confirm."""
        token = self._token(request)
        if not token:
            raise Refused(403, "Refused: the console is read-only", "log in with an operator token to act on sagas")
        query = _query(request)
        spec = OPERATION_SPECS.get((query.get("operation") or [""])[-1])
        if spec is None:
            raise Refused(400, "Unknown operation", f"use one of {', '.join(OPERATION_SPECS)}")
        try:
            chosen = ListFilter.parse({name: values for name, values in query.items() if name != "page"})
        except BadFilter as error:
            raise Refused(400, "Bad filter", f"{error.field_name}: {error.message}") from None
        statuses = chosen.status_values() or [
            value for name in spec.batch_statuses for value in STATUS_WORDS[name.lower()]
        ]
        sagas, more = await self.orchestrator.list_up_to(chosen.request(time.time(), statuses=statuses),
                                                         _BATCH_LIMIT, token)  # fmt: skip
        return self.render(
            request,
            "batch_confirm.html",
            spec=spec,
            filter=chosen,
            sagas=sagas,
            more=more,
            limit=_BATCH_LIMIT,
            now=time.time(),
            picked=[status_name(value) for value in statuses],
        )

    async def batch_run(self, request: Request) -> Response:
        form = await request.form()
        token = require_form(request, form)
        spec = OPERATION_SPECS.get(_field(form, "operation"))
        if spec is None:
            raise Refused(400, "Unknown operation", f"use one of {', '.join(OPERATION_SPECS)}")
        reason = _field(form, "reason")
        saga_ids = [value for value in form.getlist("saga_id") if isinstance(value, str)]
        if not saga_ids or len(saga_ids) > _BATCH_LIMIT or not all(SAGA_ID.fullmatch(one) for one in saga_ids):
            raise Refused(400, "Bad batch", f"a batch names 1 to {_BATCH_LIMIT} saga ids, as its confirmation lists")
        if spec.reason is ReasonRule.REQUIRED and not reason:
            raise Refused(
                400, f"{spec.name} needs a reason", "it is recorded in each saga's history: go back, give one"
            )
        results: list[BatchResult] = []
        stopped = ""
        for saga_id in saga_ids:
            try:
                saga = await self.orchestrator.operate(spec.name, saga_id, reason, token)
            except ClientError as error:
                if error.exit_code == EXIT_UNREACHABLE or (
                    error.code in _TOKEN_REFUSALS and error.reason not in _PER_SAGA_PERMISSION
                ):
                    stopped = error.message
                    break
                results.append(BatchResult(saga_id, False, error.message))
            else:
                results.append(BatchResult(saga_id, True, f"now {status_name(saga.status)}"))
        return self.render(
            request,
            "batch_done.html",
            spec=spec,
            results=results,
            stopped=stopped,
            not_tried=len(saga_ids) - len(results),
            succeeded=sum(1 for result in results if result.ok),
        )

    # -- login ---------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        csrf_token(request.session)  # the login form needs one before anyone is logged in
        return self._login_form(request, safe_next(request.query_params.get("next", "/")))

    def _login_form(self, request: Request, next_path: str, problem: str = "", status_code: int = 200) -> Response:
        return self.render(
            request, "login.html", status_code, next_path=next_path, problem=problem,
            login_csrf=csrf_token(request.session),
        )  # fmt: skip

    async def login(self, request: Request) -> Response:
        form = await request.form()
        require_form(request, form, operator=False)
        next_path = safe_next(_field(form, "next") or "/")
        token = _field(form, "token")
        problem = token_problem(token)
        if problem:
            return self._login_form(request, next_path, f"that is not a token: {problem}", 400)
        log_in(request.session, token)
        flash(
            request.session,
            "ok",
            "logged in: operator actions now carry your token (the orchestrator checks it on each call)",
        )
        return RedirectResponse(next_path, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        require_form(request, form, operator=False)
        log_out(request.session)
        flash(request.session, "ok", "logged out: the console is read-only")
        return RedirectResponse("/", status_code=303)

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")


def _number(text: str | None) -> int:
    return int(text) if text and text.isdigit() and len(text) < 19 else 0
