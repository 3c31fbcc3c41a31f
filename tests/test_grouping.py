"""Length groups of the within-visit LSTM: every visit once, and the cheapest cuts."""

from __future__ import annotations

import itertools
import random

import pytest

from ehrplan.plan.grouping import group_shapes, plan_groups


def cost(lengths_desc: list[int], groups: list[tuple[int, int, int]], call: int) -> int:
    return sum((e - s) * length for s, e, length in groups) + call * len(groups)


def brute_force(lengths_desc: list[int], call: int) -> int:
    """The least cost over every way of cutting between distinct lengths."""
    cuts = [i for i in range(1, len(lengths_desc)) if lengths_desc[i] != lengths_desc[i - 1]]
    best = None
    for r in range(len(cuts) + 1):
        for chosen in itertools.combinations(cuts, r):
            bounds = [0, *chosen, len(lengths_desc)]
            groups = [(a, b, lengths_desc[a]) for a, b in itertools.pairwise(bounds)]
            c = cost(lengths_desc, groups, call)
            best = c if best is None else min(best, c)
    return best or 0


@pytest.mark.parametrize("seed", range(30))
def test_groups_cover_every_visit_once_at_the_least_cost(seed: int) -> None:
    rng = random.Random(seed)
    lengths = sorted((rng.randint(1, 12) for _ in range(rng.randint(1, 25))), reverse=True)
    call = rng.choice([0, 3, 10, 40, 500])
    groups = plan_groups(lengths, call)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    for (_, end, _), (start, _, _) in itertools.pairwise(groups):
        assert end == start  # contiguous, no visit twice or lost
    for s, e, length in groups:
        assert e > s and length == lengths[s] == max(lengths[s:e])  # padded to its longest
    assert cost(lengths, groups, call) == brute_force(lengths, call)


def test_call_cost_decides_between_one_group_and_one_per_length() -> None:
    lengths = [9, 9, 7, 4, 4, 4, 1]
    assert plan_groups(lengths, 10**6) == [(0, 7, 9)]
    assert plan_groups(lengths, 0) == [(0, 2, 9), (2, 3, 7), (3, 6, 4), (6, 7, 1)]


def test_group_shapes_sorts_and_skips_empty_visits() -> None:
    assert group_shapes([]) == []
    assert group_shapes([0, 0]) == []
    assert group_shapes([3, 0, 5, 5], call_slots=10**6) == [(3, 5)]
    assert group_shapes([1, 50, 2, 50, 1, 1, 2, 1], call_slots=5) == [(2, 50), (6, 2)]
