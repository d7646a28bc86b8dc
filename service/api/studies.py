"""Study routes: create, list, show, pause/resume/stop, delete, trials, fidelity report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response, status
from pydantic import AfterValidator, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from tunefleet.service import studies
from tunefleet.service.api.deps import BackendDep, Reader, UserOrAdmin, errors
from tunefleet.service.errors import InvalidInput, NotFound
from tunefleet.service.schemas import EnqueueIn, Page, StudyOut, TrialOut, storable_text
from tunefleet.service.spec import StudySpec

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])

# Paging bounds: past PostgreSQL's integer no table has rows (and past its bigint an OFFSET is a 500).
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]
NameFilter = Annotated[str | None, Query(max_length=200, description="studies whose name contains this"),
                       AfterValidator(storable_text)]


class _DocumentedAsStudySpec:
    """Documents a body as `StudySpec` (its JSON schema, in the OpenAPI components) while the route reads it
    as a plain object: the domain layer validates the spec itself (service/studies.py `create_study`, with
    messages naming each field's fix) and stores it exactly as submitted."""

    @classmethod
    def __get_pydantic_json_schema__(cls, _: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(StudySpec.__pydantic_core_schema__)


SpecBody = Annotated[dict[str, Any], Body(description="a study spec (docs/configuration.md)"), _DocumentedAsStudySpec]


ACTIONS = ("pause", "resume", "stop")
# Documented as a choice; another word is an unknown path (404), as before.
Action = Annotated[str, Path(description="what to do with the study", json_schema_extra={"enum": list(ACTIONS)})]


def _with_loc(exc: InvalidInput, *loc: str) -> InvalidInput:
    """A domain 422 about one query parameter, with its `loc`."""
    return exc if isinstance(exc.detail, list) else InvalidInput(exc.message, loc=loc)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyOut, responses=errors(404, 409, 422))
def create_study(backend: BackendDep, principal: UserOrAdmin, spec: SpecBody) -> StudyOut:
    """Submit a study spec (see docs/configuration.md); 422 lists every offending field, 404 names an unknown
    project (or one the token may not see), 403 a project it may only read."""
    return studies.create_study(backend, spec, principal)


@router.get("", response_model=Page[StudyOut], responses=errors(422))
def list_studies(backend: BackendDep, principal: Reader, state: str | None = None, name: NameFilter = None,
                 limit: int = Query(50, ge=1, le=500), offset: Offset = 0) -> Page[StudyOut]:
    """The studies of the projects the token may see, newest first."""
    try:
        items, total = studies.list_studies(backend, state, name, limit, offset, principal)
    except InvalidInput as exc:  # the only one: an unknown state
        raise _with_loc(exc, "query", "state") from None
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyOut, responses=errors(404, 422))
def get_study(backend: BackendDep, principal: Reader, study_id: int) -> StudyOut:
    studies.check_study_access(backend, principal, study_id)
    return studies.get_study(backend, study_id)


@router.post("/{study_id}/trials", status_code=status.HTTP_201_CREATED, response_model=TrialOut,
             responses=errors(404, 409, 422))
def enqueue_trial(backend: BackendDep, principal: UserOrAdmin, study_id: int, body: EnqueueIn) -> TrialOut:
    """Queue a configuration (known-good settings, a warm start by hand): it runs before the sampler's own
    proposals and counts against the budget when it runs. 422 names each parameter outside the search space."""
    studies.check_study_access(backend, principal, study_id, write=True)
    return studies.enqueue_trial(backend, study_id, body.params, body.note)


@router.post("/{study_id}/{action}", response_model=StudyOut, responses=errors(404, 409, 422))
def change_state(backend: BackendDep, principal: UserOrAdmin, study_id: int, action: Action) -> StudyOut:
    if action not in ACTIONS:
        raise NotFound(f"unknown action {action!r}: use pause, resume or stop")
    studies.check_study_access(backend, principal, study_id, write=True)
    return studies.set_study_state(backend, study_id, action)


@router.delete("/{study_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def delete_study(backend: BackendDep, principal: UserOrAdmin, study_id: int) -> Response:
    studies.check_study_access(backend, principal, study_id, write=True)
    studies.delete_study(backend, study_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{study_id}/trials", response_model=Page[TrialOut], responses=errors(404, 422))
def list_trials(backend: BackendDep, principal: Reader, study_id: int, state: str | None = None,
                limit: int = Query(100, ge=1, le=1000), offset: Offset = 0) -> Page[TrialOut]:
    studies.check_study_access(backend, principal, study_id)
    try:
        items, total = studies.list_trials(backend, study_id, state, limit, offset)
    except InvalidInput as exc:  # the only one: an unknown state
        raise _with_loc(exc, "query", "state") from None
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}/report", responses=errors(404, 422))
def study_report(backend: BackendDep, principal: Reader, study_id: int) -> dict[str, Any]:
    """Fidelity report: how well each rung ranked the final scores, steps saved, tuned vs baseline."""
    studies.check_study_access(backend, principal, study_id)
    return studies.study_report(backend, study_id)
