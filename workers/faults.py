"""Test-only fault switches, read from one environment variable that the driver forwards to the stages.

WURSTFABRIK_TEST_FAULTS='{"kill": {"stage": "decoder", "marker": "/tmp/x"}, "fail_encode": "text"}':
`kill` ends the stage's actor process on its first batch, once per marker file; `fail_encode` makes the
writer fail to encode images whose prompt contains the text."""

import json
import os
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


def fails_encoding(prompt: str) -> bool:
    text = _faults().get("fail_encode")
    return bool(text) and text in prompt
