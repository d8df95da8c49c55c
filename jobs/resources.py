"""What a job's placement asks of the Ray cluster, and whether the cluster has it or its autoscaler can add it,
so that a job that could never be scheduled is refused up front instead of waiting forever."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import ray

log = logging.getLogger("wurstfabrik")
READ_CPUS = 0.25  # a read task; small, so it fits beside the actors
# An autoscaling node group with no upper bound is counted as this many nodes.
UNBOUNDED_NODES = 64


@dataclass(frozen=True)
class Demand:
    what: str  # "prior actor", "writer task", ...
    count: int
    bundle: dict[str, float]  # Ray resources of one of them
    fields: str  # the placement fields that set it

    def describe(self) -> str:
        return f"{self.count} {self.what}{'s' if self.count > 1 else ''} ({_resources(self.bundle)})"


def stage_gpus(placement, cluster: ClusterShape) -> tuple[float, float]:
    """GPUs per prior and per decoder actor: as the spec asks, or (auto) a whole GPU each where the cluster has
    (or its autoscaler can add) a GPU per actor, an equal share of the GPUs there are where it has fewer (both
    stages on one GPU: 0.5 each), and none on a cluster without GPUs. Fused actors hold both stages: their GPUs
    come first, and the decoder gets none of its own."""
    gpus = cluster.total("GPU")
    actors = placement.prior_actors + (0 if placement.fused else placement.decoder_actors)
    share = 0.0 if not gpus else 1.0 if gpus >= actors else min(1.0, _gpu_fraction(gpus / actors))
    if placement.fused:
        return (share if placement.prior_gpus is None else placement.prior_gpus, 0.0)
    return (share if placement.prior_gpus is None else placement.prior_gpus,
            share if placement.decoder_gpus is None else placement.decoder_gpus)


def _gpu_fraction(share: float) -> float:
    """A fraction Ray accepts (it splits a GPU in hundredths), rounded down so the actors still fit."""
    return max(0.01, int(share * 100) / 100)


def demands(placement, prior_gpus: float, decoder_gpus: float) -> list[Demand]:
    """Everything that must run at once for images to flow: both actor pools (or the one fused pool), and one
    each of the tasks."""
    def actor(cpus, gpus, resources):
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}

    if placement.fused:
        actors = [Demand("fused actor", placement.prior_actors, actor(placement.prior_cpus, prior_gpus,
                                                                      placement.prior_resources),
                         "placement.prior_actors, prior_cpus, prior_gpus, prior_resources (fused)")]
    else:
        actors = [Demand("prior actor", placement.prior_actors, actor(placement.prior_cpus, prior_gpus,
                                                                      placement.prior_resources),
                         "placement.prior_actors, prior_cpus, prior_gpus, prior_resources"),
                  Demand("decoder actor", placement.decoder_actors, actor(placement.decoder_cpus, decoder_gpus,
                                                                          placement.decoder_resources),
                         "placement.decoder_actors, decoder_cpus, decoder_gpus, decoder_resources")]
    return [
        *actors,
        Demand("read task", 1, {"CPU": READ_CPUS}, "(fixed)"),
        Demand("encoder task", 1, {"CPU": placement.writer_cpus}, "placement.writer_cpus"),
        Demand("writer task", 1, {"CPU": placement.writer_cpus}, "placement.writer_cpus"),
    ]


@dataclass(frozen=True)
class ClusterShape:
    nodes: list[dict[str, float]]  # total resources of each live node
    groups: list[tuple[dict[str, float], int]]  # autoscaler node groups: resources of one node, max nodes to add
    # An autoscaler runs whose node types cannot be read (Ray's v1 autoscaler): what it can add is unknown.
    unknown_autoscaler: bool = False

    @classmethod
    def current(cls) -> ClusterShape:
        nodes = [{k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
                 for n in ray.nodes() if n.get("Alive")]
        groups = _autoscaler_groups()
        return cls(nodes, groups, unknown_autoscaler=not groups and _v1_autoscaler_with_node_types())

    def total(self, resource: str) -> float:
        """How much of a resource the cluster has, with what its autoscaler can add."""
        return sum(n.get(resource, 0) for n in self.nodes) + sum(r.get(resource, 0) * count
                                                                  for r, count in self.groups)

    def describe(self) -> str:
        total: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                if k in ("CPU", "GPU") or not _is_internal(k):
                    total[k] = total.get(k, 0) + v
        text = f"{len(self.nodes)} node(s) with {_resources(total)}"
        if self.groups:
            text += "; the autoscaler can add " + ", ".join(
                f"{'any number' if n >= UNBOUNDED_NODES else n} × ({_resources(r)})" for r, n in self.groups)
        else:
            text += " and no autoscaler"
        return text


def _is_internal(name: str) -> bool:
    return name in ("memory", "object_store_memory") or name.startswith(("node:", "accelerator_type:"))


def _autoscaler_groups() -> list[tuple[dict[str, float], int]]:
    """Node groups the autoscaler may launch (ray up, KubeRay), from the cluster config it reports to the GCS."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # private API: a Ray without it means no autoscaler we can see
        log.debug("no autoscaler config: %s", e)
        return []
    if config is None:
        return []
    groups = []
    for group in config.node_group_configs:
        count = group.max_count
        if count == 0 or not group.resources:
            continue
        groups.append(({k: float(v) for k, v in group.resources.items()},
                       UNBOUNDED_NODES if count < 0 else min(count, UNBOUNDED_NODES)))
    return groups


def _v1_autoscaler_with_node_types() -> bool:
    """Whether Ray's v1 autoscaler runs with a config of its own (`ray up`, KubeRay). Without one it makes up a
    read-only node type per node, named node_<id>, and can add nothing."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
    except Exception as e:  # private API: if it cannot be read, assume no autoscaler we could rely on
        log.debug("no autoscaler status: %s", e)
        return False
    report = status.get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    types |= set(report.get("pending_launches") or {})
    return any(not name.startswith("node_") and name != "ray.head.default" for name in types)


def unschedulable(needs: list[Demand], cluster: ClusterShape) -> str | None:
    """Why `needs` can never all run at once on the cluster (with what its autoscaler can add), or None. With an
    autoscaler whose node types are unknown, nothing can be ruled out; the stall watchdog covers that case."""
    if cluster.unknown_autoscaler:
        log.info("the cluster's autoscaler does not say which nodes it can add, so the placement is not checked "
                 "against them; resilience.stall_s stops a job that never gets its workers")
        return None
    shapes = cluster.nodes + [r for r, _ in cluster.groups]
    for need in needs:
        if not any(_fits(need.bundle, shape) for shape in shapes):
            missing = sorted(k for k in need.bundle if need.bundle[k] > 0
                             and not any(s.get(k, 0) >= need.bundle[k] for s in shapes))
            lacking = f"no node has enough {', '.join(missing)}" if missing else "no node has all of it at once"
            return (f"placement cannot run: a {need.what} needs {_resources(need.bundle)}, and {lacking} (the "
                    f"cluster: {cluster.describe()}); change {need.fields}")
    free = [dict(n) for n in cluster.nodes] + [dict(r) for r, count in cluster.groups for _ in range(count)]
    bundles = sorted((need.bundle for need in needs for _ in range(need.count)),
                     key=lambda bundle: (-bundle.get("GPU", 0), -bundle.get("CPU", 0)))
    for bundle in bundles:
        node = next((n for n in free if _fits(bundle, n)), None)
        if node is None:
            each = ", ".join(n.describe() for n in needs)
            total: dict[str, float] = {}
            for n in needs:
                for k, v in n.bundle.items():
                    total[k] = total.get(k, 0) + n.count * v
            return (f"placement cannot run: {each} must run at the same time, and together they need "
                    f"{_resources(total)} (the cluster: {cluster.describe()}); lower placement.prior_cpus, "
                    f"decoder_cpus, writer_cpus, the GPUs or the actor counts, or add nodes")
        for k, v in bundle.items():
            node[k] = node.get(k, 0) - v
    return None


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def _resources(bundle: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in bundle.items() if v) or "nothing"


def pending_demands() -> str:
    """What Ray is waiting to schedule, as `ray status` shows it; "unknown" if it cannot be read."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        waiting = [str(b) for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
        waiting += [str(b) for d in status.resource_demands.placement_group_demand for b in d.bundles_by_count]
        return "; ".join(waiting) or "none"
    except Exception as e:  # an old Ray or an unreachable GCS: say so rather than fail the report
        return f"unknown ({type(e).__name__})"
