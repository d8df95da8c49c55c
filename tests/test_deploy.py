"""Tests for deploy/: the KubeRay manifests pass KubeRay's own CRD schemas and agree with the job spec, the CLI, the
image and the README they go with; deploy/ray_submit.py hands a scheduler the job's own exit code; `ray job submit`
with token authentication as the README does it. The tests that need a Ray head share one."""

import copy
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, ray_head
from job_helpers import START_LINE, SUMMARY_LINE, lines_like, with_s3_checkpoints

from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.store.manifest import latest_status, read_manifest
from wurstfabrik.store.storage import open_output

try:
    import tomllib
except ImportError:  # Python 3.10; pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
RAYCRONJOB = DEPLOY / "kuberay" / "raycronjob.yaml"
MANIFESTS = [RAYJOB, RAYCRONJOB]
KIND_OF = {RAYJOB.name: "RayJob", RAYCRONJOB.name: "RayCronJob"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
STAGES = ("prior", "decoder")
GPU_KEY = "nvidia.com/gpu"
# KubeRay's limits (ray-operator/controllers/ray/utils/constant.go): the names it derives must stay valid.
MAX_NAME = {"RayJob": 47, "RayCronJob": 36}
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
README_PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of ramen"]
# `ray start --head` with a dashboard and `ray job submit`s to it: a minute of process starts, for deploy/ray_submit.py
# and the README's Ray-by-hand steps, which rarely change.
NEEDS_A_HEAD = pytest.mark.slow


def kuberay_reference() -> Path:
    """KubeRay's CRDs, copied unchanged from the workplace's shared/reference/kuberay (see its README)."""
    return ROOT / "tests" / "data" / "kuberay"


def load_documents(path: Path) -> dict[str, dict]:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    kinds = [d["kind"] for d in documents]
    assert len(kinds) == len(set(kinds)), f"{path.name}: one document per kind expected, got {kinds}"
    return {d["kind"]: d for d in documents}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, dict]]:
    return {path.name: load_documents(path) for path in MANIFESTS}


def job_spec_of(documents: dict[str, dict]) -> dict:
    """The RayJob spec of a file: the RayJob's own, or the one the RayCronJob creates."""
    if "RayJob" in documents:
        return documents["RayJob"]["spec"]
    return documents["RayCronJob"]["spec"]["jobTemplate"]


@pytest.fixture(scope="module", params=[p.name for p in MANIFESTS])
def job(request, manifests) -> dict:
    return job_spec_of(manifests[request.param])


@pytest.fixture(scope="module")
def configmap(manifests) -> dict:
    return manifests[RAYJOB.name]["ConfigMap"]


# --- KubeRay's schemas, applied as the API server and kubectl apply them --------------------------------------------


def strict(schema: dict) -> dict:
    """The schema as kubectl's default (strict) field validation applies it: an unknown field is an error, where the
    bare OpenAPI schema would let the API server drop it silently."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and isinstance(node.get("properties"), dict)
                    and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def _list_type(validator, list_type, instance, schema):
    # Kubernetes refuses duplicate entries in list-type map (by their keys) and set lists.
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = schema.get("items", {}).get("properties", {})
        identity = [tuple(item.get(k, defaults.get(k, {}).get("default")) for k in keys) for item in instance]
    elif list_type == "set":
        identity = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        return
    duplicates = {i for i in identity if identity.count(i) > 1}
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries {sorted(map(str, duplicates))} in a list-type {list_type}")


def _cel_rules(validator, rules, instance, schema):
    # The API server evaluates these CEL rules; jsonschema cannot, so the manifests stay clear of guarded fields.
    yield jsonschema.ValidationError(f"sets a field guarded by CEL rules this test cannot evaluate: "
                                     f"{[r['rule'] for r in rules]}")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)


@functools.cache
def crd_version(kind: str) -> tuple[str, dict]:
    """The apiVersion KubeRay stores the kind under, and that version's strict schema."""
    text = (kuberay_reference() / CRD_FILES[kind]).read_text(encoding="utf-8")
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 25,000 lines
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return f"{crd['spec']['group']}/{version['name']}", strict(version["schema"]["openAPIV3Schema"])


def schema_errors(document: dict, schema: dict) -> list[str]:
    validator = KubernetesValidator(schema, format_checker=FORMATS)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_custom_resource_passes_kuberays_crd_schema(manifests, path):
    documents = manifests[path.name]
    custom = [kind for kind in documents if kind in CRD_FILES]
    assert custom == [KIND_OF[path.name]], custom
    for kind in custom:
        api_version, schema = crd_version(kind)
        assert documents[kind]["apiVersion"] == api_version
        errors = schema_errors(documents[kind], schema)
        assert not errors, f"{path.name}: {kind}:\n" + "\n".join(errors)


def test_the_strict_schema_catches_what_the_api_server_would_refuse(manifests):
    # The validation above is only worth something if it can fail: a misspelled field, a wrong type, a duplicate.
    _, schema = crd_version("RayJob")
    rayjob = manifests[RAYJOB.name]["RayJob"]
    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(broken, schema))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["backoffLimit"] = "1"
    assert any("backoffLimit" in e for e in schema_errors(broken, schema))
    broken = copy.deepcopy(rayjob)
    env = broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(copy.deepcopy(env[0]))
    assert any("duplicate" in e for e in schema_errors(broken, schema))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions.mode" in e for e in schema_errors(broken, schema))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_configmap_is_well_formed(manifests, path):
    configmap = manifests[path.name]["ConfigMap"]
    assert configmap["apiVersion"] == "v1"
    assert set(configmap) <= {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}, set(configmap)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", configmap["metadata"]["name"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in configmap["data"].items())


# --- What KubeRay's controller checks beyond the schema (ray-operator/controllers/ray/utils/validation.go) ---------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_names_fit_what_kuberay_derives_from_them(manifests, path):
    for kind, document in manifests[path.name].items():
        if kind in MAX_NAME:
            name = document["metadata"]["name"]
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{kind} {name}: not a DNS-1035 label"
            assert len(name) <= MAX_NAME[kind], f"{kind} {name}: longer than {MAX_NAME[kind]} characters"


def ray_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_kuberay_accepts_the_job_settings(job):
    assert job["shutdownAfterJobFinishes"] or job.get("ttlSecondsAfterFinished", 0) == 0, \
        "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
    assert job["activeDeadlineSeconds"] > 0 and job["preRunningDeadlineSeconds"] > 0
    assert job["backoffLimit"] >= 0
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode", "the submitter Job keeps the driver's log"
    cluster = job["rayClusterSpec"]
    # Token authentication: KubeRay refuses it without a rayVersion of at least 2.52.0.
    assert cluster["authOptions"]["mode"] == "token"
    assert not cluster["authOptions"].get("enableK8sTokenAuth"), "KubeRay does not support it for RayJobs"
    assert ray_version(cluster["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        params = group.get("rayStartParams", {})
        assert "labels" not in params, "KubeRay wants labels in the group's labels field"
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params)), \
            "resources in both rayStartParams and the group's resources field"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]


# --- The job the manifests run -------------------------------------------------------------------------------------


def head_container(job: dict) -> dict:
    return ray_container(job["rayClusterSpec"]["headGroupSpec"])


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def containers(job: dict) -> list[dict]:
    """Every container the job starts: the Ray ones and any sidecars or submitter."""
    cluster = job["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    if "submitterPodTemplate" in job:
        pods.append(job["submitterPodTemplate"])
    return [c for pod in pods for c in [*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])]]


def spec_in(configmap: dict) -> JobSpec:
    return JobSpec.from_dict(yaml.safe_load(configmap["data"]["job.yaml"]))


def test_the_configmap_holds_a_valid_job_spec(configmap):
    spec = spec_in(configmap)
    # Every node reads and writes: a local path would differ from pod to pod.
    assert spec.prompts.startswith("s3://") and spec.output.startswith("s3://")


def test_the_configmap_shows_checkpoints_mirrored_to_s3_beside_the_hub_ids(configmap):
    s3 = JobSpec.from_dict(yaml.safe_load(with_s3_checkpoints(configmap["data"]["job.yaml"])))
    assert s3.prior.startswith("s3://") and s3.decoder.startswith("s3://") and s3.checkpoint_cache
    checkpoints = {"prior", "decoder", "checkpoint_cache"}
    assert s3.model_dump(exclude=checkpoints) == spec_in(configmap).model_dump(exclude=checkpoints)


def test_entrypoint_runs_the_cli_on_the_mounted_spec(job, configmap):
    from wurstfabrik.jobs.cli import parser  # imported here: the CLI module pulls in the driver side of jobs/

    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "wurstfabrik", argv
    args = parser().parse_args(argv[1:])
    assert args.command == "run" and args.no_progress, "a progress bar in a log is a line per refresh"
    spec_path = Path(args.spec)

    pod = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = {}
    for mount in head_container(job).get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source and source["name"] == configmap["metadata"]["name"]:
            files = {i["path"]: i["key"] for i in source.get("items", [])} or {k: k for k in configmap["data"]}
            mounted.update({Path(mount["mountPath"]) / path: key for path, key in files.items()})
    assert spec_path in mounted, f"{spec_path} is not a file the head mounts from {configmap['metadata']['name']}"
    assert mounted[spec_path] == "job.yaml"
    if args.overrides:
        spec_in(configmap).with_overrides(args.overrides)


def readme_secret() -> tuple[str, set[str]]:
    """The Secret deploy/README.md tells users to create, and the keys it names."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"kubectl create secret generic ([a-z0-9-]+)", readme))
    assert len(names) == 1, f"deploy/README.md should create one Secret, names {names}"
    return names.pop(), set(re.findall(r"--from-literal=([A-Z_]+)=", readme))


def test_credentials_come_from_the_secret_the_readme_creates(job):
    secret, keys = readme_secret()
    for container in containers(job):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret, f"{container['name']} {env['name']}: Secret {ref['name']}"
                assert ref["key"] in keys, f"{container['name']} {env['name']}: deploy/README.md lacks {ref['key']}"
            elif re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", env["name"]):
                pytest.fail(f"{container['name']} {env['name']}: a credential inline, not from a Secret")


def test_every_ray_node_has_the_s3_credentials(job):
    # Writer and read tasks run wherever Ray has room, the GPU pods included.
    cluster = job["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in env and not env[name]["valueFrom"]["secretKeyRef"].get("optional"), \
                f"{group.get('groupName', 'head')}: {name}"


# --- Placement: the spec's actors fit the worker groups ------------------------------------------------------------


def advertised(group: dict) -> dict[str, float]:
    """What Ray on a pod of the group offers: GPUs and CPUs from the container's limits (as KubeRay passes them)
    unless rayStartParams says otherwise, plus the custom resources of rayStartParams."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group).get("resources", {}).get("limits", {})
    offer = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
             "GPU": float(params.get("num-gpus", limits.get(GPU_KEY, 0)))}
    if "resources" in params:
        offer.update(json.loads(params["resources"].strip("'\"` ").replace('\\"', '"')))
    return offer


def stage_request(spec: JobSpec, stage: str) -> dict[str, float]:
    place = spec.placement
    gpus = getattr(place, f"{stage}_gpus")
    return {"CPU": getattr(place, f"{stage}_cpus"), "GPU": 1.0 if gpus is None else gpus,
            **getattr(place, f"{stage}_resources")}


def actors_per_pod(offer: dict[str, float], request: dict[str, float]) -> int:
    return min((int(offer.get(name, 0) // amount) for name, amount in request.items() if amount), default=0)


@pytest.mark.parametrize("stage", STAGES)
def test_the_stages_pins_are_advertised_by_gpu_groups_only(job, configmap, stage):
    spec = spec_in(configmap)
    pins = getattr(spec.placement, f"{stage}_resources")
    assert pins, f"placement.{stage}_resources pins the stage to nothing"
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    for resource in pins:
        providers = [g for g in groups if advertised(g).get(resource, 0) > 0]
        assert providers, f"placement.{stage}_resources.{resource}: no worker group advertises it"
        assert all(advertised(g)["GPU"] > 0 for g in providers), [g["groupName"] for g in providers]
    assert not set(pins) & set(advertised(job["rayClusterSpec"]["headGroupSpec"]))


def test_each_gpu_group_serves_one_stage_and_the_head_none(job, configmap):
    spec = spec_in(configmap)
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    serving = {stage: {g["groupName"] for g in groups if actors_per_pod(advertised(g), stage_request(spec, stage))}
               for stage in STAGES}
    assert serving["prior"] and serving["decoder"] and not serving["prior"] & serving["decoder"], serving
    head = advertised(job["rayClusterSpec"]["headGroupSpec"])
    assert head["GPU"] == 0 and not any(actors_per_pod(head, stage_request(spec, s)) for s in STAGES)
    assert head["CPU"] >= spec.placement.writer_cpus, "the head reads and writes too"


@pytest.mark.parametrize("stage", STAGES)
def test_the_groups_can_grow_to_hold_every_actor(job, configmap, stage):
    spec = spec_in(configmap)
    request = stage_request(spec, stage)
    room = sum(g["maxReplicas"] * actors_per_pod(advertised(g), request)
               for g in job["rayClusterSpec"]["workerGroupSpecs"])
    wanted = getattr(spec.placement, f"{stage}_actors")
    assert room >= wanted, f"{stage}: {wanted} actors asking for {request}, room for {room}"


# --- The image -----------------------------------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def test_every_container_runs_one_image_with_the_manifests_ray(job):
    images = {c["image"] for c in containers(job)}
    assert len(images) == 1, f"Ray refuses nodes whose Ray or Python differs from the head's: {images}"
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu\s*$", dockerfile(), re.MULTILINE)
    assert base, "deploy/Dockerfile should start from a rayproject/ray GPU image"
    assert base.group(1) == job["rayClusterSpec"]["rayVersion"]
    assert f'"ray[data,default]=={base.group(1)}"' in dockerfile(), "pip could move Ray off the image's version"


def test_the_image_copies_every_package_pyproject_installs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    root = setuptools["package-dir"]["wurstfabrik"]
    # The top-level folders of the packages pyproject lists (wurstfabrik.store.formats comes with store), and the
    # root package's own __init__.py.
    packages = {name.split(".")[1] for name in setuptools["packages"] if name.count(".") == 1} | {"__init__.py"}
    assert root == "." and all((ROOT / p).exists() for p in packages), packages
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile(), re.MULTILINE):
        sources = [word for word in line.split() if not word.startswith("--")][:-1]
        copied.update(sources)
    assert packages <= copied, f"deploy/Dockerfile does not copy {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied, "pip install . reads both"


# --- The nightly job -----------------------------------------------------------------------------------------------


def test_the_cron_job_runs_the_same_job_and_spec(manifests):
    once, nightly = manifests[RAYJOB.name], manifests[RAYCRONJOB.name]
    assert nightly["RayCronJob"]["spec"]["jobTemplate"] == once["RayJob"]["spec"]
    assert nightly["ConfigMap"] == once["ConfigMap"], "applying either file must leave the same spec"


def test_the_cron_job_runs_nightly_and_ends_each_run_before_the_next(manifests):
    cron = manifests[RAYCRONJOB.name]["RayCronJob"]["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and "TZ" not in cron["schedule"], "a standard five-field schedule; KubeRay refuses TZ"
    minute, hour, *rest = fields
    assert minute.isdigit() and 0 <= int(minute) < 60 and hour.isdigit() and 0 <= int(hour) < 24
    assert rest == ["*", "*", "*"], "once a day"
    assert "timeZone" not in cron, "KubeRay 1.6 has no timeZone field"
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


# --- `ray job submit` and deploy/ray_submit.py against a real head with token authentication ---------------------


@dataclass
class TokenHead:
    address: str
    home: Path  # the HOME whose ~/.ray/auth_token the head and the README's clients read
    env: dict[str, str]  # a README user's shell: RAY_AUTH_MODE=token, the token from HOME
    token_env: dict[str, str]  # a KubeRay submitter's: the same token in RAY_AUTH_TOKEN, the user's own HOME


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """One `ray start --head` with token authentication for every test of this module, set up as the README says: a
    token generated into a fresh HOME, then the head started with RAY_AUTH_MODE=token."""
    home = tmp_path_factory.mktemp("home")
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")  # a user with no token yet
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    env["RAY_AUTH_MODE"] = "token"
    token = (home / ".ray" / "auth_token").read_text().strip()
    token_env = {**env, "HOME": os.environ.get("HOME", str(home)), "RAY_AUTH_TOKEN": token}
    with ray_head(env, num_cpus=2) as address:
        yield TokenHead(address, home, env, token_env)


@NEEDS_A_HEAD
def test_ray_job_submit_with_token_authentication_as_the_readme_says(token_head, tmp_path):
    """The README's steps for a Ray started by hand: a token, `ray start --head` (the fixture), and `ray job submit`
    of the local example from the repository root, all with RAY_AUTH_MODE=token; a client without it is turned
    away."""
    from wurstfabrik.jobs.cli import write_demo_inputs

    assert (token_head.home / ".ray" / "auth_token").is_file()
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    (checkout / "examples" / "job-local.yaml").write_text((ROOT / "examples" / "job-local.yaml").read_text())
    write_demo_inputs(checkout / "demo")
    pq.write_table(pa.table({"prompt": README_PROMPTS}), checkout / "demo" / "prompts.parquet")  # a short run
    env = token_head.env
    entrypoint = f"cd {checkout} && wurstfabrik run examples/job-local.yaml --no-progress"
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", token_head.address, "--", "bash",
              "-c", entrypoint]
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(submit, env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (summary,) = lines_like(done.stdout, SUMMARY_LINE)  # the job's own lines, as `ray job submit` shows them
    assert summary["counts"] == "3 ok, 0 failed, 0 missing of 3 images" and summary["code"] == "0"
    assert len(lines_like(done.stdout, START_LINE)) == 1
    rows = latest_status(read_manifest(open_output(str(checkout / "demo" / "output-local")))).values()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)


def ray_submit(address: str, env: dict, *entrypoint: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "ray_submit.py"), "--address", address, "--", *entrypoint],
                          env=env, capture_output=True, text=True, timeout=timeout)


EXIT_CODE_CASES = {
    "ok": (["python", "-c", "print('done')"], 0),
    "cli-spec-error": (["wurstfabrik", "run", "no-such-spec.yaml"], 2),  # the real CLI: a spec problem, before Ray
    "exit-3": (["python", "-c", "exit(3)"], 3),
}


@pytest.fixture(scope="module")
def submitted(token_head) -> dict[str, subprocess.CompletedProcess]:
    """Short jobs submitted to the head at the same time, as a scheduler may (each submission spends seconds
    starting processes): `ray job submit` alone of an entrypoint that exits 3, and ray_submit.py of each case."""
    address, env = token_head.address, token_head.token_env
    plain = ["ray", "job", "submit", "--address", address, "--", "python", "-c", "exit(3)"]
    with ThreadPoolExecutor(len(EXIT_CODE_CASES) + 1) as pool:
        alone = pool.submit(subprocess.run, plain, env=env, capture_output=True, text=True, timeout=180)
        cases = {name: pool.submit(ray_submit, address, env, *entrypoint)
                 for name, (entrypoint, _) in EXIT_CODE_CASES.items()}
        return {"ray job submit": alone.result(), **{name: done.result() for name, done in cases.items()}}


@NEEDS_A_HEAD
def test_ray_job_submit_alone_reports_every_failure_as_1(submitted):
    plain = submitted["ray job submit"]
    assert plain.returncode == 1, plain.stdout[-2000:] + plain.stderr[-2000:]


@NEEDS_A_HEAD
@pytest.mark.parametrize("case", EXIT_CODE_CASES)
def test_ray_submit_exits_with_the_entrypoints_code(submitted, case):
    result, code = submitted[case], EXIT_CODE_CASES[case][1]
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"exit code {code}" in result.stderr


def job_status(address: str, env: dict, submission_id: str) -> str:
    status = subprocess.run(["ray", "job", "status", "--address", address, submission_id], env=env,
                            capture_output=True, text=True, timeout=60)
    return status.stdout + status.stderr


@NEEDS_A_HEAD
@pytest.mark.parametrize("when", ["running", "submitting"])
def test_ray_submit_stops_the_job_when_it_is_terminated(token_head, when):
    address, env = token_head.address, token_head.token_env
    process = subprocess.Popen(
        [sys.executable, str(DEPLOY / "ray_submit.py"), "--address", address, "--", "sleep", "300"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        submission_id = re.search(r"submitting job (\S+)", process.stderr.readline()).group(1)
        deadline = time.monotonic() + 300
        while when == "running" and "RUNNING" not in job_status(address, env, submission_id):
            assert process.poll() is None and time.monotonic() < deadline, "the job never ran"
            time.sleep(1)
        process.send_signal(signal.SIGTERM)  # "submitting": while `ray job submit` may still be sending it
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr[-2000:]
    status = job_status(address, env, submission_id)
    assert re.search(r"STOPPED|was stopped", status) or (when == "submitting" and "does not exist" in status), status


def test_ray_submit_without_a_cluster_fails_with_1():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 32}
    env.pop("RAY_ADDRESS", None)
    result = ray_submit(f"http://127.0.0.1:{free_port()}", env, "true", timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ray job submit exited" in result.stderr
