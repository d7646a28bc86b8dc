"""Uploaded data sets and base models ("assets"): one tar each in the store under `<kind>/<sha256>.tar`, a name
and a version (the first 12 hex digits of the SHA-256) on top, and the pinning of a spec's `tunefleet://`
references when a study is created, so every trial of a study reads the same bytes."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tunefleet.service.errors import Conflict, InvalidInput, NotFound
from tunefleet.service.refs import ASSET_NAME, SCHEME, Ref, input_fields, parse_ref
from tunefleet.service.schemas import AssetFile, AssetOut
from tunefleet.service.tables import Asset
from tunefleet.service.tables import Study as StudyRow

if TYPE_CHECKING:
    from tunefleet.service.backend import Backend

__all__ = ["KINDS", "asset_chunks", "check_asset_name", "delete_asset", "find_asset", "list_assets", "pin_inputs",
           "record_upload"]

KINDS = {"datasets": "data set", "models": "model"}
VERSION_CHARS = 12
_UPLOAD_HINT = {"datasets": "`tunefleet data upload FILE|DIR --name NAME`",
                "models": "`tunefleet model upload DIR --name NAME`"}


def check_asset_name(kind: str, name: str) -> str:
    """`name` when it can name a data set or model; InvalidInput (422 on the `name` path parameter) otherwise."""
    if not ASSET_NAME.fullmatch(name):
        msg = (f"{KINDS[kind]} name {name[:100]!r} is not allowed: use up to 200 letters, digits, '_', '.' or '-', "
               "starting with a letter or digit (e.g. bbc-news)")
        raise InvalidInput(msg, [{"loc": ["path", "name"], "msg": msg, "type": "value_error"}])
    return name


def _out(row: Asset) -> AssetOut:
    return AssetOut(kind=row.kind, name=row.name, version=row.sha256[:VERSION_CHARS], sha256=row.sha256,
                    size=row.size, files=[AssetFile(**f) for f in row.files], created_at=row.created_at)


def _tar_files(kind: str, tmp: Path) -> list[dict[str, Any]]:
    """The files of an uploaded tar, `[{name, size}]` in name order; InvalidInput (422) when it is no tar, holds
    a link, device or unsafe name, or holds no file."""
    def bad(msg: str) -> InvalidInput:
        return InvalidInput(msg, [{"loc": ["body"], "msg": msg, "type": "value_error"}])

    try:
        with tarfile.open(tmp) as tar:  # reads the headers, streaming through the file
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise bad(f"the body is not a tar file ({exc}): upload with {_UPLOAD_HINT[kind]}, which packs one") from None
    files = []
    for member in members:
        if member.name.startswith("/") or any(p in ("", ".", "..") for p in member.name.rstrip("/").split("/")):
            raise bad(f"the tar holds an unsafe name {member.name[:200]!r}: only relative names without '..' are "
                      "accepted")
        if member.isfile():
            files.append({"name": member.name, "size": member.size})
        elif not member.isdir():
            raise bad(f"the tar holds {member.name[:200]!r}, which is not a plain file or folder (a link or "
                      "device): upload the files themselves")
    if not files:
        raise bad(f"the tar holds no file: upload a {KINDS[kind]} with at least one file")
    return sorted(files, key=lambda f: f["name"])


def record_upload(backend: Backend, kind: str, name: str, tmp: Path, sha256: str, size: int) -> AssetOut:
    """Check an uploaded tar (streamed to `tmp`), put it into the store once per content and record it under
    `name`; the same content under the same name again returns the existing version."""
    files = _tar_files(kind, tmp)
    key = f"{kind}/{sha256}.tar"
    if not backend.store.exists(key):
        backend.store.put(key, tmp)
    with backend.session() as session:
        row = session.scalar(sa.select(Asset).where(Asset.kind == kind, Asset.name == name, Asset.sha256 == sha256))
        if row is None:
            row = Asset(kind=kind, name=name, sha256=sha256, size=size, files=files)
            session.add(row)
            session.flush()
        return _out(row)


def list_assets(backend: Backend, kind: str, name: str | None = None) -> list[AssetOut]:
    """Every version of every data set (or model), or of one name, newest first; NotFound when `name` has none."""
    query = sa.select(Asset).where(Asset.kind == kind)
    if name is not None:
        query = query.where(Asset.name == name)
    with backend.session() as session:
        rows = session.scalars(query.order_by(Asset.name, Asset.created_at.desc(), Asset.id.desc())).all()
        if name is not None and not rows:
            raise _unknown(kind, name)
        return [_out(row) for row in rows]


def _unknown(kind: str, name: str) -> NotFound:
    return NotFound(f"no {KINDS[kind]} named {name!r} was uploaded: upload it with {_UPLOAD_HINT[kind]}, or "
                    f"list them with `tunefleet {'data' if kind == 'datasets' else 'model'} ls`")


def find_asset(backend: Backend, kind: str, name: str, version: str | None = None) -> AssetOut:
    """The version of `name` whose SHA-256 starts with `version` (None or "latest": the newest); NotFound when
    there is none, InvalidInput when `version` matches several."""
    versions = list_assets(backend, kind, name)
    if version in (None, "latest"):
        return versions[0]
    matches = [v for v in versions if v.sha256.startswith(str(version).lower())]
    if not matches:
        raise NotFound(f"{KINDS[kind]} {name!r} has no version {version!r}: it has "
                       f"{', '.join(v.version for v in versions)}")
    if len(matches) > 1:
        raise InvalidInput(f"version {version!r} of {KINDS[kind]} {name!r} matches {len(matches)} versions: give "
                           "more of its hex digits", loc=("path", "version"))
    return matches[0]


def asset_chunks(backend: Backend, kind: str, name: str, version: str) -> tuple[Iterator[bytes], int]:
    """The tar of one version, streamed from the store, and its size; NotFound."""
    asset = find_asset(backend, kind, name, version)
    try:
        return backend.store.chunks(f"{kind}/{asset.sha256}.tar"), asset.size
    except FileNotFoundError:
        raise NotFound(f"{KINDS[kind]} {name!r} version {asset.version} is recorded but its file is gone from the "
                       f"store ({backend.store.describe()}): upload it again") from None


def delete_asset(backend: Backend, kind: str, name: str, version: str) -> AssetOut:
    """Forget one version of `name` and return it; its tar leaves the store unless another name holds the same
    content. NotFound; InvalidInput for ``latest`` (a deletion names its version); Conflict naming the running
    or paused studies that use it (stop them first). A finished study keeps its spec and results, but cannot be
    re-run from it."""
    if version == "latest":
        raise InvalidInput(f"name the version of {KINDS[kind]} {name!r} to delete (`tunefleet "
                           f"{'data' if kind == 'datasets' else 'model'} show {name}` lists them), not 'latest'",
                           loc=("path", "version"))
    asset = find_asset(backend, kind, name, version)
    with backend.session() as session:
        users = [study.name for study in session.scalars(
                     sa.select(StudyRow).where(StudyRow.state.in_(("running", "paused"))).order_by(StudyRow.id))
                 if _pins(study.spec, kind, name, asset.sha256)]
        if users:
            raise Conflict(f"{KINDS[kind]} {name!r} version {asset.version} is in use by "
                           f"{'study' if len(users) == 1 else 'studies'} {', '.join(users[:10])}: stop "
                           f"{'it' if len(users) == 1 else 'them'} (`tunefleet study stop`) before deleting it")
        session.execute(sa.delete(Asset).where(Asset.kind == kind, Asset.name == name, Asset.sha256 == asset.sha256))
        shared = session.scalar(sa.select(sa.func.count()).select_from(Asset)
                                .where(Asset.kind == kind, Asset.sha256 == asset.sha256))
    if not shared:  # after the commit: a failed delete leaves an unreferenced tar, never a row without one
        backend.store.delete(f"{kind}/{asset.sha256}.tar")
    return asset


def _pins(spec: Mapping[str, Any], kind: str, name: str, sha256: str) -> bool:
    """Whether a stored (pinned) spec uses this upload in any input field."""
    for _, field_kind, value in input_fields(spec):
        try:
            ref = parse_ref(value)
        except ValueError:
            continue
        if (field_kind == kind and ref is not None and ref.name == name
                and (ref.version is None or sha256.startswith(ref.version))):  # unpinned: may be any version
            return True
    return False


def pin_inputs(backend: Backend, spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` with every `tunefleet://NAME` reference pinned to the version it names now
    (`tunefleet://NAME@VERSION`), so a later upload under the same name does not change a running study;
    InvalidInput (422) naming each reference to nothing, or to a file the upload does not hold."""
    pinned: dict[str, Any] = {**spec}
    if spec.get("data") is not None:  # a script study may have none
        pinned["data"] = dict(spec["data"])
    errors: list[dict[str, Any]] = []
    for loc, kind, value in input_fields(spec):
        try:
            ref = parse_ref(value)
            if ref is None:
                continue
            uri = _pin(backend, kind, ref)
        except (ValueError, NotFound, InvalidInput) as exc:
            errors.append({"loc": list(loc), "msg": getattr(exc, "message", str(exc)), "type": "value_error"})
            continue
        if len(loc) == 1:  # model, tokenizer
            pinned[loc[0]] = uri
        else:
            pinned["data"][loc[1]] = uri
    if errors:
        first = errors[0]
        raise InvalidInput(f"invalid study spec: {'.'.join(first['loc'])}: {first['msg']}", errors)
    return pinned


def _pin(backend: Backend, kind: str, ref: Ref) -> str:
    asset = find_asset(backend, kind, ref.name, ref.version)
    names = [f.name for f in asset.files]
    if kind == "datasets":
        if ref.path is None and len(names) > 1:
            raise InvalidInput(f"data set {ref.name!r} holds {len(names)} files: name one, e.g. "
                               f"{SCHEME}{ref.name}/{names[0]}")
        if ref.path is not None and ref.path not in names:
            raise InvalidInput(f"data set {ref.name!r} version {asset.version} holds no file {ref.path!r}; it holds "
                               f"{', '.join(names[:10])}")
    elif ref.path is not None and not any(n.startswith(ref.path + "/") for n in names):
        raise InvalidInput(f"model {ref.name!r} version {asset.version} has no folder {ref.path!r}")
    return Ref(ref.name, asset.version, ref.path).uri()
