"""Request bodies streamed to a spool file: what the artifact and the data set / model upload routes share."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import Request

from tunefleet.service.backend import Backend
from tunefleet.service.errors import TooLarge

__all__ = ["spooled_upload"]


@contextlib.asynccontextmanager
async def spooled_upload(request: Request, backend: Backend, limit: int, too_large: Callable[[], TooLarge]
                         ) -> AsyncIterator[tuple[Path, str, int]]:
    """Stream the body to a spool file in the store's incoming area; yields (path, sha256 hex, size).

    Raises `too_large()` before reading a byte when Content-Length is over `limit`, and as soon as the bytes
    read go over it (a chunked body declares no length). The spool file is removed on the way out, whatever
    happened; whoever keeps it moves it away first.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    fd, tmp = backend.store.incoming()
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large()
                digest.update(chunk)
                fh.write(chunk)
        yield tmp, digest.hexdigest(), size
    finally:
        tmp.unlink(missing_ok=True)
