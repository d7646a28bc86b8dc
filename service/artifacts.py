"""The artifact store: trained adapters and logs on a filesystem path (a local disk or a shared mount)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import sqlalchemy as sa

from tunefleet.service.auth import check_lease_token
from tunefleet.service.errors import InvalidInput, NotFound
from tunefleet.service.schemas import ArtifactOut
from tunefleet.service.tables import Artifact, Lease, utcnow

if TYPE_CHECKING:
    from tunefleet.service.backend import Backend

__all__ = ["ArtifactStore", "artifact_path", "clean_name", "list_artifacts", "record_artifact"]


def clean_name(name: str) -> str:
    """A safe relative artifact name (``adapter/adapter_model.safetensors``); raises InvalidInput."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts) or "\\" in name:
        raise InvalidInput(f"artifact name {name!r} must be a relative path without '..', e.g. adapter/model.bin")
    return str(path)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    def path_for(self, study_id: int, trial_id: int, name: str) -> Path:
        return self.root / str(study_id) / str(trial_id) / clean_name(name)

    def incoming(self) -> tuple[int, Path]:
        """A temp file on the store's own filesystem, so the final move is an atomic rename."""
        folder = self.root / ".incoming"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="upload-")
        return fd, Path(tmp)

    def delete_study(self, study_id: int) -> None:
        shutil.rmtree(self.root / str(study_id), ignore_errors=True)


# ---- artifact records ------------------------------------------------------------------------------------

def record_artifact(backend: Backend, trial_id: int, token: str | None, name: str, tmp: Path, sha256: str,
                    size: int) -> ArtifactOut:
    """Move an uploaded file into place and record it; uploading the same name again replaces it. Only the
    holder of the trial's lease token may upload (Forbidden otherwise)."""
    name = clean_name(name)
    with backend.trial_lock(trial_id), backend.session() as session:
        lease = session.get(Lease, trial_id)
        if lease is None:
            tmp.unlink(missing_ok=True)
            raise NotFound(f"trial {trial_id} has no lease; artifacts belong to leased trials")
        check_lease_token(lease, token)
        path = backend.artifacts.path_for(lease.study_id, trial_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        row = session.scalar(sa.select(Artifact).where(Artifact.trial_id == trial_id, Artifact.name == name))
        if row is None:
            row = Artifact(trial_id=trial_id, study_id=lease.study_id, name=name, path=str(path), size=size,
                           sha256=sha256)
            session.add(row)
        else:
            row.path, row.size, row.sha256, row.created_at = str(path), size, sha256, utcnow()
        session.flush()
        return ArtifactOut(name=row.name, size=row.size, sha256=row.sha256, created_at=row.created_at)


def list_artifacts(backend: Backend, trial_id: int) -> list[ArtifactOut]:
    with backend.session() as session:
        rows = session.scalars(sa.select(Artifact).where(Artifact.trial_id == trial_id).order_by(Artifact.name))
        return [ArtifactOut(name=r.name, size=r.size, sha256=r.sha256, created_at=r.created_at) for r in rows]


def artifact_path(backend: Backend, trial_id: int, name: str) -> Path:
    with backend.session() as session:
        row = session.scalar(sa.select(Artifact).where(Artifact.trial_id == trial_id,
                                                       Artifact.name == clean_name(name)))
        if row is None or not Path(row.path).exists():
            raise NotFound(f"trial {trial_id} has no artifact {name!r}: "
                           f"list them with GET /trials/{trial_id}/artifacts")
        return Path(row.path)
