"""Prompt ids, per-image seeds and object keys: pure functions of the input, so a rerun finds its own work.

InputError, raised for input rows that cannot be used, lives here and is shared by the other job modules.
"""

from __future__ import annotations

import hashlib
import numbers
import re

MAX_ID_LENGTH = 100
HASH_SUFFIX_LENGTH = 8
SEED_LIMIT = 2**63
IMAGES_PREFIX = "images/"

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSION = re.compile(r"[a-z0-9]+")


class InputError(Exception):
    """An input row (id, seed, prompt, size) that cannot be used as given."""


def _sha256(text: str) -> bytes:
    # surrogatepass: a lone surrogate in a raw id must hash, not crash the row.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def sanitize_id(raw: str) -> str:
    """A stable id that is safe as one path segment.

    Characters outside [A-Za-z0-9._-] become `_`, leading dots go, and the result is capped at
    MAX_ID_LENGTH. Whenever anything changed, `-` and 8 hex chars of sha256(raw) are appended, so two
    raw ids that clean up alike still get different ids. Clean ids pass through unchanged, which also
    makes sanitize_id idempotent.
    """
    if isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
        raw = str(raw)
    if raw is None or raw == "":
        raise InputError(f"id: must not be empty (got {raw!r})")
    if not isinstance(raw, str):
        raise InputError(f"id: must be a string or an integer (got {type(raw).__name__})")
    cleaned = _UNSAFE_RUN.sub("_", raw).lstrip(".")
    if cleaned == raw and len(raw) <= MAX_ID_LENGTH:
        return raw
    suffix = _sha256(raw).hex()[:HASH_SUFFIX_LENGTH]
    base = cleaned[: MAX_ID_LENGTH - HASH_SUFFIX_LENGTH - 1] or "id"
    return f"{base}-{suffix}"


def row_id(file_name: str, row_number: int) -> str:
    """The id of a row without an id column: the file's base name without extension, and the row number.

    Only the base name is used so that moving the inputs (say, local to S3) keeps the ids; two input
    files with the same base name in different folders would share ids, so the planner must refuse that.
    """
    if not isinstance(row_number, numbers.Integral) or isinstance(row_number, bool) or row_number < 0:
        raise InputError(f"row number of {file_name!r}: must be an integer >= 0 (got {row_number!r})")
    base = file_name.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, _ = base.rpartition(".")
    if not dot or not stem:
        stem = base
    if not stem:
        raise InputError(f"file name {file_name!r}: has no base name to derive row ids from")
    return f"{sanitize_id(stem)}-{int(row_number):06d}"


def _check_seed(seed: int, what: str) -> int:
    # Seed columns read through NumPy may arrive as floats (a nullable int column); accept whole values.
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise InputError(f"{what}: must be an integer (got {seed!r})")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise InputError(f"{what}: must be in [0, 2**63) (got {seed})")
    return seed


def _check_index(image_index: int) -> int:
    if not isinstance(image_index, numbers.Integral) or isinstance(image_index, bool) or image_index < 0:
        raise InputError(f"image index: must be an integer >= 0 (got {image_index!r})")
    return int(image_index)


def _seed_from(text: str) -> int:
    return int.from_bytes(_sha256(text)[:8], "big") >> 1


def image_seed(job_seed: int, prompt_id: str, image_index: int) -> int:
    """The seed of one image when the row has no seed: 63 bits of sha256 of job seed, id and index."""
    job_seed = _check_seed(job_seed, "job seed")
    image_index = _check_index(image_index)
    # Seed and index are digits, so the first and last ':' delimit the id unambiguously.
    return _seed_from(f"{job_seed}:{prompt_id}:{image_index}")


def explicit_seed(seed: int, image_index: int) -> int:
    """The seed of one image when the row gives a seed.

    Image 0 uses the row's seed itself, so a single image reproduces exactly what that seed gives
    elsewhere; image i > 0 uses 63 bits of sha256("explicit:<seed>:<i>"), different per index.
    """
    seed = _check_seed(seed, "seed")
    image_index = _check_index(image_index)
    if image_index == 0:
        return seed
    return _seed_from(f"explicit:{seed}:{image_index}")


def image_key(prompt_id: str, image_index: int, ext: str) -> str:
    """The object key of one image: images/<2 hex of sha256(id)>/<id>_<index>.<ext>.

    The shard keeps any one folder small. The id must already be sanitized; the index has no `_`,
    so the last `_` splits key names back uniquely.
    """
    if not isinstance(prompt_id, str) or not prompt_id or sanitize_id(prompt_id) != prompt_id:
        raise InputError(f"prompt id {prompt_id!r}: not a sanitized id; pass it through sanitize_id first")
    image_index = _check_index(image_index)
    ext = ext.lower().lstrip(".") if isinstance(ext, str) else ext
    if not isinstance(ext, str) or not _EXTENSION.fullmatch(ext):
        raise InputError(f"extension {ext!r}: must be letters and digits, like 'png'")
    shard = _sha256(prompt_id).hex()[:2]
    return f"{IMAGES_PREFIX}{shard}/{prompt_id}_{image_index}.{ext}"


def sample_key(prompt_id: str, image_index: int) -> str:
    """A WebDataset sample key for one image: `<id>_<index>`, with no dots, since readers split member names at
    the first dot. An id with dots has them replaced and its hash appended, so keys stay unique."""
    if not isinstance(prompt_id, str) or not prompt_id or sanitize_id(prompt_id) != prompt_id:
        raise InputError(f"prompt id {prompt_id!r}: not a sanitized id; pass it through sanitize_id first")
    image_index = _check_index(image_index)
    if "." in prompt_id:
        prompt_id = f"{prompt_id.replace('.', '_')}-{_sha256(prompt_id).hex()[:HASH_SUFFIX_LENGTH]}"
    return f"{prompt_id}_{image_index}"
