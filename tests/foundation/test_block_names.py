"""The reversible rule between AzManagers template names and Prefect block names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_azmanagers.blocks import template_block_name, template_name_from_block
from prefect_azmanagers.exceptions import TemplateError

PREFECT_BLOCK_NAME = re.compile(r"[a-z0-9-]+")


@pytest.mark.parametrize(
    ("name", "block_name"),
    [
        ("localcloud-small", "localcloud-small"),
        ("ussc/t107/v4/amd/cbox176", "ussc--t107--v4--amd--cbox176"),
        ("Std_8", "---53td---5f8"),
        ("a-/b", "a---2d--b"),
        ("x--y", "x---2d-y"),
        ("trailing/", "trailing---2f"),
        ("snow☃", "snow----002603"),
    ],
)
def test_documented_examples(name: str, block_name: str) -> None:
    assert template_block_name(name) == block_name
    assert template_name_from_block(block_name) == name


@settings(deadline=None)
@given(st.text(min_size=1))
def test_round_trip_any_name(name: str) -> None:
    block_name = template_block_name(name)
    assert PREFECT_BLOCK_NAME.fullmatch(block_name)
    assert template_name_from_block(block_name) == name


@settings(deadline=None)
@given(st.text(alphabet="ab/-_Z.", min_size=1, max_size=12))
def test_round_trip_names_dense_in_separators(name: str) -> None:
    assert template_name_from_block(template_block_name(name)) == name


@settings(deadline=None)
@given(st.text(min_size=1), st.text(min_size=1))
def test_distinct_names_get_distinct_block_names(a: str, b: str) -> None:
    if a != b:
        assert template_block_name(a) != template_block_name(b)


@pytest.mark.parametrize("bad", ["", None, 7])
def test_empty_or_non_string_name_is_refused(bad) -> None:
    with pytest.raises(TemplateError, match="non-empty string"):
        template_block_name(bad)


@pytest.mark.parametrize("bad", ["a-----b", "---zz", "---4", "----0000", "Upper"])
def test_block_names_the_rule_cannot_make_are_refused(bad: str) -> None:
    with pytest.raises(TemplateError):
        template_name_from_block(bad)
