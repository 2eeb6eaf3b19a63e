"""The dashboard's FastAPI app factory and a ``serve`` helper (uvicorn).

Example:
    >>> from moe_lab.dashboard import DashboardSettings, create_app
    >>> app = create_app(DashboardSettings(store_url="sqlite://"))
    >>> app.title
    'moe-lab dashboard'
"""

from __future__ import annotations

import logging
import os
import threading
import webbrowser
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from moe_lab.dashboard.protocol import ErrorResponse
from moe_lab.dashboard.routes import compare, pages, runs
from moe_lab.dashboard.service import DashboardService
from moe_lab.dashboard.settings import DashboardSettings
from moe_lab.tracking import StoreError

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _error(
    status: int, code: str, message: str, problems: list[dict[str, Any]] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorResponse.make(code, message, problems).model_dump(), status_code=status)


def create_app(settings: DashboardSettings | None = None) -> FastAPI:
    """Build the app; the :class:`DashboardService` (run store + runs directory) is made at startup and
    kept on ``app.state.service``."""
    settings = settings or DashboardSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "service", None) is None:
            app.state.service = DashboardService(settings)
        try:
            yield
        finally:
            app.state.service.close()
            app.state.service = None

    app = FastAPI(title="moe-lab dashboard", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.service = None
    app.include_router(runs.router)
    app.include_router(compare.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Any:
        if getattr(request.app.state, "service", None) is None:  # app used without its lifespan
            request.app.state.service = DashboardService(settings)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, err: StoreError) -> JSONResponse:
        msg = str(err)
        if msg.startswith("no run"):
            return _error(404, "not_found", msg)
        return _error(503, "store_unavailable", msg)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, "http_error", str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return _error(422, "bad_request", "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("dashboard: unexpected error on %s", request.url.path)
        return _error(500, "internal", f"{type(err).__name__}: {err}"[:500])

    return app


def serve(
    runs_dir: str | os.PathLike[str] | None = None,
    store_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    open_browser: bool = False,
) -> None:
    """Run the dashboard with uvicorn until interrupted. Binds to ``127.0.0.1`` unless told otherwise.

    >>> # serve(runs_dir="runs")   # then open http://127.0.0.1:8080
    """
    import uvicorn

    settings = DashboardSettings.from_env(
        runs_dir=Path(runs_dir) if runs_dir is not None else None, store_url=store_url, host=host, port=port
    )
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "dashboard: listening on %s exposes your runs to the network (no authentication)", settings.host
        )
    app = create_app(settings)
    app.state.service = DashboardService(settings)  # open the store now: a bad URL fails here, not in uvicorn
    if open_browser:
        url = (
            f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}/"  # noqa: S104  # nosec B104
        )
        threading.Timer(1.0, webbrowser.open, args=[url]).start()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
