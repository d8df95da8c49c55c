"""Tests for store.ids: safe ids, reproducible seeds, keys that stay under images/."""

import re

import pytest

from wurstfabrik.store.ids import (
    MAX_ID_LENGTH,
    SEED_LIMIT,
    InputError,
    explicit_seed,
    image_key,
    image_seed,
    row_id,
    sanitize_id,
)

SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

AWKWARD_IDS = [
    "../../etc/passwd",
    "a/b",
    "a\\b",
    "..",
    ".",
    "...",
    ".hidden",
    " ",
    "héllo wörld",
    "日本語のプロンプト",
    "emoji 🌭",
    "x" * 500,
    "tab\there",
    "new\nline",
    "\ud800lone surrogate",
]


def test_clean_id_is_unchanged():
    assert sanitize_id("prompt-0001_v2.final") == "prompt-0001_v2.final"


def test_integer_id_is_accepted():
    assert sanitize_id(42) == "42"


@pytest.mark.parametrize("raw", AWKWARD_IDS)
def test_awkward_ids_become_one_safe_segment(raw):
    clean = sanitize_id(raw)
    assert SAFE_SEGMENT.fullmatch(clean)
    assert clean not in ("", ".", "..")
    assert "/" not in clean and "\\" not in clean
    assert len(clean) <= MAX_ID_LENGTH
    assert re.search(r"-[0-9a-f]{8}$", clean)


@pytest.mark.parametrize("raw", AWKWARD_IDS + ["plain", "x" * MAX_ID_LENGTH])
def test_sanitize_is_stable_and_idempotent(raw):
    assert sanitize_id(raw) == sanitize_id(raw)
    assert sanitize_id(sanitize_id(raw)) == sanitize_id(raw)


def test_path_traversal_is_neutralized():
    clean = sanitize_id("../../etc/passwd")
    assert clean.startswith("_.._etc_passwd-")


def test_slash_is_replaced():
    assert sanitize_id("a/b").startswith("a_b-")


def test_ids_that_sanitize_alike_do_not_collide():
    similar = ["a/b", "a\\b", "a b", "a?b", "a_b", "a//b", "a é b"]
    assert len({sanitize_id(raw) for raw in similar}) == len(similar)
    unicode_only = ["日本", "中文", "한국어", "ελληνικά"]
    assert len({sanitize_id(raw) for raw in unicode_only}) == len(unicode_only)


def test_long_ids_with_common_prefix_do_not_collide():
    a, b = "x" * 200 + "a", "x" * 200 + "b"
    assert sanitize_id(a) != sanitize_id(b)
    assert len(sanitize_id(a)) == MAX_ID_LENGTH


@pytest.mark.parametrize("raw", [None, ""])
def test_empty_id_is_an_input_error(raw):
    with pytest.raises(InputError, match="id: must not be empty"):
        sanitize_id(raw)


def test_non_string_id_is_an_input_error():
    with pytest.raises(InputError, match="id: must be a string or an integer"):
        sanitize_id(1.5)


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("prompts.parquet", "prompts-000123"),
        ("data/part-01/prompts.parquet", "prompts-000123"),
        ("s3://bucket/in/prompts.parquet", "prompts-000123"),
        ("prompts", "prompts-000123"),
        ("prompts.v2.parquet", "prompts.v2-000123"),
    ],
)
def test_row_id_uses_base_name_and_row_number(file_name, expected):
    assert row_id(file_name, 123) == expected


def test_row_id_sanitizes_the_file_name():
    rid = row_id("/data/my prompts.parquet", 7)
    assert SAFE_SEGMENT.fullmatch(rid)
    assert rid.endswith("-000007")
    assert row_id("/data/my prompts.parquet", 7) == rid


def test_row_id_pads_but_does_not_truncate():
    assert row_id("p.parquet", 12345678) == "p-12345678"


@pytest.mark.parametrize("row_number", [-1, 1.5, True])
def test_row_id_rejects_bad_row_numbers(row_number):
    with pytest.raises(InputError, match="row number"):
        row_id("p.parquet", row_number)


def test_image_seed_is_deterministic_and_in_range():
    seeds = [image_seed(7, f"id-{i}", j) for i in range(50) for j in range(4)]
    assert seeds == [image_seed(7, f"id-{i}", j) for i in range(50) for j in range(4)]
    assert all(0 <= s < SEED_LIMIT for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_image_seed_depends_on_job_seed_id_and_index():
    base = image_seed(0, "a", 0)
    assert image_seed(1, "a", 0) != base
    assert image_seed(0, "b", 0) != base
    assert image_seed(0, "a", 1) != base


def test_image_seed_is_pinned():
    # A change here silently changes every image a resumed job would produce.
    assert image_seed(0, "a", 0) == image_seed(0, "a", 0) == 1811790662130920900


@pytest.mark.parametrize("job_seed", [-1, SEED_LIMIT, "1", True])
def test_image_seed_rejects_bad_job_seed(job_seed):
    with pytest.raises(InputError, match="job seed"):
        image_seed(job_seed, "a", 0)


def test_image_seed_rejects_negative_index():
    with pytest.raises(InputError, match="image index"):
        image_seed(0, "a", -1)


def test_explicit_seed_gives_image_zero_the_seed_itself():
    assert explicit_seed(12345, 0) == 12345
    assert explicit_seed(SEED_LIMIT - 1, 0) == SEED_LIMIT - 1


def test_explicit_seed_derives_later_images():
    later = [explicit_seed(12345, i) for i in range(1, 20)]
    assert later == [explicit_seed(12345, i) for i in range(1, 20)]
    assert all(0 <= s < SEED_LIMIT for s in later)
    assert len(set(later + [12345])) == 20


def test_explicit_seed_accepts_whole_floats():
    assert explicit_seed(5.0, 0) == 5


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, 2**64, 1.5, float("nan"), None, "5", False])
def test_explicit_seed_rejects_bad_seed(seed):
    with pytest.raises(InputError, match="seed"):
        explicit_seed(seed, 0)


def test_image_key_layout():
    key = image_key("prompt-1", 3, "png")
    assert re.fullmatch(r"images/[0-9a-f]{2}/prompt-1_3\.png", key)
    assert image_key("prompt-1", 3, "png") == key


def test_image_key_normalizes_extension():
    assert image_key("a", 0, ".PNG") == image_key("a", 0, "png")


@pytest.mark.parametrize("raw", AWKWARD_IDS + ["plain"])
def test_keys_of_sanitized_ids_stay_under_images(raw):
    key = image_key(sanitize_id(raw), 0, "webp")
    parts = key.split("/")
    assert parts[0] == "images"
    assert len(parts) == 3
    assert ".." not in parts and "." not in parts
    assert key.endswith("_0.webp")


def test_distinct_ids_and_indexes_give_distinct_keys():
    keys = {image_key(pid, i, "png") for pid in ("a", "a_1", "a_10", "a_1_0") for i in (0, 1, 10)}
    assert len(keys) == 12


@pytest.mark.parametrize("prompt_id", ["../x", "a/b", "..", "", "日本"])
def test_image_key_refuses_unsanitized_ids(prompt_id):
    with pytest.raises(InputError, match="not a sanitized id"):
        image_key(prompt_id, 0, "png")


@pytest.mark.parametrize("ext", ["", "p/ng", "../png", "png "])
def test_image_key_refuses_bad_extensions(ext):
    with pytest.raises(InputError, match="extension"):
        image_key("a", 0, ext)
