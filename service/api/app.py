"""The FastAPI application, its lifespan (backend, reaper thread) and `run_server` for the CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from tunefleet import __version__
from tunefleet.service.api import metrics, studies, tokens, trials
from tunefleet.service.backend import Backend
from tunefleet.service.config import Settings, get_settings, is_loopback
from tunefleet.service.db import check_database
from tunefleet.service.errors import DatabaseNotReady, TunefleetError

__all__ = ["BackgroundServer", "app_from_environment", "create_app", "run_server"]

log = logging.getLogger("tunefleet.server")


class Reaper(threading.Thread):
    """Fails and re-queues trials whose lease expired, and running trials that never got a lease, every
    `reaper_interval_seconds`."""

    def __init__(self, backend: Backend):
        super().__init__(name="tunefleet-reaper", daemon=True)
        self.backend = backend
        self.stopped = threading.Event()

    def run(self) -> None:
        from tunefleet.service.leases import reap_expired, reap_orphans

        while not self.stopped.wait(self.backend.settings.reaper_interval_seconds):
            try:
                n = reap_expired(self.backend) + reap_orphans(self.backend)
                if n:
                    metrics.REAPED.inc(n)
            except Exception:  # the reaper must outlive a database blip
                log.exception("reaper pass failed; retrying in %ss", self.backend.settings.reaper_interval_seconds)


class _Timing:
    """Request latency per route into Prometheus; a plain ASGI middleware (no per-request task like
    Starlette's BaseHTTPMiddleware, which costs on the workers' hot path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, auth_enabled: bool | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = Backend(settings)
        app.state.backend = backend
        reaper = Reaper(backend)
        reaper.start()
        try:
            yield
        finally:
            reaper.stopped.set()
            reaper.join(timeout=10)
            backend.close()

    app = FastAPI(title="tunefleet", version=__version__, lifespan=lifespan,
                  description="Hyperparameter optimisation for fine-tuning language models. See docs/api.md.")
    app.state.auth_enabled = settings.auth_enabled() if auth_enabled is None else auth_enabled
    for router in (studies.router, trials.router, tokens.router):
        app.include_router(router)

    @app.exception_handler(TunefleetError)
    async def domain_error(_: Request, exc: TunefleetError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_middleware(_Timing)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        try:
            check_database(request.app.state.backend.engine)
        except DatabaseNotReady as exc:
            return JSONResponse({"status": "not ready", "detail": exc.message}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"])
    def prometheus() -> Response:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_environment() -> FastAPI:
    """The app of one server process when `run_server` starts several (uvicorn imports it by name)."""
    return create_app(get_settings())


def run_server(host: str | None = None, port: int | None = None, migrate: bool = False,
               processes: int | None = None) -> int:
    """Check the configuration and the database, then serve; returns an exit code (never a traceback)."""
    import uvicorn

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    processes = processes or settings.server_processes
    auth = settings.auth_enabled(host)
    if not auth and not is_loopback(host):
        log.error("refusing to serve on %s without auth: set TUNEFLEET_AUTH=true and create tokens with "
                  "`tunefleet token create`, or bind 127.0.0.1", host)
        return 2
    if processes > 1 and not settings.resolved_database_url.startswith("postgresql"):
        log.error("%s server processes need PostgreSQL (they coordinate through its locks); the embedded "
                  "SQLite database serves from one process: drop --processes or set TUNEFLEET_DATABASE_URL",
                  processes)
        return 2
    from tunefleet.service.db import make_engine, upgrade_database

    try:
        if migrate:
            upgrade_database(settings)
        engine = make_engine(settings.resolved_database_url)
        try:
            check_database(engine)
        finally:
            engine.dispose()
    except DatabaseNotReady as exc:
        log.error("%s", exc.message)
        return 1
    log.info("tunefleet %s on http://%s:%s (database %s, auth %s, %s process%s)", __version__, host, port,
             _safe_url(settings.resolved_database_url), "on" if auth else "off (loopback only)", processes,
             "es" if processes > 1 else "")
    if processes == 1:
        uvicorn.run(create_app(settings, auth_enabled=auth), host=host, port=port, log_level=settings.log_level)
        return 0
    # Each process builds its app from the environment: pass on the decisions made here.
    os.environ.update(TUNEFLEET_AUTH=str(auth).lower(), TUNEFLEET_HOST=host, TUNEFLEET_PORT=str(port))
    uvicorn.run("tunefleet.service.api.app:app_from_environment", factory=True, workers=processes, host=host, port=port,
                log_level=settings.log_level)
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class BackgroundServer:
    """uvicorn serving an app from a thread of this process, on a loopback port (0: any free port).

    For the demo and the tests: real HTTP, one process. `with BackgroundServer(app) as server: server.url`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if not port:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.port = port
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="tunefleet-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start (is the port free?)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
