"""The object-storage interface every service codes against.

Implementations are chosen by URL scheme in :func:`shared.storage.open_object_store`; one shared test
suite (tests/shared/test_storage_contract.py) runs against each of them, so they are interchangeable.
Large objects always move as streams: nothing here requires a whole series or volume in memory.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO


class ObjectNotFoundError(KeyError):
    """Raised when a key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


class ObjectStore(abc.ABC):
    """A flat key → blob store. Keys use '/' separators; metadata keys are lower-case ASCII."""

    url: str

    @abc.abstractmethod
    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        length: int = -1,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Store a stream; ``length=-1`` when unknown (the implementation uploads in parts)."""

    @abc.abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Yield the object's bytes chunk by chunk. Raises ObjectNotFoundError before the first chunk."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, etag, content type and user metadata. Raises ObjectNotFoundError."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (idempotent)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, recursively, in lexical order."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFoundError:
            return False
        return True

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        import io

        return self.put_stream(key, io.BytesIO(data), len(data), content_type, metadata)

    def put_file(
        self,
        key: str,
        path: str,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        import os

        with open(path, "rb") as stream:
            return self.put_stream(key, stream, os.path.getsize(path), content_type, metadata)

    def get_bytes(self, key: str) -> bytes:
        """Whole object in memory: only for small objects (headers, JSON, reports)."""
        return b"".join(self.iter_chunks(key))

    def download_file(self, key: str, path: str) -> None:
        with open(path, "wb") as out:
            for chunk in self.iter_chunks(key):
                out.write(chunk)
