"""A trial's inputs on this node: uploaded data sets and models fetched from the server into the node's cache,
remote files (s3://, gs://, https://, hf://) read with fsspec, local paths as they are.

The cache holds each upload once, unpacked, under `<cache>/<kind>/<sha256>/` (moved into place in one rename
once its SHA-256 checked out), so a node downloads a version once whichever of its workers needs it first,
and every trial after that starts from disk. `resolve` rewrites a lease's spec to local paths and says what
each input was and its hash: the trial's data-splits file records that.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunefleet.service.client import file_sha256
from tunefleet.service.refs import input_fields, is_remote, parse_ref
from tunefleet.workers.checkpoints import folder_digest
from tunefleet.workers.errors import DataError, ModelLoadError, TrialFailed

if TYPE_CHECKING:
    from tunefleet.service.client import Client

__all__ = ["InputCache"]

log = logging.getLogger(__name__)


class InputCache:
    """Uploaded data sets and models of this node, by hash, under `root`; shared by the node's workers."""

    def __init__(self, root: Path, client: Client):
        self.root = Path(root)
        self.client = client

    def resolve(self, spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`spec` with its inputs as local paths, and `{location: {uri, sha256}}` for each input that was not a
        local path already (or a hub id). Raises DataError
        or ModelLoadError (the study's problem: not retryable) naming the input and the fix."""
        resolved: dict[str, Any] = {**spec, "data": dict(spec.get("data") or {})}
        record: dict[str, Any] = {}
        for loc, kind, value in input_fields(spec):
            error = DataError if kind == "datasets" else ModelLoadError
            try:
                local, sha256 = self._local(kind, value)
            except TrialFailed:
                raise
            except Exception as exc:  # the server's answer, fsspec's many errors: the input cannot be had
                # Only a server that was away (the client's ServerUnavailable) may answer next time.
                retryable = getattr(exc, "status_code", 0) in (None, 502, 503, 504)
                raise error(f"{'.'.join(loc)}: cannot fetch {value!r}: {type(exc).__name__}: "
                            f"{getattr(exc, 'message', exc)}", retryable=retryable) from exc
            if local is None:
                continue
            record[".".join(loc)] = {"uri": value, "sha256": sha256}
            if len(loc) == 1:
                resolved[loc[0]] = str(local)
            else:
                resolved["data"][loc[1]] = str(local)
        return resolved, record

    def _local(self, kind: str, value: str) -> tuple[Path | None, str | None]:
        ref = parse_ref(value)
        if ref is not None:
            meta = self.client.get_asset(kind, ref.name, ref.version or "latest")
            folder = self.fetch(kind, ref.name, meta["sha256"])
            if ref.path:
                return folder / ref.path, meta["sha256"]
            files = [f["name"] for f in meta["files"]]
            return (folder / files[0] if kind == "datasets" and len(files) == 1 else folder), meta["sha256"]
        if is_remote(value):
            return self._remote(value)
        return None, None

    def _remote(self, uri: str) -> tuple[Path, str]:
        """A remote file or folder, downloaded with fsspec (at every trial: only the download tells whether it
        changed) and kept by hash, so an unchanged one keeps its path (and a worker's loaded model)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        incoming = self.root / "remote" / f".incoming-{uuid.uuid4().hex}"
        target = incoming / Path(path.rstrip("/")).name
        incoming.mkdir(parents=True)
        try:
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", str(target), recursive=True)
                sha256 = folder_digest(target)
            else:
                fs.get(path, str(target))
                sha256 = file_sha256(target)
            final = self.root / "remote" / sha256
            try:
                incoming.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
            return final / target.name, sha256
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def fetch(self, kind: str, name: str, sha256: str) -> Path:
        """The unpacked folder of an upload, downloaded once per node."""
        final = self.root / kind / sha256
        if final.is_dir():
            return final
        incoming = self.root / kind / f".incoming-{uuid.uuid4().hex}"
        incoming.mkdir(parents=True)
        try:
            tar_path = incoming / "upload.tar"
            digest = self.client.download_asset_to(kind, name, sha256, tar_path)
            if digest != sha256:
                raise TrialFailed(f"{kind} {name!r} arrived with SHA-256 {digest}, expected {sha256}",
                                  retryable=True)
            content = incoming / "content"
            with tarfile.open(tar_path) as tar:
                tar.extractall(content, filter="data")
            tar_path.unlink()
            try:
                content.rename(final)  # one rename: another worker of the node sees all of it or nothing
            except OSError:
                if not final.is_dir():  # not another worker's copy that got there first
                    raise
            log.info("cached %s %s (%s) in %s", kind, name, sha256[:12], final)
            return final
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
