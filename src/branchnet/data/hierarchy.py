"""A class hierarchy as data: a tree whose leaves are the dataset's classes.

Internal nodes are named groups; the root is called ``"root"``. Leaves are class names (or
integer class indices, turned into names against a class list with :meth:`Hierarchy.bind`).
Trees may have any depth and be ragged.

Example:
    >>> h = Hierarchy.from_dict({"round": ["0", "6"], "straight": {"thin": ["1"], "bent": ["4", "7"]}})
    >>> h.internal_nodes()
    ['root', 'round', 'straight', 'thin', 'bent']
    >>> h.path("7")
    ['root', 'straight', 'bent', '7']
    >>> h.children("straight")
    ['thin', 'bent']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from branchnet.data import induce as _induce
from branchnet.data.dataset import DataError

ROOT = "root"

CIFAR10_HIERARCHY: dict[str, list[str]] = {
    "vehicles": ["airplane", "automobile", "ship", "truck"],
    "animals": ["bird", "cat", "deer", "dog", "frog", "horse"],
}

#: CIFAR-100's 20 superclasses and their fine classes (the dataset's own coarse labels).
CIFAR100_HIERARCHY: dict[str, list[str]] = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


class Hierarchy:
    """A rooted class tree. Build it with :meth:`from_dict`, :meth:`from_yaml` or a built-in.

    Every leaf appears exactly once; internal node names are unique and differ from leaves.
    """

    def __init__(self, children: Mapping[str, Sequence[str]]):
        self._children: dict[str, list[str]] = {k: list(v) for k, v in children.items()}
        if ROOT not in self._children:
            raise DataError(f"a hierarchy needs a {ROOT!r} node; got nodes {list(children)}")
        self._parent: dict[str, str] = {}
        for node, kids in self._children.items():
            if not kids:
                raise DataError(f"internal node {node!r} has no children")
            for kid in kids:
                if kid in self._parent:
                    raise DataError(
                        f"{kid!r} appears twice in the hierarchy (under {self._parent[kid]!r} "
                        f"and {node!r}); every class must appear exactly once"
                    )
                self._parent[kid] = node
        if ROOT in self._parent:
            raise DataError(f"{ROOT!r} is reserved for the root and cannot be a child")
        unreachable = [n for n in self._children if n != ROOT and n not in self._parent]
        if unreachable:
            raise DataError(f"nodes {unreachable} are not reachable from the root")
        self._leaves = [n for n in self._walk(ROOT) if n not in self._children]

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> Hierarchy:
        """Nested dict: keys are group names, values lists of leaves or further dicts.

        A top-level ``{"root": ...}`` wrapper is optional. Integer leaves are kept as their
        decimal string (bind them to class names with :meth:`bind`).
        """
        if set(tree) == {ROOT}:
            tree = tree[ROOT]
        children: dict[str, list[str]] = {}

        def add(name: str, value: Any) -> None:
            if name in children:
                raise DataError(f"group name {name!r} is used twice")
            if isinstance(value, Mapping):
                children[name] = [str(k) for k in value]
                for k, v in value.items():
                    add(str(k), v)
            elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                items = list(value)
                kids = []
                for item in items:
                    if isinstance(item, Mapping):
                        for k, v in item.items():
                            add(str(k), v)
                            kids.append(str(k))
                    else:
                        kids.append(str(item))
                children[name] = kids
            else:
                raise DataError(
                    f"group {name!r} must map to a list of classes or a dict of groups, "
                    f"got {value!r}"
                )

        add(ROOT, dict(tree) if isinstance(tree, Mapping) else tree)
        return cls(children)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Hierarchy:
        """Read a hierarchy from a YAML file (or YAML text) holding the nested dict."""
        p = Path(path_or_text)
        is_file = isinstance(path_or_text, Path) or p.suffix in {".yaml", ".yml"}
        if not is_file and "\n" not in str(path_or_text):
            try:
                is_file = p.exists()
            except OSError:  # e.g. YAML text longer than a file name may be
                is_file = False
        try:
            text = p.read_text() if is_file else str(path_or_text)
        except OSError as e:
            raise DataError(f"cannot read hierarchy file {p}: {e}") from e
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise DataError(f"hierarchy YAML must hold a mapping of groups, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def flat(cls, classes: Sequence[str]) -> Hierarchy:
        """A one-level tree: the root's children are all the classes."""
        return cls({ROOT: [str(c) for c in classes]})

    @classmethod
    def from_groups(cls, groups: Mapping[str, Sequence[str]]) -> Hierarchy:
        """A two-level tree from ``{group: [classes]}`` (such as ``Data.groups``); a group named
        like one of the classes gets the suffix ``-group``, since every node needs its own name.

        >>> Hierarchy.from_groups({"science": ["math", "science"], "net": ["mail"]}).children(ROOT)
        ['science-group', 'net']
        """
        classes = {str(c) for members in groups.values() for c in members}
        return cls.from_dict({ROOT: [{(f"{g}-group" if g in classes else g):
                                       [str(c) for c in members]}
                                      for g, members in groups.items()]})

    @classmethod
    def builtin(cls, name: str) -> Hierarchy:
        """``"cifar10"`` (vehicles / animals) or ``"cifar100"`` (its 20 superclasses)."""
        table = {"cifar10": CIFAR10_HIERARCHY, "cifar100": CIFAR100_HIERARCHY}
        if name not in table:
            raise DataError(f"unknown built-in hierarchy {name!r}; choose from {sorted(table)}")
        return cls.from_dict(table[name])

    @classmethod
    def induce(cls, method: str, classes: Sequence[str], *, confusion: Any = None,
               features: Any = None, weights: Any = None, groups: int = 2, depth: int = 1,
               seed: int = 0) -> Hierarchy:
        """A hierarchy induced from what a trained parent knows, bound to ``classes``.

        ``method`` is ``"confusion"`` (spectral clustering of a ``[C, C]`` confusion matrix on
        validation data, rows the true class), ``"features"`` (class means ``[C, D]`` of a
        tapped layer) or ``"weights"`` (the last layer's class weights ``[C, D]``, NBDT); give
        the matching argument. ``groups`` children per internal node, ``depth`` levels of
        groups; groups are named after their members (:mod:`branchnet.data.induce`).
        Deterministic for a ``seed``.

        >>> import numpy as np
        >>> conf = np.array([[8, 2, 0, 0], [3, 7, 0, 0], [0, 0, 9, 1], [0, 0, 2, 8]])
        >>> h = Hierarchy.induce("confusion", ["cat", "dog", "car", "bus"], confusion=conf)
        >>> h.top_groups()
        {'cat+dog': ['cat', 'dog'], 'car+bus': ['car', 'bus']}
        """
        classes = [str(c) for c in classes]
        sources = {"confusion": confusion, "features": features, "weights": weights}
        given = sorted(k for k, v in sources.items() if v is not None)
        if method not in _induce.METHODS:
            raise DataError(f"induce must be one of {list(_induce.METHODS)}, got {method!r}")
        if given != [method]:
            raise DataError(f"induce {method!r} needs exactly its own source {method}=...; got "
                            f"{given or 'none'}")
        _induce.check_shape(len(classes), groups, depth)
        source = _induce.prepare(method, sources[method], classes)
        nested = _induce.induce_groups(method, source, groups, depth, seed)
        return cls.from_dict(_induce.name_groups(nested, classes, source, method)).bind(classes)

    def top_groups(self) -> dict[str, list[str]]:
        """Each child of the root and the classes under it (a class there is its own group)."""
        return {kid: self.leaves_under(kid) for kid in self.children(ROOT)}

    def agreement(self, other: Hierarchy) -> float:
        """Adjusted Rand index between the top-level groupings of two trees on one class set.

        >>> a = Hierarchy.from_dict({"x": ["1", "2"], "y": ["3", "4"]})
        >>> a.agreement(Hierarchy.from_dict({"p": ["2", "1"], "q": ["4", "3"]}))
        1.0
        """
        if set(self.leaves) != set(other.leaves):
            raise DataError(f"the two hierarchies have different classes: "
                            f"{sorted(set(self.leaves) ^ set(other.leaves))} in only one")
        def labels(h: Hierarchy) -> list[int]:
            group = {c: g for g, (_, cs) in enumerate(h.top_groups().items()) for c in cs}
            return [group[c] for c in self.leaves]
        return _induce.agreement(labels(self), labels(other))

    def to_dict(self) -> dict[str, Any]:
        """The nested-dict form (inverse of :meth:`from_dict`)."""

        def build(node: str) -> Any:
            kids = self._children[node]
            if all(k in self._children for k in kids):
                return {k: build(k) for k in kids}
            return [{k: build(k)} if k in self._children else k for k in kids]

        out = build(ROOT)
        return out if isinstance(out, dict) else {ROOT: out}

    # queries ------------------------------------------------------------------------------
    def _walk(self, node: str) -> list[str]:
        out = [node]
        for kid in self._children.get(node, []):
            out.extend(self._walk(kid))
        return out

    @property
    def leaves(self) -> list[str]:
        """Leaf classes in depth-first order."""
        return list(self._leaves)

    def internal_nodes(self) -> list[str]:
        """Internal nodes (root first, then depth-first order); each gets a branch head."""
        return [n for n in self._walk(ROOT) if n in self._children]

    def children(self, node: str) -> list[str]:
        self._check_node(node)
        return list(self._children.get(node, []))

    def parent(self, node: str) -> str | None:
        self._check_node(node)
        return self._parent.get(node)

    def is_leaf(self, node: str) -> bool:
        self._check_node(node)
        return node not in self._children

    def path(self, node: str) -> list[str]:
        """Nodes from the root down to ``node`` (inclusive)."""
        self._check_node(node)
        out = [node]
        while out[-1] != ROOT:
            out.append(self._parent[out[-1]])
        return out[::-1]

    def ancestors(self, node: str, include_root: bool = False) -> list[str]:
        """Strict ancestors of ``node``, nearest last."""
        p = self.path(node)[:-1]
        return p if include_root else p[1:]

    def leaves_under(self, node: str) -> list[str]:
        self._check_node(node)
        return [n for n in self._walk(node) if n not in self._children]

    def depth(self) -> int:
        """Longest root-to-leaf edge count."""
        return max(len(self.path(leaf)) - 1 for leaf in self._leaves)

    def _check_node(self, node: str) -> None:
        if node != ROOT and node not in self._parent:
            raise DataError(f"unknown node {node!r}; the hierarchy has leaves {self._leaves}")

    # binding to a dataset -------------------------------------------------------------------
    def bind(self, classes: Sequence[str]) -> Hierarchy:
        """Check the tree against a dataset's class list and return it with class-name leaves.

        Integer leaves (``"3"``) are read as indices into ``classes`` when they are not names
        themselves. Every class must appear exactly once, and every leaf must be a class.
        """
        classes = [str(c) for c in classes]
        rename: dict[str, str] = {}
        for leaf in self._leaves:
            if leaf in classes:
                continue
            if leaf.lstrip("-").isdigit() and 0 <= int(leaf) < len(classes):
                rename[leaf] = classes[int(leaf)]
            else:
                raise DataError(
                    f"hierarchy leaf {leaf!r} is not a class of the data; classes are {classes}"
                )
        new_children = {
            node: [rename.get(k, k) for k in kids] for node, kids in self._children.items()
        }
        bound = Hierarchy(new_children)
        missing = [c for c in classes if c not in bound._leaves]
        if missing:
            raise DataError(
                f"the hierarchy does not cover classes {missing}; every class of the data must "
                "appear exactly once as a leaf"
            )
        return bound

    def check_labels(self, y: Iterable[int], classes: Sequence[str]) -> None:
        """Raise if a label index is out of range or its class is not a leaf."""
        present = sorted({int(v) for v in y})
        bad = [v for v in present if not 0 <= v < len(classes)]
        if bad:
            raise DataError(f"labels {bad} are outside 0..{len(classes) - 1}")
        uncovered = [classes[v] for v in present if classes[v] not in self._leaves]
        if uncovered:
            raise DataError(f"labels for classes {uncovered} are missing from the hierarchy")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hierarchy) and self._children == other._children

    def __repr__(self) -> str:
        return f"Hierarchy({self.to_dict()!r})"

    def render(self) -> str:
        """An indented text picture of the tree."""
        lines: list[str] = []

        def walk(node: str, indent: int) -> None:
            lines.append("  " * indent + node)
            for kid in self._children.get(node, []):
                walk(kid, indent + 1)

        walk(ROOT, 0)
        return "\n".join(lines)
