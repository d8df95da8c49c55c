"""Which of millions of ids are among millions of others, and how many differ: Arrow's hash lookups, done in
slices of the ids chosen by their last two bytes and length, so that only about a thirty-second of the set is hashed
at a time and a resume of sixteen million images stays within a gigabyte and a half."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SLICES = 32  # at 16 million ids a slice's hash set is ~50 MB of the resume's peak
COUNT_THREADS = 4  # slices counted at once: each holds its own filtered ids and hash set


def is_member(ids: pa.Array | pa.ChunkedArray, members: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A bool per id: whether it is among `members` (null ids never are). Duplicates in `members` are fine."""
    ids, members = _strings(ids), _strings(members)
    found = np.zeros(len(ids), dtype=bool)
    if len(ids) == 0 or len(members) == 0:
        return found
    id_slices, member_slices = _slice_numbers(ids), _slice_numbers(members)
    for number in range(SLICES):
        in_slice = id_slices == number
        positions = np.flatnonzero(in_slice)
        if len(positions) == 0:
            continue
        these = members.filter(pa.array(member_slices == number))
        if len(these) == 0:
            continue
        # filter, not take: a take on a chunked array joined all its chunks first (the whole id column, per slice)
        hits = pc.is_in(ids.filter(pa.array(in_slice)), value_set=these.combine_chunks())
        found[positions] = pc.fill_null(hits, False).to_numpy(zero_copy_only=False)
    return found


def count_distinct(ids: pa.Array | pa.ChunkedArray) -> int:
    """How many different non-null ids there are, counted slice by slice like is_member, COUNT_THREADS slices at
    a time (Arrow's filter and hashing let go of the GIL: `status` of 16 million images spent 6 of its 11 s here)."""
    ids = _strings(ids)
    slices = _slice_numbers(ids)

    def count(number: int) -> int:
        in_slice = slices == number
        return pc.count_distinct(ids.filter(pa.array(in_slice))).as_py() if in_slice.any() else 0

    with ThreadPoolExecutor(max_workers=COUNT_THREADS) as pool:
        return sum(pool.map(count, range(SLICES)))


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return pa.chunked_array([values], type=values.type) if isinstance(values, pa.Array) else values


def _slice_numbers(values: pa.ChunkedArray) -> np.ndarray:
    """A number in [0, SLICES) per string from its last two bytes and its length, read straight off Arrow's
    buffers."""
    numbers = []
    for chunk in values.chunks:
        if len(chunk) == 0:
            continue
        _, offsets_buffer, data_buffer = chunk.buffers()
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=width)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(1, np.uint8)
        lengths = np.diff(offsets)
        last = data[np.maximum(offsets[1:] - 1, 0)] if len(data) else np.zeros(len(chunk), np.uint8)
        last = np.where(lengths > 0, last, 0)  # an empty string has no last byte of its own
        # The byte before it too: ids that end in a decimal number (row ids) have ten last bytes, which left some
        # slices with twice the ids of others (and the largest slice sets the peak).
        before = data[np.maximum(offsets[1:] - 2, 0)] if len(data) else np.zeros(len(chunk), np.uint8)
        before = np.where(lengths > 1, before, 0)
        # One byte per id: at 16 million ids, int64 numbers for the ids and the members were 256 MB of the peak.
        numbers.append(((last.astype(np.int64) + 7 * before.astype(np.int64) + 31 * lengths) % SLICES)
                       .astype(np.uint8))
    return np.concatenate(numbers) if numbers else np.zeros(0, dtype=np.uint8)
