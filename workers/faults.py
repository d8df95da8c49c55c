"""Test-only fault switches, read from one environment variable that the driver forwards to the stages.

WURSTFABRIK_TEST_FAULTS='{"kill": {"stage": "decoder", "marker": "/tmp/x"}, "fail_encode": "text"}':
`kill` ends the stage's actor process on its first batch, once per marker file; `fail_encode` makes the
encoder fail images whose prompt contains the text; `hang` makes the named stage wait forever on its first
batch; `slow_encode` ({"seconds": s, "log": folder}) makes each encoder task take s seconds and leave a file
with its start and end times in the folder; `batch_log` (a folder) makes the prior and decoder stages leave a
file per model batch naming the stage, the requested size and the number of images."""

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
