"""Checkpoints at an s3:// prefix, as `wurstfabrik mirror` writes them: checked from their index before any actor
starts (the driver: the index, the layout and configs, every object the stage reads), then fetched by each actor
into its node's cache (store.checkpoint_cache), a folder that loads like any other. Errors name the S3 objects, not
the cache's files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wurstfabrik.pipeline.checkpoint import check_folder_kind, hub_patterns, read_config, read_json
from wurstfabrik.pipeline.checkpoint_info import MODEL_FOLDERS, check_repo_files
from wurstfabrik.pipeline.errors import CheckpointError
from wurstfabrik.store.checkpoint_cache import cache_root, fetch_files
from wurstfabrik.store.checkpoint_index import INDEX_FILE, CheckpointIndex, IndexedFile, read_index
from wurstfabrik.store.storage import open_output

WEIGHTS_SUFFIX = ".safetensors"


def is_s3(name: str | None) -> bool:
    return name is not None and name.startswith("s3://")


@dataclass(frozen=True)
class S3Checkpoint:
    uri: str
    kind: str  # "prior", "decoder" or "prior_text"
    index: CheckpointIndex
    files: dict[str, IndexedFile]  # what the stage reads, every weight variant
    folder: Path  # this node's cache folder, holding the configs once inspected
    model_only: bool

    def identity(self) -> dict:
        """What the job records: the files' sha256 (and a hash of them all), and the hub repository and commit
        they were mirrored from, where they were."""
        lines = "".join(f"{path}\0{entry.sha256}\n" for path, entry in sorted(self.files.items()))
        identity = {"given": self.uri, "source": "s3",
                    "revision": self.index.revision if self.index.source_kind == "hub" else None,
                    "fingerprint": hashlib.sha256(lines.encode()).hexdigest()}
        if self.index.source_kind == "hub":
            identity["mirror_of"] = self.index.source
        identity["files"] = {path: {"bytes": e.size, "sha256": e.sha256} for path, e in sorted(self.files.items())}
        return identity


def inspect_s3_checkpoint(uri: str, kind: str, settings=None, cache: str | None = None) -> S3Checkpoint:
    """Checks an s3:// checkpoint as the stages will load it, reading its index, fetching its configs into this
    node's cache and asking the store for every other object (a HEAD each). Raises CheckpointError (one line that
    names the prefix or object and what is wrong) or StorageError (the store refused or is away)."""
    remote = open_output(uri, settings)
    index = read_index(remote)
    if index is None:
        raise CheckpointError(f"{uri}: no checkpoint index ({INDEX_FILE}) there: not a checkpoint written by "
                              f"`wurstfabrik mirror`; mirror it there with `wurstfabrik mirror SOURCE {uri}`")
    names = sorted(index.files)
    files = {path: index.files[path] for path in hub_patterns(names, kind, None) if path in index.files}
    small = {path: entry for path, entry in files.items() if not path.endswith(WEIGHTS_SUFFIX)}
    for top in ("model_index.json", "config.json"):  # what tells the kind, read even where the kind has no use
        if top in index.files:
            small[top] = index.files[top]
    folder = fetch_files(remote, small, cache_root(cache)).folder
    with naming_objects({folder: uri}):
        model_only = check_folder_kind(folder, kind) == "prior_model"
    check_repo_files(remote.root_uri, names, kind)
    with naming_objects({folder: uri}):
        check_configs(folder, kind, model_only, names)
    check_objects(remote, files)
    return S3Checkpoint(uri, kind, index, files, folder, model_only)


def check_configs(folder: Path, kind: str, model_only: bool, names: list[str]) -> None:
    """The configs read as loading reads them, and every shard a sharded component's index names is in the
    checkpoint's index."""
    subs = [""] if model_only else [*MODEL_FOLDERS[kind], "text_encoder"]
    for sub in subs:
        base = folder / sub if sub else folder
        if sub == "text_encoder":
            if f"{sub}/config.json" not in names:
                raise CheckpointError(f"{base / 'config.json'}: missing")
        else:
            read_config(base, sub or "prior")
        prefix = f"{sub}/" if sub else ""
        for name in names:
            if name.startswith(prefix) and "/" not in name[len(prefix):] and ".safetensors.index" in name:
                weight_map = read_json(folder / name).get("weight_map")
                shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
                if not shards:
                    raise CheckpointError(f"{folder / name}: no weight_map")
                missing = [s for s in shards if not isinstance(s, str) or f"{prefix}{s}" not in names]
                if missing:
                    raise CheckpointError(f"{base / str(missing[0])}: missing weight shard (named by {name}, not "
                                          "in the checkpoint's index)")


def check_objects(remote, files: dict[str, IndexedFile]) -> None:
    """Each file the stage reads is an object of the size (and, where stored with one, the sha256) its index
    gives."""
    for path, entry in sorted(files.items()):
        found = remote.stat(path)
        if found is None:
            raise CheckpointError(f"{remote.uri(path)}: named by the checkpoint index but not in the store; mirror "
                                  "the checkpoint again")
        if found.size != entry.size or (found.sha256 is not None and found.sha256 != entry.sha256):
            what = (f"{found.size} bytes where the index says {entry.size}" if found.size != entry.size else
                    "its sha256 is not the index's")
            raise CheckpointError(f"{remote.uri(path)}: changed since the checkpoint was mirrored ({what}); mirror "
                                  "the checkpoint again")


def fetch_s3_checkpoint(uri: str, kind: str, prefer_half: bool = False, settings=None, cache: str | None = None,
                        files: dict[str, IndexedFile] | None = None) -> Path:
    """A local folder holding what a stage of `kind` reads from the s3:// checkpoint, in one weight variant: the
    node's cache folder, filled by the first process that needs it. `files` pins the sha256s (the driver's
    inspection, as a job's actors get it); without it, the index at the prefix is read."""
    remote = open_output(uri, settings)
    if files is None:
        index = read_index(remote)
        if index is None:
            raise CheckpointError(f"{uri}: no checkpoint index ({INDEX_FILE}) there")
        files = index.files
    wanted = [path for path in hub_patterns(sorted(files), kind, prefer_half) if path in files]
    return fetch_files(remote, {path: files[path] for path in wanted}, cache_root(cache)).folder


@contextmanager
def naming_objects(folders: dict) -> Iterator[None]:
    """CheckpointErrors raised inside name the S3 object (each folder's value) instead of its copy in a cache
    folder (the key, a path)."""
    try:
        yield
    except CheckpointError as e:
        message = str(e)
        for folder, uri in folders.items():
            message = message.replace(str(folder), uri.rstrip("/"))
        raise CheckpointError(message) from None
