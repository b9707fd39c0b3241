"""libvirt cpuset syntax and the choice of dedicated CPUs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cpuset import MAX_CPU_ID, CpuSetSyntaxError, format_cpuset, parse_cpuset
from controller.scheduler import pick_pcpus


@pytest.mark.parametrize(
    ("spec", "cpus"),
    [
        ("0", {0}),
        ("0-3", {0, 1, 2, 3}),
        ("0-3,^2,8", {0, 1, 3, 8}),
        (" 0 - 1 ", {0, 1}),
        ("1, 3 ,5", {1, 3, 5}),
        ("0-3,^2,2", {0, 1, 2, 3}),
        ("^2,0-3", {0, 1, 2, 3}),  # left to right, as libvirt: the range re-adds 2
        ("4-4", {4}),
        (f"{MAX_CPU_ID}", {MAX_CPU_ID}),
    ],
)
def test_parse(spec: str, cpus: set[int]) -> None:
    assert parse_cpuset(spec) == frozenset(cpus)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        ",",
        "0,",
        ",0",
        "a",
        "0-",
        "-1",
        "3-1",
        "^1-2",
        "0-3,^",
        "^ 2",
        "1.5",
        "0x1",
        "²",
        "0--2",
        "0-3,^0,^1,^2,^3",
        f"{MAX_CPU_ID + 1}",
        "0-99999999",
    ],
)
def test_parse_errors(spec: str) -> None:
    with pytest.raises(CpuSetSyntaxError):
        parse_cpuset(spec)


def test_syntax_error_is_a_value_error_naming_the_item() -> None:
    with pytest.raises(ValueError, match=r"bad item 'x'"):
        parse_cpuset("0,x")


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ({0, 1, 3, 8}, "0-1,3,8"),
        ({5}, "5"),
        ({0, 1, 2, 3}, "0-3"),
        ({1, 3, 5}, "1,3,5"),
        (set(), ""),
        ({9, 2, 3, 4, 10}, "2-4,9-10"),
    ],
)
def test_format(cpus: set[int], text: str) -> None:
    assert format_cpuset(cpus) == text


def test_format_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_cpuset({-1, 2})


@settings(max_examples=200, deadline=None)
@given(st.frozensets(st.integers(0, 300), min_size=1))
def test_round_trip(cpus: frozenset[int]) -> None:
    assert parse_cpuset(format_cpuset(cpus)) == cpus


NUMA_2X4 = {cpu: cpu // 4 for cpu in range(8)}  # cell 0: 0-3, cell 1: 4-7


def test_pick_prefers_one_cell_even_if_not_lowest_ids() -> None:
    free = frozenset({0, 1, 4, 5, 6, 7})
    assert pick_pcpus(free, NUMA_2X4, 3, prefer_numa_local=True) == (4, 5, 6)
    assert pick_pcpus(free, NUMA_2X4, 3, prefer_numa_local=False) == (0, 1, 4)


def test_pick_best_fit_cell_keeps_big_cell_whole() -> None:
    free = frozenset({0, 1, 4, 5, 6, 7})
    assert pick_pcpus(free, NUMA_2X4, 2, prefer_numa_local=True) == (0, 1)


def test_pick_spans_fewest_cells() -> None:
    numa = {cpu: cpu // 4 for cpu in range(12)}  # three cells of four
    free = frozenset({0, 4, 5, 6, 8, 9, 10, 11})  # cell sizes 1, 3, 4
    # 6 CPUs: the 4-CPU cell plus the smallest cell that covers the other 2 (cell 1, not 0).
    assert pick_pcpus(free, numa, 6, prefer_numa_local=True) == (4, 5, 8, 9, 10, 11)


def test_pick_edge_cases() -> None:
    assert pick_pcpus(frozenset({1, 2}), NUMA_2X4, 0, prefer_numa_local=True) == ()
    assert pick_pcpus(frozenset({1, 2}), NUMA_2X4, 3, prefer_numa_local=True) is None
    # Unknown NUMA cells form their own group instead of joining a real cell.
    assert pick_pcpus(frozenset({0, 20, 21}), {0: 0}, 2, prefer_numa_local=True) == (20, 21)


@settings(max_examples=200, deadline=None)
@given(
    st.frozensets(st.integers(0, 63), max_size=64),
    st.dictionaries(st.integers(0, 63), st.integers(0, 3)),
    st.integers(0, 70),
    st.booleans(),
)
def test_pick_is_a_valid_minimal_choice(
    free: frozenset[int], numa: dict[int, int], count: int, local: bool
) -> None:
    picked = pick_pcpus(free, numa, count, prefer_numa_local=local)
    if count > len(free):
        assert picked is None
        return
    assert picked is not None
    assert len(picked) == len(set(picked)) == count
    assert set(picked) <= free
    assert list(picked) == sorted(picked)
    assert pick_pcpus(free, numa, count, prefer_numa_local=local) == picked
    if local and count:
        sizes: dict[int, int] = {}
        for cpu in free:
            sizes[numa.get(cpu, -1)] = sizes.get(numa.get(cpu, -1), 0) + 1
        ordered = sorted(sizes.values(), reverse=True)
        fewest = next(i + 1 for i in range(len(ordered)) if sum(ordered[: i + 1]) >= count)
        assert len({numa.get(cpu, -1) for cpu in picked}) == fewest
