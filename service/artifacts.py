"""Trial artifacts (adapters, models, logs, pause checkpoints): their names, records and limits. The bytes live
in the server's store (`service/stores.py`: a local folder or S3-compatible object storage) under the key
`<study id>/<trial id>/<name>`, which `tf_artifacts.path` records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session

from tunefleet.service.auth import check_lease_token
from tunefleet.service.errors import Conflict, InvalidInput, NotFound
from tunefleet.service.schemas import ArtifactOut, printable, text_problem
from tunefleet.service.stores import LocalStore
from tunefleet.service.tables import Artifact, Lease, utcnow

if TYPE_CHECKING:
    from tunefleet.service.backend import Backend

__all__ = ["CHECKPOINT_FOLDER", "artifact_chunks", "artifact_key", "check_name_free", "clean_name",
           "delete_checkpoints", "find_artifact", "list_artifacts", "record_artifact"]

MAX_PART_BYTES = 255  # a file or folder name on ext4, XFS, NFS
MAX_NAME_BYTES = 500  # tf_artifacts.name is a VARCHAR(500)
EXAMPLE = "e.g. adapter/model.bin"
# Paused trials upload their rung checkpoints under this folder of the trial's artifacts.
CHECKPOINT_FOLDER = "checkpoints"


def name_problem(name: str) -> str | None:
    """What makes `name` unsafe as an artifact name (a path relative to the trial's folder), with the fix;
    None when it is safe."""
    if not name:
        return f"is empty: name the file, {EXAMPLE}"
    text = text_problem(name)
    if text and text[0] == "lone_surrogate":
        return text[1]
    control = next((c for c in name if c < " " or "\x7f" <= c <= "\x9f"), None)
    if control is not None:
        return f"contains a control character ({control!r}): use printable characters only"
    if "\\" in name:
        return f"contains a backslash: separate folders with '/', {EXAMPLE}"
    if name.startswith("/"):
        return f"is absolute: give a path relative to the trial, {EXAMPLE}"
    parts = name.split("/")
    if "" in parts:
        return f"has an empty part ('//' or a trailing '/'): name every folder, {EXAMPLE}"
    for part in parts:
        if part in (".", ".."):
            return f"has a {part!r} part: give a plain relative path, {EXAMPLE}"
        if len(part.encode()) > MAX_PART_BYTES:
            return (f"has a part of {len(part.encode())} bytes: keep each folder and file name within "
                    f"{MAX_PART_BYTES} bytes (UTF-8)")
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is {len(name.encode())} bytes long: keep artifact names within {MAX_NAME_BYTES} bytes (UTF-8)"
    return None


def clean_name(name: str) -> str:
    """A safe relative artifact name (``adapter/adapter_model.safetensors``), unchanged; raises InvalidInput
    (422 naming the `name` path parameter and the rule) otherwise."""
    problem = name_problem(name)
    if problem:
        shown = printable(name) if len(name) <= 120 else printable(name[:100]) + "..."
        msg = f"artifact name {shown!r} {problem}"
        raise InvalidInput(msg, [{"loc": ["path", "name"], "msg": msg, "type": "value_error"}])
    return name


def _clash(session: Session, trial_id: int, name: str, path: Path | None = None) -> str | None:
    """Why `name` cannot be stored beside the trial's other artifacts (a file where one of its folders
    would be, or a folder where it would be), looking at the records and, given its `path`, the disk."""
    parts = name.split("/")
    folders = ["/".join(parts[:i]) for i in range(1, len(parts))]
    others = session.scalars(sa.select(Artifact.name).where(
        Artifact.trial_id == trial_id,
        sa.or_(Artifact.name.in_(folders), Artifact.name.startswith(name + "/", autoescape=True)),
    ).order_by(Artifact.name))
    for other in others:  # checked again here: SQLite's LIKE ignores case
        if other in folders:
            return f"artifact {name!r} needs a folder {other!r}, but the trial has a file {other!r}: pick another name"
        if other.startswith(name + "/"):
            return (f"artifact {name!r} would replace the folder {name!r}, which holds the trial's artifact "
                    f"{other!r}: pick another name")
    if path is not None:
        if path.is_dir():
            return f"artifact {name!r} would replace a folder of the trial's store: pick another name"
        for folder, parent in zip(reversed(folders), path.parents, strict=False):
            if parent.exists() and not parent.is_dir():
                return (f"artifact {name!r} needs a folder {folder!r}, but the trial's store has a file there: "
                        "pick another name")
    return None


def check_name_free(backend: Backend, trial_id: int, name: str) -> str:
    """The clean `name` when the trial has no artifact clashing with it; InvalidInput (422) or Conflict (409)
    otherwise. A cheap check before a long upload; `record_artifact` checks again under the trial's lock."""
    name = clean_name(name)
    with backend.session() as session:
        clash = _clash(session, trial_id, name)
    if clash:
        raise Conflict(clash)
    return name


def artifact_key(study_id: int, trial_id: int, name: str) -> str:
    """Where the store keeps a trial's artifact."""
    return f"{study_id}/{trial_id}/{clean_name(name)}"


# ---- artifact records ------------------------------------------------------------------------------------

def record_artifact(backend: Backend, trial_id: int, token: str | None, name: str, tmp: Path, sha256: str,
                    size: int) -> ArtifactOut:
    """Put an uploaded file into the store and record it; uploading the same name again replaces it. Only the
    holder of the trial's lease token may upload (Forbidden otherwise); a name clashing with another
    artifact (a file where a folder is, or the reverse) is a Conflict, and nothing is written then."""
    name = clean_name(name)
    with backend.trial_lock(trial_id), backend.session() as session:
        lease = session.get(Lease, trial_id, with_for_update=backend.is_postgres)
        if lease is None:
            tmp.unlink(missing_ok=True)
            raise NotFound(f"trial {trial_id} has no lease; artifacts belong to leased trials")
        check_lease_token(lease, token)
        key = artifact_key(lease.study_id, trial_id, name)
        store = backend.store
        clash = _clash(session, trial_id, name, store.path(key) if isinstance(store, LocalStore) else None)
        if clash:
            raise Conflict(clash)
        _check_trial_total(backend, session, trial_id, name, size)
        row = session.scalar(sa.select(Artifact).where(Artifact.trial_id == trial_id, Artifact.name == name))
        if row is None:
            row = Artifact(trial_id=trial_id, study_id=lease.study_id, name=name, path=key, size=size,
                           sha256=sha256)
            session.add(row)
        else:
            row.path, row.size, row.sha256, row.created_at = key, size, sha256, utcnow()
        session.flush()  # the record first: if storing fails, the transaction rolls back
        store.put(key, tmp)
        return ArtifactOut(name=row.name, size=row.size, sha256=row.sha256, created_at=row.created_at)


def _check_trial_total(backend: Backend, session: Session, trial_id: int, name: str, size: int) -> None:
    """InvalidInput when the trial's artifacts, with this one (replacing one of the same name), would pass
    TUNEFLEET_MAX_TRIAL_ARTIFACT_MB."""
    others = session.scalar(sa.select(sa.func.coalesce(sa.func.sum(Artifact.size), 0)).where(
        Artifact.trial_id == trial_id, Artifact.name != name)) or 0
    limit_mb = backend.settings.max_trial_artifact_mb
    if others + size > limit_mb * 2**20:
        raise InvalidInput(f"artifact {name!r} would bring trial {trial_id}'s artifacts to "
                           f"{(others + size) / 2**20:.1f} MB, over {limit_mb} MB: upload less or raise "
                           "TUNEFLEET_MAX_TRIAL_ARTIFACT_MB")


def list_artifacts(backend: Backend, trial_id: int) -> list[ArtifactOut]:
    with backend.session() as session:
        rows = session.scalars(sa.select(Artifact).where(Artifact.trial_id == trial_id).order_by(Artifact.name))
        return [ArtifactOut(name=r.name, size=r.size, sha256=r.sha256, created_at=r.created_at) for r in rows]


def artifact_chunks(backend: Backend, trial_id: int, name: str) -> tuple[Iterator[bytes], int]:
    """The artifact's bytes as a stream from the store, and its size; NotFound when there is no such artifact
    (or its object is gone from the store)."""
    with backend.session() as session:
        row = session.scalar(sa.select(Artifact).where(Artifact.trial_id == trial_id,
                                                       Artifact.name == clean_name(name)))
        key, size = (row.path, row.size) if row is not None else (None, 0)
    try:
        if key is not None:
            return backend.store.chunks(key), size
    except FileNotFoundError:
        pass
    raise NotFound(f"trial {trial_id} has no artifact {name!r}: list them with GET /trials/{trial_id}/artifacts")


def find_artifact(session: Session, trial_id: int, name: str) -> Artifact | None:
    return session.scalar(sa.select(Artifact).where(Artifact.trial_id == trial_id, Artifact.name == name))


def delete_checkpoints(backend: Backend, trial_id: int, keep: str | None = None) -> int:
    """Delete the trial's uploaded rung checkpoints (artifacts under `checkpoints/`) but `keep`; returns how many.
    The records go first: a file left behind by a crash is unreferenced, never a record without its file."""
    with backend.session() as session:
        rows = session.scalars(sa.select(Artifact).where(
            Artifact.trial_id == trial_id, Artifact.name.startswith(CHECKPOINT_FOLDER + "/"))).all()
        doomed = [row for row in rows if row.name != keep]
        keys = [row.path for row in doomed]
        for row in doomed:
            session.delete(row)
    for key in keys:
        backend.store.delete(key)
    return len(keys)
