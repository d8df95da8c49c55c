"""Every S3 request a process sends, by S3 operation, and whether it repeats one that failed: told to one listener
(workers.metrics exports them), so the store itself knows nothing of Ray or of metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable

# (operation, is_retry): the S3 API operation (PutObject, GetObject, ...) and whether the request repeats a failed one
RequestListener = Callable[[str, bool], None]

_listener: RequestListener | None = None
_repeat = threading.local()


def listen(listener: RequestListener | None) -> None:
    """Tells `listener` of every S3 request this process sends from now on (None: tell no one)."""
    global _listener
    _listener = listener


def repeating() -> None:
    """Called before a call that failed is made again (store.retry): its first request is a retry."""
    _repeat.pending = True


def on_request_created(request, operation_name: str, **_) -> None:
    """botocore's `request-created` event, once per HTTP request; botocore's own retries carry attempt > 1."""
    attempt = request.context.get("retries", {}).get("attempt", 1)
    retry = attempt > 1 or getattr(_repeat, "pending", False)
    _repeat.pending = False
    listener = _listener
    if listener is not None:
        listener(operation_name, retry)
