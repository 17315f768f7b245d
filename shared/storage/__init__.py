"""Object storage chosen by URL scheme: ``s3://`` (minio SDK) or ``file://`` (embedded)."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.storage.base import ObjectInfo, ObjectNotFoundError, ObjectStore

__all__ = ["ObjectInfo", "ObjectNotFoundError", "ObjectStore", "open_object_store"]


def open_object_store(url: str) -> ObjectStore:
    """Return the store for ``url``; raise ValueError for an unknown scheme."""
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        from shared.storage.s3 import S3ObjectStore

        return S3ObjectStore.from_url(url)
    if scheme == "file":
        from shared.storage.filesystem import FileObjectStore

        return FileObjectStore.from_url(url)
    raise ValueError(f"unsupported object storage URL scheme {scheme!r} in {url!r}: use s3:// or file://")
