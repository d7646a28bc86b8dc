"""Data set and base model routes: upload (a tar, streamed to the store), list, show, download, delete. The same
routes under /datasets and /models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunefleet.service import assets
from tunefleet.service.api.deps import Admin, BackendDep, Reader, UserOrAdmin, errors
from tunefleet.service.api.trials import octet_stream
from tunefleet.service.api.uploads import spooled_upload
from tunefleet.service.backend import Backend
from tunefleet.service.errors import TooLarge
from tunefleet.service.schemas import AssetOut

__all__ = ["routers"]

# A tar, sent and answered as plain bytes (the server reads the tar itself, whatever the Content-Type).
_TAR = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_UPLOAD_BODY = {"requestBody": {
    "required": True, "content": _TAR,
    "description": "a tar of the files (`tunefleet data upload` / `model upload` pack one)"}}
Name = Annotated[str, Path(max_length=200, description="the data set's or model's name")]
Version = Annotated[str, Path(max_length=64, description="a version (hex prefix of its sha256) or `latest`")]


def _router(kind: str) -> APIRouter:
    what = assets.KINDS[kind]
    router = APIRouter(prefix=f"/api/v1/{kind}", tags=[kind])

    @router.post("/{name}", status_code=status.HTTP_201_CREATED, response_model=AssetOut,
                 responses=errors(413, 422), openapi_extra=_UPLOAD_BODY, summary=f"Upload a {what}")
    async def upload(backend: BackendDep, _: UserOrAdmin, name: Name, request: Request) -> AssetOut:
        """Store a tar of files under `name`; its version is its SHA-256. The same bytes again answer the same
        version. Over TUNEFLEET_MAX_UPLOAD_MB: 413; not a tar, or a tar with links or unsafe names: 422."""
        assets.check_asset_name(kind, name)
        limit = backend.settings.max_upload_mb * 2**20
        async with spooled_upload(request, backend, limit, lambda: _too_large(backend, kind)) as (tmp, sha256, size):
            return await run_in_threadpool(assets.record_upload, backend, kind, name, tmp, sha256, size)

    @router.get("", response_model=list[AssetOut], responses=errors(), summary=f"List {what}s")
    def list_all(backend: BackendDep, _: Reader) -> list[AssetOut]:
        """Every version of every one, by name, newest first."""
        return assets.list_assets(backend, kind)

    @router.get("/{name}", response_model=list[AssetOut], responses=errors(404, 422), summary=f"Versions of a {what}")
    def versions(backend: BackendDep, _: Reader, name: Name) -> list[AssetOut]:
        """The versions of `name`, newest first; 404 when none was uploaded."""
        return assets.list_assets(backend, kind, assets.check_asset_name(kind, name))

    @router.get("/{name}/{version}", response_model=AssetOut, responses=errors(404, 422), summary=f"One {what}")
    def show(backend: BackendDep, _: Reader, name: Name, version: Version) -> AssetOut:
        return assets.find_asset(backend, kind, assets.check_asset_name(kind, name), version)

    @router.get("/{name}/{version}/content", response_class=StreamingResponse, summary=f"Download a {what}",
                responses={200: {"description": "the tar's bytes", "content": _TAR}, **errors(404, 422)})
    def content(backend: BackendDep, _: Reader, name: Name, version: Version) -> StreamingResponse:
        """The tar, streamed from the store (workers fetch inputs this way: they need no store credentials)."""
        return octet_stream(*assets.asset_chunks(backend, kind, assets.check_asset_name(kind, name), version))

    @router.delete("/{name}/{version}", response_model=AssetOut, responses=errors(404, 409, 422),
                   summary=f"Delete a version of a {what}")
    def delete(backend: BackendDep, _: Admin, name: Name, version: Version) -> AssetOut:
        """Forget one version (its tar leaves the store unless another name holds the same bytes); returns it.
        Admin only: uploads are shared by every project. 409 names the running or paused studies that use it;
        `latest` is refused (422): a deletion names its version."""
        return assets.delete_asset(backend, kind, assets.check_asset_name(kind, name), version)

    return router


def _too_large(backend: Backend, kind: str) -> TooLarge:
    return TooLarge(f"the {assets.KINDS[kind]} is over {backend.settings.max_upload_mb} MB: raise "
                    "TUNEFLEET_MAX_UPLOAD_MB on the server, or upload less")


routers = [_router(kind) for kind in assets.KINDS]
