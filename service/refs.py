"""Where a spec's inputs come from: `tunefleet://NAME[@VERSION][/PATH]` names a data set or base model uploaded
to the server (`tunefleet data upload`, `tunefleet model upload`); `s3://`, `gs://`, `https://`, `hf://` name a
remote file read with fsspec; anything else is a local path (or, for a model, a hub id).

Torch-free and database-free: the server pins references when a study is created (service/assets.py), and
the workers resolve them into their cache (workers/inputs.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ASSET_NAME", "DATA_FIELDS", "REMOTE_SCHEMES", "SCHEME", "Ref", "input_fields", "is_remote",
           "looks_like_local_path", "parse_ref"]

SCHEME = "tunefleet://"
REMOTE_SCHEMES = ("s3://", "gs://", "http://", "https://", "hf://")
# A data set's or model's name: what a study name may be.
ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")
_VERSION = re.compile(r"[0-9a-f]{4,64}")
# The spec fields that name an input, and which kind of upload a tunefleet:// reference there names.
DATA_FIELDS = ("train", "validation", "test")
EXAMPLE = "tunefleet://NAME, tunefleet://NAME@VERSION or tunefleet://NAME/train.jsonl"


@dataclass(frozen=True)
class Ref:
    """An uploaded data set or model: its name, a version (a prefix of its SHA-256; None: the newest) and a
    file or folder inside it (None: the whole upload, or its only file)."""

    name: str
    version: str | None = None
    path: str | None = None

    def uri(self) -> str:
        version = f"@{self.version}" if self.version else ""
        path = f"/{self.path}" if self.path else ""
        return f"{SCHEME}{self.name}{version}{path}"


def parse_ref(text: str) -> Ref | None:
    """The reference `text` holds; None when it is not a tunefleet:// URI; ValueError saying the fix when it
    is one but malformed."""
    if not text.startswith(SCHEME):
        return None
    head, _, path = text.removeprefix(SCHEME).partition("/")
    name, _, version = head.partition("@")
    if not ASSET_NAME.fullmatch(name):
        raise ValueError(f"{text!r} names no data set or model: write {EXAMPLE} (names: letters, digits, '_.-')")
    if version and not _VERSION.fullmatch(version):
        raise ValueError(f"{text!r} has a bad version {version!r}: give the hex version `tunefleet data ls` shows")
    parts = path.split("/") if path else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{text!r} has an empty, '.' or '..' part in its path: name a file inside the upload")
    return Ref(name, version or None, path or None)


def is_remote(text: str) -> bool:
    """True for a URI fsspec reads (s3://, gs://, http(s)://, hf://)."""
    return text.startswith(REMOTE_SCHEMES)


def input_fields(spec: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """Every input a spec names: (its location, the kind of upload a reference there means, its value)."""
    for field in ("model", "tokenizer"):
        if isinstance(spec.get(field), str):
            yield (field,), "models", spec[field]
    data = spec.get("data")
    if isinstance(data, Mapping):
        for split in DATA_FIELDS:
            if isinstance(data.get(split), str):
                yield ("data", split), "datasets", data[split]


def looks_like_local_path(name: str) -> bool:
    """True when `name` can only mean a folder on this machine, never a hub id (`name` or `namespace/name`):
    it starts with `/`, `./`, `../` or `~`, holds a separator other than `/`, or has more than one `/`."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~")):
        return True
    separators = {sep for sep in (os.sep, os.altsep) if sep is not None and sep != "/"}
    return any(sep in name for sep in separators) or name.count("/") > 1
