"""The application factory: ``create_app(settings)`` builds a ready-to-serve FastAPI app."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from state_manager import __version__, dashboard
from state_manager.api import openapi
from state_manager.api.hot import HotPath
from state_manager.api.middleware import RequestContextMiddleware
from state_manager.api.routes import refusal, v0
from state_manager.background import loops
from state_manager.crypto import SecretBox, SecretDecryptionError
from state_manager.errors import StateManagerError
from state_manager.metrics import Metrics
from state_manager.services import operations, writes
from state_manager.services.context import Context
from state_manager.settings import Settings
from state_manager.store import open_store
from state_manager.store.failures import DATABASE_ERRORS

logger = logging.getLogger(__name__)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthResponse(BaseModel):
    message: str


class ReadyResponse(BaseModel):
    ready: bool
    detail: str | None = None


def create_app(settings: Settings, *, run_background: bool = True) -> FastAPI:
    """Build the app. The database is opened (and migrated if allowed) at start-up."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = open_store(settings)
        try:
            if settings.auto_migrate:
                await db.migrate()
            await db.check_migrated()
        except BaseException:
            await db.close()
            raise
        context = Context(
            db=db,
            settings=settings,
            box=SecretBox(settings.secrets_encryption_key),
            metrics=metrics,
        )
        db.on_work = context.notifier.notify
        await db.start_listening()
        context.committer.start(
            functools.partial(writes.run_batch, context), metrics.batch_operations.observe
        )
        app.state.context = context
        tasks = loops.start(context) if run_background else []
        logger.info(
            "state manager ready",
            extra={"database": db.dialect, "mode": settings.mode.value},
        )
        try:
            yield
        finally:
            await loops.stop(tasks)
            await context.committer.stop()
            await db.close()

    app = FastAPI(
        title="Exosphere State Manager",
        version=__version__,
        lifespan=lifespan,
        description="Durable workflow state manager, wire-compatible with the Exosphere v0 API.",
        # /docs is served by the dashboard package from vendored assets (no CDN).
        docs_url=None,
        redoc_url=None,
    )

    async def _refused(request: Request, exc: Exception) -> JSONResponse:
        answer = refusal(exc, request.url.path)
        if answer is None:
            raise exc  # a bug: the request middleware logs it and answers 500
        return answer

    app.add_exception_handler(StateManagerError, _refused)
    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, _refused)  # type: ignore[arg-type]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """A 405's ``Allow`` lists every method the schema documents for the path (the
        router alone names those of the first route that matched the path)."""
        if exc.status_code == 405:
            methods = openapi.allowed_methods(app.openapi(), request.url.path)
            if methods:
                headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
                exc = StarletteHTTPException(405, exc.detail, headers=headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(SecretDecryptionError)
    async def _secret_error(_request: Request, exc: SecretDecryptionError) -> JSONResponse:
        logger.error("a stored secret could not be decrypted; is SECRETS_ENCRYPTION_KEY right?")
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.get("/health", tags=["operations"])
    async def health() -> HealthResponse:
        return HealthResponse(message="OK")

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "Not ready: `detail` says why."}},
    )
    async def ready(request: Request) -> JSONResponse:
        context: Context | None = getattr(request.app.state, "context", None)
        problem = "starting" if context is None else await operations.readiness_problem(context)
        if problem is not None:
            return JSONResponse({"ready": False, "detail": problem}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics_endpoint(request: Request) -> Response:
        await operations.sample_gauges(request.app.state.context)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    app.include_router(v0)
    dashboard.install(app, settings)
    openapi.install(app, settings)
    app.add_middleware(HotPath)
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_request_bytes
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"],
        allow_headers=[
            "Accept",
            "Accept-Language",
            "Content-Language",
            "Content-Type",
            "X-API-Key",
            "Authorization",
            "X-Requested-With",
            "X-Exosphere-Request-ID",
            "Idempotency-Key",
        ],
        expose_headers=["X-Exosphere-Request-ID"],
    )
    return app
