"""A simulated fleet: the job's own dataflow, driver, manifest, encoders and writers on a Ray cluster of many
simulated GPU nodes on this machine (ray.cluster_utils.Cluster with logical GPUs), with the prior and decoder
replaced by bench/simulated_engine.py (H200 batch times / --speedup, sleeping, no CPU) through run_job's
stage_models seam, writing to real S3 (rclone or moto on loopback) behind a proxy that adds --latency-ms per request.

    python bench/fleet.py                                   # 64 simulated GPUs, files, rclone, 40 ms, batch 8
    python bench/fleet.py --latency-ms 0 80 --formats files webdataset parquet   # the store off the critical path?
    python bench/fleet.py --batch 8 32                      # the head's CPU per image at two batch sizes
    python bench/fleet.py --engine-only                     # the baseline alone: Ray Data's own cost per image
    python bench/fleet.py --batches-per-block 1 auto        # one GPU batch per Ray Data block, and the default
    python bench/fleet.py --dry-run                         # 2 simulated GPUs, a few dozen images

In one run it measures the simulated engine alone (the same pools through Ray Data, no encoder, writer, store or
manifest) as the baseline, then each job: sustained images/s once warm (10 % to 90 % of its images, by the
manifest's finish times), the driver process's CPU-seconds per image and the Ray head processes' (GCS, raylet,
dashboard: this machine's cluster has them in processes of their own), requests per image at the store (counted by
the proxy), manifest parts stored and left after compaction, Ray Data's per-operator stats (the run record's
`dataflow`), the machine's CPU use, and the cap that held the job below the engine; then `status` and a resume on
the output. Everything shares this machine's cores, and other work may run beside it: ratios are against the
baseline of the same run.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "tests"))  # the S3 servers the tests start (conftest)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The actors unpickle the simulated engine as bench.simulated_engine: every Ray worker needs the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.simulated_engine import SimulatedModels  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (not its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


class Store:
    """rclone or moto on loopback, behind the latency proxy (one proxy per latency)."""

    def __init__(self, kind: str, work: Path):
        import conftest

        self.kind, self.work = kind, work
        if kind == "rclone":
            (work / "s3-root").mkdir(parents=True)
            self.server = conftest.start_rclone(work / "s3-root", work / "s3-work")
            self.upstream, self.process = self.server.endpoint, self.server.process
            self.env = conftest.s3_environment(self.server)
        else:
            port = conftest.free_port()
            log = (work / "moto.log").open("wb")
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                            stdout=log, stderr=subprocess.STDOUT)
            self.upstream = f"http://127.0.0.1:{port}"
            self.env = conftest.moto_environment(conftest.MotoServer(self.upstream, self.process))
            self._wait_for(port)
        self.proxy = None

    def _wait_for(self, port: int) -> None:
        import socket

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("moto did not start")

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=endpoint or self.upstream,
                                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                              region_name="us-east-1")

    def start_proxy(self, latency_ms: float) -> str:
        """A fresh proxy with its own request counts, on the same port each time (the cluster's workers were
        started with its endpoint); returns the endpoint."""
        import conftest

        self.stop_proxy()
        self.port = getattr(self, "port", None) or conftest.free_port()
        self.counts_file = self.work / f"requests-{uuid.uuid4().hex[:8]}.json"
        self.proxy = subprocess.Popen([sys.executable, str(ROOT / "bench" / "latency_proxy.py"), self.upstream,
                                       str(latency_ms), str(self.counts_file), str(self.port)],
                                      stdout=subprocess.PIPE, text=True)
        return self.proxy.stdout.readline().strip()

    def stop_proxy(self) -> dict:
        if self.proxy is None:
            return {}
        self.proxy.terminate()
        self.proxy.wait(timeout=30)
        self.proxy = None
        return json.loads(self.counts_file.read_text())

    def close(self) -> None:
        self.stop_proxy()
        self.process.terminate()
        self.process.wait(timeout=20)


def start_cluster(args):
    """A head that runs no stage (its processes are the head's cost) and `--nodes` workers, each with its share of
    the simulated GPUs and logical CPUs for read, encode and write tasks."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    gpus_per_node = -(-args.gpus // args.nodes)
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=gpus_per_node)
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    return cluster


def head_pids(cluster) -> list[int]:
    return [process.pid for _, process in cluster.head_node.live_processes()]


class CpuSampler(threading.Thread):
    """(wall clock, driver CPU s, head CPU s) every half second while a job runs: the steady state's cost per
    image is the CPU between two samples over the images finished between them, without the fixed start-up."""

    def __init__(self, heads: list[int]):
        super().__init__(daemon=True)
        self.heads, self.samples, self.done = heads, [], threading.Event()

    def sample(self) -> None:
        self.samples.append((time.time(), time.process_time(), sum(cpu_seconds(p) for p in self.heads)))

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()

    def per_image(self, finished: np.ndarray) -> tuple[float | None, float | None]:
        """CPU ms per image of the driver and the head between 10 % and 90 % of the images."""
        finished = np.sort(finished)
        if len(finished) < 10 or len(self.samples) < 3:
            return None, None
        times = np.array([s[0] for s in self.samples])
        first = int(np.searchsorted(times, finished[len(finished) // 10]))
        last = int(np.searchsorted(times, finished[len(finished) * 9 // 10])) - 1
        if last <= first:
            return None, None
        (t0, driver0, head0), (t1, driver1, head1) = self.samples[first], self.samples[last]
        images = int(((finished >= t0) & (finished <= t1)).sum())
        if not images:
            return None, None
        return 1000 * (driver1 - driver0) / images, 1000 * (head1 - head0) / images


def write_prompts(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"prompt": [f"a sausage stand at dusk, take {i}" for i in range(n)]}), path)
    return path


def sustained_rate(times: np.ndarray) -> float | None:
    """Images per second between 10 % and 90 % of the images: once warm, before the tail."""
    times = np.sort(times)
    if len(times) < 10:
        return None
    first, last = times[len(times) // 10], times[len(times) * 9 // 10]
    return (len(times) * 9 // 10 - len(times) // 10) / (last - first) if last > first else None


def engine_alone(args, models: SimulatedModels, n: int, heads: list[int], batch: int, per_block: int | None) -> dict:
    """The simulated pools through Ray Data with nothing after them: the rate the job could reach."""
    import ray

    from wurstfabrik.jobs.stage_chain import block_rows
    from wurstfabrik.workers.decoder_stage import DecoderStage
    from wurstfabrik.workers.prior_stage import PriorStage

    spec = job_spec(args, Path("/nonexistent.parquet"), "unused", "files", batch, per_block)
    rows = ray.data.from_items([{"prompt_id": f"p{i}", "prompt": "x", "negative_prompt": "", "seed": i,
                                 "height": args.size, "width": args.size} for i in range(n)])
    place = spec.placement
    actor = {"fn_constructor_kwargs": {"spec": spec, "models": models, "labels": None}, "batch_size": None}
    rows_per_block = block_rows(place, n)
    blocks = rows.repartition(target_num_rows_per_block=rows_per_block)
    decoded = blocks.map_batches_internal(PriorStage, compute=ray.data.ActorPoolStrategy(size=place.prior_actors),
                                          num_gpus=1, num_cpus=place.prior_cpus, **actor).map_batches_internal(
        DecoderStage, compute=ray.data.ActorPoolStrategy(size=place.decoder_actors), num_gpus=1,
        num_cpus=place.decoder_cpus, **actor)
    arrivals = []
    sampler = CpuSampler(heads)
    sampler.start()
    start = time.perf_counter()
    for block in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        arrivals += [time.time()] * block.num_rows
    sampler.done.set()
    sampler.join()
    driver_ms, head_ms = sampler.per_image(np.array(arrivals))
    # The driver here is Ray Data's executor and Ray's client alone: no loop of ours, no recording.
    return {"batch": batch, "batches_per_block": per_block or "auto", "rows_per_block": rows_per_block,
            "images": len(arrivals), "elapsed_s": round(time.perf_counter() - start, 2),
            "sustained_images_per_s": _round(sustained_rate(np.array(arrivals))),
            "driver_cpu_ms_per_image_steady": _round(driver_ms), "head_cpu_ms_per_image_steady": _round(head_ms)}


def job_spec(args, prompts: Path, output: str, output_format: str, batch: int, per_block: int | None):
    from wurstfabrik.jobs.spec import JobSpec

    prior, decoder = args.checkpoints
    half = args.gpus // 2
    return JobSpec.from_dict({
        "prompts": str(prompts), "output": output, "prior": str(prior), "decoder": str(decoder),
        "height": args.size, "width": args.size, "format": args.image_format, "output_format": output_format,
        "shard_size": args.shard_size,
        "placement": {"prior_actors": half, "decoder_actors": args.gpus - half, "prior_gpus": 1.0,
                      "decoder_gpus": 1.0, "prior_cpus": 0.01, "decoder_cpus": 0.01, "writer_cpus": 0.25,
                      "prior_batch_size": batch, "decoder_batch_size": batch, "batches_per_block": per_block,
                      "max_restarts": 0},
        "resilience": {"stall_s": 300.0}})


def run_job_measured(args, store: Store, cluster, models: SimulatedModels, prompts: Path, output_format: str,
                     latency_ms: float, batch: int, per_block: int | None) -> dict:
    from wurstfabrik.jobs.driver import run_job
    from wurstfabrik.jobs.stage_chain import block_rows
    from wurstfabrik.jobs.status import status_report
    from wurstfabrik.store.manifest import part_keys, read_manifest
    from wurstfabrik.store.runs import read_runs
    from wurstfabrik.store.storage import open_output

    store.start_proxy(latency_ms)
    servers_before = cpu_seconds(store.proxy.pid) + cpu_seconds(store.process.pid)
    bucket = f"fleet-{uuid.uuid4().hex[:8]}"
    store.client().create_bucket(Bucket=bucket)
    spec = job_spec(args, prompts, f"s3://{bucket}/out", output_format, batch, per_block)
    heads = head_pids(cluster)
    head_before = sum(cpu_seconds(p) for p in heads)
    busy_before, total_before = machine_busy()
    sampler = CpuSampler(heads)
    sampler.start()
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    try:
        result = run_job(spec, progress=False, stage_models=models)
    finally:
        sampler.done.set()
        sampler.join()
    driver_cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    busy, total = machine_busy()
    head_cpu = sum(cpu_seconds(p) for p in heads) - head_before
    servers_cpu = cpu_seconds(store.proxy.pid) + cpu_seconds(store.process.pid) - servers_before
    requests = store.stop_proxy()
    store.start_proxy(latency_ms)  # what follows is not the job's: counted apart
    output = open_output(spec.output)
    made = result.summary["generated_now"]
    record = next(r for r in read_runs(output) if r.get("run_id") == result.summary["run_id"])
    table = read_manifest(output, ["finished_at", "write_s"], result.summary["job_id"], "ok")
    finished = pc.cast(table.column("finished_at"), pa.int64()).to_numpy().astype(np.float64) / 1e6
    row = {"format": output_format, "latency_ms": latency_ms, "batch": batch,
           "batches_per_block": per_block or "auto", "rows_per_block": block_rows(spec.placement, args.images),
           "images": made,
           "exit_code": result.exit_code, "elapsed_s": round(wall, 2),
           "sustained_images_per_s": _round(sustained_rate(finished)),
           "driver_cpu_s": round(driver_cpu, 2), "driver_cpu_ms_per_image": _round(1000 * driver_cpu / max(1, made)),
           "head_cpu_s": round(head_cpu, 2), "head_cpu_ms_per_image": _round(1000 * head_cpu / max(1, made)),
           **dict(zip(("driver_cpu_ms_per_image_steady", "head_cpu_ms_per_image_steady"),
                      map(_round, sampler.per_image(finished)), strict=True)),
           "machine_cpu_busy": round((busy - busy_before) / max(1e-9, total - total_before), 3),
           # Where the machine's CPU went: the driver, the head, the S3 server and proxy, and the rest (the stage
           # actors, read, encode and write tasks, the worker nodes' raylets, and whatever else ran here).
           "machine_cpu_s": round(busy - busy_before, 1), "store_and_proxy_cpu_s": round(servers_cpu, 1),
           "requests": requests, "requests_per_image": _round(sum(requests.values()) / max(1, made)),
           "write_s_per_image": _round(float(np.mean(table.column("write_s").to_numpy()))) if made else None,
           "manifest_parts_stored": (record.get("recording") or {}).get("parts"),
           "driver_loop_cpu_ms_per_image": _round(1000 * (record.get("recording") or {}).get("loop_cpu_s", 0)
                                                  / max(1, made)),
           "recorder_cpu_ms_per_image": _round(1000 * (record.get("recording") or {}).get("cpu_s", 0) / max(1, made)),
           "manifest_parts_left": len(part_keys(output)), "dataflow": record.get("dataflow")}
    start = time.perf_counter()
    status_report(spec.output)
    row["status_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    again = run_job(spec, progress=False, stage_models=models)
    row["resume_s"] = round(time.perf_counter() - start, 2)
    row["resume_made"] = again.summary["generated_now"]
    store.stop_proxy()
    return row


def cap(row: dict, engine_rate: float | None, cores: int) -> str:
    """What held the job below the engine, from what the run measured."""
    rate = row["sustained_images_per_s"]
    if rate is None or engine_rate is None:
        return "unknown (too few images to measure a sustained rate)"
    if rate >= 0.9 * engine_rate:
        return "GPU-bound: the job keeps up with the simulated engine (≥ 0.9×)"
    wall = row["elapsed_s"]
    if row["driver_cpu_s"] / wall >= 0.8:
        return f"driver-bound: the driver process used {row['driver_cpu_s'] / wall:.0%} of a core"
    if row["machine_cpu_busy"] >= 0.85:
        return (f"CPU-bound: this machine's {cores} cores were {row['machine_cpu_busy']:.0%} busy (the stage "
                f"processes, encoders, writers, servers and proxy share them; the driver used "
                f"{row['driver_cpu_s'] / wall:.0%} of one)")
    if row["write_s_per_image"] and row["latency_ms"] and row["write_s_per_image"] > row["latency_ms"] / 1000 / 2:
        return f"store-bound: writers spent {row['write_s_per_image'] * 1000:.0f} ms per image on the store"
    return "writer-bound (the writers' and encoders' tasks, with CPU to spare)"


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=64, help="simulated GPUs, one actor each: half prior, half "
                                                             "decoder (default 64)")
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes they are spread over (default 4)")
    parser.add_argument("--cpus-per-node", type=float, default=4, help="logical CPUs per node for read, encode and "
                                                                     "write tasks (default 4)")
    parser.add_argument("--speedup", type=float, default=1.0, help="divides the H200 batch times (default 1)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[40.0])
    parser.add_argument("--formats", nargs="+", default=["files"], choices=["files", "webdataset", "parquet"])
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="prior and decoder batch sizes")
    parser.add_argument("--batches-per-block", nargs="+", default=[None], type=_per_block,
                        help="prior batches per Ray Data block: numbers or auto (default auto)")
    parser.add_argument("--images", type=int, default=3000, help="images per job (default 3000)")
    parser.add_argument("--store", choices=["rclone", "moto"], default="rclone")
    parser.add_argument("--full-size", action="store_true", help="1024² images (default 128²: small, so that "
                                                                 "encoding does not hide the control plane)")
    parser.add_argument("--image-format", default="jpeg", choices=["jpeg", "png", "webp"])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--engine-only", action="store_true", help="only the simulated engine through Ray Data "
                                                                    "(its rate and the driver's CPU at that rate)")
    parser.add_argument("--dry-run", action="store_true", help="2 simulated GPUs, 48 images, 10× speed-up")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.gpus, args.nodes, args.cpus_per_node, args.images, args.speedup = 2, 1, 2, 48, 10.0
        args.shard_size = min(args.shard_size, 16)
    args.size = 1024 if args.full_size else 128
    return args


def _per_block(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a number ≥ 1 or auto, not {value!r}")
    return int(value)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    from wurstfabrik.pipeline.tiny import write_tiny_checkpoints

    cores = os.cpu_count()
    result = {"machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}",
              "date": datetime.date.today().isoformat(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                     for k, v in vars(args).items()}, "jobs": []}
    models = SimulatedModels(speedup=args.speedup)
    half = args.gpus // 2
    result["engine_nominal_images_per_s"] = round(models.images_per_s(half, args.gpus - half), 1)
    print(f"machine: {result['machine']}; {args.gpus} simulated GPUs on {args.nodes} nodes, speed-up "
          f"{args.speedup:g}: nominal {result['engine_nominal_images_per_s']} images/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        work = Path(tmp)
        args.checkpoints = write_tiny_checkpoints(work / "tiny")  # the driver checks and pins them; no actor loads
        prompts = write_prompts(work / "prompts.parquet", args.images)
        store = Store(args.store, work)
        for name, value in store.env.items():  # before the cluster starts: its workers inherit it
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cluster = None
        try:
            # Every job's proxy listens on one port, whose endpoint the cluster's workers inherit when it starts.
            os.environ["AWS_ENDPOINT_URL"] = store.start_proxy(0)
            store.stop_proxy()
            cluster = start_cluster(args)
            shapes = [(batch, per_block) for batch in args.batch for per_block in args.batches_per_block]
            engines = {}
            for batch, per_block in shapes:
                engine = engines[batch, per_block] = engine_alone(args, models, args.images, head_pids(cluster), batch,
                                                                  per_block)
                print(f"engine alone, batch {batch}, {engine['rows_per_block']} rows per block: "
                      f"{engine['sustained_images_per_s']} images/s sustained ({engine['images']} images in "
                      f"{engine['elapsed_s']} s); steady CPU per image: driver (Ray Data and Ray alone) "
                      f"{engine['driver_cpu_ms_per_image_steady']} ms, "
                      f"head {engine['head_cpu_ms_per_image_steady']} ms",
                      flush=True)
            result["engines"] = list(engines.values())
            result["engine"] = result["engines"][0]
            for latency in [] if args.engine_only else args.latency_ms:
                for output_format in args.formats:
                    for batch, per_block in shapes:
                        row = run_job_measured(args, store, cluster, models, prompts, output_format, latency, batch,
                                               per_block)
                        row["cap"] = cap(row, engines[batch, per_block]["sustained_images_per_s"], cores)
                        result["jobs"].append(row)
                        report(row)
                        if args.json:
                            args.json.write_text(json.dumps(result, indent=2, default=str))
        finally:
            if cluster is not None:
                ray.shutdown()
                cluster.shutdown()
            store.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def report(row: dict) -> None:
    print(f"\njob: {row['format']}, {row['latency_ms']:g} ms per request, batch {row['batch']}, "
          f"{row['rows_per_block']} rows per block: "
          f"{row['images']} images in {row['elapsed_s']} s, {row['sustained_images_per_s']} images/s sustained "
          f"(exit {row['exit_code']})")
    print(f"  CPU per image, whole run (steady, 10-90 %): driver {row['driver_cpu_ms_per_image']} ms "
          f"({row['driver_cpu_ms_per_image_steady']} ms), Ray head {row['head_cpu_ms_per_image']} ms "
          f"({row['head_cpu_ms_per_image_steady']} ms); machine CPUs {row['machine_cpu_busy']:.0%} busy")
    print(f"  machine CPU {row['machine_cpu_s']} s: driver {row['driver_cpu_s']}, head {row['head_cpu_s']}, S3 server "
          f"and proxy {row['store_and_proxy_cpu_s']}, the rest (stage processes, tasks, other work) "
          f"{row['machine_cpu_s'] - row['driver_cpu_s'] - row['head_cpu_s'] - row['store_and_proxy_cpu_s']:.1f}")
    print(f"  of the driver's: its loop {row['driver_loop_cpu_ms_per_image']} ms, the recorder's threads "
          f"{row['recorder_cpu_ms_per_image']} ms, the rest Ray Data's executor, Ray's client and the planning")
    print(f"  store: {row['requests_per_image']} requests per image {row['requests']}; writers "
          f"{row['write_s_per_image']} s per image")
    print(f"  manifest: {row['manifest_parts_stored']} parts stored, {row['manifest_parts_left']} left after "
          f"compaction; status {row['status_s']} s, resume {row['resume_s']} s ({row['resume_made']} made)")
    for op in row["dataflow"] or []:
        print(f"    {op['operator'][:60]:60s} tasks {op.get('tasks')}, busy {op.get('busy_s')} s, "
              f"scheduling {op.get('mean_scheduling_s')} s")
    print(f"  cap: {row['cap']}", flush=True)


if __name__ == "__main__":
    main()
