"""Stage selection over the canonical order."""

from __future__ import annotations

import pytest

from bezoar_jobs.errors import BadInput
from bezoar_jobs.pipeline import CANONICAL, STAGES, levels, select

DATA = ["generate-lamini", "generate-evol", "generate-orca", "filter-lamini", "filter-evol", "filter-orca"]


def test_canonical_order_starts_with_the_data_stages():
    assert list(CANONICAL[:6]) == DATA


def test_from_until_are_inclusive():
    assert select("generate-orca", "filter-evol") == ["generate-orca", "filter-lamini", "filter-evol"]
    assert select(until="generate-lamini") == ["generate-lamini"]
    assert select() == list(CANONICAL)


def test_only_keeps_canonical_order():
    assert select(only=["filter-orca", "generate-lamini"]) == ["generate-lamini", "filter-orca"]


@pytest.mark.parametrize("kw", [{"from_": "nope"}, {"only": ["x"]}, {"from_": "filter-orca", "until": "generate-lamini"},
                                {"only": ["generate-evol"], "from_": "generate-evol"}])
def test_bad_selection(kw):
    with pytest.raises(BadInput):
        select(**kw)


def test_levels_respect_inputs():
    waves = levels(DATA)
    assert waves[0] == ["generate-lamini", "generate-evol", "generate-orca"]
    assert waves[1] == ["filter-lamini", "filter-evol", "filter-orca"]
    # inputs outside the selection count as already committed
    assert levels(["filter-evol"]) == [["filter-evol"]]
    for name in CANONICAL:
        for inp in STAGES[name].inputs:
            assert CANONICAL.index(inp) < CANONICAL.index(name)
