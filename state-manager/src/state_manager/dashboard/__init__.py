"""The dashboard: server-rendered pages at ``/dashboard/`` and air-gapped API docs at ``/docs``.

Everything it serves (styles, scripts, Swagger UI) is vendored in this package;
nothing is loaded from another host. The repository's ``THIRD_PARTY.md`` lists the
vendored files and their licences.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from state_manager.dashboard import session
from state_manager.dashboard.render import build_environment
from state_manager.dashboard.routes import Dashboard, router
from state_manager.dashboard.urls import STATIC_PREFIX, static
from state_manager.settings import Settings


def install(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard, its static files and the ``/docs`` page to ``app``.

    The app must be created with ``docs_url=None``: the docs page here serves
    Swagger UI from this package instead of a CDN.
    """
    app.state.dashboard = Dashboard(
        settings=settings,
        signer=session.Signer(
            session.signing_key(settings.state_manager_secret, settings.secrets_encryption_key)
        ),
        templates=build_environment(),
    )
    # Static files first: the router ends with a catch-all for unknown dashboard pages.
    app.mount(
        STATIC_PREFIX,
        StaticFiles(packages=[("state_manager.dashboard", "static")]),
        name="dashboard-static",
    )
    app.include_router(router)

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · API docs",
            swagger_js_url=static("vendor/swagger-ui/swagger-ui-bundle.js"),
            swagger_css_url=static("vendor/swagger-ui/swagger-ui.css"),
            swagger_favicon_url=static("vendor/swagger-ui/favicon-32x32.png"),
            oauth2_redirect_url=None,
            # No call to the public validator service: the page must work offline.
            swagger_ui_parameters={"validatorUrl": None},
        )
