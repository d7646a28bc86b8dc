"""The FastAPI application, its lifespan (backend, reaper thread), the server's logging and `run_server` for
the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from optuna.exceptions import StorageInternalError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunefleet import __version__
from tunefleet.service.api import assets, metrics, projects, studies, tokens, trials
from tunefleet.service.api.deps import RETRY_AFTER_SECONDS, errors, principal_for
from tunefleet.service.backend import Backend
from tunefleet.service.config import Settings, get_settings, is_loopback
from tunefleet.service.db import check_database
from tunefleet.service.errors import DatabaseNotReady, InvalidInput, TunefleetError
from tunefleet.service.schemas import printable

__all__ = ["BackgroundServer", "JsonFormatter", "TextFormatter", "app_from_environment", "configure_logging",
           "create_app", "request_context", "run_server"]

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
                    metrics.FINISHED.labels(state="expired").inc(n)
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


# ---- request context and logging -------------------------------------------------------------------------

# An incoming X-Request-ID is kept when it looks like one (no spaces or control characters), else replaced.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_CONTEXT_KEYS = ("request_id", "study_id", "trial_id", "worker_id")


@dataclass(frozen=True)
class _Request:
    request_id: str
    scope: Scope  # the router adds the path parameters to it once it has matched the route


_CURRENT_REQUEST: ContextVar[_Request | None] = ContextVar("tunefleet_request", default=None)


def request_context() -> dict[str, Any]:
    """What is known about the request being served in this context: its request id, and the study id and
    trial id of its path (`/studies/{study_id}`, `/trials/{trial_id}`). Empty outside a request (the reaper)."""
    current = _CURRENT_REQUEST.get()
    if current is None:
        return {}
    fields: dict[str, Any] = {"request_id": current.request_id}
    params = current.scope.get("path_params") or {}
    for key in ("study_id", "trial_id"):
        value = params.get(key)
        if value is not None:
            fields[key] = int(value) if str(value).isdigit() else value
    return fields


class _RequestContext:
    """Gives each HTTP request an id (the caller's `X-Request-ID` when it sends a sane one, else a new one),
    returns it in the response's `X-Request-ID` header and makes it, with the path's study and trial ids,
    known to every log line written while the request is served (`request_context`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # Not reset afterwards: the server runs each request in its own task (a copy of the context), and
        # uvicorn's access line and its "Exception in ASGI application" line come after this call returns.
        _CURRENT_REQUEST.set(_Request(request_id, scope))
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The request's context, then ids a log call passed itself (`extra={"worker_id": ...}`)."""
    fields = request_context()
    for key in _CONTEXT_KEYS:
        value = getattr(record, key, None)
        if value is not None:
            fields[key] = value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`2025-01-31T12:00:00.123Z INFO tunefleet.service.studies: study 3 (x) created: ... [request_id=...]`."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _log_fields(record)
        if fields:
            line += " [" + " ".join(f"{key}={value}" for key, value in fields.items()) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then request_id, study_id, trial_id and
    worker_id when known, and exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname, "logger": record.name,
                                 "message": record.getMessage(), **_log_fields(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrHandler(logging.Handler):
    """Writes each line to whatever `sys.stderr` is at that moment, in one write."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": 5}  # uvicorn's TRACE


def configure_logging(settings: Settings) -> None:
    """Log lines of a server process on stderr in `settings.log_format`: tunefleet's own (loggers
    `tunefleet.*`) at `settings.log_level`, uvicorn's (uvicorn sets their level; run it with
    `log_config=None` so they reach this handler), Optuna's, and other libraries' warnings. Idempotent."""
    import optuna

    level = _LEVELS[settings.log_level]
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))  # other libraries: warnings and errors only
    logging.getLogger("tunefleet").setLevel(level)
    optuna.logging.disable_default_handler()  # Optuna's own stderr handler has its own format
    optuna.logging.enable_propagation()
    if settings.log_format == "json":
        logging.captureWarnings(True)  # Python warnings as log lines too: every line is JSON


# ---- the application -------------------------------------------------------------------------------------


# ---- error answers ---------------------------------------------------------------------------------------
# One body for every error answer (service/schemas.py): a 422 is {"detail": [{"loc", "msg", "type"}, ...]},
# every other status {"detail": "message"}. A database that is away (unreachable, dropped, out of
# connections) is a 503 with Retry-After, never a 500.

_RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_SECONDS)}
# SQLSTATE classes of a database that is away rather than of a bad statement: connection exceptions (08),
# insufficient resources (53: too many clients, out of memory or disk), operator intervention (57: shutdown,
# terminated backend, database dropped).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57")


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    detail: str | None = None


def _unavailable(exc: BaseException) -> bool:
    """Whether a database error means the database is away for now (retry later), not a bad statement."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the exception, then what it was raised from
        seen.add(id(current))
        if isinstance(current, (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)):
            return True
        if isinstance(current, DBAPIError):
            code = getattr(current.orig, "pgcode", None) or getattr(current.orig, "sqlstate", None) or ""
            return current.connection_invalidated or str(code).startswith(_UNAVAILABLE_SQLSTATES)
        current = current.__cause__ or current.__context__
    return False


def _why_unavailable(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc.__cause__ or exc).lower()
    if "too many" in text or "connection limit" in text or isinstance(exc, PoolTimeout):
        return "the database has no free connection"
    return "the database does not answer"


def _printable_loc(part: Any) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else printable(str(part))


def _error(status: int, detail: str | list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"detail": detail}`; text that cannot be encoded (a lone surrogate quoted back) is escaped first."""
    if isinstance(detail, str):
        detail = printable(detail)
    else:
        detail = [{"loc": [_printable_loc(p) for p in e["loc"]], "msg": printable(e["msg"]), "type": e["type"]}
                  for e in detail]
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _unavailable_answer(exc: BaseException) -> JSONResponse:
    what = str(getattr(exc, "orig", None) or exc).strip()
    log.warning("database unavailable, answered 503: %s: %s", type(exc).__name__, what.splitlines()[0] if what else "")
    return _error(503, f"{_why_unavailable(exc)}: retry in {RETRY_AFTER_SECONDS} s (Retry-After); if it lasts, "
                       "check the database and `GET /readyz`", _RETRY_AFTER)


def _internal_error(exc: BaseException, *, logged: bool = False) -> JSONResponse:
    """A bug: 500 in the one error shape, naming the request id of the log line with the traceback."""
    if not logged:
        log.error("unhandled %s: %s", type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))
    request_id = request_context().get("request_id", "?")
    return _error(500, f"internal error (request id {request_id}): the server logged it; please report it")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answer through one shape; database outages as 503 with Retry-After."""

    @app.exception_handler(TunefleetError)
    async def domain_error(_: Request, exc: TunefleetError) -> JSONResponse:
        if isinstance(exc, InvalidInput):
            return _error(422, exc.errors())
        if exc.status_code == 503:
            return _error(503, f"{exc.message.strip()} (retry in {RETRY_AFTER_SECONDS} s)", _RETRY_AFTER)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _error(exc.status_code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's entries without `input` and `ctx`: one entry shape for every 422 (never an echo of
        # what was sent, which may be large or secret).
        return _error(422, [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                             "type": str(e.get("type", "value_error"))} for e in exc.errors()]
                      or [{"loc": [], "msg": "invalid request", "type": "value_error"}])

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read a JSON body (not UTF-8): malformed, as bad JSON is
            return _error(422, [{"loc": ["body"], "msg": "the body is not readable JSON: send UTF-8 encoded JSON",
                                 "type": "json_invalid"}])
        return _error(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)

    @app.exception_handler(StorageInternalError)
    async def storage_error(_: Request, exc: StorageInternalError) -> JSONResponse:
        # Optuna's wrapper of a failed commit: the database went away, unless what it wraps says otherwise.
        cause = exc.__cause__
        if isinstance(cause, DBAPIError) and not _unavailable(cause):
            return _internal_error(exc)
        return _unavailable_answer(cause or exc)

    @app.exception_handler(SQLAlchemyError)
    async def database_error(_: Request, exc: SQLAlchemyError) -> JSONResponse:
        return _unavailable_answer(exc) if _unavailable(exc) else _internal_error(exc)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Anything else, still in the one shape; Starlette re-raises it afterwards, so uvicorn logs it.
        return _unavailable_answer(exc) if _unavailable(exc) else _internal_error(exc, logged=True)


def create_app(settings: Settings | None = None, *, auth_enabled: bool | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = Backend(settings)
        backend.on_trial_finished = metrics.trial_finished
        app.state.backend = backend
        reaper = Reaper(backend)
        reaper.start()
        try:
            yield
        finally:
            reaper.stopped.set()
            reaper.join(timeout=10)
            backend.close()

    # Swagger UI (/docs) and ReDoc (/redoc) from files inside the installed fastapi-offline package, not a CDN:
    # an air-gapped cluster gets working API pages.
    app = FastAPIOffline(title="tunefleet", version=__version__, lifespan=lifespan,
                         description="Hyperparameter optimisation for fine-tuning language models. See docs/api.md.")
    app.state.auth_enabled = settings.auth_enabled() if auth_enabled is None else auth_enabled
    # /metrics: a token of any role when TUNEFLEET_METRICS_AUTH says so, else whenever auth is on.
    app.state.metrics_auth = app.state.auth_enabled if settings.metrics_auth is None else settings.metrics_auth
    for router in (studies.router, trials.router, tokens.router, projects.router, *assets.routers):
        app.include_router(router)

    _add_error_handlers(app)
    app.add_middleware(_Timing)
    app.add_middleware(_RequestContext)  # added last: the outer one, so the timing and every log line see it

    @app.get("/healthz", tags=["health"], response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @app.get("/readyz", tags=["health"], response_model=Readiness,
             responses={503: {"model": Readiness, "description": "the database does not answer, or is not at the "
                              "latest schema (`detail` says which); retry after `Retry-After` seconds",
                              "headers": errors(503)[503]["headers"]}})
    def readyz(request: Request) -> JSONResponse:
        try:
            check_database(request.app.state.backend.engine)
        except DatabaseNotReady as exc:
            return JSONResponse({"status": "not ready", "detail": exc.message}, status_code=503,
                                headers=_RETRY_AFTER)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus metrics (text exposition format)",
                              "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                        **{k: v for k, v in errors().items() if k != 403}})
    def prometheus(request: Request) -> Response:
        backend: Backend = request.app.state.backend
        if request.app.state.metrics_auth:
            principal_for(backend, request.headers.get("authorization"))  # AuthError (401) without a valid token
        try:
            metrics.ACTIVE_LEASES.set(backend.active_leases())
        except DatabaseNotReady as exc:
            metrics.ACTIVE_LEASES.set(float("nan"))  # unknown, rather than a stale count
            log.warning("/metrics: active leases unknown: %s", exc.message)
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_environment() -> FastAPI:
    """The app of one server process when `run_server` starts several (uvicorn imports it by name)."""
    settings = get_settings()
    configure_logging(settings)  # a new process: its log lines need the same handler as the first one's
    return create_app(settings)


def run_server(host: str | None = None, port: int | None = None, migrate: bool = False,
               processes: int | None = None) -> int:
    """Check the configuration and the database, then serve; returns an exit code (never a traceback)."""
    import uvicorn

    settings = get_settings()
    configure_logging(settings)
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
    from tunefleet.service.db import check_connection_budget, make_engine, upgrade_database

    try:
        if migrate:
            upgrade_database(settings)
        engine = make_engine(settings.resolved_database_url, settings)
        try:
            check_database(engine)
            check_connection_budget(engine, settings, processes)
        finally:
            engine.dispose()
    except DatabaseNotReady as exc:
        log.error("%s", exc.message)
        return 1
    log.info("tunefleet %s on http://%s:%s (database %s, auth %s, %s process%s)", __version__, host, port,
             _safe_url(settings.resolved_database_url), "on" if auth else "off (loopback only)", processes,
             "es" if processes > 1 else "")
    # log_config=None: uvicorn's loggers get no handlers of their own and write through `configure_logging`'s.
    if processes == 1:
        uvicorn.run(create_app(settings, auth_enabled=auth), host=host, port=port, log_level=settings.log_level,
                    log_config=None)
        return 0
    # Each process builds its app from the environment: pass on the decisions made here.
    os.environ.update(TUNEFLEET_AUTH=str(auth).lower(), TUNEFLEET_HOST=host, TUNEFLEET_PORT=str(port))
    uvicorn.run("tunefleet.service.api.app:app_from_environment", factory=True, workers=processes, host=host, port=port,
                log_level=settings.log_level, log_config=None)
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
