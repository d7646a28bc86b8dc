"""The Python client of the tunefleet REST API (`docs/api.md`), used by the CLI and the workers.

Torch-free: it needs only httpx. Every method maps to one endpoint and returns its decoded JSON.

Retries: connection errors, timeouts and 502/503/504 answers are retried with exponential backoff and
jitter (`backoff * 2**attempt`, capped at `max_backoff`, scaled by a random factor in [0.5, 1];
a `Retry-After` header wins when it is longer). Every call is safe to retry because the server makes
worker writes idempotent (a lease carries a `request_id` that this client reuses across its own
retries). When the retries are exhausted the call raises `ServerUnavailable`.

Errors: any other non-2xx answer raises `ApiError` (or a subclass: `NotFoundError` for 404,
`AuthError` for 401/403, `ConflictError` for 409), whose message is the server's `detail`, with one
`loc: msg` entry per offending field for a 422.

Testing in process: pass `transport=` (any sync `httpx.BaseTransport`, e.g. `httpx.MockTransport`) or
`http_client=` (any configured `httpx.Client`). `httpx.ASGITransport` is async-only, so to drive the
FastAPI app without a server use Starlette's test client, which is a sync `httpx.Client`:

    from starlette.testclient import TestClient
    client = Client("http://testserver", token, http_client=TestClient(create_app()))
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "API_PREFIX",
    "ApiError",
    "AuthError",
    "Client",
    "ConflictError",
    "NotFoundError",
    "ServerUnavailable",
    "file_sha256",
]

API_PREFIX = "/api/v1"
# Header carrying a trial's lease token (the server's `tunefleet.service.auth.LEASE_TOKEN_HEADER`).
LEASE_TOKEN_HEADER = "X-Lease-Token"
# Answers that mean "the server (or its proxy) is briefly away": always worth another try.
RETRY_STATUSES = frozenset({502, 503, 504})


class ApiError(Exception):
    """A non-2xx answer. `status_code` is None when no answer came at all (see ServerUnavailable)."""

    def __init__(self, status_code: int | None, detail: Any):
        self.status_code = status_code
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One readable line: the HTTP status and the server's detail (every field for a 422)."""
        text = format_detail(self.detail)
        return f"{self.status_code}: {text}" if self.status_code is not None else text


class NotFoundError(ApiError):
    """404: the study, trial, artifact or token does not exist."""


class AuthError(ApiError):
    """401 (no or bad token) or 403 (see ForbiddenError)."""


class ForbiddenError(AuthError):
    """403: the token's role may not do this, or a call on a trial came without its lease token."""


class ConflictError(ApiError):
    """409: the change is illegal in the resource's current state."""


class ServerUnavailable(ApiError):
    """The server could not be reached, or answered 502/503/504, on every attempt."""


def format_detail(detail: Any) -> str:
    """Render an error `detail` on one line; a pydantic-style list becomes `loc: msg; loc: msg`."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping) and "msg" in item:
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                parts.append(f"{'.'.join(loc)}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, Mapping) and "msg" in detail:
        return format_detail([detail])
    return str(detail)


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
}


def _error_from_response(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text.strip() or response.reason_phrase
    if response.status_code in RETRY_STATUSES:
        return ServerUnavailable(response.status_code, detail)
    # A 422's detail stays a list, so the message names every offending field.
    return _ERRORS_BY_STATUS.get(response.status_code, ApiError)(response.status_code, detail)


class Client:
    """A synchronous client of one tunefleet server.

    `base_url` is the server root (`http://host:8000`); a trailing `/api/v1` is accepted too.
    `retries` is the number of extra attempts after the first; `timeout` applies to each attempt.
    `sleep` and `rng` exist so tests can observe the backoff without waiting.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        root = base_url.rstrip("/")
        root = root.removesuffix(API_PREFIX)
        self.base_url = root
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._rng = rng or random.Random()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if http_client is not None:
            http_client.headers.update(headers)
            self._http = http_client
            self._owns_http = False
        else:
            self._http = httpx.Client(base_url=root, headers=headers, timeout=timeout, transport=transport)
            self._owns_http = True
        # trial id -> the lease token of the lease this client holds on it (see `lease`).
        self._lease_tokens: dict[int, str] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (only when this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        delay *= 0.5 + 0.5 * self._rng.random()  # jitter: spreads the retries of many workers
        retry_after = _retry_after_seconds(response) if response is not None else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | Path | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int | None = None,
        api: bool = True,
        into: Path | None = None,
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return the 2xx response.

        A `content` Path is streamed from the file (opened again for each attempt), never read whole; with
        `into`, a 2xx body is streamed into that file instead of memory.
        Raises ServerUnavailable when every attempt failed with a connection error, a timeout or
        502/503/504; the matching ApiError subclass for any other non-2xx answer.
        """
        url = f"{API_PREFIX}{path}" if api else path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        retries = self.retries if retries is None else retries
        last: ApiError | None = None
        for attempt in range(retries + 1):
            response: httpx.Response | None = None
            try:
                response = self._send(method, url, json=json, params=query, content=content, headers=headers,
                                      into=into)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts, protocol errors
                last = ServerUnavailable(None, f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}")
            else:
                if response.is_success:
                    return response
                error = _error_from_response(response)
                if not isinstance(error, ServerUnavailable):
                    raise error
                last = error
            if attempt < retries:
                self._sleep(self._delay(attempt, response))
        assert last is not None
        tries = retries + 1
        raise ServerUnavailable(last.status_code, f"{format_detail(last.detail)} (gave up after {tries} tries)")

    def _send(self, method: str, url: str, *, content: bytes | Path | None, into: Path | None,
              **kwargs: Any) -> httpx.Response:
        """One attempt; a file body and an `into` download are streamed in chunks."""
        with contextlib.ExitStack() as stack:
            body = stack.enter_context(content.open("rb")) if isinstance(content, Path) else content
            response = stack.enter_context(self._http.stream(method, url, content=body, **kwargs))
            if into is not None and response.is_success:
                with into.open("wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            else:
                response.read()
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # -- health ---------------------------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        """GET /healthz: the process is up. Raises ServerUnavailable when it is not."""
        return self._json("GET", "/healthz", api=False) or {}

    def readyz(self) -> dict[str, Any]:
        """GET /readyz, one attempt: the database answers and its schema is current.

        Raises ServerUnavailable with the server's reason when not ready or unreachable.
        """
        return self._json("GET", "/readyz", api=False, retries=0) or {}

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> dict[str, Any]:
        """Poll /readyz until it answers 200; raises ServerUnavailable after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.readyz()
            except ServerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(interval)

    # -- studies --------------------------------------------------------------------------------

    def create_study(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """POST /studies; returns the Study. A rejected spec raises ApiError(422) naming every field."""
        return self._json("POST", "/studies", json=dict(spec))

    def list_studies(
        self, state: str | None = None, name: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """GET /studies; returns `{items, total, limit, offset}`."""
        params = {"state": state, "name": name, "limit": limit, "offset": offset}
        return self._json("GET", "/studies", params=params)

    def get_study(self, study_id: int) -> dict[str, Any]:
        """GET /studies/{id}; raises NotFoundError."""
        return self._json("GET", f"/studies/{study_id}")

    def enqueue_trial(self, study_id: int, params: Mapping[str, Any], note: str = "") -> dict[str, Any]:
        """POST /studies/{id}/trials: queue a configuration to run next; returns the WAITING Trial."""
        return self._json("POST", f"/studies/{study_id}/trials", json={"params": dict(params), "note": note})

    def pause_study(self, study_id: int) -> dict[str, Any]:
        """POST /studies/{id}/pause; raises NotFoundError, ConflictError."""
        return self._json("POST", f"/studies/{study_id}/pause")

    def resume_study(self, study_id: int) -> dict[str, Any]:
        """POST /studies/{id}/resume; raises NotFoundError, ConflictError."""
        return self._json("POST", f"/studies/{study_id}/resume")

    def stop_study(self, study_id: int) -> dict[str, Any]:
        """POST /studies/{id}/stop; raises NotFoundError, ConflictError."""
        return self._json("POST", f"/studies/{study_id}/stop")

    def delete_study(self, study_id: int) -> None:
        """DELETE /studies/{id} (its trials, leases and artifacts go too); raises NotFoundError."""
        self.request("DELETE", f"/studies/{study_id}")

    def list_trials(
        self, study_id: int, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """GET /studies/{id}/trials; returns `{items, total, limit, offset}`."""
        params = {"state": state, "limit": limit, "offset": offset}
        return self._json("GET", f"/studies/{study_id}/trials", params=params)

    def study_report(self, study_id: int) -> dict[str, Any]:
        """GET /studies/{id}/report: the fidelity report (rank correlation per rung, baseline...)."""
        return self._json("GET", f"/studies/{study_id}/report")

    # -- trials and artifacts -------------------------------------------------------------------

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        """GET /trials/{id}; raises NotFoundError."""
        return self._json("GET", f"/trials/{trial_id}")

    def upload_artifact(self, trial_id: int, name: str, data: bytes | Path, *,
                        lease_token: str | None = None) -> dict[str, Any]:
        """PUT /trials/{id}/artifacts/{name} as the trial's lease holder; `name` may contain `/`. The same name
        again replaces the file."""
        return self._json("PUT", _artifact_path(trial_id, name), content=data,
                          headers=self._holder(trial_id, lease_token))

    def list_artifacts(self, trial_id: int) -> list[dict[str, Any]]:
        """GET /trials/{id}/artifacts: `[{name, size, sha256, created_at}]`."""
        return self._json("GET", f"/trials/{trial_id}/artifacts")

    def download_artifact(self, trial_id: int, name: str) -> bytes:
        """GET /trials/{id}/artifacts/{name}: the file's bytes; raises NotFoundError."""
        return self.request("GET", _artifact_path(trial_id, name)).content

    # -- the worker protocol --------------------------------------------------------------------

    def lease(self, worker_id: str, device: Mapping[str, Any], hostname: str, devices: int = 1,
              tasks: Sequence[str] | None = None) -> dict[str, Any] | None:
        """POST /leases: the next trial to run, or None when no study has work (204). `devices`: how many
        devices this worker can train one trial on (studies needing more are not leased to it). `tasks`: the
        study tasks this worker runs (None: the built-in ones; `tunefleet agent` runs ``script``).

        One request id per call, reused by this call's retries, so a lease whose answer was lost is
        handed back again instead of leaking a second trial. The answer's `lease_token` is kept: the
        per-trial calls below send it (`X-Lease-Token`), since only the lease holder may change a trial.
        """
        body = {"worker_id": worker_id, "request_id": str(uuid.uuid4()), "device": dict(device),
                "devices": devices, "hostname": hostname}
        if tasks is not None:
            body["tasks"] = list(tasks)
        leased = self._json("POST", "/leases", json=body)
        if leased is not None:
            self._lease_tokens[leased["trial_id"]] = leased["lease_token"]
        return leased

    def _holder(self, trial_id: int, lease_token: str | None) -> dict[str, str]:
        """The header that proves this client holds the trial's lease: `lease_token`, else the one `lease`
        kept; none when this client never leased the trial (the server then answers 403)."""
        token = lease_token or self._lease_tokens.get(trial_id)
        return {LEASE_TOKEN_HEADER: token} if token else {}

    def heartbeat(self, trial_id: int, worker_id: str, *, lease_token: str | None = None) -> dict[str, Any]:
        """POST /trials/{id}/heartbeat: extends the lease; `{stop, reason, deadline}`."""
        return self._json("POST", f"/trials/{trial_id}/heartbeat", json={"worker_id": worker_id},
                          headers=self._holder(trial_id, lease_token))

    def report(
        self, trial_id: int, step: int, value: float, metrics: Mapping[str, Any] | None = None, *,
        lease_token: str | None = None,
    ) -> str:
        """POST /trials/{id}/reports at `step` (percent of the budget); the server's action: "continue",
        "prune" (stop for good) or "pause" (store a checkpoint, then call `pause`)."""
        body = {"step": step, "value": value, "metrics": dict(metrics or {})}
        answer = self._json("POST", f"/trials/{trial_id}/reports", json=body,
                            headers=self._holder(trial_id, lease_token))
        return str(answer.get("action") or ("prune" if answer["prune"] else "continue"))

    def pause(self, trial_id: int, step: int, checkpoint: Mapping[str, Any] | None = None, *,
              lease_token: str | None = None) -> dict[str, Any]:
        """POST /trials/{id}/pause after a pause answer at `step`, once `checkpoint` is stored: `{step, sha256,
        size, name}` for an uploaded artifact of the trial, `{step, sha256, node, path}` for a folder on a node;
        None when there is none. Releases the lease; returns the Trial."""
        body = {"step": step, "checkpoint": dict(checkpoint) if checkpoint else None}
        return self._json("POST", f"/trials/{trial_id}/pause", json=body, headers=self._holder(trial_id, lease_token))

    def download_artifact_to(self, trial_id: int, name: str, path: Path) -> str:
        """GET /trials/{id}/artifacts/{name} streamed into the file `path` (with this client's retries); returns
        the file's SHA-256."""
        self.request("GET", _artifact_path(trial_id, name), into=path)
        return file_sha256(path)

    def complete(
        self,
        trial_id: int,
        value: float | None = None,
        values: list[float] | None = None,
        validation_metrics: Mapping[str, Any] | None = None,
        test_metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        *,
        lease_token: str | None = None,
    ) -> dict[str, Any]:
        """POST /trials/{id}/complete with the final value (or values); returns the Trial."""
        if (value is None) == (values is None):
            raise ValueError("give exactly one of value (single objective) or values (multi-objective)")
        body: dict[str, Any] = {"value": value} if values is None else {"values": list(values)}
        body.update(validation_metrics=dict(validation_metrics or {}), test_metrics=dict(test_metrics or {}),
                    extra=dict(extra or {}))
        return self._json("POST", f"/trials/{trial_id}/complete", json=body,
                          headers=self._holder(trial_id, lease_token))

    def fail(self, trial_id: int, reason: str, retryable: bool = False, *, kind: str = "trial",
             lease_token: str | None = None) -> dict[str, Any]:
        """POST /trials/{id}/fail; a retryable failure re-queues the same parameters. `kind` says whose problem
        it is: model, data or config (the study's: several in a row pause the study), or memory, diverged,
        trial, crash (the parameters')."""
        return self._json("POST", f"/trials/{trial_id}/fail",
                          json={"reason": reason, "retryable": retryable, "kind": kind},
                          headers=self._holder(trial_id, lease_token))

    # -- data sets and models -------------------------------------------------------------------

    def upload_asset(self, kind: str, name: str, source: Path) -> dict[str, Any]:
        """POST /{kind}/{name} (kind: datasets or models): a file or folder, packed into a tar whose bytes
        depend only on the files' names and contents (so the same files give the same version), streamed.
        Returns `{kind, name, version, sha256, size, files, created_at}`."""
        with tempfile.TemporaryDirectory(prefix="tunefleet-upload-") as tmp:
            tar_path = Path(tmp) / "upload.tar"
            pack_files(source, tar_path)
            return self._json("POST", f"/{kind}/{quote(name, safe='')}", content=tar_path,
                              headers={"Content-Type": "application/octet-stream"})

    def list_assets(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        """GET /{kind} (every version of every one) or /{kind}/{name} (its versions), newest first."""
        return self._json("GET", f"/{kind}" + (f"/{quote(name, safe='')}" if name else ""))

    def get_asset(self, kind: str, name: str, version: str = "latest") -> dict[str, Any]:
        """GET /{kind}/{name}/{version}; raises NotFoundError."""
        return self._json("GET", f"/{kind}/{quote(name, safe='')}/{quote(version, safe='')}")

    def delete_asset(self, kind: str, name: str, version: str) -> dict[str, Any]:
        """DELETE /{kind}/{name}/{version} (admin): forget one version; returns it. Raises ConflictError while a
        running or paused study uses it, NotFoundError."""
        return self._json("DELETE", f"/{kind}/{quote(name, safe='')}/{quote(version, safe='')}")

    def download_asset_to(self, kind: str, name: str, version: str, path: Path) -> str:
        """GET /{kind}/{name}/{version}/content streamed into the file `path`; returns its SHA-256."""
        self.request("GET", f"/{kind}/{quote(name, safe='')}/{quote(version, safe='')}/content", into=path)
        return file_sha256(path)

    # -- tokens ---------------------------------------------------------------------------------

    def create_token(self, name: str, role: str, projects: Mapping[str, str] | None = None) -> dict[str, Any]:
        """POST /tokens (admin): `{id, name, role, projects, token}`; the plain token is shown only here.
        `projects` grants project names `read` or `write` access."""
        return self._json("POST", "/tokens", json={"name": name, "role": role, "projects": dict(projects or {})})

    # -- projects -------------------------------------------------------------------------------

    def create_project(self, name: str) -> dict[str, Any]:
        """POST /projects (admin): `{id, name, access}`."""
        return self._json("POST", "/projects", json={"name": name})

    def list_projects(self) -> list[dict[str, Any]]:
        """GET /projects: the projects this token may see, each with `access` (read or write)."""
        return self._json("GET", "/projects")

    def list_tokens(self) -> list[dict[str, Any]]:
        """GET /tokens (admin): `[{id, name, role, created_at, revoked}]`."""
        return self._json("GET", "/tokens")

    def revoke_token(self, token_id: int) -> None:
        """DELETE /tokens/{id} (admin); raises NotFoundError."""
        self.request("DELETE", f"/tokens/{token_id}")


def pack_files(source: Path, tar_path: Path) -> None:
    """Write the file `source`, or every file under the folder `source`, into an uncompressed tar with fixed
    metadata (names in order, mtime 0, owner 0, mode 644): the same files always give the same bytes, so
    the same SHA-256. Raises ValueError when there is no file to pack."""
    source = Path(source)
    if source.is_file():
        files = [(source, source.name)]
    elif source.is_dir():
        files = [(p, p.relative_to(source).as_posix()) for p in sorted(source.rglob("*")) if p.is_file()]
    else:
        raise ValueError(f"{source}: no such file or folder")
    if not files:
        raise ValueError(f"{source} holds no file to upload")
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in sorted(files, key=lambda f: f[1]):
            info = tarfile.TarInfo(name)
            info.size, info.mode = path.stat().st_size, 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _artifact_path(trial_id: int, name: str) -> str:
    # Keep the slashes of nested names (adapter/adapter_model.safetensors), escape everything else.
    return f"/trials/{trial_id}/artifacts/{quote(name, safe='/')}"


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
