"""A node-local cache of checkpoint files fetched from an S3 prefix: the first process on a node to need a file
fetches it, the others on that node wait for it and read the same file.

    CACHE/blobs/<sha256>                    each file once, named by the sha256 of its bytes
    CACHE/snapshots/<bucket>-<prefix>-<h>/  one folder per set of files asked for: links to the blobs, laid out as
                                            the checkpoint is, so it loads like any checkpoint folder

A snapshot holds exactly the files asked for (one weight variant, or only the configs), never a file left from an
earlier checkpoint at the same prefix, since loading a folder goes by what it finds there. Every blob is checked each
time it is asked for: its size, then the sha256 of its bytes. A missing, truncated or damaged blob is fetched again,
by parallel ranged GETs through the same S3 layer (and retries) as a job's outputs, into a temporary name that
becomes the blob's only once its sha256 matches. A flock on the cache folder orders the processes: checking takes
it shared, so actors starting together check at once; fetching takes it exclusively, so one process fetches while
the others wait, and then find the blobs there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .checkpoint_index import IndexedFile
from .local_output import FolderLock
from .location import READ_BUFFER, StorageError, safe_key

log = logging.getLogger("wurstfabrik")

PART_PREFIX = ".part-"  # a blob or snapshot being made; never read, removed by the next fetch
FETCH_THREADS = 8  # ranged GETs in flight (botocore keeps 10 connections per client)
CHUNK_BYTES = 16 * 1024 * 1024
LOGGED_BYTES = 64 * 1024 * 1024  # a fetch this large is worth a line in the log; a config's is not
DEFAULT_FOLDER = Path("wurstfabrik") / "checkpoints"  # under $XDG_CACHE_HOME, else ~/.cache


def cache_root(setting: str | None = None) -> Path:
    """The node's checkpoint cache: the setting (a job's `checkpoint_cache`), else $XDG_CACHE_HOME/wurstfabrik/
    checkpoints, else ~/.cache/wurstfabrik/checkpoints; resolved on the node that uses it."""
    if setting:
        return Path(setting).expanduser().absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser().absolute() / DEFAULT_FOLDER


@dataclass(frozen=True)
class CachedFiles:
    folder: Path  # the snapshot: the files asked for, at their paths
    fetched: list[str]  # the keys this call fetched from the store (none: all were cached)


def fetch_files(remote, files: dict[str, IndexedFile], root: Path, threads: int = FETCH_THREADS,
                chunk_bytes: int = CHUNK_BYTES) -> CachedFiles:
    """A folder in the cache `root` holding each of `files` (relative keys under the S3Output `remote`) with the
    size and sha256 its index gives, fetching what the node does not hold yet. Raises StorageError naming the
    object or the cache folder at fault."""
    for key in files:
        safe_key(key)
    snapshot = root / "snapshots" / snapshot_name(remote, files)
    blobs = root / "blobs"
    try:
        for folder in (blobs, snapshot.parent):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{root}: cannot create the checkpoint cache folder: {e.strerror or e}") from None
    wanted = {entry.sha256: (key, entry) for key, entry in sorted(files.items())}  # one blob for equal files
    with ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-fetch") as pool:
        with FolderLock(root, shared=True):
            stale = _stale(blobs, wanted, pool, report=True)
            ready = snapshot.is_dir()
        if stale or not ready:
            with FolderLock(root):
                _remove_parts(root)
                stale = _stale(blobs, {sha: wanted[sha] for sha in stale}, pool)  # fetched meanwhile by another
                if stale:
                    _fetch(remote, {sha: wanted[sha] for sha in stale}, blobs, pool, threads, chunk_bytes)
                if not snapshot.is_dir():
                    _link(snapshot, files, blobs)
    return CachedFiles(snapshot, sorted(wanted[sha][0] for sha in stale))


def snapshot_name(remote, files: dict[str, IndexedFile]) -> str:
    """Readable (bucket and prefix), and distinct for every endpoint, prefix and set of files."""
    listing = "".join(f"{key}\0{entry.sha256}\n" for key, entry in sorted(files.items()))
    identity = f"{remote.endpoint or ''}\0{remote.root_uri}\0{listing}"
    readable = f"{remote.bucket}-{remote.prefix.replace('/', '-')}".strip("-")[:80]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(READ_BUFFER):
            digest.update(chunk)
    return digest.hexdigest()


def _stale(blobs: Path, wanted: dict[str, tuple[str, IndexedFile]], pool: ThreadPoolExecutor,
           report: bool = False) -> list[str]:
    """The sha256s whose blob is missing, or whose size or bytes are not what the index gives (checked in
    parallel: hashlib lets go of the GIL)."""
    def problem(sha256: str) -> str | None:
        path, entry = blobs / sha256, wanted[sha256][1]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size != entry.size:
            return f"{size} bytes where the index says {entry.size}"
        return None if file_sha256(path) == sha256 else "its bytes do not match their sha256"

    stale = []
    for sha256, found in zip(list(wanted), pool.map(problem, list(wanted)), strict=True):
        if found is None:
            continue
        if report and found != "missing":
            log.warning("checkpoint cache: %s (%s) is damaged: %s; fetching it again", blobs / sha256,
                        wanted[sha256][0], found)
        stale.append(sha256)
    return stale


def _remove_parts(root: Path) -> None:
    """Leftovers of a fetch that was killed; only called under the exclusive lock, so none is in progress."""
    for folder in (root / "blobs", root / "snapshots"):
        for part in folder.glob(f"{PART_PREFIX}*"):
            if part.is_dir() and not part.is_symlink():
                shutil.rmtree(part)
            else:
                part.unlink(missing_ok=True)


def _fetch(remote, wanted: dict[str, tuple[str, IndexedFile]], blobs: Path, pool: ThreadPoolExecutor, threads: int,
           chunk_bytes: int) -> None:
    total = sum(entry.size for _, entry in wanted.values())
    free = shutil.disk_usage(blobs).free
    if total > free:
        raise StorageError(f"{blobs}: not enough disk space for the checkpoint {remote.root_uri}: it needs "
                           f"{total / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free some, or point "
                           "checkpoint_cache at a larger disk")
    level = logging.INFO if total >= LOGGED_BYTES else logging.DEBUG
    log.log(level, "fetching %d files (%.2f GB) of %s into %s", len(wanted), total / 1e9, remote.root_uri, blobs.parent)
    started = time.monotonic()
    small = [sha for sha, (_, entry) in wanted.items() if entry.size <= chunk_bytes]
    remote.ranged_client  # noqa: B018 - built here, once: botocore sessions are not safe to build from many threads

    def fetch_small(sha256: str) -> None:
        key, entry = wanted[sha256]
        _fetch_blob(remote, key, entry, blobs, [remote.get_range(key, 0, entry.size)])

    # Small files, one GET each, all at once; then each large one by ranged GETs that keep the pool busy.
    list(pool.map(fetch_small, small))
    for sha256 in sorted(set(wanted) - set(small)):
        key, entry = wanted[sha256]
        _fetch_blob(remote, key, entry, blobs, _ranges(remote, key, entry.size, pool, 2 * threads, chunk_bytes))
    seconds = time.monotonic() - started
    log.log(level, "fetched %s in %.1f s (%.0f MB/s)", remote.root_uri, seconds, total / 1e6 / max(seconds, 1e-9))


def _ranges(remote, key: str, size: int, pool: ThreadPoolExecutor, in_flight: int,
            chunk_bytes: int) -> Iterator[bytes]:
    """The object's bytes in order, fetched by ranged GETs, at most `in_flight` of them at a time."""
    starts = iter(range(0, size, chunk_bytes))
    pending = deque()

    def submit_next() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(pool.submit(remote.get_range, key, start, min(chunk_bytes, size - start)))

    for _ in range(in_flight):
        submit_next()
    try:
        while pending:
            data = pending.popleft().result()
            submit_next()
            yield data
    finally:
        for future in pending:
            future.cancel()


def _fetch_blob(remote, key: str, entry: IndexedFile, blobs: Path, chunks) -> None:
    """Writes the chunks to a temporary name, and renames it to the blob's once size and sha256 match."""
    part = blobs / f"{PART_PREFIX}{entry.sha256}-{secrets.token_hex(4)}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(part, "wb") as file:
            for data in chunks:
                file.write(data)
                digest.update(data)
                size += len(data)
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise StorageError(f"{remote.uri(key)}: its bytes are not those the checkpoint index records "
                               f"({size} bytes, sha256 {digest.hexdigest()[:12]}…, where the index says {entry.size} "
                               f"bytes, {entry.sha256[:12]}…); the object changed after it was mirrored: mirror the "
                               "checkpoint again")
        os.replace(part, blobs / entry.sha256)
    except OSError as e:
        raise StorageError(f"{blobs}: cannot write to the checkpoint cache: {e.strerror or e}") from None
    finally:
        part.unlink(missing_ok=True)


def _link(snapshot: Path, files: dict[str, IndexedFile], blobs: Path) -> None:
    """The snapshot folder, made under a temporary name and renamed whole: it exists only complete."""
    part = snapshot.parent / f"{PART_PREFIX}{snapshot.name}-{secrets.token_hex(4)}"
    try:
        for key, entry in sorted(files.items()):
            link = part / key
            link.parent.mkdir(parents=True, exist_ok=True)
            # Relative, so the cache folder can be moved; the snapshot's depth is the part's.
            os.symlink(os.path.relpath(blobs / entry.sha256, (snapshot / key).parent), link)
        os.rename(part, snapshot)
    except OSError as e:
        raise StorageError(f"{snapshot}: cannot write to the checkpoint cache: {e.strerror or e}") from None
    finally:
        if part.exists():
            shutil.rmtree(part)
