"""A folder that keeps torch.compile's work between processes: inductor's on-disk cache, and a portable file of its
artifacts that a process on another machine restores before compiling, so that it loads kernels instead of
compiling them (minutes per stage on a cold start).

    cache = CompileCache("/var/cache/wurstfabrik")
    cache.restore()                       # before the first compile in this process
    pipe = WuerstchenPipeline.from_pretrained(..., compile=True)
    pipe(["warm-up"], [0])                # compiles, or loads what the cache holds
    cache.save()                          # after compiling: what this process compiled or loaded

The artifacts file holds dynamo's, AOTAutograd's and inductor's graph caches with, on CUDA, their Triton kernels.
Inductor's C++ kernels for the CPU are not in it (measured on torch 2.13: a restore on a fresh folder still rebuilds
them), so on the CPU only the folder itself, kept between processes, saves the compile.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ARTIFACTS_FILE = "torch-compile-artifacts.bin"
INDUCTOR_FOLDER = "inductor"


@dataclass
class CompileCache:
    """`folder`/inductor is inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) and `folder`/torch-compile-artifacts.bin
    the portable artifacts (torch.compiler.save_cache_artifacts), which can be copied to other machines."""

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)

    @property
    def artifacts(self) -> Path:
        return self.folder / ARTIFACTS_FILE

    @property
    def inductor_dir(self) -> Path:
        return self.folder / INDUCTOR_FOLDER

    def restore(self) -> bool:
        """Points inductor's cache at this folder and loads the saved artifacts into it; False when there are none.
        Call it before anything is compiled in this process: what was compiled before keeps its old cache."""
        self.inductor_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor_dir)
        if not self.artifacts.is_file():
            return False
        try:
            loaded = torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        except Exception as e:  # a file from another torch version, or damaged: compiling afresh still works
            raise CompileCacheError(f"{self.artifacts}: cannot load the compile artifacts ({type(e).__name__}: {e}); "
                                    "delete it to compile afresh") from None
        return loaded is not None

    def save(self) -> Path | None:
        """Writes the artifacts this process compiled or loaded (atomically: concurrent writers leave one whole
        file); None when it has none, and then an existing file stays."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data, _ = saved
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{ARTIFACTS_FILE}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.artifacts)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.artifacts


class CompileCacheError(Exception):
    """A compile cache file that cannot be used; the message names it."""
