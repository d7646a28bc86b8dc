"""Trial routes: the worker protocol (heartbeat, reports, pause, complete, fail, artifacts) and trial reads."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunefleet.service import leases, studies
from tunefleet.service.api import metrics
from tunefleet.service.api.deps import BackendDep, LeaseToken, Reader, WorkerOrAdmin, errors
from tunefleet.service.api.uploads import spooled_upload
from tunefleet.service.artifacts import artifact_chunks, check_name_free, clean_name, list_artifacts, record_artifact
from tunefleet.service.backend import Backend
from tunefleet.service.errors import TooLarge
from tunefleet.service.schemas import (
    ArtifactOut,
    CompleteIn,
    FailIn,
    HeartbeatIn,
    HeartbeatOut,
    LeaseIn,
    LeaseOut,
    PauseIn,
    ReportIn,
    ReportOut,
    TrialOut,
)

router = APIRouter(prefix="/api/v1", tags=["trials"])

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
# PUT /trials/{id}/artifacts/{name} reads its body as a stream of raw bytes (no FastAPI body parameter).
_UPLOAD_BODY = {"requestBody": {"required": True, "description": "the file's bytes", "content": _BINARY}}


@router.post("/leases", response_model=LeaseOut,
             responses={204: {"description": "no study has work"}, **errors(409, 422)})
def lease(backend: BackendDep, principal: WorkerOrAdmin, body: LeaseIn) -> LeaseOut | Response:
    leased = leases.lease(backend, body, principal)
    if leased is None:
        return Response(status_code=204)
    metrics.LEASES.inc()
    return leased


@router.get("/trials/{trial_id}", response_model=TrialOut, responses=errors(404, 422))
def get_trial(backend: BackendDep, principal: Reader, trial_id: int) -> TrialOut:
    studies.check_trial_access(backend, principal, trial_id)
    return studies.get_trial(backend, trial_id)


@router.post("/trials/{trial_id}/heartbeat", response_model=HeartbeatOut, responses=errors(404, 422))
def heartbeat(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, token: LeaseToken = None,
              body: HeartbeatIn | None = None) -> HeartbeatOut:
    return leases.heartbeat(backend, trial_id, token, body.worker_id if body else "")


@router.post("/trials/{trial_id}/reports", response_model=ReportOut, responses=errors(404, 409, 422))
def report(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, body: ReportIn, token: LeaseToken = None
           ) -> ReportOut:
    """Record an evaluation at a rung; the answer says continue, prune or pause (see POST .../pause)."""
    action = leases.report(backend, trial_id, token, body)
    metrics.REPORTS.labels(action=action).inc()
    return ReportOut(action=action, prune=action == "prune")


@router.post("/trials/{trial_id}/pause", response_model=TrialOut, responses=errors(404, 409, 422))
def pause(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, body: PauseIn, token: LeaseToken = None) -> TrialOut:
    """After a report answered pause, and once its checkpoint is stored (uploaded as an artifact of the trial, or
    kept on the node): release the lease. The trial waits, paused, until a lease resumes it."""
    return leases.pause(backend, trial_id, token, body)


@router.post("/trials/{trial_id}/complete", response_model=TrialOut, responses=errors(404, 409, 422))
def complete(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, body: CompleteIn, token: LeaseToken = None
             ) -> TrialOut:
    return leases.complete(backend, trial_id, token, body)


@router.post("/trials/{trial_id}/fail", response_model=TrialOut, responses=errors(404, 409, 422))
def fail(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, body: FailIn, token: LeaseToken = None) -> TrialOut:
    return leases.fail(backend, trial_id, token, body)


@router.put("/trials/{trial_id}/artifacts/{name:path}", response_model=ArtifactOut,
            responses=errors(404, 409, 413, 422), openapi_extra=_UPLOAD_BODY)
async def put_artifact(backend: BackendDep, _: WorkerOrAdmin, trial_id: int, name: str, request: Request,
                       token: LeaseToken = None) -> ArtifactOut:
    """Upload one file (streamed to a spool file, then put into the store); the same name again replaces it. Over
    TUNEFLEET_MAX_ARTIFACT_MB: 413."""
    clean_name(name)
    await run_in_threadpool(leases.require_holder, backend, trial_id, token)  # before reading the body
    await run_in_threadpool(check_name_free, backend, trial_id, name)  # 409 on a file/folder clash, too
    limit = backend.settings.max_artifact_mb * 2**20
    async with spooled_upload(request, backend, limit, lambda: _too_large(backend, name)) as (tmp, sha256, size):
        return await run_in_threadpool(record_artifact, backend, trial_id, token, name, tmp, sha256, size)


def _too_large(backend: Backend, name: str) -> TooLarge:
    return TooLarge(f"artifact {name!r} is over {backend.settings.max_artifact_mb} MB: raise "
                    "TUNEFLEET_MAX_ARTIFACT_MB on the server, or upload a smaller file")


@router.get("/trials/{trial_id}/artifacts", response_model=list[ArtifactOut], responses=errors(404, 422))
def get_artifacts(backend: BackendDep, principal: Reader, trial_id: int) -> list[ArtifactOut]:
    """The trial's artifacts (maybe none); 404 when there is no such trial, or not one the token may see."""
    studies.check_trial_access(backend, principal, trial_id)
    return list_artifacts(backend, trial_id)


@router.get("/trials/{trial_id}/artifacts/{name:path}", response_class=StreamingResponse,
            responses={200: {"description": "the file's bytes", "content": _BINARY}, **errors(404, 422)})
def download_artifact(backend: BackendDep, principal: Reader, trial_id: int, name: str) -> StreamingResponse:
    """The file's bytes, streamed from the store (a local folder or object storage)."""
    studies.check_trial_access(backend, principal, trial_id)
    return octet_stream(*artifact_chunks(backend, trial_id, name))


def octet_stream(chunks: Iterator[bytes], size: int) -> StreamingResponse:
    """A download streamed chunk by chunk from the store, with its length."""
    return StreamingResponse(chunks, media_type="application/octet-stream", headers={"Content-Length": str(size)})
