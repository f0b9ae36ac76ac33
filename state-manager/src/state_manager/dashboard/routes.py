"""The dashboard's HTTP routes: server-rendered pages, sign-in, and the two actions.

Every page needs a session (else it redirects to the sign-in page and back);
every POST also needs the session's CSRF token and a same-origin ``Origin``.
Handlers parse, call one service of :mod:`state_manager.services.views`, and
render a template; errors become HTML pages through :class:`DashboardRoute`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment
from pydantic import ValidationError

from state_manager.api import schemas
from state_manager.api.routes import MAX_PAGE, GraphName, Namespace, RunId
from state_manager.dashboard import session as sessions
from state_manager.dashboard.render import page_context
from state_manager.dashboard.urls import run_url
from state_manager.errors import InvalidRequest, NotFound, StateManagerError
from state_manager.services import graphs, runs, views
from state_manager.services.context import Context
from state_manager.settings import Settings

PAGE_SIZES = (10, 20, 50, 100)
REFRESH_CHOICES = (0, 5, 10, 30, 60)
RUN_REFRESH_MS = 2000
NODE_PAGE_SIZE = 50
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Dashboard:
    """What the routes need, built once per app (kept on ``app.state.dashboard``)."""

    settings: Settings
    signer: sessions.Signer
    templates: Environment


class SignInRequired(Exception):
    """A page was asked for without a valid session."""


class Refused(Exception):
    """A state-changing request without a session, a valid CSRF token or our origin."""


def _dashboard(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


def _context(request: Request) -> Context:
    found: Context = request.app.state.context
    return found


def render(
    request: Request,
    template: str,
    values: Mapping[str, Any],
    *,
    session: sessions.Session | None,
    status_code: int = 200,
) -> HTMLResponse:
    dashboard = _dashboard(request)
    html = dashboard.templates.get_template(template).render(
        **page_context(request, session), **values
    )
    return HTMLResponse(html, status_code=status_code)


class DashboardRoute(APIRoute):
    """Answers every dashboard request with HTML and the dashboard's security headers:
    sign-in redirects, refusals and service errors become pages, never JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(
                    "/dashboard/login?" + urlencode({"next": target}), status_code=303
                )
            except Refused as exc:
                response = _error_page(request, 403, str(exc))
            except StateManagerError as exc:
                response = _error_page(request, exc.status_code, exc.detail)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
                )
                response = _error_page(request, 400, f"Invalid request: {problems}")
            response.headers.update(SECURITY_HEADERS)
            return response

        return wrapped


def _error_page(request: Request, status: int, message: str) -> HTMLResponse:
    current = _current_session(request)
    return render(
        request,
        "error.html",
        {"status": status, "message": message},
        session=current,
        status_code=status,
    )


def _current_session(request: Request) -> sessions.Session | None:
    context = _context(request)
    return _dashboard(request).signer.session(
        request.cookies.get(sessions.SESSION_COOKIE), context.clock() // 1000
    )


def require_session(request: Request) -> sessions.Session:
    found = _current_session(request)
    if found is None:
        if request.method in {"GET", "HEAD"}:
            raise SignInRequired()
        raise Refused("Not signed in: sign in to the dashboard first.")
    return found


def _own_host(request: Request) -> str:
    return request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    """The fields of an urlencoded form (the only kind the dashboard posts)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise Refused("Expected a form submitted from the dashboard.")
    body = (await request.body()).decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            raise InvalidRequest("The form contains a NUL character")
        fields[name] = value
    return fields


def _require_our_origin(request: Request) -> None:
    if not sessions.same_origin(
        request.headers.get("origin"), request.headers.get("referer"), _own_host(request)
    ):
        raise Refused("Cross-site request refused.")


async def checked_form(
    request: Request, current: Annotated[sessions.Session, Depends(require_session)]
) -> dict[str, str]:
    """The form of a state-changing request, after the CSRF and origin checks."""
    _require_our_origin(request)
    fields = await _form(request)
    if not sessions.csrf_ok(current, fields.get("csrf_token")):
        raise Refused("Missing or wrong CSRF token: reload the page and try again.")
    return fields


SessionDep = Annotated[sessions.Session, Depends(require_session)]
FormDep = Annotated[dict[str, str], Depends(checked_form)]
ContextDep = Annotated[Context, Depends(_context)]

router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)


# -- sign-in ------------------------------------------------------------------------


def _login_page(
    request: Request, next_url: str, error: str | None, status_code: int = 200
) -> HTMLResponse:
    dashboard = _dashboard(request)
    nonce, cookie = dashboard.signer.new_login_nonce(_context(request).clock() // 1000)
    response = render(
        request,
        "login.html",
        {"next_url": next_url, "nonce": nonce, "error": error},
        session=None,
        status_code=status_code,
    )
    _set_cookie(request, response, sessions.LOGIN_COOKIE, cookie, sessions.LOGIN_NONCE_SECONDS)
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=sessions.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return _login_page(request, sessions.safe_next(next), None)


@router.post("/login")
async def login(request: Request) -> Response:
    _require_our_origin(request)
    fields = await _form(request)
    next_url = sessions.safe_next(fields.get("next"))
    dashboard = _dashboard(request)
    now = _context(request).clock() // 1000
    if not dashboard.signer.login_nonce_ok(
        request.cookies.get(sessions.LOGIN_COOKIE), fields.get("nonce", ""), now
    ):
        return _login_page(request, next_url, "The sign-in form expired; try again.", 400)
    if not sessions.api_key_matches(
        fields.get("api_key", ""), dashboard.settings.state_manager_secret
    ):
        return _login_page(request, next_url, "Wrong API key.", 401)
    lifetime = dashboard.settings.dashboard_session_hours * 3600
    _session, cookie = dashboard.signer.new_session(now, lifetime)
    response = RedirectResponse(next_url, status_code=303)
    _set_cookie(request, response, sessions.SESSION_COOKIE, cookie, lifetime)
    response.delete_cookie(sessions.LOGIN_COOKIE, path=sessions.COOKIE_PATH)
    return response


@router.post("/logout")
async def logout(_form: FormDep) -> Response:
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE, path=sessions.COOKIE_PATH)
    return response


# -- overview -----------------------------------------------------------------------


@router.get("/")
@router.get("/namespaces/{namespace}")
async def overview(
    request: Request, current: SessionDep, ctx: ContextDep, namespace: str | None = None
) -> Response:
    """A namespace (from the path, or ``?namespace=``; default: the first one)."""
    found = await views.overview(ctx, namespace)
    return render(request, "overview.html", {"overview": found}, session=current)


# -- runs ---------------------------------------------------------------------------


@router.get("/namespaces/{namespace}/runs")
async def runs_page(
    request: Request,
    namespace: Namespace,
    current: SessionDep,
    ctx: ContextDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    size: Annotated[int, Query(ge=1, le=max(PAGE_SIZES))] = 20,
    refresh: Annotated[int, Query(ge=0, le=3600)] = 10,
) -> Response:
    total, listed = await runs.list_runs(ctx, namespace, page, size)
    return render(
        request,
        "runs.html",
        {
            "namespace": namespace,
            "namespaces": await graphs.list_namespaces(ctx),
            "runs": listed,
            "total": total,
            "page": page,
            "size": size,
            "pages": max(1, math.ceil(total / size)),
            "refresh": refresh,
            "page_sizes": PAGE_SIZES,
            "refresh_choices": REFRESH_CHOICES,
        },
        session=current,
    )


@router.get("/namespaces/{namespace}/runs/{run_id}")
async def run_page(
    request: Request,
    namespace: Namespace,
    run_id: RunId,
    current: SessionDep,
    ctx: ContextDep,
    node: str | None = None,
    state: str | None = None,
    status: Annotated[list[str] | None, Query()] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
) -> Response:
    """One run: its graph, and a panel for a node's states (``node``) or one ``state``."""
    view = await views.run_view(ctx, namespace, run_id)
    panel: dict[str, Any] = {}
    if state:
        panel["details"] = await views.state_details(
            ctx, namespace, view.summary.graph_name, run_id, state
        )
    elif node:
        panel["listing"] = await views.node_states(
            ctx, namespace, run_id, node, list(status or []), page, NODE_PAGE_SIZE
        )
    return render(
        request,
        "run.html",
        {
            "view": view,
            "panel": panel,
            "refresh_ms": RUN_REFRESH_MS if view.summary.status == "PENDING" else 0,
        },
        session=current,
    )


@router.post("/namespaces/{namespace}/runs/{run_id}/states/{state_id}/retry")
async def retry_state(
    namespace: Namespace, run_id: RunId, state_id: str, _form: FormDep, ctx: ContextDep
) -> Response:
    new_id = await views.retry(ctx, namespace, state_id)
    return RedirectResponse(run_url(namespace, run_id, state=new_id), status_code=303)


@router.post("/namespaces/{namespace}/runs/{run_id}/cancel")
async def cancel_run(
    namespace: Namespace, run_id: RunId, _form: FormDep, ctx: ContextDep
) -> Response:
    await views.cancel(ctx, namespace, run_id)
    return RedirectResponse(run_url(namespace, run_id), status_code=303)


# -- graph templates ----------------------------------------------------------------


async def _graph_response(
    request: Request,
    ctx: Context,
    namespace: str,
    graph_name: str,
    current: sessions.Session,
    *,
    form: Mapping[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    graph = await views.graph_page(ctx, namespace, graph_name)
    return render(
        request,
        "graph.html",
        {"namespace": namespace, "graph": graph, "form": form or {}, "error": error},
        session=current,
        status_code=status_code,
    )


@router.get("/namespaces/{namespace}/graphs/{graph_name}")
async def graph_page(
    request: Request,
    namespace: Namespace,
    graph_name: GraphName,
    current: SessionDep,
    ctx: ContextDep,
) -> Response:
    return await _graph_response(request, ctx, namespace, graph_name, current)


def trigger_request(fields: Mapping[str, str]) -> schemas.TriggerRequest:
    """The trigger form as the API's trigger body (same rules as the API).

    ``store.KEY`` and ``input.NAME`` fields left blank are not sent, so defaults and
    the template's inputs apply; ``more_store`` holds extra ``key=value`` lines.
    """
    store = {
        name.removeprefix("store."): value
        for name, value in fields.items()
        if name.startswith("store.") and value != ""
    }
    for line in fields.get("more_store", "").splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"Store entries must be key=value lines, got {line.strip()!r}")
        store[key.strip()] = value
    inputs = {
        name.removeprefix("input."): value
        for name, value in fields.items()
        if name.startswith("input.") and value != ""
    }
    text = fields.get("start_delay", "").strip() or "0"
    # A form sends text; the API's body takes JSON integers only.
    delay: object = int(text) if text.lstrip("-").isdigit() and text.isascii() else text
    try:
        return schemas.TriggerRequest.model_validate(
            {"store": store, "inputs": inputs, "start_delay": delay}
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"Invalid trigger: {problems}") from None


@router.post("/namespaces/{namespace}/graphs/{graph_name}/trigger")
async def trigger_run(
    request: Request,
    namespace: Namespace,
    graph_name: GraphName,
    form: FormDep,
    current: SessionDep,
    ctx: ContextDep,
) -> Response:
    try:
        body = trigger_request(form)
        run_id = await views.trigger(
            ctx, namespace, graph_name, body.store, body.inputs, body.start_delay
        )
    except InvalidRequest as exc:
        return await _graph_response(
            request,
            ctx,
            namespace,
            graph_name,
            current,
            form=form,
            error=exc.detail,
            status_code=400,
        )
    return RedirectResponse(run_url(namespace, run_id), status_code=303)


@router.get("/{unknown:path}")
async def not_found(unknown: str, _current: SessionDep) -> Response:
    """Any other dashboard address: a 404 page (after sign-in, like every page)."""
    raise NotFound(f"No dashboard page at /dashboard/{unknown}")
