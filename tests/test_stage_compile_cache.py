"""Tests for workers.compile_cache: compiled kernels kept in a folder or under an s3:// prefix, so that an actor of
a stage after the first loads them instead of compiling."""

import os
import subprocess
import sys

import pytest

from wurstfabrik.pipeline.compile_cache import ARTIFACTS_FILE
from wurstfabrik.store.storage import open_output

# One process compiles a small function with inductor and keeps what it compiled; a second one, with an empty local
# folder, must then find the artifacts (from the shared folder or from S3) and load them.
ACTOR = """
import sys, torch
from wurstfabrik.workers.compile_cache import StageCompileCache
cache = StageCompileCache(sys.argv[1], "prior")
step = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
assert torch.allclose(step(torch.ones(8)), torch.sin(torch.ones(8)) * 2 + 1)
cache.after_first_batch()
cache.after_first_batch()  # once only
print("hits", torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"])
"""


def actor(location: str, env: dict) -> int:
    done = subprocess.run([sys.executable, "-c", ACTOR, location], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("hits")[-1])


@pytest.mark.slow  # two inductor compiles in fresh processes: a minute here
def test_a_second_actor_elsewhere_loads_what_the_first_compiled_through_s3(tmp_path, s3_env, s3_bucket):
    """A folder shared by the actors is pipeline.compile_cache's own (tests/test_compile.py); this is the copy to
    and from S3 that actors on other machines share."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # each actor's own inductor folder starts empty
    (tmp_path / "tmp").mkdir()
    location = f"s3://{s3_bucket}/compile-cache"
    assert actor(location, env) == 0  # the first compiles
    assert open_output(location).exists(f"prior/{ARTIFACTS_FILE}")
    assert actor(location, env) >= 1  # the second finds its graph in the cache
