"""Tests for jobs.resources: what a placement needs, whether a cluster (with its autoscaler) can ever hold it, and
how automatic GPU shares are chosen; and how many rows a block carries through the stages."""

import pytest
import yaml
from test_cluster_config import CLUSTER, JOB

from wurstfabrik.jobs.resources import ClusterShape, demands, stage_gpus, unschedulable
from wurstfabrik.jobs.spec import Placement, load_spec
from wurstfabrik.jobs.stage_chain import BLOCK_ROWS, block_rows


def needs(gpus=(0.0, 0.0), **fields):
    return demands(Placement(**fields), *gpus)


def test_a_small_local_placement_fits_two_cpus():
    small = {"prior_cpus": 0.5, "decoder_cpus": 0.5, "writer_cpus": 0.25}
    assert unschedulable(needs(**small), ClusterShape([{"CPU": 2.0}], [])) is None
    problem = unschedulable(needs(), ClusterShape([{"CPU": 2.0}], []))
    assert "together they need CPU 3.25" in problem and "no autoscaler" in problem


def test_what_no_node_has_is_named_with_the_field_to_change():
    problem = unschedulable(needs((1.0, 1.0)), ClusterShape([{"CPU": 8.0}], []))
    assert "a prior actor needs CPU 1, GPU 1, and no node has enough GPU" in problem
    assert "placement.prior_actors, prior_cpus, prior_gpus, prior_resources" in problem


def test_nodes_the_autoscaler_can_add_count():
    gpu_node = ({"CPU": 4.0, "GPU": 1.0}, 4)
    cluster = ClusterShape([{"CPU": 6.0}], [gpu_node])
    assert unschedulable(needs((1.0, 1.0), prior_actors=2, decoder_actors=2), cluster) is None
    problem = unschedulable(needs((1.0, 1.0), prior_actors=4, decoder_actors=1), cluster)
    assert "together they need CPU 6.25, GPU 5" in problem and "can add 4 × (CPU 4, GPU 1)" in problem


def test_an_autoscaler_of_unknown_node_types_rules_nothing_out():
    assert unschedulable(needs((1.0, 1.0)), ClusterShape([{"CPU": 2.0}], [], unknown_autoscaler=True)) is None


@pytest.mark.parametrize("gpus, actors, expected", [
    (0, (1, 1), (0.0, 0.0)), (1, (1, 1), (0.5, 0.5)), (2, (1, 1), (1.0, 1.0)), (1, (2, 1), (0.33, 0.33)),
    (8, (3, 2), (1.0, 1.0)),
])
def test_automatic_gpus_share_what_the_cluster_has(gpus, actors, expected):
    cluster = ClusterShape([{"CPU": 16.0, "GPU": float(gpus)}], [])
    place = Placement(prior_actors=actors[0], decoder_actors=actors[1])
    assert stage_gpus(place, cluster) == expected
    assert stage_gpus(Placement(prior_gpus=0.25), cluster)[0] == 0.25  # as asked, whatever the cluster


@pytest.mark.parametrize("gpus, actors, expected", [(0, 1, 0.0), (1, 1, 1.0), (1, 2, 0.5), (4, 2, 1.0)])
def test_fused_actors_get_a_whole_gpu_each_where_there_is_one(gpus, actors, expected):
    cluster = ClusterShape([{"CPU": 16.0, "GPU": float(gpus)}], [])
    place = Placement(fused=True, prior_actors=actors)
    assert stage_gpus(place, cluster) == (expected, 0.0)
    [fused] = [d for d in demands(place, *stage_gpus(place, cluster)) if "actor" in d.what]
    assert (fused.what, fused.count, fused.bundle) == ("fused actor", actors, {"CPU": 1.0, **({"GPU": expected}
                                                                                            if gpus else {})})


def test_a_fused_placement_needs_one_gpu_where_two_pools_need_two():
    one_gpu = ClusterShape([{"CPU": 8.0, "GPU": 1.0}], [])
    assert unschedulable(needs((1.0, 1.0)), one_gpu) is not None
    assert unschedulable(needs((1.0, 0.0), fused=True), one_gpu) is None
    problem = unschedulable(needs((2.0, 0.0), fused=True), one_gpu)
    assert "a fused actor needs CPU 1, GPU 2" in problem and "prior_gpus, prior_resources (fused)" in problem


def test_the_example_job_fits_the_example_cluster_as_the_driver_checks_it():
    cluster_yaml = yaml.safe_load(CLUSTER.read_text())
    head = cluster_yaml["head_node_type"]
    types = cluster_yaml["available_node_types"]
    shape = ClusterShape([{k: float(v) for k, v in types[head]["resources"].items()}],
                         [({k: float(v) for k, v in t["resources"].items()}, t["max_workers"])
                          for name, t in types.items() if name != head])
    place = load_spec(JOB).placement
    assert unschedulable(demands(place, *stage_gpus(place, shape)), shape) is None


@pytest.mark.parametrize("fields, images, rows", [
    ({}, None, BLOCK_ROWS),  # a user's Dataset, of unknown length: blocks of about BLOCK_ROWS
    ({}, 1_000_000, BLOCK_ROWS),
    ({"prior_batch_size": 32}, 1_000_000, 32),
    ({"prior_batch_size": 12}, 1_000_000, 24),  # whole batches only
    ({"prior_batch_size": 64}, 1_000_000, 64),  # never less than one batch
    ({}, 24, 8),  # a small job: one batch per block, so that it spreads over every actor
    ({"prior_actors": 4}, 8 * 16 * 4, 16),  # 8 blocks of two batches per actor, not of four
    ({"batches_per_block": 1}, 1_000_000, 8),
    ({"batches_per_block": 16, "prior_batch_size": 2}, 10, 32),  # as set, whatever the job's size
])
def test_a_block_holds_whole_prior_batches(fields, images, rows):
    assert block_rows(Placement(**fields), images) == rows
