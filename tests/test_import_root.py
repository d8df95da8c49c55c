"""The distribution's one import root, `wurstfabrik`, in every way the package is used: the editable install run
from the repository root; the wheel's contents; the installed wheel with a checkout first on the path, as
`ray job submit --working-dir .` puts it; a Ray job whose working directory holds a team's own `store.py`,
`pipeline.py`, `jobs/` and `workers/`; a script beside those files. And an output written before the package had
one root (tests/data/output-0.1.0, made by commit 92ac6aa) resumes after it."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ray_head
from job_helpers import START_LINE, lines_like, ok_rows

from wurstfabrik.store.storage import open_output

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAYERS = ("pipeline", "store", "workers", "jobs")
# A team's repository: every name our layers had before they moved under one root, each something else here.
USER_FILES = {
    "store.py": "def bucket_for(team):\n    return f's3://{team}-data'\n",
    "pipeline.py": "STEPS = ['clean', 'caption']\n",
    "jobs/__init__.py": "NIGHTLY = 'generate'\n",
    "workers/__init__.py": "POOL_SIZE = 4\n",
}
# A script of the team's, beside those files, that runs a job through the CLI's code path.
TEAM_SCRIPT = """import sys

import store  # the team's own module
from wurstfabrik.jobs.cli import main

assert store.bucket_for("ml") == "s3://ml-data"
sys.exit(main(["run", "job.json", "--no-progress"]))
"""
# A short demo: 36 images at 128², two steps per stage.
SHORT_DEMO = ["--set", "height=128", "--set", "width=128", "--set", "prior_steps=2", "--set", "decoder_steps=2"]


def python(code: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def user_repository(folder: Path) -> Path:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_the_editable_install_is_the_repository_root_and_answers_only_to_wurstfabrik(tmp_path):
    probe = python("import importlib.util, sys, wurstfabrik\n"
                   "print(wurstfabrik.__file__)\nprint(wurstfabrik.__version__)\n"
                   f"print([n for n in {LAYERS!r} if importlib.util.find_spec(n)])\n"
                   "print(sorted({'torch', 'ray'} & set(sys.modules)))", cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    where, version, bare, heavy = probe.stdout.splitlines()
    assert Path(where) == ROOT / "__init__.py"
    assert version == importlib.metadata.version("wurstfabrik")
    assert bare == "[]", f"installed under a bare name: {bare}"
    assert heavy == "[]", "importing wurstfabrik must not import torch or Ray"
    # The CLI and `python -m` from the repository root, as the README's commands and the tests run them.
    schema = subprocess.run([BIN / "wurstfabrik", "schema"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0 and schema.stdout == (ROOT / "schema" / "job.schema.json").read_text()
    tiny = subprocess.run([sys.executable, "-m", "wurstfabrik.pipeline.tiny", str(tmp_path / "tiny")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert tiny.returncode == 0 and (tmp_path / "tiny" / "prior" / "model_index.json").is_file(), tiny.stderr


def test_no_module_imports_a_layer_by_its_bare_name():
    """Nor does code in a string that a test or benchmark runs in a process of its own (where the repository root,
    first on the path, would answer to the bare name and hide the mistake)."""
    bare_import = re.compile(rf"(?:^|\\n|[\"'])\s*(?:from|import)\s+(?:{'|'.join(LAYERS)})\b")
    bare = []
    for folder in (*LAYERS, "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if bare_import.search(line.strip()) and not line.endswith("# the team's own module"):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "\n".join(bare)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` of a copy of this checkout's package files (the build leaves build/ and egg-info
    folders where it runs)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy(ROOT / name, source / name)
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [found] = out.glob("wurstfabrik-*.whl")
    return found


def test_the_wheel_holds_the_wurstfabrik_package_and_nothing_else_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    version = importlib.metadata.version("wurstfabrik")
    assert {n.split("/")[0] for n in names} == {"wurstfabrik", f"wurstfabrik-{version}.dist-info"}
    packaged = {n.removeprefix("wurstfabrik/") for n in names if n.startswith("wurstfabrik/")}
    in_checkout = {"__init__.py"} | {p.relative_to(ROOT).as_posix() for layer in LAYERS
                                     for p in (ROOT / layer).rglob("*.py")}
    assert in_checkout <= packaged, sorted(in_checkout - packaged)
    assert not {n for n in packaged if n.split("/")[0] in ("tests", "bench", "deploy", "docs")}
    with zipfile.ZipFile(wheel) as archive:
        info = f"wurstfabrik-{version}.dist-info"
        assert archive.read(f"{info}/top_level.txt").decode().split() == ["wurstfabrik"]
        assert "wurstfabrik = wurstfabrik.jobs.cli:main" in archive.read(f"{info}/entry_points.txt").decode()


@pytest.fixture(scope="module")
def installed_wheel(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a folder of its own, which stands for a site-packages: on
    PYTHONPATH it comes before the editable install's finder, which Python asks last."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_a_script_beside_a_teams_own_store_and_jobs_runs_a_job_through_the_cli(ray_local, tiny_checkpoints,
                                                                               tmp_path):
    """`python gen.py` in a folder holding store.py, pipeline.py, jobs/ and workers/: Ray puts the script's folder
    first on the driver's path and on every worker's, where our layers' old names are the team's modules."""
    from job_helpers import make_spec, spec_file, write_prompts

    folder = user_repository(tmp_path / "team")
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", ["a red fox", "a lighthouse"]),
                     tmp_path / "out", prior_steps=2, decoder_steps=2)
    spec_file(spec, folder / "job.json")
    (folder / "gen.py").write_text(TEAM_SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ray_local}
    done = subprocess.run([sys.executable, "gen.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(ok_rows(open_output(str(tmp_path / "out")))) == 2


def test_an_output_written_before_the_one_import_root_resumes(ray_local, tmp_path):
    """The fixture's run (before this layout) left 3 images ok and 1 failed (an encoding fault); a run now must
    take it as the same job, generate the failed image only, and keep the others as they are."""
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "output-0.1.0", old)
    images = {p: p.read_bytes() for p in (old / "output" / "images").rglob("*.jpg")}
    before = ok_rows(open_output(str(old / "output")))
    assert len(images) == 3 and len(before) == 3
    env = {**os.environ, "RAY_ADDRESS": ray_local}
    done = subprocess.run([BIN / "wurstfabrik", "run", "job.yaml", "--no-progress"], cwd=old, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (start,) = lines_like(done.stderr, START_LINE)
    assert (start["total"], start["done"], start["todo"]) == ("4", "3", "1")
    after = ok_rows(open_output(str(old / "output")))
    assert len(after) == 4 and all(after[key] == row for key, row in before.items())
    assert all(path.read_bytes() == data for path, data in images.items())
    assert len(list((old / "output" / "images").rglob("*.jpg"))) == 4


# --- `ray job submit` to a head whose nodes have the wheel installed ------------------------------------------------


@pytest.fixture(scope="module")
def wheel_head(installed_wheel, tmp_path_factory):
    """`ray start --head` with a HOME of its own (no token: none was ever generated there), its processes and jobs
    finding the installed wheel on their path, as a cluster whose image has wurstfabrik installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(tmp_path_factory.mktemp("home")), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               PYTHONPATH=str(installed_wheel))
    with ray_head(env, num_cpus=2) as address:
        yield address, env


def submit(address: str, env: dict, working_dir: Path, *entrypoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(working_dir),
                           "--", *entrypoint], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ray_job_submit_from_the_checkout_runs_the_installed_wheel(wheel_head, installed_wheel, tmp_path):
    """The README's `ray job submit --working-dir .` from the repository root: the checkout comes first on the job's
    path, and the package is still the installed one."""
    address, env = wheel_head
    done = submit(address, env, ROOT, "bash", "-c",
                  f"wurstfabrik --version && wurstfabrik demo --dir {tmp_path / 'demo'} {' '.join(SHORT_DEMO)}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"({installed_wheel / 'wurstfabrik'})" in done.stdout
    assert len(ok_rows(open_output(str(tmp_path / "demo" / "output")))) == 36


@pytest.mark.slow
def test_ray_job_submit_from_a_teams_repository_runs_the_demo(wheel_head, tmp_path):
    address, env = wheel_head
    folder = user_repository(tmp_path / "team")
    done = submit(address, env, folder, "wurstfabrik", "demo", "--dir", str(tmp_path / "demo"), *SHORT_DEMO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(ok_rows(open_output(str(tmp_path / "demo" / "output")))) == 36
