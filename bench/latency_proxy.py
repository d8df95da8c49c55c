"""An S3 proxy that adds a fixed latency to every request, in a process of its own (so its CPU is not counted as the
driver's): `python bench/latency_proxy.py UPSTREAM DELAY_MS COUNTS_JSON PORT`. It prints its endpoint on the first line
and, on SIGTERM, writes the number of requests it forwarded by method to COUNTS_JSON. tests/fault_proxy.py does the
forwarding, with no faults."""

import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fault_proxy import FaultProxy  # noqa: E402


def main() -> None:
    upstream, delay_ms, counts, port = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    proxy = FaultProxy(upstream, share=0.0, delay_s=delay_ms / 1000, port=port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(proxy.endpoint, flush=True)
    while not stop.wait(0.5):
        pass
    proxy.stop()
    counts.write_text(json.dumps(dict(Counter(method for method, _, _ in proxy.requests))))


if __name__ == "__main__":
    main()
