"""The agent's CPU sets: configuration keys and flags, and resolution against online CPUs."""

from __future__ import annotations

import pytest

from agent import config as config_mod
from agent.tuning import cpusets
from common.errors import InvalidRequest

ONLINE = frozenset(range(8))
BASE = {"host_id": "hv1", "libvirt_uri": "test:///default"}


def test_defaults_all_online_cpus_shared_none_dedicated() -> None:
    sets = cpusets.resolve(ONLINE)
    assert sets.shared == ONLINE
    assert sets.dedicated == frozenset()
    assert sets.reserved == frozenset()
    assert sets.allowed() == ONLINE


def test_shared_defaults_to_what_is_left() -> None:
    sets = cpusets.resolve(ONLINE, dedicated="2-5", reserved="7")
    assert sets.dedicated == {2, 3, 4, 5}
    assert sets.reserved == {7}
    assert sets.shared == {0, 1, 6}
    assert sets.allowed() == {0, 1, 2, 3, 4, 5, 6}


def test_explicit_sets_and_libvirt_syntax() -> None:
    sets = cpusets.resolve(ONLINE, dedicated="0-7,^0,^1", shared="0", reserved="1")
    assert sets.dedicated == {2, 3, 4, 5, 6, 7}
    assert sets.shared == {0}
    assert sets.reserved == {1}


def test_empty_strings_mean_empty_sets() -> None:
    sets = cpusets.resolve(ONLINE, dedicated="", reserved=" ")
    assert sets.dedicated == frozenset() and sets.reserved == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dedicated": "2-5", "shared": "5-7"}, "overlap on CPU(s) 5"),
        ({"dedicated": "1", "reserved": "1"}, "overlap on CPU(s) 1"),
        ({"dedicated": "6-9"}, "CPU(s) 8-9 are not online"),
        ({"dedicated": "0-7"}, "no CPU is left for shared VMs"),
        ({"dedicated": "0-3", "reserved": "4-7"}, "no CPU is left"),
        ({"dedicated": "3-1"}, "reversed range"),
        ({"shared": "x"}, "bad item"),
    ],
)
def test_bad_sets_are_refused_with_the_reason(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        cpusets.resolve(ONLINE, **kwargs)
    assert fragment in err.value.message


def test_no_online_cpu() -> None:
    with pytest.raises(InvalidRequest):
        cpusets.resolve(frozenset())


def test_config_file_keys_and_defaults() -> None:
    cfg = config_mod.resolve({**BASE}, {}, {})
    assert (cfg.dedicated_cpus, cfg.shared_cpus, cfg.reserved_cpus) == (None, None, None)
    cfg = config_mod.resolve(
        {**BASE, "dedicated_cpus": "2-7", "shared_cpus": " 0-1 ", "reserved_cpus": ""}, {}, {}
    )
    assert (cfg.dedicated_cpus, cfg.shared_cpus, cfg.reserved_cpus) == ("2-7", "0-1", "")


def test_config_flags_override_the_file() -> None:
    cfg = config_mod.load(
        [
            "--host-id",
            "hv1",
            "--libvirt-uri",
            "test:///default",
            "--dedicated-cpus",
            "1",
            "--shared-cpus",
            "0",
        ],
        {},
    )
    assert cfg.dedicated_cpus == "1" and cfg.shared_cpus == "0"


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"dedicated_cpus": "1-3", "shared_cpus": "3"}, "overlap"),
        ({"dedicated_cpus": 3}, "expected a CPU list string"),
        ({"reserved_cpus": "0-"}, "bad item"),
    ],
)
def test_config_refuses_bad_sets(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        config_mod.resolve({**BASE, **values}, {}, {})
    assert fragment in err.value.message
