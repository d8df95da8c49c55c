"""Test-only fault switches, read from one environment variable that the driver forwards to the stages.

WURSTFABRIK_TEST_FAULTS='{"kill": {"stage": "decoder", "marker": "/tmp/x"}, "fail_encode": "text"}':
`kill` ends the stage's actor process on its first batch, once per marker file; `fail_encode` makes the
encoder fail images whose prompt contains the text; `hang` makes the named stage wait forever on its first
batch; `slow_encode` ({"seconds": s, "log": folder}) makes each encoder task take s seconds and leave a file
with its start and end times in the folder; `batch_log` (a folder) makes the prior and decoder stages leave a
file per model batch naming the stage, the requested size and the number of images.

`kill_writer` ({"after": "store" | "return", "marker": path, "regroup": bool}) ends the process of the first
writer task that gets there, once per marker file, in which it leaves the ids and URIs of the images it stored:
after it stored its images, or once its result is ready but before Ray has it. Ray then runs the task again, as
after losing its node. With `regroup`, each attempt claims its shard number under a key of its own, as if the
rerun carried a regrouped block: the rerun then stores its images in another shard than the lost attempt."""

import json
import os
import time
import uuid
from pathlib import Path

FAULTS_ENV = "WURSTFABRIK_TEST_FAULTS"


def _faults() -> dict:
    return json.loads(os.environ.get(FAULTS_ENV) or "{}")


def maybe_kill(stage: str) -> None:
    kill = _faults().get("kill")
    if not kill or kill.get("stage") != stage:
        return
    marker = Path(kill["marker"])
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os._exit(1)


def maybe_kill_writer(point: str, rows: list[dict]) -> None:
    kill = _faults().get("kill_writer")
    if not kill or kill.get("after") != point:
        return
    try:
        with open(kill["marker"], "x") as marker:
            json.dump([{name: row[name] for name in ("prompt_id", "image_index", "uri")} for row in rows], marker)
    except FileExistsError:
        return
    os._exit(1)


def attempt_key(batch_key: str) -> str:
    """The key a writer attempt claims its shard number under: its batch's, or one of its own under `regroup`."""
    kill = _faults().get("kill_writer")
    return f"{batch_key}/{uuid.uuid4().hex}" if kill and kill.get("regroup") else batch_key


def maybe_hang(stage: str) -> None:
    if _faults().get("hang") == stage:
        while True:
            time.sleep(60)


def maybe_slow_encoding() -> None:
    slow = _faults().get("slow_encode")
    if not slow:
        return
    start = time.time()
    time.sleep(float(slow["seconds"]))
    Path(slow["log"], f"{uuid.uuid4().hex}.txt").write_text(f"{os.getpid()} {start} {time.time()}")


def fails_encoding(prompt: str) -> bool:
    text = _faults().get("fail_encode")
    return bool(text) and text in prompt


def record_batch(stage: str, height: int, width: int, images: int) -> None:
    folder = _faults().get("batch_log")
    if folder:
        Path(folder, f"{stage}-{uuid.uuid4().hex}.json").write_text(
            json.dumps({"stage": stage, "height": height, "width": width, "images": images}))
