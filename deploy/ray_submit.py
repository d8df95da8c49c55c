"""`ray job submit` for schedulers: submits, follows the job to its end, and exits with the entrypoint's own code.

`ray job submit` exits 1 for every failed job and 0 for a stopped one, so cron or Airflow would see wurstfabrik's
2 (fix the spec) and 3 (another run holds the output) as 1, and a stopped run as a success. Arguments are those of
`ray job submit`, passed on unchanged; this script adds the submission id:

    python deploy/ray_submit.py --address http://127.0.0.1:8265 --working-dir job -- wurstfabrik run job.yaml

Exits with the entrypoint's code when it ran; 1 when the job could not be submitted or followed, or failed without
an exit code (its runtime environment could not be set up, the head was lost); 130 or 143 when it was stopped.
SIGINT or SIGTERM here (Ctrl-C, cron's kill, Airflow's on_kill) stops the Ray job first; a second one exits at once.
"""

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

POLL_S = 5.0
LOST_CONTACT_S = 600.0  # how long the dashboard may not answer before the job is given up on
STOP_WAIT_S = 90.0  # covers RAY_JOB_STOP_WAIT_TIME_S (60 in deploy/kuberay) before Ray's SIGKILL


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame) -> None:
    # The second signal gets the default action, so a stop that hangs can still be cut short.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


def say(message: str) -> None:
    print(f"ray_submit: {message}", file=sys.stderr, flush=True)


def ray_command() -> str:
    """The `ray` installed beside this Python (its venv's), else the one on PATH: cron's PATH is short."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def address_argument(args: list[str]) -> str | None:
    """The --address given to `ray job submit`; None leaves it to RAY_ADDRESS, as the CLI does."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--address" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--address="):
            return arg.partition("=")[2]
    return None


def exit_code(status: JobStatus, driver_exit_code: int | None, stop_signal: int = signal.SIGTERM) -> int:
    """What a finished job means to a scheduler, following the entrypoint's own exit code where there is one."""
    if status == JobStatus.SUCCEEDED:
        return 0
    if status == JobStatus.STOPPED:
        return 128 + stop_signal
    return driver_exit_code if driver_exit_code is not None else 1


def follow(address: str | None, submission_id: str, submit_code: int) -> int:
    """Waits for the job to end and returns its exit code; `submit_code` is what `ray job submit` exited with."""
    said_waiting = False
    last_answer = time.monotonic()
    while True:
        try:
            info = JobSubmissionClient(address).get_job_info(submission_id)
            last_answer = time.monotonic()
        except Exception as err:  # whatever the reason the dashboard does not answer, it is retried alike
            if submit_code != 0:
                say(f"ray job submit exited {submit_code} and the cluster has no job {submission_id}: {err}")
                return 1
            if time.monotonic() - last_answer > LOST_CONTACT_S:
                say(f"no answer about job {submission_id} for {LOST_CONTACT_S:.0f} s, giving up: {err}; it may still "
                    f"be running: ray job status {submission_id}")
                return 1
            time.sleep(POLL_S)
            continue
        if info.status.is_terminal():
            code = exit_code(info.status, info.driver_exit_code)
            detail = "" if info.driver_exit_code is not None or info.status != JobStatus.FAILED else f": {info.message}"
            say(f"job {submission_id} {info.status.value}, exit code {code}{detail}")
            return code
        if not said_waiting:
            say(f"the log stream ended while job {submission_id} is {info.status.value}; waiting for it to end "
                f"(ray job logs -f {submission_id} follows it)")
            said_waiting = True
        time.sleep(POLL_S)


def stop(address: str | None, submission_id: str, signum: int, submit: subprocess.Popen | None) -> int:
    """Stops the job and waits for it to end, returning its exit code (128 + signum when it was stopped)."""
    say(f"{signal.Signals(signum).name}: stopping job {submission_id}")
    if submit is not None and submit.poll() is None:
        # Its request may be on the way: once it has exited, the job either exists or never will.
        submit.terminate()
        try:
            submit.wait(timeout=30)
        except subprocess.TimeoutExpired:
            submit.kill()
            submit.wait()
    started = time.monotonic()
    stop_sent = False
    while time.monotonic() - started < STOP_WAIT_S:
        try:
            client = JobSubmissionClient(address)
            info = client.get_job_info(submission_id)
            if info.status.is_terminal():
                return exit_code(info.status, info.driver_exit_code, signum)
            if not stop_sent:
                client.stop_job(submission_id)
                stop_sent = True
        except Exception as err:  # not submitted, or the dashboard does not answer
            if not stop_sent and time.monotonic() - started > 10:
                say(f"could not stop job {submission_id} (it was not submitted, or the cluster does not answer): {err}")
                return 128 + signum
        time.sleep(1.0)
    say(f"job {submission_id} did not end within {STOP_WAIT_S:.0f} s of being stopped")
    return 128 + signum


def main(args: list[str]) -> int:
    if any(arg == "--submission-id" or arg.startswith("--submission-id=") for arg in args):
        say("--submission-id is set by this script; leave it out")
        return 2
    submission_id = f"wurstfabrik-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    address = address_argument(args)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    submit = None
    say(f"submitting job {submission_id}")
    try:
        submit = subprocess.Popen([ray_command(), "job", "submit", "--submission-id", submission_id, *args])
        return follow(address, submission_id, submit.wait())
    except Interrupted as interrupted:
        return stop(address, submission_id, interrupted.signum, submit)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
