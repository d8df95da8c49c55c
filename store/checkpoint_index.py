"""The index of a checkpoint mirrored to an S3 prefix (`wurstfabrik mirror`): where it came from (a hub repository
at a commit, or a folder), and each file's path, size and sha256. Loading reads it first: it says what to fetch
and how to check what was fetched, and its sha256s are the checkpoint's identity."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .location import StorageError, safe_key

INDEX_FILE = "wurstfabrik-checkpoint.json"
INDEX_FORMAT = 1
SOURCE_KINDS = ("hub", "folder")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class IndexedFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointIndex:
    source: str  # the hub repository's id, or the folder's path on the machine that mirrored it
    source_kind: str  # "hub" or "folder"
    revision: str | None  # the hub commit mirrored; None for a folder
    files: dict[str, IndexedFile]  # relative POSIX path -> size and sha256

    def to_json(self) -> bytes:
        files = {path: {"size": f.size, "sha256": f.sha256} for path, f in sorted(self.files.items())}
        return (json.dumps({"format": INDEX_FORMAT, "source": self.source, "source_kind": self.source_kind,
                            "revision": self.revision, "files": files}, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CheckpointIndex:
        """Parses and checks an index; StorageError naming `where` and what is wrong otherwise."""
        def refuse(problem: str) -> StorageError:
            return StorageError(f"{where}: not a checkpoint index ({problem}); write it again with "
                                "`wurstfabrik mirror`")

        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise refuse(f"not JSON: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
            raise refuse("no files")
        if raw.get("format") != INDEX_FORMAT:
            raise refuse(f"format {raw.get('format')!r}, where this version reads {INDEX_FORMAT}")
        if raw.get("source_kind") not in SOURCE_KINDS or not isinstance(raw.get("source"), str):
            raise refuse("no source")
        revision = raw.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise refuse("a revision that is not a string")
        files = {}
        for path, entry in raw["files"].items():
            try:
                safe_key(path)
            except StorageError as e:
                raise refuse(str(e)) from None
            if path == INDEX_FILE or not isinstance(entry, dict):
                raise refuse(f"a bad entry for {path!r}")
            size, sha256 = entry.get("size"), entry.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise refuse(f"{path}: no size")
            if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
                raise refuse(f"{path}: no sha256")
            files[path] = IndexedFile(size, sha256)
        return cls(raw["source"], raw["source_kind"], revision, files)


def read_index(remote) -> CheckpointIndex | None:
    """The index at an S3 prefix (an S3Output), or None when there is none. Raises StorageError when it cannot be
    read (the message names the object) or is not an index."""
    data = remote.get(INDEX_FILE)
    return None if data is None else CheckpointIndex.from_json(data, remote.uri(INDEX_FILE))
