"""Tests for branchnet.data.hierarchy.Hierarchy: building trees from dicts and YAML, the
nested-dict round trip, built-in hierarchies, binding to a dataset's classes, label checks and
tree queries."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from branchnet.data.dataset import DataError
from branchnet.data.hierarchy import CIFAR10_HIERARCHY, CIFAR100_HIERARCHY, ROOT, Hierarchy

DIGITS = {"round": ["0", "6"], "straight": {"thin": ["1"], "bent": ["4", "7"]}}


# ---------------------------------------------------------------- from_dict


def test_from_dict_nested() -> None:
    h = Hierarchy.from_dict(DIGITS)
    assert h.internal_nodes() == ["root", "round", "straight", "thin", "bent"]
    assert h.leaves == ["0", "6", "1", "4", "7"]
    assert h.children("root") == ["round", "straight"]
    assert h.children("straight") == ["thin", "bent"]
    assert h.children("bent") == ["4", "7"]
    assert h.parent("7") == "bent" and h.parent("root") is None
    assert h.is_leaf("7") and not h.is_leaf("thin")


def test_from_dict_ragged_depths() -> None:
    h = Hierarchy.from_dict({"a": ["x"], "b": {"c": {"d": ["y", "z"]}}, "e": ["w", "v"]})
    assert h.depth() == 4
    assert h.path("x") == ["root", "a", "x"]
    assert h.path("y") == ["root", "b", "c", "d", "y"]
    assert sorted(h.leaves) == ["v", "w", "x", "y", "z"]


def test_from_dict_mixed_leaves_and_groups_in_a_list() -> None:
    # a group can hold leaves and sub-groups side by side (list items that are dicts)
    h = Hierarchy.from_dict({"animals": ["cat", {"birds": ["owl", "crow"]}, "dog"], "car": ["car_"]})
    assert h.children("animals") == ["cat", "birds", "dog"]
    assert h.children("birds") == ["owl", "crow"]
    assert h.leaves == ["cat", "owl", "crow", "dog", "car_"]
    # a list item that is a dict with several groups
    h2 = Hierarchy.from_dict({"g": [{"a": ["1", "2"], "b": ["3"]}, "4"]})
    assert h2.children("g") == ["a", "b", "4"]


def test_from_dict_integer_leaves_become_strings() -> None:
    h = Hierarchy.from_dict({"round": [0, 6, 8], "straight": [1, 7]})
    assert h.leaves == ["0", "6", "8", "1", "7"]
    assert all(isinstance(leaf, str) for leaf in h.leaves)


def test_from_dict_root_wrapper_is_optional() -> None:
    plain = Hierarchy.from_dict(DIGITS)
    assert Hierarchy.from_dict({"root": DIGITS}) == plain
    # a root that holds leaves directly (and a group) next to each other
    mixed = Hierarchy.from_dict({"root": ["a", {"g": ["b", "c"]}]})
    assert mixed.children("root") == ["a", "g"]
    assert Hierarchy.from_dict({"root": ["a", "b"]}) == Hierarchy.flat(["a", "b"])


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"g": ["a", "b"], "h": ["b"]}, "'b' appears twice"),
        ({"g": ["a"], "h": {"g": ["c"]}}, "'g' is used twice"),
        ({"g": []}, "'g' has no children"),
        ({"g": "a"}, "must map to a list"),
        ({"g": 3}, "must map to a list"),
        ({"g": ["root"]}, "reserved for the root"),
        ({"g": ["a"], "a": ["b"]}, "'a' appears twice"),  # a group named like a leaf
    ],
)
def test_from_dict_rejects_bad_trees(tree: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        Hierarchy.from_dict(tree)


def test_constructor_needs_a_root_and_reachable_nodes() -> None:
    with pytest.raises(DataError, match="needs a 'root' node"):
        Hierarchy({"g": ["a"]})
    with pytest.raises(DataError, match="not reachable"):
        Hierarchy({"root": ["a"], "island": ["b"]})


# ---------------------------------------------------------------- to_dict round trip


def test_to_dict_round_trip_examples() -> None:
    for tree in (
        DIGITS,
        {"root": ["a", "b", "c"]},
        {"root": ["a", {"g": ["b", {"h": ["c", "d"]}]}]},
        CIFAR100_HIERARCHY,
    ):
        h = Hierarchy.from_dict(tree)
        d = h.to_dict()
        assert Hierarchy.from_dict(d) == h
        # the nested dict survives YAML too (what tree.json / configs hold)
        assert Hierarchy.from_dict(yaml.safe_load(yaml.safe_dump(d, sort_keys=False))) == h


@st.composite
def random_trees(draw: st.DrawFn) -> dict[str, Any]:
    """A random ragged tree as a nested dict: groups mix leaves and sub-groups, names unique."""
    counter = itertools.count()

    def node(depth: int) -> list[Any] | dict[str, Any]:
        n_kids = draw(st.integers(1, 4))
        kids: list[Any] = []
        for _ in range(n_kids):
            if depth < 3 and draw(st.booleans()):
                kids.append({f"g{next(counter)}": node(depth + 1)})
            else:
                kids.append(f"c{next(counter)}")
        if all(isinstance(k, dict) for k in kids) and draw(st.booleans()):
            return {name: sub for k in kids for name, sub in k.items()}  # dict form
        return kids

    top = node(0)
    return top if isinstance(top, dict) else {"root": top}


@settings(max_examples=60, deadline=None)
@given(random_trees())
def test_to_dict_round_trip_random_trees(tree: dict[str, Any]) -> None:
    h = Hierarchy.from_dict(tree)
    assert Hierarchy.from_dict(h.to_dict()) == h
    assert Hierarchy.from_dict(yaml.safe_load(yaml.safe_dump(h.to_dict(), sort_keys=False))) == h
    # structural invariants
    leaves = h.leaves
    assert len(set(leaves)) == len(leaves)
    assert all(h.path(leaf)[0] == ROOT and h.path(leaf)[-1] == leaf for leaf in leaves)
    assert sorted(h.leaves_under(ROOT)) == sorted(leaves)
    assert set(leaves).isdisjoint(h.internal_nodes())
    assert h.depth() == max(len(h.path(leaf)) - 1 for leaf in leaves)
    for node in h.internal_nodes():
        assert h.children(node), node
        for kid in h.children(node):
            assert h.parent(kid) == node


def test_equality_and_repr() -> None:
    a, b = Hierarchy.from_dict(DIGITS), Hierarchy.from_dict(DIGITS)
    assert a == b and a != Hierarchy.flat(["0", "6", "1", "4", "7"]) and a != "x"
    assert "straight" in repr(a)
    assert a.render().splitlines()[:3] == ["root", "  round", "    0"]


# ---------------------------------------------------------------- YAML


def test_from_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(DIGITS, sort_keys=False))
    assert Hierarchy.from_yaml(p) == Hierarchy.from_dict(DIGITS)
    assert Hierarchy.from_yaml(str(p)) == Hierarchy.from_dict(DIGITS)
    # a file without a .yaml suffix is read too
    q = tmp_path / "hierarchy.txt"
    q.write_text("round: [0, 6]\nstraight: [1, 7]\n")
    assert Hierarchy.from_yaml(q).leaves == ["0", "6", "1", "7"]


def test_from_yaml_text() -> None:
    h = Hierarchy.from_yaml("round: [0, 6]\nstraight:\n  thin: [1]\n  bent: [4, 7]\n")
    assert h == Hierarchy.from_dict(DIGITS)
    assert Hierarchy.from_yaml("{a: [x, y], b: [z]}").leaves == ["x", "y", "z"]


def test_from_yaml_long_text() -> None:
    # YAML text longer than a file name may be is still text, not "file name too long"
    text = "\n".join(f"group{i}: [a{i}, b{i}, c{i}]" for i in range(40))
    assert len(Hierarchy.from_yaml(text).leaves) == 120
    flow = "{" + ", ".join(f"group{i}: [a{i}, b{i}]" for i in range(40)) + "}"
    assert len(Hierarchy.from_yaml(flow).leaves) == 80


def test_from_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read hierarchy file"):
        Hierarchy.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(DataError, match="mapping"):
        Hierarchy.from_yaml("- a\n- b\n")
    with pytest.raises(DataError, match="mapping"):
        Hierarchy.from_yaml("just-a-word")


# ---------------------------------------------------------------- built-ins


def test_builtin_cifar10() -> None:
    h = Hierarchy.builtin("cifar10")
    assert sorted(h.children("root")) == ["animals", "vehicles"]
    assert len(h.leaves) == 10
    assert h.children("vehicles") == CIFAR10_HIERARCHY["vehicles"]
    assert h.depth() == 2


def test_builtin_cifar100() -> None:
    h = Hierarchy.builtin("cifar100")
    groups = h.children("root")
    assert len(groups) == 20
    assert all(len(h.children(g)) == 5 for g in groups)
    assert len(h.leaves) == len(set(h.leaves)) == 100
    assert h.path("dolphin") == ["root", "aquatic_mammals", "dolphin"]


def test_builtin_unknown() -> None:
    with pytest.raises(DataError, match="cifar10"):
        Hierarchy.builtin("imagenet")


# ---------------------------------------------------------------- bind


def test_bind_integer_leaves_to_class_names() -> None:
    classes = ["cat", "dog", "car", "bus"]
    h = Hierarchy.from_dict({"animals": [0, 1], "vehicles": [2, 3]}).bind(classes)
    assert h.leaves == classes
    assert h.children("vehicles") == ["car", "bus"]
    # names and indices can be mixed; names that are digits stay names
    h2 = Hierarchy.from_dict({"a": ["cat", 1], "b": [2, "bus"]}).bind(classes)
    assert h2.leaves == classes
    digits = [str(i) for i in range(3)]
    assert Hierarchy.from_dict({"a": [2, 0], "b": [1]}).bind(digits).leaves == ["2", "0", "1"]


def test_bind_missing_class_is_named() -> None:
    h = Hierarchy.from_dict({"animals": ["cat", "dog"], "vehicles": ["car"]})
    with pytest.raises(DataError, match="'bus'"):
        h.bind(["cat", "dog", "car", "bus"])


def test_bind_leaf_not_a_class() -> None:
    h = Hierarchy.from_dict({"animals": ["cat", "dog"], "vehicles": ["car", "plane"]})
    with pytest.raises(DataError, match="'plane' is not a class"):
        h.bind(["cat", "dog", "car"])
    # an integer leaf out of range is not a class either
    with pytest.raises(DataError, match="'7'"):
        Hierarchy.from_dict({"a": [0, 7]}).bind(["x", "y"])
    with pytest.raises(DataError, match="'-1'"):
        Hierarchy.from_dict({"a": [0, -1]}).bind(["x", "y"])


def test_bind_class_twice() -> None:
    # index 0 and the name "cat" are the same class
    with pytest.raises(DataError, match="'cat' appears twice"):
        Hierarchy.from_dict({"a": [0, "dog"], "b": ["cat"]}).bind(["cat", "dog"])


def test_bind_is_idempotent_and_keeps_structure() -> None:
    classes = ["0", "1", "4", "6", "7"]
    h = Hierarchy.from_dict(DIGITS).bind(classes)
    assert h == Hierarchy.from_dict(DIGITS)
    assert h.bind(classes) == h


# ---------------------------------------------------------------- check_labels


def test_check_labels() -> None:
    classes = ["a", "b", "c"]
    full = Hierarchy.from_dict({"g": ["a", "b"], "h": ["c"]})
    full.check_labels([0, 1, 2, 2], classes)
    with pytest.raises(DataError, match=r"labels \[3\] are outside 0..2"):
        full.check_labels([0, 3], classes)
    with pytest.raises(DataError, match="outside"):
        full.check_labels([-1, 0], classes)
    partial = Hierarchy.from_dict({"g": ["a", "b"]})
    partial.check_labels([0, 1], classes)  # only present labels matter
    with pytest.raises(DataError, match=r"\['c'\] are missing from the hierarchy"):
        partial.check_labels([0, 2], classes)


# ---------------------------------------------------------------- queries


def test_path_ancestors_leaves_under_depth() -> None:
    h = Hierarchy.from_dict(DIGITS)
    assert h.path("7") == ["root", "straight", "bent", "7"]
    assert h.path("root") == ["root"]
    assert h.path("straight") == ["root", "straight"]
    assert h.ancestors("7") == ["straight", "bent"]
    assert h.ancestors("7", include_root=True) == ["root", "straight", "bent"]
    assert h.ancestors("root") == [] and h.ancestors("round") == []
    assert h.leaves_under("straight") == ["1", "4", "7"]
    assert h.leaves_under("round") == ["0", "6"]
    assert h.leaves_under("6") == ["6"]
    assert h.leaves_under("root") == h.leaves
    assert h.depth() == 3
    assert Hierarchy.flat(["a", "b"]).depth() == 1


def test_unknown_node_queries() -> None:
    h = Hierarchy.from_dict(DIGITS)
    for query in (h.path, h.children, h.parent, h.is_leaf, h.leaves_under, h.ancestors):
        with pytest.raises(DataError, match="unknown node 'nope'"):
            query("nope")
