"""Where a feature store lives: a local folder, or a prefix on object storage (``s3://bucket/prefix``).

`location(path)` gives the store's files behind one small interface over keys relative to
the store root (``"feats/c/3/0/0/0"``): `LocalFiles` for a folder, `ObjectFiles` for a URL
(s3fs; zarr reads and writes the same objects through its ``FsspecStore``).

Object storage has no rename, no lock and no multi-object update. What a store on it relies
on instead (S3 semantics, strongly consistent since 2020; moto's server behaves the same):

- a PUT makes one whole object visible, or nothing (a multipart upload appears only when
  completed): a shard object is never torn, and is written whole by one writer;
- a PUT with ``If-None-Match: *`` creates an object only if it is absent (`create_exclusive`):
  the store's ``zarr.json`` is created this way, so exactly one writer creates a store and
  fixes its configuration;
- a write is visible to every later read: the ``done`` flags of a shard are written after its
  shard objects, and the ``complete`` marker (in ``zarr.json``, with the consolidated
  metadata, one PUT) after every shard verified. A reader that sees the marker sees every shard.

Readers never list a bucket: every key is computed from the store's metadata; existence and
size are a HEAD, data a GET (whole shard objects in bulk, byte ranges for one image).
Credentials and the endpoint come from botocore's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``~/.aws/config``, instance roles;
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint), never from params.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator

SCHEMES = ("s3",)  # object stores semcorr is tested against (through moto's S3 server)


def is_url(path) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def location(path) -> "LocalFiles | ObjectFiles":
    """The files of the store at ``path`` (a local path, or an ``s3://bucket/prefix`` URL)."""
    if not is_url(path):
        return LocalFiles(Path(path))
    scheme = str(path).split("://", 1)[0]
    if scheme not in SCHEMES:
        raise ValueError(f"{path}: unsupported storage URL scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    return ObjectFiles(str(path))


def store_parts(path) -> tuple[str, str]:
    """``(parent folder name, store name)`` of a store path or URL, e.g. ``("dinov2_vitb14", "spair.zarr")``."""
    parts = PurePosixPath(str(path).split("://", 1)[-1].rstrip("/")).parts
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


class Blob:
    """One file or object opened for reading: ``size`` and `pread`."""

    size: int

    def pread(self, offset: int, out: memoryview) -> int:
        """Read up to ``len(out)`` bytes at ``offset`` into ``out``; returns the bytes read (0 at the end)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FileBlob(Blob):
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def pread(self, offset: int, out: memoryview) -> int:
        return os.preadv(self.fd, [out], offset)

    def close(self) -> None:
        os.close(self.fd)


class _BytesBlob(Blob):
    def __init__(self, data: bytes):
        self.data, self.size = memoryview(data), len(data)

    def pread(self, offset: int, out: memoryview) -> int:
        got = max(0, min(len(out), self.size - offset))
        out[:got] = self.data[offset : offset + got]
        return got


class _RangeBlob(Blob):
    """An object read by byte ranges (one GET each): for a few chunks of a large object."""

    def __init__(self, fs, path: str, size: int):
        self.fs, self.path, self.size = fs, path, size

    def pread(self, offset: int, out: memoryview) -> int:
        end = min(offset + len(out), self.size)
        if end <= offset:
            return 0
        data = self.fs.cat_file(self.path, start=offset, end=end)
        out[: len(data)] = data
        return len(data)


class LocalFiles:
    """A store folder on a local (or shared POSIX) filesystem."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        """Bytes of ``key``; `FileNotFoundError` when it is absent."""
        return self.path(key).stat().st_size

    def blob(self, key: str, whole: bool = False) -> Blob:
        """``key`` opened for reading (`FileNotFoundError` when absent); ``whole`` matters only remotely."""
        return _FileBlob(self.path(key))

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading ``key`` into the page cache (returns at once)."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def drop_prefetched(self) -> None:
        pass

    def sync(self, key: str) -> None:
        """Make ``key`` durable (fsync)."""
        if self.path(key).exists():
            fd = os.open(self.path(key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def link(self, source: "LocalFiles", key: str) -> None:
        """Put ``source``'s file ``key`` here: a hard link (a copy where the filesystem refuses
        one), renamed into place; ``source``'s file is only ever read."""
        src, dst = source.path(key), self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def remove_partials(self) -> None:
        """Remove the temp files of writers killed mid-file."""
        for partial in self.root.rglob("*.partial"):
            partial.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def zarr_store(self, read_only: bool):
        """What `zarr.open_group` opens: the folder (zarr's LocalStore writes every file through
        a temp file and a rename, so a file is never written in place)."""
        return str(self.root)


class ObjectFiles:
    """A store under a prefix of an object store (``s3://bucket/prefix/name.zarr``), through s3fs."""

    remote = True

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.root = self.url
        self.fs = _filesystem(asynchronous=False)
        self._prefix = self.url.split("://", 1)[1]
        self._ahead: dict[str, Future] = {}

    def __str__(self) -> str:
        return self.url

    def path(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}"

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        """Bytes of ``key`` (one HEAD: s3fs's ``info`` would list the prefix when it is absent)."""
        bucket, _, name = self._key(key).partition("/")
        with _translated(self.path(key)):
            return int(self.fs.call_s3("head_object", Bucket=bucket, Key=name)["ContentLength"])

    def get(self, key: str) -> bytes:
        """The whole object ``key`` in one GET (`FileNotFoundError` when absent)."""
        with _translated(self.path(key)):
            return self.fs.cat_file(self._key(key))

    def put(self, key: str, data: bytes) -> None:
        with _translated(self.path(key)):
            self.fs.pipe_file(self._key(key), data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``); False if it did."""
        try:
            with _translated(self.path(key)):
                self.fs.pipe_file(self._key(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def blob(self, key: str, whole: bool = False) -> Blob:
        """``key`` for reading: fetched whole in one GET (``whole``, or prefetched), else read by
        byte ranges after one HEAD. `FileNotFoundError` when absent."""
        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            return _BytesBlob(ahead.result())
        if whole:
            return _BytesBlob(self.get(key))
        return _RangeBlob(self.fs, self._key(key), self.size(key))

    def prefetch(self, key: str) -> None:
        """Start fetching ``key`` whole in the background; the next `blob` of it takes the result."""
        if key not in self._ahead:
            self._ahead[key] = _prefetcher().submit(self.get, key)  # an absent key raises in `blob`

    def drop_prefetched(self) -> None:
        """Forget prefetched objects nobody read (a reader that stopped early)."""
        self._ahead.clear()

    def sync(self, key: str) -> None:
        """Nothing to do: a PUT returns once the object is stored."""

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), _translated(self.path(key)):
            self.fs.rm_file(self._key(key))

    def remove_partials(self) -> None:
        """Nothing to do: an interrupted PUT leaves no object (interrupted multipart uploads are
        invisible; a bucket lifecycle rule aborts them)."""

    def remove(self) -> None:
        """Delete every object under the store's prefix (lists it: writers only)."""
        with contextlib.suppress(FileNotFoundError), _translated(self.url):
            self.fs.rm(self._prefix, recursive=True)

    def zarr_store(self, read_only: bool):
        from zarr.storage import FsspecStore

        return FsspecStore(_filesystem(asynchronous=True), path=self._prefix, read_only=read_only)


_FILESYSTEMS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _filesystem(asynchronous: bool):
    """One s3fs filesystem per process, AWS environment and mode. ``max_concurrency=1``: a GET
    of a whole object is one request, without the HEAD before it (s3fs's HEAD of an absent key
    would list the prefix); no listings cache: other processes write the same prefix."""
    import s3fs

    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), asynchronous, environment)
    with _LOCK:
        if key not in _FILESYSTEMS:
            fs = s3fs.S3FileSystem(asynchronous=asynchronous, max_concurrency=1, use_listings_cache=False,
                                   skip_instance_cache=True)
            if asynchronous:  # zarr's instance: s3fs closes the connections of its sync instances only
                atexit.register(_close_on_zarr_loop, fs)
            _FILESYSTEMS[key] = fs
        return _FILESYSTEMS[key]


def _close_on_zarr_loop(fs) -> None:
    """Close the connections of zarr's s3fs instance on zarr's event loop (before zarr stops it
    at exit: atexit runs this first), else aiohttp reports an unclosed session on exit."""
    from zarr.core.sync import sync

    if fs._s3 is not None:
        with contextlib.suppress(Exception):
            sync(fs._s3.close(), timeout=5)


_PREFETCH: list[ThreadPoolExecutor] = []


def _prefetcher() -> ThreadPoolExecutor:
    with _LOCK:
        if not _PREFETCH:
            _PREFETCH.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-prefetch"))
        return _PREFETCH[0]


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    """botocore's own errors (no endpoint, no credentials) as `OSError` naming the object."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except BotoCoreError as exc:
        raise OSError(f"{url}: {exc}") from None
