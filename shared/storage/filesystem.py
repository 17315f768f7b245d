"""An embedded object store on a local directory, for single-machine trials and tests.

It honours the :class:`~shared.storage.base.ObjectStore` contract that the S3 store honours, so a service
that works against ``file://`` works against ``s3://``. Writes are atomic (a reader never sees half an
object): data goes to a temporary file in the target directory and is moved into place with
``os.replace``. Content type and user metadata live in a JSON sidecar next to the object, because a plain
file system has nowhere else portable to keep them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from shared.storage.base import ObjectInfo, ObjectNotFoundError, ObjectStore

#: Suffix of the JSON sidecar that holds content type, etag and metadata of an object.
SIDECAR_SUFFIX = ".__vfmeta__.json"
#: Suffix of in-flight temporary files; they are never listed and never valid keys.
TEMP_SUFFIX = ".__vftmp__"
_RESERVED_SUFFIXES = (SIDECAR_SUFFIX, TEMP_SUFFIX)
_COPY_CHUNK = 1024 * 1024


class FileObjectStore(ObjectStore):
    """Objects as files under ``root``; keys map to relative paths and may never leave ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    @classmethod
    def from_url(cls, url: str) -> FileObjectStore:
        """``file:///absolute/path`` → a store rooted there (created if missing)."""
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise ValueError(f"not a file:// URL: {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL must not name a host (use file:///abs/path): {url!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file:// URL needs an absolute path: {url!r}")
        return cls(path)

    # -- key handling ---------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """Map a key to its file, refusing anything that could escape the root or clash with sidecars.

        Checked lexically (no '..', no absolute keys, no empty segments) *and* after resolving, so a
        symlink planted inside the root cannot redirect a write outside of it either.
        """
        if not key or key.startswith("/") or "\\" in key or "\x00" in key:
            raise ValueError(f"invalid object key {key!r}: keys are relative, '/'-separated, non-empty")
        segments = key.split("/")
        if any(seg in ("", ".", "..") for seg in segments):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segments are not allowed")
        if key.endswith(_RESERVED_SUFFIXES):
            raise ValueError(f"invalid object key {key!r}: the suffix is reserved for the store's own files")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"invalid object key {key!r}: it resolves outside the store root")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR_SUFFIX)

    # -- ObjectStore ------------------------------------------------------------------------------------

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        length: int = -1,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        token = uuid.uuid4().hex
        tmp_data = path.with_name(f".{path.name}.{token}{TEMP_SUFFIX}")
        tmp_meta = path.with_name(f".{path.name}.{token}.m{TEMP_SUFFIX}")
        try:
            with open(tmp_data, "wb") as out:
                while True:
                    want = _COPY_CHUNK if length < 0 else min(_COPY_CHUNK, length - size)
                    if want == 0:
                        break
                    chunk = stream.read(want)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if 0 <= length != size:
                raise ValueError(f"stream for {key!r} ended after {size} bytes, {length} were announced")
            info = ObjectInfo(key=key, size=size, etag=digest.hexdigest(), content_type=content_type, metadata=meta)
            tmp_meta.write_text(
                json.dumps({"etag": info.etag, "content_type": content_type, "metadata": meta}), "utf-8"
            )
            os.replace(tmp_data, path)
            os.replace(tmp_meta, self._sidecar(path))
        finally:
            for tmp in (tmp_data, tmp_meta):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return info

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return chunks()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(key)
        size = path.stat().st_size
        try:
            side = json.loads(self._sidecar(path).read_text("utf-8"))
        except FileNotFoundError:
            side = {}  # a file dropped in by hand: compute what the sidecar would have said
        etag = side.get("etag") or self._md5(path)
        return ObjectInfo(
            key=key,
            size=size,
            etag=etag,
            content_type=side.get("content_type", "application/octet-stream"),
            metadata=dict(side.get("metadata", {})),
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        for target in (path, self._sidecar(path)):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                target.unlink()
        # Prune directories the object leaves empty, so listings and the tree stay tidy.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory the prefix names; the final filter applies the rest of it.
        base = self.root
        if "/" in prefix:
            directory = prefix.rsplit("/", 1)[0]
            if directory:
                base = self._path(directory)
        if not base.is_dir():
            return iter(())
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_RESERVED_SUFFIXES):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    @staticmethod
    def _md5(path: Path) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(_COPY_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
