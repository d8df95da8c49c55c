"""Tests for store.membership: the sliced lookup answers exactly what one big pc.is_in answers."""

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from wurstfabrik.store.membership import count_distinct, is_member


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
def test_sliced_membership_equals_a_plain_lookup(kind):
    rng = random.Random(5)
    pool = [f"id-{rng.randrange(10**6)}{'.x' * rng.randrange(2)}" for _ in range(5000)] + ["", "é", "a" * 300]
    ids = pa.chunked_array([pa.array([rng.choice(pool) if rng.random() > 0.05 else None for _ in range(3000)],
                                     kind) for _ in range(3)])
    members = pa.chunked_array([pa.array(rng.sample(pool, 2500) + pool[:10], kind), pa.array([], kind)])
    expected = pc.fill_null(pc.is_in(ids, value_set=members.combine_chunks()), False).to_numpy()
    got = is_member(ids, members)
    assert got.dtype == bool and np.array_equal(got, expected) and 0 < got.sum() < len(got)
    assert np.array_equal(is_member(ids.slice(1000, 4000), members), expected[1000:5000])  # sliced chunks
    assert count_distinct(ids) == pc.count_distinct(ids).as_py()


def test_nothing_is_a_member_of_nothing():
    assert is_member(pa.array(["a"]), pa.array([], pa.string())).tolist() == [False]
    assert is_member(pa.array([], pa.string()), pa.array(["a"])).tolist() == []
