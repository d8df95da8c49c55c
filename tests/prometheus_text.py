"""Reading a Ray node's metrics export port as Prometheus does: its text format, parsed into samples."""

from __future__ import annotations

import re
import time
import urllib.request

import ray

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics_port() -> int:
    """The metrics export port of the connected Ray's only node (ray.nodes() says where each node exports)."""
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return node["MetricsExportPort"]


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """One scrape: (name, labels, value) of each sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        found = LINE.match(line)
        if found and not line.startswith("#"):
            samples.append((found[1], dict(LABEL.findall(found[2] or "")), float(found[3])))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels` (Ray keeps a series per worker)."""
    return sum(v for n, have, v in samples if n == name and all(have.get(k) == w for k, w in labels.items()))


def scrape_until(port: int, done, timeout: float = 60) -> list:
    """Scrapes every second until `done(samples)` (or the time is up): processes report every few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)
