"""Stops raised by signals in the driver's main thread."""

import os
import signal
import time

import pytest

from wurstfabrik.jobs.supervisor import RunStopped, Supervisor


def test_a_stop_passes_through_a_librarys_except_exception():
    """SIGTERM arrives while library code runs inside `except Exception` (as Ray Data's statistics update does): the
    stop must reach the run, not be logged and swallowed there."""
    swallowed, before = [], signal.getsignal(signal.SIGTERM)
    with Supervisor(), pytest.raises(RunStopped) as stopped:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at the next bytecode
        except Exception as e:
            swallowed.append(e)
    assert swallowed == [] and stopped.value.exit_code == 143 and stopped.value.reason == "interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
