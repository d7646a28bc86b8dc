"""Checkpoints of paused trials on the worker's side: pack one for upload, unpack a downloaded one, keep one
on this node's disk. Torch-free: a checkpoint is a folder the trainer wrote (for the real trainer, a
`transformers` checkpoint: weights or adapter, optimizer, scheduler, RNG states, trainer state).

Integrity: an uploaded checkpoint is one tar file whose SHA-256 the server records once the upload is
complete; a node checkpoint is a folder moved into place in one rename, with the SHA-256 of its files. A
resume checks the hash before it loads anything, so a half-written checkpoint is never trained from.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

from tunefleet.service.client import file_sha256

__all__ = ["NodeCheckpoints", "artifact_name", "folder_digest", "pack", "unpack"]


def artifact_name(step: int) -> str:
    """The trial artifact an uploaded checkpoint at rung `step` is stored as."""
    return f"checkpoints/step-{step:03d}.tar"


def pack(folder: Path, tar_path: Path) -> tuple[str, int]:
    """Write `folder` as an uncompressed tar (safetensors and optimizer states do not compress); returns its
    SHA-256 and size."""
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    return file_sha256(tar_path), tar_path.stat().st_size


def unpack(tar_path: Path, folder: Path) -> None:
    """Extract a packed checkpoint into `folder` (only plain files and folders inside it: the data filter)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")


def folder_digest(folder: Path) -> str:
    """SHA-256 over the relative names and contents of every file under `folder`, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


class NodeCheckpoints:
    """Checkpoints kept on this node's disk under `root/trial-<id>/step-<pct>` (checkpoints.storage: node).

    Workers of one node share `root` (the fleet gives them one work folder), so any of them can resume a
    trial another paused. Only the newest checkpoint of a trial is kept.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, trial_id: int) -> Path:
        return self.root / f"trial-{trial_id}"

    def keep(self, trial_id: int, step: int, source: Path) -> tuple[Path, str]:
        """Move the trainer's checkpoint `source` into place (one rename on the same filesystem, else a copy to
        a temporary name and a rename), drop the trial's older ones; returns its path and digest."""
        trial = self.folder(trial_id)
        trial.mkdir(parents=True, exist_ok=True)
        final = trial / f"step-{step:03d}"
        incoming = trial / f".incoming-{step:03d}"
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.move(str(source), str(incoming))
        shutil.rmtree(final, ignore_errors=True)
        incoming.rename(final)
        for older in trial.iterdir():
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        return final, folder_digest(final)

    def remove(self, trial_id: int) -> None:
        shutil.rmtree(self.folder(trial_id), ignore_errors=True)

    def trial_ids(self) -> list[int]:
        """Trials that have a checkpoint folder on this node."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.removeprefix("trial-")) for p in self.root.glob("trial-*")
                      if p.name.removeprefix("trial-").isdigit())
