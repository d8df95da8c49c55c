"""Compiled kernels kept between a job's actors, so that only the first actor of a stage compiles: a local folder
(shared by the actors of one node, or a network mount), or an s3:// prefix whose artifacts file each actor copies
in before it compiles and the first one copies out after (pipeline.compile_cache says what the file holds)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from wurstfabrik.pipeline.compile_cache import ARTIFACTS_FILE, CompileCache, CompileCacheError
from wurstfabrik.store.storage import StorageError, open_output

log = logging.getLogger("wurstfabrik")


class StageCompileCache:
    """One stage's compile cache in one actor: restored when made, saved once after the first batch."""

    def __init__(self, location: str | None, stage: str, settings=None):
        self.remote = None
        self.saved = location is None
        if location is None:
            self.cache = None
            return
        if location.startswith("s3://"):
            self.remote = open_output(location, settings)
            self.key = f"{stage}/{ARTIFACTS_FILE}"
            self.cache = CompileCache(Path(tempfile.mkdtemp(prefix=f"wurstfabrik-compile-{stage}-")))
            try:
                data = self.remote.get(self.key)
            except StorageError as e:  # the cache only saves time: compile without it
                log.warning("compile cache %s: %s; compiling from scratch", location, e)
                data = None
            if data:
                self.cache.artifacts.write_bytes(data)
        else:
            self.cache = CompileCache(Path(location).expanduser() / stage)
        try:
            self.cache.restore()
        except CompileCacheError as e:  # a damaged or foreign file: compiling afresh still works
            log.warning("%s; compiling from scratch", e)

    def after_first_batch(self) -> None:
        if self.saved:
            return
        self.saved = True
        path = self.cache.save()
        if self.remote is not None and path is not None:
            try:
                self.remote.put(self.key, path.read_bytes(), "application/octet-stream")
            except StorageError as e:
                log.warning("could not store the compile cache: %s", e)
