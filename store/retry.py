"""Riding out an S3 outage: which errors are worth retrying, and a loop that retries them with backoff until a
deadline, so a failover or a throttling burst of a minute costs a pause, not a run."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .requests import repeating

log = logging.getLogger("wurstfabrik.storage")
T = TypeVar("T")

DEFAULT_OUTAGE_S = 60.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
# What S3 and its look-alikes answer while failing over, overloaded or throttling.
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded", "OperationAborted",
}
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def is_transient(err: BaseException) -> bool:
    """An error that a later attempt of the same request may not meet: the endpoint away, slow or throttling."""
    if isinstance(err, (BotoConnectionError, EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                        IncompleteReadError, ResponseStreamingError, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
    return False


def retry_transient(call: Callable[[], T], outage_s: float, what: str) -> T:
    """`call()`, retried with exponential backoff (full jitter) while it fails transiently, for up to `outage_s`
    seconds from the first failure; the last error is raised when that time is up."""
    first_failure = None
    delay = FIRST_DELAY_S
    while True:
        try:
            result = call()
        except Exception as err:
            if not is_transient(err):
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                log.warning("storage: %s failed (%s); retrying for up to %.0f s", what, type(err).__name__, outage_s)
            left = outage_s - (now - first_failure)
            if left <= 0:
                raise
            time.sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(delay * 2, MAX_DELAY_S)
            repeating()
            continue
        if first_failure is not None:
            log.warning("storage: %s succeeded after %.1f s of retries", what, time.monotonic() - first_failure)
        return result
