"""Study routes: create, list, show, pause/resume/stop, delete, trials, fidelity report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response, status
from pydantic import AfterValidator

from tunefleet.service import studies
from tunefleet.service.api.deps import BackendDep, Reader, UserOrAdmin
from tunefleet.service.errors import NotFound
from tunefleet.service.schemas import Page, StudyOut, TrialOut, storable_text

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])

# Paging bounds: past PostgreSQL's integer no table has rows (and past its bigint an OFFSET is a 500).
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]
NameFilter = Annotated[str | None, Query(max_length=200, description="studies whose name contains this"),
                       AfterValidator(storable_text)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyOut)
def create_study(backend: BackendDep, _: UserOrAdmin, spec: dict[str, Any] = Body(...)) -> StudyOut:
    """Submit a study spec (see docs/configuration.md); 422 lists every offending field."""
    return studies.create_study(backend, spec)


@router.get("", response_model=Page[StudyOut])
def list_studies(backend: BackendDep, _: Reader, state: str | None = None, name: NameFilter = None,
                 limit: int = Query(50, ge=1, le=500), offset: Offset = 0) -> Page[StudyOut]:
    items, total = studies.list_studies(backend, state, name, limit, offset)
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyOut)
def get_study(backend: BackendDep, _: Reader, study_id: int) -> StudyOut:
    return studies.get_study(backend, study_id)


@router.post("/{study_id}/{action}", response_model=StudyOut)
def change_state(backend: BackendDep, _: UserOrAdmin, study_id: int, action: str) -> StudyOut:
    if action not in ("pause", "resume", "stop"):
        raise NotFound(f"unknown action {action!r}: use pause, resume or stop")
    return studies.set_study_state(backend, study_id, action)


@router.delete("/{study_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_study(backend: BackendDep, _: UserOrAdmin, study_id: int) -> Response:
    studies.delete_study(backend, study_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{study_id}/trials", response_model=Page[TrialOut])
def list_trials(backend: BackendDep, _: Reader, study_id: int, state: str | None = None,
                limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> Page[TrialOut]:
    items, total = studies.list_trials(backend, study_id, state, limit, offset)
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}/report")
def study_report(backend: BackendDep, _: Reader, study_id: int) -> dict[str, Any]:
    """Fidelity report: how well each rung ranked the final scores, steps saved, tuned vs baseline."""
    return studies.study_report(backend, study_id)
