"""Shard numbering shared by the shard formats: shards/00012.tar and data/00012.parquet are numbered from 0,
and a new shard takes the lowest number no stored shard has (workers.shard_numbers hands them out)."""

from __future__ import annotations

import re

SHARD_DIGITS = 5
_NUMBER = re.compile(r"^(\d+)(?:\.|_stats\.json$)")


def shard_name(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}"


def stored_shard_numbers(output, prefix: str) -> set[int]:
    """Numbers of every shard object (or sidecar) under `prefix`, finished or orphaned."""
    numbers = set()
    for key in output.list(prefix):
        found = _NUMBER.match(key[len(prefix):])
        if found:
            numbers.add(int(found[1]))
    return numbers


def shard_number(uri: str) -> int | None:
    found = _NUMBER.match(uri.rsplit("/", 1)[-1])
    return int(found[1]) if found else None
