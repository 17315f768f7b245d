"""S3 object storage through the ``minio`` SDK: MinIO, SeaweedFS (the local stack) and AWS alike.

URL form: ``s3://ACCESS:SECRET@HOST:PORT/BUCKET?secure=false&region=us-east-1``. Credentials are
URL-decoded, so secrets containing ``/``, ``+`` or ``@`` can be percent-encoded. Uploads of unknown length
stream as multipart uploads (``part_size``), so a whole DICOM series never has to be held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from minio import Minio
from minio.error import S3Error

from shared.storage.base import ObjectInfo, ObjectNotFoundError, ObjectStore

#: Part size for uploads of unknown length: S3 needs ≥5 MiB parts; 16 MiB keeps memory bounded and
#: allows objects up to 160 GiB within the 10 000-part limit.
MULTIPART_PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_META_PREFIX = "x-amz-meta-"


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class _CountingReader:
    """Counts bytes as the SDK reads them, so an upload of unknown length can report its size."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


class S3ObjectStore(ObjectStore):
    """One bucket of an S3-compatible server; the bucket is created on first use if missing."""

    def __init__(self, client: Minio, bucket: str, url: str, create_bucket: bool = True) -> None:
        self.client = client
        self.bucket = bucket
        self.url = url
        if create_bucket and not client.bucket_exists(bucket):
            try:
                client.make_bucket(bucket)
            except S3Error as exc:  # another replica may have created it in between
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @classmethod
    def from_url(cls, url: str) -> S3ObjectStore:
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"not an s3:// URL: {url!r}")
        if not parts.hostname:
            raise ValueError(f"s3:// URL needs a host: {url!r}")
        bucket = parts.path.strip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"s3:// URL needs exactly one bucket path segment: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        secure = _truthy(query.get("secure", "true"))
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        endpoint = f"{host}:{parts.port}" if parts.port else host
        client = Minio(
            endpoint,
            access_key=unquote(parts.username or "") or None,
            secret_key=unquote(parts.password or "") or None,
            secure=secure,
            region=query.get("region"),
        )
        # Keep the secret out of ``url``: it ends up in logs and reprs.
        safe_netloc = f"{unquote(parts.username)}:***@{endpoint}" if parts.username else endpoint
        return cls(client, bucket, f"s3://{safe_netloc}/{bucket}?secure={str(secure).lower()}")

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        length: int = -1,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        reader = _CountingReader(stream)
        result = self.client.put_object(
            self.bucket,
            key,
            reader,  # type: ignore[arg-type]  # the SDK only calls read()
            length=length,
            content_type=content_type,
            metadata=meta or None,  # type: ignore[arg-type]
            part_size=MULTIPART_PART_SIZE if length < 0 else 0,
        )
        size = length if length >= 0 else reader.count
        return ObjectInfo(key=key, size=size, etag=result.etag or "", content_type=content_type, metadata=meta)

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        # The GET is issued here, not on the first next(), so a missing key raises at the call site.
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            raise self._translate(exc, key) from exc

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk_size)
            finally:
                # Return the pooled connection even when the consumer stops early.
                response.close()
                response.release_conn()

        return chunks()

    def stat(self, key: str) -> ObjectInfo:
        try:
            obj = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            raise self._translate(exc, key) from exc
        return ObjectInfo(
            key=key,
            size=obj.size or 0,
            etag=obj.etag or "",
            content_type=obj.content_type or "application/octet-stream",
            metadata=self._user_metadata(obj.metadata),
        )

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in _NOT_FOUND_CODES:
                raise

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` in lexical order.

        AWS and MinIO list lexically, but SeaweedFS walks its directory tree ("a/b/x" before "a/b-c"), so
        the keys are sorted here to keep the contract on every server. That holds the key names (not the
        objects) in memory, which is fine for the per-study/per-run prefixes services list.
        """
        names = [
            obj.object_name
            for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            if obj.object_name is not None and not obj.is_dir
        ]
        return iter(sorted(names))

    @staticmethod
    def _user_metadata(headers: Any) -> dict[str, str]:
        """User metadata comes back as ``X-Amz-Meta-…`` response headers; strip and lower-case them."""
        if not headers:
            return {}
        return {
            str(name).lower()[len(_META_PREFIX) :]: str(value)
            for name, value in headers.items()
            if str(name).lower().startswith(_META_PREFIX)
        }

    @staticmethod
    def _translate(exc: S3Error, key: str) -> Exception:
        if exc.code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(key)
        return exc
