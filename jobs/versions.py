"""What `wurstfabrik --version` reports: this installation's versions, where its package was imported from, and
whether torch sees CUDA, the first things asked when a job behaves differently on two machines."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .provenance import wurstfabrik_version


def version_report() -> str:
    import wurstfabrik

    lines = [f"wurstfabrik {wurstfabrik_version()} ({Path(wurstfabrik.__file__).parent})",
             f"Python {platform.python_version()}",
             f"Ray {_installed('ray')}"]
    try:
        import torch  # only here: importing torch takes a few seconds, and every other command's start would pay it
    except Exception as err:  # a broken torch install is what this command is asked about, not a crash
        return "\n".join([*lines, f"torch {_installed('torch')} (cannot import: {err})", "CUDA: unknown"])
    lines.append(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA {torch.version.cuda}: available, {torch.cuda.device_count()} device(s): {names}")
    else:
        built = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build of torch"
        lines.append(f"CUDA: not available ({built})")
    return "\n".join(lines)


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
