"""The CLI's own help: `wurstfabrik --version` in a fresh process says what this installation runs on and where its
package is, and `wurstfabrik run --help` lists the exit codes and where the reference is."""

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from wurstfabrik.jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_names_wurstfabrik_python_ray_torch_and_cuda():
    done = subprocess.run(["wurstfabrik", "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"wurstfabrik {version('wurstfabrik')} ({ROOT})"  # the package's folder: this checkout
    assert re.fullmatch(r"Python 3\.\d+\.\d+", lines[1])
    assert lines[2] == f"Ray {version('ray')}"
    assert lines[3] == f"torch {torch.__version__}"
    cuda = "CUDA: not available" if not torch.cuda.is_available() else f"CUDA {torch.version.cuda}: available"
    assert lines[4].startswith(cuda)
    assert len(lines) == 5


def test_run_help_lists_the_exit_codes_and_points_at_the_docs(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    codes = re.findall(r"^  (\d+(?:, \d+)*) ", text, flags=re.MULTILINE)
    assert codes == ["0", "1", "2", "3", "130, 143"]
    assert "docs/jobs.md" in text
    assert "--set KEY=VALUE" in text
