"""The driver: under the output's lease (jobs.claim, taken before this module's imports of torch and Ray), checks
everything it can before any work (checkpoints, inputs, placement), plans, runs the Ray Data chain read → prior →
decoder → encode → write, and records how the run went."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.store.formats import OutputFormat, open_format
from wurstfabrik.store.formats.shards import shard_number, stored_shard_numbers
from wurstfabrik.store.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    compact,
    image_states,
    input_failures,
    keys_in,
    named_uris,
    read_job_params,
    read_manifest,
    store_part,
    summarize,
    write_job_params,
    write_summary,
)
from wurstfabrik.store.runs import DID_NOT_FINISH, RUNNING, unfinished_runs, write_run
from wurstfabrik.store.storage import Output, StorageError
from wurstfabrik.workers.metrics import MetricLabels, RunMeter, count_store_requests
from wurstfabrik.workers.models import StageModels
from wurstfabrik.workers.reader_stage import read_unit
from wurstfabrik.workers.shard_numbers import ShardNumbers
from wurstfabrik.workers.writer_stage import STORAGE_ERROR, STORAGE_TRANSIENT, manifest_rows, write_images

from .claim import Claim, claim_output, now, submission_id
from .dataflow_stats import operator_stats
from .exit_codes import EXIT_DONE, EXIT_INCOMPLETE, EXIT_REFUSED, storage_exit
from .plan import Plan, Scan, plan_units, scan_inputs
from .provenance import (
    CheckpointChecks,
    checkpoint_change,
    job_id,
    job_params,
    sample_provenance,
    wurstfabrik_version,
)
from .ray_connection import connect_ray
from .recorder import Recorder
from .resources import READ_CPUS, pending_demands
from .run_report import start_line
from .spec import LATER_GENERATION_DEFAULTS, JobSpec
from .stage_chain import (
    append_stages,
    encoder_pool,
    for_workers,
    placed_gpus,
    prompt_problem,
    size_problem,
    stage_runtime_env,
)
from .supervisor import RunStopped, Supervisor, Watchdog

log = logging.getLogger("wurstfabrik")
COMPACT_EVERY_S = 30.0  # merge the manifest's parts this often while a job runs


class JobError(Exception):
    """A job that cannot start or resume as asked; the message says why and what to do."""


@dataclass
class JobResult:
    summary: dict
    output: str
    exit_code: int = EXIT_DONE
    message: str | None = None

    @property
    def failed(self) -> int:
        return self.summary["status"].get("failed", 0)


@dataclass(frozen=True)
class Job:
    """What the stages need to know of the job beyond its spec."""

    job_id: str
    run_id: str
    params: dict  # job params: generation fields and checkpoint identity
    geometry: Geometry
    output_format: OutputFormat


def check_resume(params: dict, output: Output, force: bool, spec: JobSpec) -> None:
    recorded = read_job_params(output)
    if recorded is None or force:
        return
    # Fields added later are recorded only when not at their default: absent means the default, on either side.
    before = {**LATER_GENERATION_DEFAULTS, **recorded.get("params", {})}
    current = {**LATER_GENERATION_DEFAULTS, **params}
    # Outputs written before checkpoint identities were recorded have no such keys; compare what both have.
    compared = {k: v for k, v in current.items() if k in before or not k.endswith("_checkpoint")}
    changed = sorted(k for k in compared if before.get(k) != compared[k])
    if changed:
        changes = "; ".join(checkpoint_change(k, before.get(k), compared[k]) for k in changed)
        raise JobError(f"{spec.output} holds images made with other generation parameters (changed: {changes}); "
                       f"name a new output, or pass --force to regenerate them all")


def ray_job_name() -> str | None:
    """The Ray job submission id when run by `ray job submit`, else the Ray job id once connected."""
    return submission_id() or (ray.get_runtime_context().get_job_id() if ray.is_initialized() else None)


def build_dataset(spec: JobSpec, plan: Plan, job: Job, output: Output, gpus: tuple[float, float],
                  shard_numbers, stage_models=None) -> ray.data.Dataset:
    """The whole dataflow: read tasks, the stages (jobs.stage_chain: two GPU actor pools or one fused pool, then CPU
    encoders), then the writers. `stage_models`: what the actors load instead of the job's checkpoints (run_job)."""
    settings = getattr(output, "settings", None)
    models = stage_models or StageModels.from_job(job.params, job.geometry, settings)
    labels = MetricLabels(job.job_id, job.run_id)
    runtime_env = stage_runtime_env()
    job_info = {"job_id": job.job_id, "run_id": job.run_id, "params": json.dumps(spec.sampler_params(),
                                                                                  sort_keys=True),
                "provenance": sample_provenance(job.params, job.job_id)}
    # One read unit holds images of one size (jobs.plan), so each prior batch the stages cut from it is one size.
    rows = ray.data.from_items([asdict(u) for u in plan.units], override_num_blocks=max(1, len(plan.units))).flat_map(
        read_unit, fn_kwargs={"spec": spec, "settings": settings, "labels": labels}, num_cpus=READ_CPUS,
        runtime_env=runtime_env)
    encoded = append_stages(rows, spec, models, gpus, labels, plan.pending_images)
    if job.output_format.batch_size:
        # A shard format writes one shard per block: blocks of exactly shard_size encoded images (the last one
        # smaller), gathered after encoding, so a writer never holds a shard's raw pixels.
        encoded = encoded.repartition(target_num_rows_per_block=job.output_format.batch_size, strict=True)
    return encoded.map_batches(
        write_images, fn_kwargs={"output": output, "output_format": spec.output_format, "image_format": spec.format,
                                 "shard_size": spec.shard_size, "job": job_info, "shard_numbers": shard_numbers},
        batch_size=None, num_cpus=spec.placement.writer_cpus, compute=encoder_pool(spec), runtime_env=runtime_env)


class Run:
    """One run of a spec against its output: the bookkeeping around the dataflow."""

    def __init__(self, claim: Claim, force: bool, progress: bool):
        self.spec, self.force, self.progress = claim.spec, force, progress
        self.run_id, self.started, self.clock = claim.run_id, claim.started, claim.clock
        self.settings, self.output = claim.settings, claim.output
        self.generated = self.failed = 0
        self.cluster = ""  # which Ray the run is on, in words (jobs.ray_connection)
        self.record: dict = {}
        self.meter: RunMeter | None = None  # its metrics, once planned
        self.stage_models = None  # run_job's stage_models

    def prepare(self) -> tuple[dict, Geometry, Scan]:
        """Everything that writes nothing to the output: checkpoints, the job's params against the output's, inputs."""
        spec = self.spec
        checkpoints = CheckpointChecks(self.settings, spec.checkpoint_cache)
        prior = checkpoints.identity(spec.prior, "prior", spec.prior_text)
        decoder = checkpoints.identity(spec.decoder, "decoder")
        params = job_params(spec, prior, decoder)
        check_resume(params, self.output, self.force, spec)
        geometry = checkpoints.geometry(spec.prior, spec.decoder)
        scan = scan_inputs(spec, size_problem(geometry), prompt_problem(spec.prompt_syntax), self.settings)
        return params, geometry, scan

    def placement(self) -> tuple[float, float]:
        """GPUs per prior and decoder actor; refuses a placement the cluster can never schedule."""
        gpus, problem = placed_gpus(self.spec)
        if problem:
            raise JobError(problem)
        return gpus

    def write_record(self, state: str, **fields) -> None:
        self.record.update(state=state, **fields)
        _write_quietly(self.output, self.record)


def _write_quietly(output: Output, record: dict) -> None:
    try:
        write_run(output, record)
    except StorageError as e:  # a record is for people; failing to write one must not fail the run
        log.warning("could not write the run record: %s", e)


def run_job(spec: JobSpec, force: bool = False, progress: bool = True, stage_models=None) -> JobResult:
    """Generates every image of the spec that its output does not hold yet.

    `stage_models` is the seam for a simulated fleet (bench/fleet.py): an object the prior and decoder actors load
    their pipelines from instead of workers.models.StageModels (load_prior(spec) and load_decoder(spec), each giving
    a pipeline and a compile cache). No spec field or CLI flag reaches it; the run record names it.

    Raises StorageError if the output cannot be written, LeaseHeld if another run holds it; then, under the lease,
    what run_claimed raises."""
    with claim_output(spec) as claim:
        return run_claimed(claim, force, progress, stage_models)


def run_claimed(claim: Claim, force: bool = False, progress: bool = True, stage_models=None) -> JobResult:
    """The run of an entered claim (which gives the lease back when it exits). Raises JobError, input errors,
    CheckpointError or StorageError while checking, before any work; RunStopped if stopped then. Once the checks
    pass, it returns a JobResult whatever happens."""
    run = Run(claim, force, progress)
    run.stage_models = stage_models
    params, geometry, scan = run.prepare()
    run.cluster = connect_ray(run.spec)
    claim.supervisor.reclaim_signals()
    gpus = run.placement()
    return _run_under_lease(run, claim.supervisor, params, geometry, scan, gpus, job_id(params), claim.took_over)


def _run_under_lease(run: Run, supervisor: Supervisor, params: dict, geometry: Geometry, scan: Scan,
                     gpus: tuple[float, float], current_job: str, took_over) -> JobResult:
    spec, output = run.spec, run.output
    run.record = {"run_id": run.run_id, "job_id": current_job, "started": run.started, "host": os.uname().nodename,
                  "pid": os.getpid(), "ray_job": ray_job_name(), "cluster": run.cluster,
                  "wurstfabrik": wurstfabrik_version(), "output": spec.output, "spec": spec.model_dump(mode="json"),
                  "took_over_lease_from": asdict(took_over) if took_over else None}
    if run.stage_models is not None:
        run.record["stage_models"] = type(run.stage_models).__qualname__  # not the job's checkpoints: a simulation
    count_store_requests(MetricLabels(current_job, run.run_id))  # the driver's S3 requests, as the run's from now on
    plan = None
    try:
        with supervisor.critical():
            dead = unfinished_runs(output, run.run_id)
            for record in dead:
                log.warning("run %s (started %s on %s) did not finish: its record still said running",
                            record.get("run_id"), record.get("started"), record.get("host"))
                _write_quietly(output, {**record, "state": DID_NOT_FINISH, "noted_by": run.run_id})
            run.record["unfinished_before"] = [r.get("run_id") for r in dead]
            run.write_record(RUNNING)
        plan = plan_units(spec, scan, read_manifest(output, ["prompt_id", "image_index"], current_job, "ok"))
        new_bad = _unrecorded_bad_rows(plan.bad, output, current_job)
        job = Job(current_job, run.run_id, params, geometry,
                  open_format(spec.output_format, spec.format, spec.shard_size))
        run.record["planned"] = {"total_images": plan.total_images, "done_before": plan.done_images,
                                 "to_generate": plan.pending_images, "bad_input": plan.bad.num_rows}
        run.meter = RunMeter(MetricLabels(current_job, run.run_id), plan.total_images, plan.done_images,
                             plan.bad.num_rows)
        log.info(start_line(spec, plan, run.cluster, run.run_id))
        with supervisor.critical():
            write_job_params(output, {"job_id": current_job, "params": params, "total_images": plan.total_images,
                                      "wurstfabrik": wurstfabrik_version(), "spec": spec.model_dump(mode="json")})
            if new_bad.num_rows:
                _record_bad_rows(output, new_bad, current_job, run.run_id, spec)
                run.meter.recorded(failed=new_bad.num_rows)
            _remove_orphan_shards(job.output_format, output)
        if plan.units:
            _generate(run, supervisor, plan, job, gpus)
        with supervisor.critical():
            _remove_orphan_shards(job.output_format, output)
            compact(output)
        return _finish(run, plan, current_job, None, None)
    except RunStopped as e:
        return _finish(run, plan, current_job, e.reason, e.exit_code)
    except StorageError as e:
        return _finish(run, plan, current_job, f"storage failed: {e}", storage_exit(e.transient))
    except ManifestError as e:  # a damaged manifest object: every rerun would read it again
        return _finish(run, plan, current_job, f"the manifest cannot be read: {e}; restore or remove that object",
                       EXIT_REFUSED)
    except ray.exceptions.RayError as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.debug("the dataflow failed", exc_info=True)
        return _finish(run, plan, current_job, f"the dataflow failed: {cause}", EXIT_INCOMPLETE)


def _generate(run: Run, supervisor: Supervisor, plan: Plan, job: Job, gpus: tuple[float, float]) -> None:
    spec, output = run.spec, run.output
    shard_numbers = None
    if job.output_format.shard_prefix is not None:
        shard_numbers = ShardNumbers.remote(sorted(stored_shard_numbers(output, job.output_format.shard_prefix)))
    watchdog = Watchdog(supervisor, spec.resilience.stall_s, pending_demands)
    watchdog.start()
    bar = tqdm(total=plan.total_images, initial=plan.done_images + plan.bad.num_rows, unit="img",
               disable=not run.progress, desc="images", dynamic_ncols=True)
    last_compact = time.monotonic()
    recorder = Recorder(output)
    loop_cpu = 0.0  # the loop's own CPU seconds (Ray Data's threads and the recorder's are apart)
    try:
        with bar:
            dataset = build_dataset(for_workers(spec), plan, job, output, gpus, shard_numbers, run.stage_models)
            # Closed when the loop is left, by a stop's RunStopped too: Ray Data then ends the execution and reports
            # its statistics while Ray is still connected, not at interpreter exit, where that prints a traceback.
            with closing(iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))) as batches:
                for batch in batches:
                    started = time.thread_time()
                    watchdog.progress()
                    failures = batch.filter(pc.not_equal(batch.column(STORAGE_ERROR), ""))
                    if failures.num_rows:
                        supervisor.stop(f"storage failed: {failures.column(STORAGE_ERROR)[0].as_py()}",
                                        storage_exit(failures.column(STORAGE_TRANSIENT)[0].as_py()))
                    elif batch.num_rows:
                        # Ray hands over a writer task's result once, however often it ran the task: recording
                        # only what arrives here keeps every image in one row and one shard (workers.writer_stage).
                        with supervisor.critical():
                            recorder.add(manifest_rows(batch))
                        statuses = batch.column("status").to_numpy(zero_copy_only=False)
                        run.generated += int((statuses == "ok").sum())
                        run.failed += int((statuses == "failed").sum())
                        run.meter.recorded_statuses(statuses)
                        bar.update(len(statuses))
                        bar.set_postfix(failed=run.failed)
                    supervisor.check()
                    if time.monotonic() - last_compact > COMPACT_EVERY_S:
                        with supervisor.critical():
                            _compact_quietly(output)
                        last_compact = time.monotonic()
                    loop_cpu += time.thread_time() - started
            with supervisor.critical():
                recorder.flush()
        run.record["dataflow"] = operator_stats(dataset)
    finally:
        watchdog.done.set()
        _stop_recording(recorder, supervisor)
        run.record["recording"] = {"parts": recorder.parts, "rows": recorder.rows, "cpu_s": round(recorder.cpu_s, 3),
                                   "loop_cpu_s": round(loop_cpu, 3)}


def _stop_recording(recorder: Recorder, supervisor: Supervisor) -> None:
    """Whatever ended the loop, the rows handed over are stored before anything looks for orphan shards (jobs.
    recorder): flushed after a stop by signal or stall or a failed dataflow, dropped when the lease was lost."""
    with supervisor.critical():
        if not supervisor.keep_records:
            log.warning("not recording %d images: the output's lease is lost", recorder.discard())
        if not recorder.failed:  # else its error ended the loop, and the run reports it
            try:
                recorder.flush()
            except StorageError as e:  # the stop's own reason stands; a rerun makes these images again
                log.warning("could not record every image made: %s", e)
        recorder.close()


def _compact_quietly(output: Output) -> None:
    try:
        compact(output)
    except StorageError as e:  # the parts stay as they are; the next merge picks them up
        log.warning("could not merge the manifest's parts now: %s", e)


def _unrecorded_bad_rows(bad: pa.Table, output: Output, current_job: str) -> pa.Table:
    """Bad rows not already recorded as failed by an earlier run, so reruns do not pile up duplicates."""
    if bad.num_rows == 0:
        return bad
    failed = image_states(output, current_job).failed
    recorded = failed.filter(input_failures(failed))
    return bad.filter(pa.array(~keys_in(bad, recorded)))


def _record_bad_rows(output: Output, bad: pa.Table, current_job: str, run_id: str, spec: JobSpec) -> None:
    n = bad.num_rows
    given = {"job_id": [current_job] * n, "prompt_id": bad.column("prompt_id"),
             "image_index": bad.column("image_index"),
             "params": [json.dumps(spec.sampler_params(), sort_keys=True)] * n, "status": ["failed"] * n,
             "error": bad.column("error"), "source": bad.column("source"), "run_id": [run_id] * n,
             "finished_at": [datetime.now(timezone.utc)] * n}
    arrays = [pa.array(given[f.name], type=f.type) if isinstance(given.get(f.name), list)
              else given[f.name].cast(f.type) if f.name in given else pa.nulls(n, f.type) for f in MANIFEST_SCHEMA]
    store_part(output, pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA))


def _remove_orphan_shards(fmt: OutputFormat, output: Output) -> None:
    """Deletes shards that no manifest row names: written by a run that was killed before it recorded them.
    Runs under the lease with no writer going, so no shard is mid-write."""
    if fmt.shard_prefix is None:
        return
    stored = stored_shard_numbers(output, fmt.shard_prefix)
    if not stored:
        return
    named = {shard_number(u) for u in named_uris(output) if f"/{fmt.shard_prefix}" in u}
    for number in sorted(stored - named):
        log.info("removing shard %d: no manifest row names it (a run stopped before recording it)", number)
        for key in fmt.shard_objects(number):
            output.delete(key)


def _finish(run: Run, plan: Plan | None, current_job: str, stop_reason: str | None,
            stop_code: int | None) -> JobResult:
    """Summary, run record and exit code; a storage outage here still leaves an exit code and a message. A run
    that stopped after every image was recorded ok exits 0, its reason a warning: a rerun would have nothing to do
    (a signal still exits 128 + N, as a scheduler expects)."""
    spec, output = run.spec, run.output
    elapsed = time.perf_counter() - run.clock
    total = plan.total_images if plan else 0
    with_summary = True
    try:
        run_rows = read_manifest(output, ["status", "prior_s", "decoder_s", "write_s"], current_job,
                                 run_id=run.run_id)
        summary = summarize(image_states(output, current_job), run_rows, elapsed_s=elapsed)
    except (StorageError, ManifestError) as e:
        with_summary = False
        summary = {"images": None, "status": {"ok": None, "failed": None}, "bad_input": None,
                   "error": f"could not read the manifest: {e}"}
        if stop_code is None:
            transient = isinstance(e, StorageError) and e.transient
            stop_reason, stop_code = summary["error"], storage_exit(transient)
    counts = summary["status"]
    # Throughput of this run alone: images recorded by earlier runs took none of its time.
    summary.update(job_id=current_job, run_id=run.run_id, total_images=total, generated_now=run.generated,
                   failed_now=run.failed, images_per_s=run.generated / elapsed if elapsed else None,
                   output=spec.output)
    complete = False
    if with_summary:
        summary["missing"] = max(0, total - counts["ok"] - counts["failed"])
        retryable = counts["failed"] - summary["bad_input"]
        complete = plan is not None and not retryable and not summary["missing"]
    else:
        summary["missing"] = None
    exit_code = EXIT_DONE if complete else EXIT_INCOMPLETE
    if stop_code is not None and (stop_code > 128 or not complete):
        exit_code = stop_code
    elif stop_reason is not None:
        log.warning("every image is recorded ok, though %s", stop_reason)
    state = ("finished" if stop_reason is None or exit_code == EXIT_DONE else
             "interrupted" if exit_code > 128 else "stopped")
    if with_summary:
        try:
            write_summary(output, summary)
        except StorageError as e:
            log.warning("could not write the summary: %s", e)
    run.write_record(state, finished=now(), elapsed_s=round(elapsed, 3), generated=run.generated,
                     failed=run.failed, skipped_bad_input=plan.bad.num_rows if plan else 0,
                     images_per_s=summary["images_per_s"], status=counts, missing=summary["missing"],
                     exit_code=exit_code, message=stop_reason)
    return JobResult(summary, spec.output, exit_code, stop_reason)
