"""One encoded image on its way into an output format, with its manifest row and its metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    row: dict[str, Any]  # the image's manifest row as far as it is known: ids, prompt, seed, sizes, status, error
    data: bytes | None  # the encoded image; None when an earlier stage failed it
    metadata: dict[str, Any]  # what the image's .json says: the row's fields and the job's provenance

    @property
    def ok(self) -> bool:
        return self.data is not None and not self.row.get("error")
