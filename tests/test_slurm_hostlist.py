"""SLURM's compressed node and task lists, expanded in SLURM's order (pure functions: the unit layer).

test_slurm_jobs.py checks the same parser against a real ``scontrol show hostnames``.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.slurm.errors import SlurmEnvError
from launcher.slurm.hostlist import expand_hostlist, expand_tasks_per_node

pytestmark = pytest.mark.unit

EXPANSIONS = [
    pytest.param("n1", ["n1"], id="one-plain-name"),
    pytest.param("n[1-3]", ["n1", "n2", "n3"], id="a-range"),
    pytest.param("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"], id="zero-padding-kept"),
    pytest.param("gpu[001-002,010]", ["gpu001", "gpu002", "gpu010"], id="list-inside-brackets"),
    pytest.param("n[9-10]", ["n9", "n10"], id="range-grows-a-digit"),
    pytest.param("a[1-2],b[3,5],login", ["a1", "a2", "b3", "b5", "login"], id="several-groups"),
    pytest.param(
        "rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"], id="first-bracket-slowest"
    ),
    pytest.param("node-a[1-2]x", ["node-a1x", "node-a2x"], id="text-after-the-bracket"),
]

UNREADABLE = [
    pytest.param("", id="empty"),
    pytest.param("n[1-", id="unbalanced-bracket"),
    pytest.param("n[a-b]", id="letters-in-a-range"),
    pytest.param("n[3-1]", id="range-runs-backwards"),
    pytest.param("n[1-2]]", id="stray-closing-bracket"),
    pytest.param("n[[1]]", id="nested-brackets"),
    pytest.param("a,,b", id="empty-entry-between-commas"),
    pytest.param("n[1-2,]", id="empty-item-in-brackets"),
    pytest.param("n[0-999999]", id="implausibly-long-range"),
]

TASKS_PER_NODE = [
    pytest.param("4", [4], id="one-node"),
    pytest.param("2(x3),1", [2, 2, 2, 1], id="repeat-then-one"),
    pytest.param("1,2,3", [1, 2, 3], id="plain-list"),
]


@pytest.mark.parametrize("nodelist, expected", EXPANSIONS)
def test_node_list_expands_in_slurm_order(nodelist, expected):
    assert expand_hostlist(nodelist) == expected


@pytest.mark.parametrize("nodelist", UNREADABLE)
def test_unreadable_node_list_is_an_error_naming_it(nodelist):
    with pytest.raises(SlurmEnvError, match="node list"):
        expand_hostlist(nodelist)


@settings(max_examples=30, deadline=None)
@given(
    prefix=st.from_regex(r"[a-z][a-z-]{0,5}", fullmatch=True),
    first=st.integers(0, 2000),
    count=st.integers(1, 40),
    width=st.integers(1, 5),
)
def test_padded_range_gives_each_number_once_in_order_at_the_lower_bounds_width(prefix, first, count, width):
    last = first + count - 1
    names = expand_hostlist(f"{prefix}[{str(first).zfill(width)}-{last}]")
    assert len(names) == count == len(set(names))
    numbers = [int(n[len(prefix) :]) for n in names]
    assert numbers == list(range(first, last + 1))
    assert all(len(n) - len(prefix) >= width for n in names)


@pytest.mark.parametrize("spec, expected", TASKS_PER_NODE)
def test_tasks_per_node_expands_repeats(spec, expected):
    assert expand_tasks_per_node(spec) == expected


@pytest.mark.parametrize("spec", ["2(x)", "x2", "2,,1", ""])
def test_unreadable_tasks_per_node_is_an_error_naming_the_variable(spec):
    with pytest.raises(SlurmEnvError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(spec)
