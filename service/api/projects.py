"""Project routes: admins create projects; any token lists the projects it may see, with its access."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, status

from tunefleet.service.api.deps import Admin, BackendDep, Reader, errors
from tunefleet.service.auth import create_project
from tunefleet.service.schemas import ProjectIn, ProjectOut
from tunefleet.service.tables import Project

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ProjectOut, responses=errors(409, 422))
def new_project(backend: BackendDep, _: Admin, body: ProjectIn) -> ProjectOut:
    """Create a project; grant it to tokens with POST /tokens (`projects`)."""
    with backend.session() as session:
        row = create_project(session, body.name)
        return ProjectOut(id=row.id, name=row.name, access="write")


@router.get("", response_model=list[ProjectOut], responses=errors())
def list_projects(backend: BackendDep, principal: Reader) -> list[ProjectOut]:
    """The projects the calling token may see (all of them for admins and unrestricted workers)."""
    with backend.session() as session:
        rows = session.scalars(sa.select(Project).order_by(Project.name)).all()
    granted = principal.projects
    return [ProjectOut(id=r.id, name=r.name, access="write" if granted is None else granted[r.id])
            for r in rows if granted is None or r.id in granted]
