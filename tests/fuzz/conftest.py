"""The fuzz tier: each test counts the cases it ran (``fuzz_cases`` in the JUnit XML, summed by
bench/fuzz.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzzkit import CaseCount


@pytest.fixture
def cases(request: pytest.FixtureRequest) -> Iterator[CaseCount]:
    count = CaseCount()
    yield count
    request.node.user_properties.append(("fuzz_cases", count.n))
