"""One contract, every ObjectStore: the same tests run against the file store and against a real S3
server (SeaweedFS from the session stack), so services can switch between them by URL alone."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from shared.storage import ObjectNotFoundError, ObjectStore, open_object_store
from shared.storage.filesystem import FileObjectStore
from shared.storage.s3 import S3ObjectStore

_bucket_counter = itertools.count()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_object_store((tmp_path / "objects").as_uri())
    # a fresh bucket per test keeps listings independent; the store creates it itself
    s3_url: str = request.getfixturevalue("s3_url")
    parts = urlsplit(s3_url)
    bucket = f"{parts.path.strip('/')}-{next(_bucket_counter)}"
    return open_object_store(urlunsplit((parts.scheme, parts.netloc, "/" + bucket, parts.query, "")))


class _UnsizedStream(io.RawIOBase):
    """A stream that yields ``total`` bytes in small reads and cannot tell its length (like a socket)."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.digest = hashlib.md5(usedforsecurity=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.remaining, 256 * 1024)
        chunk = os.urandom(n)
        buffer[:n] = chunk
        self.digest.update(chunk)
        self.remaining -= n
        return n


def test_round_trip(store: ObjectStore) -> None:
    data = b"voxel" * 1000
    info = store.put_bytes("studies/1.2.3/series.bin", data)
    assert info.size == len(data)
    assert info.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert store.get_bytes("studies/1.2.3/series.bin") == data
    assert b"".join(store.iter_chunks("studies/1.2.3/series.bin", chunk_size=777)) == data


def test_streamed_upload_of_unknown_length(store: ObjectStore, tmp_path: Path) -> None:
    total = 20 * 1024 * 1024
    stream = _UnsizedStream(total)
    info = store.put_stream("big/volume.nii.gz", io.BufferedReader(stream), length=-1)
    assert info.size == total
    assert store.stat("big/volume.nii.gz").size == total
    out = tmp_path / "download.bin"
    store.download_file("big/volume.nii.gz", str(out))
    assert out.stat().st_size == total
    assert hashlib.md5(out.read_bytes(), usedforsecurity=False).hexdigest() == stream.digest.hexdigest()


def test_metadata_and_content_type(store: ObjectStore) -> None:
    store.put_bytes(
        "meta/obj.json",
        b"{}",
        content_type="application/json",
        metadata={"Study-Uid": "1.2.3", "modality": "CT"},
    )
    info = store.stat("meta/obj.json")
    assert info.content_type == "application/json"
    assert info.metadata == {"study-uid": "1.2.3", "modality": "CT"}
    assert info.size == 2


def test_stat_exists_and_idempotent_delete(store: ObjectStore) -> None:
    assert not store.exists("gone/x")
    store.put_bytes("gone/x", b"1")
    assert store.exists("gone/x")
    store.delete("gone/x")
    assert not store.exists("gone/x")
    store.delete("gone/x")  # deleting again is not an error
    store.delete("never/existed")


def test_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError):
        store.stat("no/such/key")
    with pytest.raises(ObjectNotFoundError):
        store.iter_chunks("no/such/key")  # raised at the call, before any chunk
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("no/such/key")


def test_list_with_prefix_is_recursive_and_sorted(store: ObjectStore) -> None:
    keys = ["a/b/c", "a/b-d", "a/a", "a/b/a", "ab", "b/x"]
    for key in keys:
        store.put_bytes(key, key.encode(), metadata={"k": "v"})
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/")) == sorted(k for k in keys if k.startswith("a/"))
    assert list(store.list("a/b")) == ["a/b-d", "a/b/a", "a/b/c"]
    assert list(store.list("zzz/")) == []


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "a//b", "", "./a"])
def test_file_store_rejects_keys_escaping_the_root(tmp_path: Path, key: str) -> None:
    store = FileObjectStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.stat(key)
    assert not (tmp_path / "x").exists()


def test_file_store_writes_atomically_and_hides_sidecars(tmp_path: Path) -> None:
    store = FileObjectStore.from_url((tmp_path / "root").as_uri())
    store.put_bytes("k/v", b"one", content_type="text/plain")
    store.put_bytes("k/v", b"two")
    assert store.get_bytes("k/v") == b"two"
    assert store.stat("k/v").content_type == "application/octet-stream"
    assert list(store.list()) == ["k/v"]  # no sidecars, no temp files


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported object storage URL scheme"):
        open_object_store("gs://bucket/key")


def test_s3_store_hides_secret_and_refuses_a_wrong_one(s3_url: str) -> None:
    store = S3ObjectStore.from_url(s3_url)
    secret = urlsplit(s3_url).password
    assert secret and secret not in store.url and "***" in store.url
    parts = urlsplit(s3_url)
    wrong = s3_url.replace(f":{secret}@", ":not-the-secret@")
    assert wrong != s3_url and parts.hostname
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        S3ObjectStore.from_url(wrong).put_bytes("x", b"x")
