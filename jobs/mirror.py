"""`wurstfabrik mirror SOURCE DEST`: copies a checkpoint, a Hugging Face hub repository at a pinned revision
(`owner/name@revision`) or a local checkpoint folder, to an s3:// prefix, with the index that loading reads first
(store.checkpoint_index).

Only the files loading reads are copied (configs, tokenizer, safetensors weights; never pickles, READMEs or
schedulers), each object with the sha256 of its bytes; large ones in parallel multipart uploads. The index goes last:
a prefix without one is a copy not finished, which loading refuses. An object already there with the file's size
and sha256 is kept, so a second run copies nothing and a run killed halfway is finished by the next.
"""

from __future__ import annotations

import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wurstfabrik.pipeline.checkpoint import cached_snapshot, folder_kind, hub_patterns
from wurstfabrik.pipeline.checkpoint_info import check_folder, check_repo_files, hub_info
from wurstfabrik.pipeline.errors import CheckpointError
from wurstfabrik.store.checkpoint_cache import file_sha256
from wurstfabrik.store.checkpoint_index import INDEX_FILE, CheckpointIndex, IndexedFile
from wurstfabrik.store.storage import S3Settings, open_output

from .exit_codes import EXIT_DONE, EXIT_INCOMPLETE, EXIT_REFUSED

log = logging.getLogger("wurstfabrik")

VARIANTS = {"all": None, "fp16": True, "full": False}  # -> hub_patterns' prefer_half
HUB_SOURCE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
PARALLEL_FILES = 8


class MirrorError(Exception):
    """A source or destination that cannot be mirrored; the message says which and what to do. `transient`: a
    rerun may get past it."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class MirrorResult:
    destination: str
    source: str  # as the index records it: a hub id (with its commit) or a folder
    copied: list[str]
    kept: list[str]  # already there, with the same size and sha256
    copied_bytes: int
    index_written: bool


def mirror(source: str, destination: str, variant: str = "all", settings: S3Settings | None = None,
           parallel: int = PARALLEL_FILES) -> MirrorResult:
    """Copies a checkpoint to an s3:// prefix. Raises MirrorError or CheckpointError (the source), StorageError
    (the store)."""
    if not destination.startswith("s3://"):
        raise MirrorError(f"{destination}: the destination must be an s3:// prefix")
    prefer_half = VARIANTS[variant]
    folder = Path(source).expanduser()
    if folder.is_dir():
        folder, source_kind, name, revision = folder.absolute(), "folder", str(folder.absolute()), None
    elif match := HUB_SOURCE.fullmatch(source):
        source_kind, name = "hub", match["repo"]
        folder, revision = download_from_hub(name, match["revision"], prefer_half)
    else:
        raise MirrorError(f"{source}: no such checkpoint folder, nor a hub repository (owner/name[@revision])")
    found = folder_kind(folder)  # a pipeline's model_index.json, or a model-only prior's config.json
    check_folder(folder, "prior" if found == "prior_model" else found)
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    paths = hub_patterns(present, "decoder" if found == "decoder" else "prior", prefer_half)
    with ThreadPoolExecutor(parallel) as pool:
        digests = dict(zip(paths, pool.map(lambda path: file_sha256(folder / path), paths), strict=True))
    index = CheckpointIndex(name, source_kind, revision,
                            {path: IndexedFile((folder / path).stat().st_size, digests[path]) for path in paths})
    return upload(folder, index, open_output(destination, settings), parallel)


def upload(folder: Path, index: CheckpointIndex, remote, parallel: int) -> MirrorResult:
    """The index's files from `folder` to the S3Output `remote`, then the index; what is there already stays."""
    def missing(path: str) -> bool:
        there = remote.stat(path)
        entry = index.files[path]
        return there is None or there.size != entry.size or there.sha256 != entry.sha256

    paths = sorted(index.files)
    remote.client  # noqa: B018 - built here, once: botocore sessions are not safe to build from many threads
    with ThreadPoolExecutor(parallel) as pool:
        to_copy = [path for path, needed in zip(paths, pool.map(missing, paths), strict=True) if needed]
    new_index = index.to_json()
    old_index = remote.get(INDEX_FILE)
    if to_copy and old_index is not None:
        # A job must never find an index that disagrees with the objects: none at all says "not finished".
        remote.delete(INDEX_FILE)
        old_index = None

    def copy(path: str) -> None:
        entry = index.files[path]
        remote.put_file(path, folder / path, "application/octet-stream", sha256=entry.sha256)
        log.info("copied %s (%s)", path, size_text(entry.size))

    # Large files one at a time, each a parallel multipart upload; small ones several at once.
    large = [path for path in to_copy if index.files[path].size >= remote.settings.multipart_threshold]
    for path in sorted(large, key=lambda p: -index.files[p].size):
        copy(path)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(copy, [path for path in to_copy if path not in large]))
    written = old_index != new_index
    if written:
        remote.put(INDEX_FILE, new_index, "application/json")
    source = f"{index.source}@{index.revision}" if index.revision else index.source
    return MirrorResult(remote.root_uri + "/", source, to_copy, [p for p in paths if p not in to_copy],
                        sum(index.files[p].size for p in to_copy), written)


def download_from_hub(repo_id: str, revision: str | None, prefer_half: bool | None) -> tuple[Path, str]:
    """The files of a hub repository that a checkpoint needs, at `revision` (default: main) resolved to its
    commit, downloaded into the local Hugging Face cache (or found there, offline); returns the folder and the
    commit."""
    from huggingface_hub import snapshot_download

    info, why = hub_info(repo_id, revision)
    if info is None:
        cached = cached_snapshot(repo_id, revision) if revision else None  # a pinned commit downloaded before
        if cached is not None:
            log.warning("%s: %s; mirroring the copy of %s in the local Hugging Face cache", repo_id, why, revision)
            return cached, cached.name
        at = f" at revision {revision}" if revision else ""
        raise MirrorError(f"{repo_id}: cannot mirror it{at}: {why}, and it is not in the local Hugging Face cache; "
                          f"run the mirror where the hub is reachable, or download it there (`hf download "
                          f"{repo_id} --local-dir DIR`), bring DIR here and mirror the folder")
    files = [sibling.rfilename for sibling in info.siblings or []]
    kind = "decoder" if any(f.startswith("decoder/") for f in files) else "prior"
    check_repo_files(repo_id, files, kind)
    try:
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=hub_patterns(files, kind, prefer_half))
    except Exception as e:
        raise MirrorError(f"{repo_id}: the download of commit {info.sha} stopped ({type(e).__name__}: {e}); run "
                          "the mirror again to go on", transient=True) from None
    return Path(folder), info.sha


def size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"


def describe(result: MirrorResult) -> str:
    files = len(result.copied) + len(result.kept)
    if not result.copied and not result.index_written:
        return f"{result.destination}: nothing to copy: it holds all {files} files of {result.source} already"
    return (f"{result.destination}: copied {len(result.copied)} of {files} files of {result.source} "
            f"({size_text(result.copied_bytes)}), {len(result.kept)} were there already; index "
            f"{INDEX_FILE} {'written' if result.index_written else 'unchanged'}")


def mirror_command(source: str, destination: str, variant: str, parallel: int) -> int:
    """The CLI's `mirror`: one line on stdout when done; a problem with the source or destination one line on
    stderr, exit 2 (1 for a download that a rerun can go on with). StorageError is left to the CLI."""
    if parallel < 1:
        print(f"error: --parallel {parallel}: copy at least 1 file at a time", file=sys.stderr)
        return EXIT_REFUSED
    try:
        result = mirror(source, destination, variant, parallel=parallel)
    except (MirrorError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE if getattr(e, "transient", False) else EXIT_REFUSED
    print(describe(result))
    return EXIT_DONE
