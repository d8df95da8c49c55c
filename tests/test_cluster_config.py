"""Tests for cluster.yaml and the example job specs: the cluster launcher would accept the config, and the cluster
it describes can place every actor the example job asks for."""

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from job_helpers import with_s3_checkpoints

from wurstfabrik.jobs.spec import JobSpec, load_spec

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
JOB = ROOT / "examples" / "job.yaml"
JOB_LOCAL = ROOT / "examples" / "job-local.yaml"
PROJECT_PATH = "~/wurstfabrik"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def job() -> JobSpec:
    return load_spec(JOB)


def worker_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def stage_request(job: JobSpec, stage: str) -> dict[str, float]:
    """What one actor of the stage asks Ray for, as the driver builds it on a cluster with GPUs."""
    place = job.placement
    gpus = getattr(place, f"{stage}_gpus")
    return {
        "CPU": getattr(place, f"{stage}_cpus"),
        "GPU": 1.0 if gpus is None else gpus,  # None is auto, which is one GPU where the cluster has any
        **getattr(place, f"{stage}_resources"),
    }


def actors_per_node(node_type: dict, request: dict[str, float]) -> int:
    """How many of these actors one node of the type holds; 0 when it cannot hold one."""
    fits = [math.floor(node_type["resources"].get(name, 0) / amount) for name, amount in request.items() if amount]
    return min(fits, default=0)


def test_has_the_cluster_launcher_keys(cluster):
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster, f"cluster.yaml: {key} is missing"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["auth"]["ssh_user"] == "ubuntu"


def test_matches_rays_own_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"{schema_path}: this Ray ships no cluster config schema")
    jsonschema.validate(cluster, json.loads(schema_path.read_text(encoding="utf-8")))


def test_ray_up_accepts_it(cluster):
    # What `ray up` does before it launches anything: fill in the provider's defaults, then validate.
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("Ray's config helpers moved; the schema test still covers the format")
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_node_types_are_well_formed(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, node_type in types.items():
        assert "node_config" in node_type and "resources" in node_type, name
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", cluster["max_workers"]), name
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head should not take GPU actors"
    assert any(t["resources"].get("GPU", 0) > 0 for t in worker_types(cluster).values())


def test_every_node_runs_the_same_image(cluster):
    # Ray refuses nodes whose Python or Ray version differs from the head's.
    images = {name: t["node_config"].get("ImageId") for name, t in cluster["available_node_types"].items()}
    assert len(set(images.values())) == 1, images


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_pinned_resources_exist_on_a_gpu_node_type(cluster, job, stage):
    pins = getattr(job.placement, f"{stage}_resources")
    assert pins, f"examples/job.yaml: placement.{stage}_resources pins the stage to nothing"
    types = cluster["available_node_types"]
    for resource in pins:
        providers = [name for name, t in types.items() if t["resources"].get(resource, 0) > 0]
        assert providers, f"placement.{stage}_resources.{resource}: no node type in cluster.yaml provides it"
        if stage_request(job, stage)["GPU"] > 0:
            assert all(types[name]["resources"].get("GPU", 0) > 0 for name in providers), providers


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_cluster_can_grow_to_hold_every_actor(cluster, job, stage):
    request = stage_request(job, stage)
    capacity = sum(t["max_workers"] * actors_per_node(t, request) for t in worker_types(cluster).values())
    wanted = getattr(job.placement, f"{stage}_actors")
    assert capacity >= wanted, f"{stage}: {wanted} actors asking for {request} but room for {capacity}"


def test_each_gpu_pool_serves_one_stage(cluster, job):
    # Otherwise a prior actor could take the node the autoscaler launched for a decoder actor.
    fits = {stage: {name for name, t in worker_types(cluster).items() if actors_per_node(t, stage_request(job, stage))}
            for stage in ("prior", "decoder")}
    assert fits["prior"] and fits["decoder"]
    assert not fits["prior"] & fits["decoder"], fits


def test_total_workers_cover_both_stages(cluster, job):
    needed = 0
    for stage in ("prior", "decoder"):
        request = stage_request(job, stage)
        per_node = max(actors_per_node(t, request) for t in worker_types(cluster).values())
        assert per_node, f"{stage}: no worker node type holds an actor asking for {request}"
        needed += math.ceil(getattr(job.placement, f"{stage}_actors") / per_node)
    assert needed <= cluster["max_workers"]


def test_setup_installs_the_project_it_copies(cluster):
    local = cluster["file_mounts"][PROJECT_PATH]
    pyproject = (ROOT / local / "pyproject.toml").read_text(encoding="utf-8")
    assert 'name = "wurstfabrik"' in pyproject
    commands = cluster["setup_commands"]
    assert any("pip install" in c and PROJECT_PATH in c for c in commands), commands
    # `ray job submit` needs the dashboard, which plain ray[data] lacks.
    assert any("pip install" in c and "ray[default" in c for c in commands), commands


def test_start_commands_start_the_head_and_join_it(cluster):
    head = " ; ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ; ".join(cluster["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert commands[0] == "ray stop", "a restarted node must drop the Ray it had before"


@pytest.mark.parametrize("path", [JOB, JOB_LOCAL], ids=lambda p: p.name)
def test_example_specs_load(path):
    assert isinstance(load_spec(path), JobSpec)


def test_the_example_shows_checkpoints_mirrored_to_s3_beside_the_hub_ids():
    s3 = JobSpec.from_dict(yaml.safe_load(with_s3_checkpoints(JOB.read_text(encoding="utf-8"))))
    assert s3.prior.startswith("s3://") and s3.decoder.startswith("s3://") and s3.checkpoint_cache
    checkpoints = {"prior", "decoder", "checkpoint_cache"}
    assert s3.model_dump(exclude=checkpoints) == load_spec(JOB).model_dump(exclude=checkpoints)


def test_local_example_asks_for_no_custom_resources():
    # A local Ray has no custom resources; a stage pinned to one would wait forever.
    place = load_spec(JOB_LOCAL).placement
    assert not place.prior_resources and not place.decoder_resources
