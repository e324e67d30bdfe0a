"""BranchTree: specialist branches grown on a frozen parent's hidden layer, routed as a tree.

Example:
    >>> import branchnet as bn
    >>> data = bn.data.load("digits", seed=0)
    >>> hier = bn.Hierarchy.from_dict({"round": [0, 6, 8, 9], "straight": [1, 4, 7], "curly": [2, 3, 5]})
    >>> fast = {"epochs": 3}
    >>> tree = bn.BranchTree(bn.models.mlp([64, 128, 64], 10), tap="hidden.1",
    ...                      parent_train=fast, head_train=fast)
    >>> select, calib = data.val.split(0.5)   # early stopping / calibration only
    >>> tree = tree.fit(data, val=select, hierarchy=hier)
    >>> _ = tree.calibrate(calib, method="coverage", coverage=0.9)
    >>> pred = tree.predict(data.test.x)
    >>> 0.5 < pred.coverage <= 1.0
    True
"""

from __future__ import annotations

import inspect
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from branchnet import models, zoo
from branchnet.cache import ActivationCache, CachedActivations
from branchnet.checkpoint import CheckpointError, save_weights
from branchnet.data.batches import TensorPairs
from branchnet.data.dataset import Data, Split, stratified_split
from branchnet.data.hierarchy import Hierarchy
from branchnet.data.imagefolder import default_cache_dir
from branchnet.data.induce import class_means, confusion_from_predictions, output_weights
from branchnet.data.texts import Texts
from branchnet.engine import TrainConfig, fit
from branchnet.fileio import write_json
from branchnet.saved_model import load_saved_parent, read_saved
from branchnet.selective import coverage_threshold, sgr_threshold
from branchnet.selfcheck import TARGETS, SelfCheckHead, fit_selfcheck, selfcheck_targets
from branchnet.taps import layer_names
from branchnet.tree.fitting import (
    HEAD_TRAIN_DEFAULTS,
    TreeError,
    _fit_brief,
    _row_hashes,
    _safe,
    _train_config,
)
from branchnet.tree.grow import grow as _grow
from branchnet.tree.layout import TreeLayout
from branchnet.tree.open_world import TreeNovelty
from branchnet.tree.prediction import Prediction
from branchnet.tree.router import (
    LOCAL_SCORES,
    PATH_POLICIES,
    POLICIES,
    SCORES,
    PathsOnly,
    Tapped,
    TreeRouter,
    local_score,
    parent_module,
)

HeadFactory = Callable[[int, int], nn.Module]
FORMAT_VERSION = 1


class PathPrediction(Prediction):
    """The :class:`Prediction` of path-only routing (what :meth:`BranchTree.predict` returns
    for the ``hard`` and ``threshold`` policies): the same fields, but ``leaf_probs``, the path
    probability of every class, needs every head, so it is computed on first read and kept.
    Until then the prediction holds the parent's outputs of its inputs (its tapped features,
    and its output where the root decision is the parent's): reading ``leaf_probs`` runs every
    head on those, not the parent again. Accessing it is what ``Prediction.topk`` and
    ``to_records`` do, and what ``evaluate`` does for its probability metrics.
    """

    def __init__(self, *args: Any, leaf_probs_of: Callable[[], torch.Tensor] | None = None,
                 **kwargs: Any):
        self._leaf_probs: torch.Tensor | None = None
        self._leaf_probs_of = leaf_probs_of
        kwargs.setdefault("leaf_probs", None)
        super().__init__(*args, **kwargs)

    @property  # the dataclass field of Prediction, computed on first read
    def leaf_probs(self) -> torch.Tensor:
        if self._leaf_probs is None:
            if self._leaf_probs_of is None:
                raise TreeError("this prediction has neither leaf_probs nor a way to compute them")
            self._leaf_probs = self._leaf_probs_of()
            self._leaf_probs_of = None  # lets the kept parent features go
        return self._leaf_probs

    @leaf_probs.setter
    def leaf_probs(self, value: torch.Tensor | None) -> None:
        self._leaf_probs = value


class ConstantHead(nn.Module):
    """Head of a node with a single child: always that child (probability 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 1)


def _as_inputs(x: Any) -> torch.Tensor | Texts:
    """Inputs as a float tensor, or as :class:`Texts` for a list of strings."""
    if isinstance(x, Split):
        return x.x
    if isinstance(x, Texts):
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x):
        return Texts(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).float()
    if not isinstance(x, torch.Tensor):
        raise TreeError(f"expected a tensor, array, list of texts or Split of inputs, got "
                        f"{type(x).__name__}")
    return x.float()


def _fit_inputs(X: Any, y: Any, val: Any, classes: list[str] | None,
                preprocessing: dict[str, Any] | None
                ) -> tuple[Split, Split | None, list[str], dict[str, Any]]:
    """(train, val or None, classes, preprocessing) from the forms :meth:`BranchTree.fit` takes."""
    if isinstance(X, (Data, Split)):
        if isinstance(y, Split) and val is None:  # fit(data, select): the validation split
            y, val = None, y
        if y is not None:
            raise TreeError(f"fit got a {type(X).__name__} and y of type {type(y).__name__}: a "
                            f"{type(X).__name__} carries its labels (pass y only with array "
                            "inputs X, and a validation Split as val=...)")
        if isinstance(X, Data):
            classes = classes or X.classes
            preprocessing = preprocessing or X.preprocessing
            val = X.val if val is None else val
            X = X.train
        train = X
    elif isinstance(X, (np.ndarray, torch.Tensor)):
        if y is None:
            raise TreeError(f"fit got inputs X ({type(X).__name__}) without labels y: pass "
                            "fit(X, y), or a Data or a Split")
        labels, classes = _labels(y, classes)
        train = Split(_as_inputs(X), labels)
    else:
        raise TreeError(f"fit expects a Data, a Split, or inputs X (array or tensor) with labels "
                        f"y; got {type(X).__name__}")
    if isinstance(val, tuple) and len(val) == 2:
        val = Split(_as_inputs(val[0]), _labels(val[1], classes)[0])
    if val is not None and not isinstance(val, Split):
        raise TreeError(f"val must be a Split or an (X, y) pair, got {type(val).__name__}")
    if classes is None:
        classes = [str(i) for i in range(int(train.y.max()) + 1)]
    return train, val, list(classes), dict(preprocessing or {})


def _labels(y: Any, classes: list[str] | None) -> tuple[torch.Tensor, list[str] | None]:
    """Labels as int64 class indices, and the classes (the sorted names for names without any)."""
    arr = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if arr.ndim != 1:
        raise TreeError(f"labels y must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return torch.from_numpy(arr.astype(np.int64)), classes
    if arr.dtype.kind not in "UO":
        raise TreeError(f"labels y must be class indices or class names, got dtype {arr.dtype}")
    names = [str(v) for v in arr]
    classes = list(classes) if classes is not None else sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise TreeError(f"labels {unknown} are not among the classes {classes}")
    return torch.tensor([index[n] for n in names], dtype=torch.long), classes


class BranchTree:
    """A frozen parent network, its tapped hidden layer, and one branch head per internal node.

    A scikit-learn-style estimator: the constructor stores its arguments as given (see
    :meth:`get_params`); :meth:`fit` sets the fitted state, in attributes ending in ``_``:
    ``classes_``, ``hierarchy_`` (bound to the classes), ``layout_``, ``heads_`` (node index ->
    :class:`Tapped` head), ``sources_``, ``router_`` (the :class:`TreeRouter` module),
    ``preprocessing_``, ``input_shape_``, ``fit_summary_``, ``fitted_rows_`` (hashes of the
    inputs used in fitting) and ``calibration_`` (set by :meth:`calibrate`).

    Args:
        parent: any ``nn.Module`` classifier. Trained by :meth:`fit` unless
            ``train_parent=False`` (then it must already be trained).
        tap: name of the parent layer whose output the branches read (see
            :func:`branchnet.taps.layer_names`).
        hierarchy: the class tree (also accepted by :meth:`fit`); default: flat.
        router: ``"parent"``: the root decision comes from the parent's own output (summed over
            each group when the parent predicts classes); ``"learned"``: a head on the tapped
            layer learns the root decision like every other node, and at inference the parent
            runs only up to the tap (cut by torch.fx; the whole parent where fx cannot trace
            it: ``router_.parent_run`` says which).
        node_input: ``"parent"``: every head reads the parent's tap; ``"branch"``: a node reads
            the hidden layer ``branch_tap`` of the head above it (branches of branches).
        head: factory ``(n_in, n_out) -> nn.Module`` or a dict ``{node: factory}``; default
            :func:`branchnet.models.branch_head` (``n_in -> 256 -> n_out``, dropout 0.5).
        policy: routing policy, one of ``hard``, ``threshold`` (hard, and backs off to the
            deepest confident node instead of abstaining), ``soft``, ``topk``. ``hard`` and
            ``threshold`` predict running only the heads on each input's path (see
            :meth:`predict`).
        confidence: the local confidence score of a node, ``msp``, ``margin`` or ``entropy``.
        backoff: predict the deepest confident node instead of abstaining (always on for the
            ``threshold`` policy).
        parent_train / head_train: :class:`~branchnet.engine.TrainConfig` or dict (a dict's
            ``progress`` defaults to ``progress``).
        head_callbacks: ``node -> [Lightning callbacks]`` for the training of each node's head,
            e.g. ``lambda node: [DynamicSparsity("rigl", density=0.2)]`` for sparse branches.
        parent_labels: train the parent on ``"fine"`` classes or ``"coarse"`` root groups.
        workdir: folder for checkpoints (needed for ``fit(..., resume=True)``); default a
            temporary folder, removed when :meth:`fit` returns. cache_dir: activation cache
            (default ``workdir/cache`` for a parent trained here, so also temporary without a
            workdir; ``$BRANCHNET_CACHE_DIR/activations`` for a pretrained one, so every run on
            the same parent, layer and data reuses it).
        selfcheck: train a self-check branch (``{}`` for the defaults, or a dict of
            :data:`SELFCHECK_DEFAULTS`' keys): it reads the parent's tap and predicts whether
            the tree's answer is right, trained on ``fraction`` of the training rows that the
            parent and heads never see (``target``: ``"tcp"``, the probability the tree gives
            the true class, as ConfidNet, or ``"correct"``). Needed by ``confidence="selfcheck"``
            (then ``{}`` is assumed); :meth:`confidence_scores` compares it with the others.
        novelty: open-world rejection (``{"score": "mahalanobis"}``, or ``energy``, ``knn``
            with ``k``, ``msp``; more options go to the scorer): every internal node gets a
            novelty scorer fitted at the end of :meth:`fit` (see
            :mod:`branchnet.tree.open_world`), and :meth:`calibrate_novelty` sets the
            threshold that rejects inputs as belonging to none of a node's children.
        progress: progress bars while caching activations and training.

    A parent with attributes ``probe`` (an ``nn.Module``) and ``probe_layer`` (one of its taps),
    such as :class:`~branchnet.text.TextParent`, is a frozen backbone: "training the parent"
    trains only its probe, on the cached activations of ``probe_layer``.
    """

    def __init__(
        self,
        parent: nn.Module,
        tap: str,
        *,
        hierarchy: Hierarchy | dict | None = None,
        router: str = "parent",
        node_input: str = "parent",
        branch_tap: str = "hidden.0",
        head: HeadFactory | dict[str, HeadFactory] | None = None,
        policy: str = "hard",
        confidence: str = "msp",
        backoff: bool = False,
        train_parent: bool = True,
        parent_train: TrainConfig | dict | None = None,
        parent_labels: str = "fine",
        head_train: TrainConfig | dict | None = None,
        head_callbacks: Callable[[str], list[Any]] | None = None,
        selfcheck: dict[str, Any] | None = None,
        novelty: dict[str, Any] | None = None,
        workdir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        cache_dtype: str = "float16",
        progress: bool = False,
    ):
        _check_choice("router", router, ("parent", "learned"))
        _check_choice("node_input", node_input, ("parent", "branch"))
        _check_choice("policy", policy, POLICIES)
        _check_choice("confidence", confidence, SCORES)
        _check_choice("parent_labels", parent_labels, ("fine", "coarse"))
        _check_choice("cache_dtype", cache_dtype, ("float16", "float32"))
        if policy in ("soft", "topk") and confidence != "msp":
            raise TreeError(f"confidence={confidence!r} applies to hard and threshold routing; the "
                            f"{policy} policy's confidence is the path probability "
                            "(use confidence='msp')")
        if not isinstance(parent, nn.Module):
            raise TreeError(f"parent must be an nn.Module, got {type(parent).__name__}")
        names = layer_names(parent)
        if tap not in names:
            raise TreeError(f"the parent has no layer {tap!r}; its layers are {names}")
        self.parent = parent
        self.tap = tap
        self.hierarchy = hierarchy
        self.router = router
        self.node_input = node_input
        self.branch_tap = branch_tap
        self.head = head
        self.policy = policy
        self.confidence = confidence
        self.backoff = backoff
        self.train_parent = train_parent
        self.parent_train = parent_train
        self.parent_labels = parent_labels
        self.head_train = head_train
        self.head_callbacks = head_callbacks
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.selfcheck = selfcheck
        self.novelty = novelty
        self.progress = progress
        self._selfcheck_options()  # checked here, before any work
        self._novelty_options()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments as given (``deep`` only for scikit-learn compatibility:
        nothing nested is expanded)."""
        return {name: getattr(self, name)
                for name in list(inspect.signature(type(self).__init__).parameters)[1:]}

    # ------------------------------------------------------------------------------------ fit
    def fit(
        self,
        X: Data | Split | np.ndarray | torch.Tensor,
        y: Any = None,
        *,
        val: Split | tuple[Any, Any] | None = None,
        hierarchy: Hierarchy | dict | None = None,
        classes: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
        resume: bool = False,
    ) -> BranchTree:
        """Train the parent (unless pretrained), cache its tapped activations, train every head.

        ``X`` is a :class:`Data` (its train split; its val split for early stopping unless
        ``val`` is given), a :class:`Split`, or inputs ``[N, ...]`` (array or tensor) with
        labels ``y`` (class indices, or class names: then ``classes`` defaults to the sorted
        names). ``val`` is a Split or an ``(X, y)`` pair; a Split may also come second
        positionally after a Data or Split, as ``fit(data, select)``. Without ``val`` a
        stratified tenth of the training split is held out for early stopping.
        """
        if resume and self.workdir is None:
            raise TreeError("resume=True continues from the checkpoints in workdir, but this tree "
                            "has none: construct it with workdir=...")
        train, val, classes, preprocessing = _fit_inputs(X, y, val, classes, preprocessing)
        if self.workdir is not None:
            return self._fit(train, val, classes, hierarchy, preprocessing, Path(self.workdir),
                             resume)
        with tempfile.TemporaryDirectory(prefix="branchnet-tree-") as tmp:
            return self._fit(train, val, classes, hierarchy, preprocessing, Path(tmp), False)

    def _fit(self, train: Split, val: Split | None, classes: list[str],
             hierarchy: Hierarchy | dict | None, preprocessing: dict[str, Any], workdir: Path,
             resume: bool) -> BranchTree:
        parent_train = _train_config(self.parent_train, self.progress)
        head_train = _train_config(self.head_train, self.progress, default=HEAD_TRAIN_DEFAULTS)
        hier = hierarchy if hierarchy is not None else self.hierarchy
        induce = induce_spec(hier, self.parent_labels)  # induced after the parent is trained
        hier = Hierarchy.from_dict(hier) if isinstance(hier, dict) and not induce else hier
        hier = Hierarchy.flat(classes) if induce or hier is None else hier
        layout = TreeLayout(hier, classes)
        layout.hierarchy.check_labels(train.y.tolist(), classes)
        sc = self._selfcheck_options()
        held = None
        if sc is not None:  # rows for the self-check only: the parent and heads never see them
            train, held = train.split(sc["fraction"], seed=head_train.seed)
        if val is None:  # a stratified tenth of the training split, for early stopping
            train, val = train.split(0.1, seed=head_train.seed)
        layout.hierarchy.check_labels(val.y.tolist(), classes)
        _check_node_examples(layout, train, val)
        vars(self).pop("router_", None)  # not fitted until this fit completes
        self.selfcheck_: SelfCheckHead | None = None
        self.classes_, self.layout_, self.hierarchy_ = list(classes), layout, layout.hierarchy
        self.preprocessing_ = dict(preprocessing)
        self.input_shape_ = tuple(train.x.shape[1:])
        used = [train, val] + ([held] if held is not None else [])  # held: the self-check's
        self.fitted_rows_ = np.unique(np.concatenate([_row_hashes(s.x) for s in used]))
        self.calibration_: dict[str, Any] = {}
        self.novelty_: TreeNovelty | None = None
        self.parent_classes_ = len(classes)  # the parent's outputs (grow adds classes after)
        summary: dict[str, Any] = {"classes": list(classes), "nodes": {}}

        # 1. the parent
        n_parent_out = len(classes) if self.parent_labels == "fine" else layout.n_children[0]
        if self.train_parent or self.router == "parent":
            self._check_parent_output(train.x[:2], n_parent_out)
        targets = train.y if self.parent_labels == "fine" else layout.leaf_slots[train.y, 0]
        vtargets = val.y if self.parent_labels == "fine" else layout.leaf_slots[val.y, 0]
        probe = _probe_of(self.parent) if self.train_parent else None
        if self.train_parent and probe is None:
            self.parent.train().requires_grad_(True)
            res = fit(self.parent, TensorPairs(train.x, targets), TensorPairs(val.x, vtargets),
                      parent_train, workdir=workdir / "parent", resume=resume,
                      description="parent")
            summary["parent"] = _fit_brief(res)
        self.parent.eval().requires_grad_(False)
        if hasattr(self.parent, "truncation"):  # texts cut at the parent's max_length
            summary["truncation"] = {"train": self.parent.truncation(train.x),
                                     "val": self.parent.truncation(val.x)}

        # 2. the activation cache (frozen parent, eval mode, no grad), all taps in one pass
        # a pretrained parent's activations are shared by every run that uses it; a parent
        # trained here is unique to this run, so its activations stay in the run's folder
        pretrained = not self.train_parent or probe is not None
        default_cache = (default_cache_dir() / "activations" if pretrained
                         else workdir / "cache")
        cache = ActivationCache(Path(self.cache_dir) if self.cache_dir else default_cache,
                                dtype=getattr(torch, self.cache_dtype))
        layers = list(dict.fromkeys([self.tap, *([probe[1]] if probe else [])]))
        cached = {
            name: cache.get_many(self.parent, layers, split, preprocessing=self.preprocessing_,
                                 progress=self.progress)
            for name, split in (("train", train), ("val", val))
        }
        if probe is not None:  # a frozen backbone: only its probe trains, on cached features
            module, layer = probe
            module.train().requires_grad_(True)
            res = fit(module, cached["train"][layer].dataset(targets, flatten=True),
                      cached["val"][layer].dataset(vtargets, flatten=True), parent_train,
                      workdir=workdir / "parent", resume=resume,
                      description=f"probe on {layer}")
            summary["parent"] = {**_fit_brief(res), "probe_layer": layer}
            self.parent.eval().requires_grad_(False)
        acts = {name: c[self.tap] for name, c in cached.items()}
        in_dim = int(np.prod(acts["train"].shape[1:]))
        summary["tap_dim"] = in_dim
        # the parent's outputs of the validation rows: an induced tree's confusion matrix, and
        # the reference ranks of a root decided by the parent
        val_logits = (self._parent_logits(val, cached["val"], probe)
                      if (self.router == "parent" and self.novelty is not None)
                      or (induce and induce["induce"] == "confusion") else None)
        self.fit_data_ = {"cache": str(cache.root), "train": [acts["train"].key],
                          "val": [acts["val"].key], "train_y": train.y.clone(),
                          "val_y": val.y.clone(), "val_logits": val_logits}
        if induce:
            layout = self._induce(induce, classes, acts["train"], train.y, val_logits, val.y,
                                  head_train.seed)
            _check_node_examples(layout, train, val)
            self.layout_, self.hierarchy_ = layout, layout.hierarchy
            summary["induced"] = {**induce, "hierarchy": layout.hierarchy.to_dict()}

        # 3. one head per internal node, top-down
        root_from_parent = self.router == "parent"
        self.sources_, self.heads_ = [], {}
        for i, node in enumerate(layout.nodes):
            parent_node = layout.parent_of[i]
            src = -1
            if self.node_input == "branch" and parent_node in self.heads_:
                # the hidden layer of the head above; a constant head (single child) has none,
                # so read what that head reads
                above = self.heads_[parent_node]
                src = parent_node if above.layer else self.sources_[parent_node]
            self.sources_.append(src)
            if i == 0 and root_from_parent:
                continue
            head = self._make_head(i, self._input_dim(i, in_dim, acts), layout.n_children[i],
                                   head_train.seed)
            has_inner_kids = any(int(c) >= 0 for c in layout.child_node[i])
            layer = (self.branch_tap if self.node_input == "branch" and has_inner_kids
                     and not isinstance(head, ConstantHead) else None)
            if layer and layer not in layer_names(head):
                raise TreeError(f"branch_tap {self.branch_tap!r} is not a layer of the head of "
                                f"{node!r}; its layers are {layer_names(head)}")
            tapped = Tapped(head, layer)
            if isinstance(head, ConstantHead):
                summary["nodes"][node] = {"constant": True}
            else:
                node_data = {}
                for name, split in (("train", train), ("val", val)):
                    slots = layout.slot_of_label(node, split.y)
                    rows = torch.nonzero(slots >= 0).flatten()
                    node_data[name] = self._node_dataset(i, acts[name], rows, slots[rows])
                res = fit(head, node_data["train"], node_data["val"], head_train,
                          workdir=workdir / "nodes" / f"{i:02d}-{_safe(node)}", resume=resume,
                          callbacks=self.head_callbacks(node) if self.head_callbacks else None,
                          description=f"branch {node!r} ({layout.n_children[i]} children)")
                summary["nodes"][node] = {"n_train": len(node_data["train"]),
                                          "n_val": len(node_data["val"]), **_fit_brief(res)}
            head.eval().requires_grad_(False)
            self.heads_[i] = tapped
        if held is not None and sc is not None:
            self._build_router(score="msp")  # the tree's answers, before the self-check exists
            summary["selfcheck"] = self._fit_selfcheck(held, sc, cache, workdir, resume)
        self.fit_summary_ = summary
        self._build_router()
        if self.novelty is not None:
            self.novelty_ = self.make_novelty(**self.novelty)
        return self

    def _parent_logits(self, split: Split, cached: dict[str, CachedActivations],
                       probe: tuple[nn.Module, str] | None) -> torch.Tensor:
        """The parent's outputs of ``split`` (a frozen backbone's probe reads its cached layer)."""
        with torch.inference_mode():
            if probe is not None:
                feats = cached[probe[1]]
                return torch.cat([probe[0](feats[i:i + 4096].flatten(1))
                                  for i in range(0, len(feats), 4096)])
            return torch.cat([self.parent(split.x[i:i + 1024])
                              for i in range(0, len(split), 1024)])

    def _induce(self, spec: dict[str, Any], classes: list[str], train_acts: CachedActivations,
                train_y: torch.Tensor, val_logits: torch.Tensor | None, val_y: torch.Tensor,
                seed: int) -> TreeLayout:
        """The hierarchy induced from what the trained parent knows (see :func:`induce_spec`)."""
        n = len(classes)
        method = spec["induce"]
        source: dict[str, Any] = {}
        if method == "confusion":
            assert val_logits is not None
            source["confusion"] = confusion_from_predictions(val_logits.argmax(1), val_y, n)
        elif method == "features":
            source["features"] = class_means(train_acts.as_tensor(), train_y, n)
        else:
            source["weights"] = output_weights(self.parent, n)
        hier = Hierarchy.induce(method, classes, groups=spec["groups"], depth=spec["depth"],
                                seed=spec.get("seed", seed), **source)
        return TreeLayout(hier, classes)

    def make_novelty(self, score: str = "mahalanobis", **options: Any) -> TreeNovelty:
        """A :class:`~branchnet.tree.open_world.TreeNovelty` with ``score``, fitted on the
        cached tap features of the rows :meth:`fit` trained on (reference ranks: its
        early-stopping rows). Not installed: ``fit`` installs the one ``novelty=`` names as
        ``novelty_``; this makes others to compare."""
        self._require_fit()
        train, val = self._fit_features("train"), self._fit_features("val")
        fd = self.fit_data_
        logits = fd["val_logits"]
        if logits is None and self.router == "parent":
            raise TreeError("the parent's outputs of the validation rows were not kept: fit "
                            "the tree with novelty={'score': ...} to fit novelty scorers")
        if logits is None:  # a learned root: the parent's output is not read
            logits = torch.zeros(len(val), 0)
        return TreeNovelty(score, **options).fit(self, (train, fd["train_y"]),
                                                 (val, fd["val_y"]), logits)

    def _fit_features(self, split: str) -> torch.Tensor:
        """The cached tap features ``[N, F]`` of the training or early-stopping rows of fit."""
        fd = getattr(self, "fit_data_", None)
        paths = [Path(fd["cache"]) / key for key in fd[split]] if fd else [None]
        for path in paths:
            if path is None or not (path / "meta.json").is_file():
                raise TreeError(
                    f"the cached activations this tree was fitted on are gone ({path}); they "
                    "are kept in the workdir (or cache_dir) given to BranchTree: fit again with "
                    "workdir=... or cache_dir=... to grow the tree or fit novelty scorers later")
        return torch.cat([CachedActivations(p).as_tensor().flatten(1) for p in paths])

    def _novelty_options(self) -> None:
        if self.novelty is None:
            return
        if not isinstance(self.novelty, dict):
            raise TreeError(f"novelty must be a dict such as {{'score': 'mahalanobis'}}, got "
                            f"{type(self.novelty).__name__}")
        TreeNovelty(**self.novelty)  # an unknown score fails here, before any work

    def _selfcheck_options(self) -> dict[str, Any] | None:
        if self.selfcheck is None and self.confidence != "selfcheck":
            return None
        given = dict(self.selfcheck or {})
        unknown = sorted(set(given) - set(SELFCHECK_DEFAULTS))
        if unknown:
            raise TreeError(f"unknown selfcheck option(s) {unknown}; valid: "
                            f"{sorted(SELFCHECK_DEFAULTS)}")
        sc = {**SELFCHECK_DEFAULTS, **given}
        _check_choice("selfcheck target", sc["target"], TARGETS)
        if not (isinstance(sc["fraction"], float) and 0 < sc["fraction"] < 1):
            raise TreeError(f"selfcheck fraction must be a number in (0, 1), got "
                            f"{sc['fraction']!r}")
        return sc

    def _fit_selfcheck(self, held: Split, sc: dict[str, Any], cache: ActivationCache,
                       workdir: Path, resume: bool) -> dict[str, Any]:
        """Train the self-check on the held-out rows: the tree's features there, and whether
        (or how surely) the tree is right there."""
        leaf, _, _, _, probs = self._run(held.x)
        right = (leaf == held.y).float()
        targets = right if sc["target"] == "correct" else selfcheck_targets(probs, held.y, "tcp")
        feats = cache.get_many(self.parent, [self.tap], held, preprocessing=self.preprocessing_,
                               progress=self.progress)[self.tap]
        seed = _train_config(self.head_train, False).seed
        fit_rows, val_rows = stratified_split(right.numpy(), 0.2, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = SelfCheckHead(int(np.prod(feats.shape[1:])), sc["hidden"], sc["dropout"])
        res = fit_selfcheck(
            head, feats.dataset(targets[fit_rows], rows=fit_rows, flatten=True), None,
            feats.dataset(targets[val_rows], rows=val_rows, flatten=True), None,
            target=sc["target"], cfg={"progress": self.progress, **sc["train"]},
            workdir=workdir / "selfcheck", resume=resume, description="self-check")
        self.selfcheck_ = head.eval().requires_grad_(False)
        return {"target": sc["target"], "n_train": len(fit_rows), "n_val": len(val_rows),
                "tree_accuracy_held_out": float(right.mean()), **_fit_brief(res)}

    def confidence_scores(self, x: Any) -> dict[str, torch.Tensor]:
        """The end-to-end confidence of each routed answer under every score: the smallest
        local ``msp`` / ``margin`` / ``entropy`` along the input's path, and ``selfcheck``
        when the tree has a self-check branch. Abstention thresholds are ignored."""
        self._require_fit()
        x = _as_inputs(x)
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for start in range(0, len(x), 1024):
                P, feats = self.router_.probs_and_features(x[start:start + 1024])
                check = self.router_.selfcheck_score(feats) if self.selfcheck_ is not None else None
                path = self.router_.route(P, check)[1]
                rows = torch.arange(len(P))[:, None]
                at_node = P[rows, path.clamp_min(0)]  # [N, D, K]
                for kind in LOCAL_SCORES:
                    local = local_score(at_node.flatten(0, 1), kind).view(path.shape)
                    local = torch.where(path >= 0, local, torch.full_like(local, float("inf")))
                    parts.setdefault(kind, []).append(local.min(dim=1).values)
                if check is not None:
                    parts.setdefault("selfcheck", []).append(check)
        return {k: torch.cat(v) for k, v in parts.items()}

    def _check_parent_output(self, x: torch.Tensor, expected: int) -> None:
        was = self.parent.training
        try:
            with torch.inference_mode():
                out = self.parent.eval()(x)
        except Exception as e:
            raise TreeError(
                f"the parent cannot run on inputs of shape {tuple(x.shape[1:])}: {e}"
            ) from e
        finally:
            self.parent.train(was)
        if out.ndim != 2 or out.shape[1] != expected:
            raise TreeError(
                f"the parent outputs shape {tuple(out.shape[1:])} but {expected} "
                f"{self.parent_labels} classes are needed (router={self.router!r}); "
                "give it a matching output layer, or use router='learned' with train_parent=False"
            )

    def _make_head(self, i: int, n_in: int, n_out: int, seed: int) -> nn.Module:
        if n_out == 1:
            return ConstantHead()
        node = self.layout_.nodes[i]
        factory = self.head.get(node) if isinstance(self.head, dict) else self.head
        # initial weights from (seed, node) alone: a resumed fit builds the same heads
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1000 + i)
            head = factory(n_in, n_out) if factory else models.branch_head(n_in, n_out)
        if not isinstance(head, nn.Module):
            raise TreeError(f"the head factory for {node!r} returned {type(head).__name__}, "
                            "not an nn.Module")
        with torch.no_grad():
            try:
                out = head.eval()(torch.zeros(2, n_in))
            except Exception as e:
                raise TreeError(f"the head of {node!r} cannot read {n_in}-d inputs: {e}") from e
        if out.shape != (2, n_out):
            raise TreeError(f"the head of {node!r} outputs {tuple(out.shape[1:])}, "
                            f"expected ({n_out},) for its {n_out} children")
        return head.train()

    def _input_dim(self, i: int, tap_dim: int, acts: dict[str, CachedActivations]) -> int:
        src = self.sources_[i]
        if src < 0:
            return tap_dim
        return int(self._branch_features(src, acts["train"][[0]].flatten(1)).shape[1])

    def _branch_features(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Hidden features of head ``i`` (applying the heads above it first)."""
        src = self.sources_[i]
        x = feats if src < 0 else self._branch_features(src, feats)
        with torch.inference_mode():
            return self.heads_[i](x)[1].clone()

    def _node_dataset(self, i: int, acts: CachedActivations, rows: torch.Tensor,
                      targets: torch.Tensor) -> Dataset:
        if self.sources_[i] < 0:
            return acts.dataset(targets, rows=rows, flatten=True)
        return TensorPairs(self._branch_features(self.sources_[i], acts[rows].flatten(1)), targets)

    def _build_router(self, score: str | None = None) -> None:
        lay = self.layout_
        # rows of the parent's own classes: classes grown later get no mass from the parent
        groups = (lay.root_groups()[:self.parent_classes_] if self.parent_labels == "fine"
                  else torch.eye(lay.n_children[0]))
        # router "learned": the parent's output is not needed, so it stops at the tap if it can
        parent, how = parent_module(self.parent, self.tap, output_needed=self.router == "parent")
        self.router_ = TreeRouter(
            lay, parent, self.heads_, self.sources_,
            root_from_parent=self.router == "parent", parent_groups=groups,
            policy="hard" if self.policy == "threshold" else self.policy,
            score=score or self.confidence, selfcheck=self.selfcheck_, parent_run=how,
        ).eval()
        self._apply_thresholds()

    def _require_fit(self) -> TreeLayout:
        if not hasattr(self, "router_"):
            raise TreeError("this BranchTree is not fitted yet; call fit() or BranchTree.load()")
        return self.layout_

    # ----------------------------------------------------------------------------- predict
    def _inputs(self, x: Any) -> torch.Tensor | Texts:
        self._require_fit()
        x = _as_inputs(x)
        if self.input_shape_ is not None and tuple(x.shape[1:]) != self.input_shape_:
            raise TreeError(f"got {_what(tuple(x.shape[1:]))} but the tree was fitted on "
                            f"{_what(self.input_shape_)}")
        return x

    def _run(self, x: Any, batch_size: int = 1024) -> tuple[torch.Tensor, ...]:
        """The router's all-heads forward over ``x`` in batches: ``(leaf, path_nodes,
        path_conf, stop_level, leaf_probs)``."""
        x = self._inputs(x)
        outs = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                outs.append(self.router_(x[start:start + batch_size]))
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    def _run_paths(self, x: Any, batch_size: int = 1024, keep_features: bool = False
                   ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Path-only routing (:meth:`TreeRouter.forward_paths`) over ``x`` in batches:
        ``(leaf, path_nodes, path_conf, stop_level)``, and, with ``keep_features``, the
        parent's ``(output, tap)`` of each batch."""
        x = self._inputs(x)
        router = self.router_
        outs, kept = [], []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                logits, feats = router.features(x[start:start + batch_size])
                check = router.selfcheck_score(feats) if router.score == "selfcheck" else None
                outs.append(router.paths_from(logits, feats, check))
                if keep_features:
                    kept.append((logits, feats))
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True)), kept

    def _paths_only(self) -> bool:
        """Whether routing follows one child per node (hard / threshold): only the heads on each
        input's path need to run."""
        return self.policy in PATH_POLICIES

    def predict(self, x: Any, *, all_heads: bool = False) -> Prediction:
        """Route inputs down the tree: labels, paths, per-level confidence, abstentions.

        With the ``hard`` and ``threshold`` policies only the heads on each input's path run
        (:meth:`TreeRouter.forward_paths`), and the result is a :class:`PathPrediction`, whose
        ``leaf_probs`` run the other heads when first read. ``soft``/``topk`` (which choose
        among every leaf's probability) and ``all_heads=True`` run every head on every input
        in one pass and fill ``leaf_probs`` at once. Both give the same outputs.

        With open-world rejection fitted and calibrated (``novelty=``, :meth:`calibrate_novelty`)
        an input may also be rejected as *novel* at a node (``Prediction.novel``), told apart
        from an *unsure* one (``Prediction.abstained``); both have ``label`` -1.
        """
        pred, kept = self._predict(x, all_heads)
        nov = getattr(self, "novelty_", None)
        if nov is not None and math.isfinite(nov.threshold_):
            u = self._novelty_ranks(x, pred.path_nodes, kept)
            pred.novel_level, pred.novelty = nov.reject(u), nov.statistic(u)
            pred.label = torch.where(pred.novel_level >= 0, torch.full_like(pred.label, -1),
                                     pred.label)
        return pred

    def _novelty_ranks(self, x: Any, path_nodes: torch.Tensor,
                       kept: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """``u`` of :class:`TreeNovelty` along each input's path, from the parent's outputs
        kept by a prediction (or computed again)."""
        assert self.novelty_ is not None
        logits, feats = (tuple(torch.cat(p) for p in zip(*kept, strict=True)) if kept
                         else self.parent_outputs(x))
        return self.novelty_.ranks(self, feats, logits, path_nodes)

    def parent_outputs(self, x: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's ``(output, tapped features [N, F])`` of inputs ``x``, in batches."""
        x = self._inputs(x)
        with torch.inference_mode():
            parts = [self.router_.features(x[i:i + batch_size])
                     for i in range(0, len(x), batch_size)]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def calibrate_novelty(self, data: Split, *, target_frr: float = 0.05,
                          delta: float = 0.1) -> dict[str, Any]:
        """Set the novelty threshold on held-out known-class inputs ``data``: with probability
        ``1 - delta``, at most ``target_frr`` of known inputs are rejected as novel."""
        self._require_fit()
        if getattr(self, "novelty_", None) is None:
            raise TreeError("this tree has no novelty scorers: construct it with "
                            "novelty={'score': 'mahalanobis'} (or energy, knn, msp) and fit it")
        calib = self._held_out(data, "novelty")
        pred, kept = self._predict(calib.x, all_heads=False)
        return self.novelty_.calibrate(self._novelty_ranks(calib.x, pred.path_nodes, kept),
                                       target_frr, delta)

    def _predict(self, x: Any, all_heads: bool
                 ) -> tuple[Prediction, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The prediction without open-world rejection, and the parent's outputs it kept."""
        lay = self._require_fit()
        common = {"nodes": list(lay.nodes), "classes": list(lay.classes),
                  "thresholds": self.thresholds_list(),
                  "backoff": self.backoff or self.policy == "threshold"}
        if all_heads or not self._paths_only():
            leaf, path_nodes, path_conf, stop, leaf_probs = self._run(x)
            label = torch.where(stop >= 0, torch.full_like(leaf, -1), leaf)
            return Prediction(label=label, leaf=leaf, path_nodes=path_nodes, path_conf=path_conf,
                              stop_level=stop, leaf_probs=leaf_probs, **common), None
        (leaf, path_nodes, path_conf, stop), kept = self._run_paths(x, keep_features=True)
        label = torch.where(stop >= 0, torch.full_like(leaf, -1), leaf)
        router = self.router_
        n_classes = len(lay.classes)

        def leaf_probs_of() -> torch.Tensor:
            with torch.inference_mode():
                parts = [router.leaf_probs(router.probs_from(lg, f)) for lg, f in kept]
            return torch.cat(parts) if parts else torch.zeros(0, n_classes)

        return PathPrediction(label=label, leaf=leaf, path_nodes=path_nodes, path_conf=path_conf,
                              stop_level=stop, leaf_probs_of=leaf_probs_of, **common), kept

    def predict_proba(self, x: Any) -> torch.Tensor:
        """``[N, C]`` class probabilities: the product of probabilities along each path (every
        head runs on every input)."""
        return self._run(x)[4]

    def score(self, x: Any, y: Any) -> float:
        """Accuracy of the routed class, ignoring abstention (scikit-learn convention); ``y``
        holds class indices or names. Hard / threshold routing runs only the heads on the path."""
        leaf = self._run_paths(x)[0][0] if self._paths_only() else self._run(x)[0]
        return float((leaf == _labels(y, self.classes_)[0]).float().mean())

    def node_proba(self, node: str, x: Any) -> torch.Tensor:
        """Child probabilities of one node for all inputs (oracle routing, as the original)."""
        lay = self._require_fit()
        if node not in lay.node_index:
            raise TreeError(f"unknown node {node!r}; internal nodes are {lay.nodes}")
        i = lay.node_index[node]
        x = _as_inputs(x)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(x), 1024):
                parts.append(self.router_.node_probs(x[start:start + 1024])[:, i,
                                                                          :lay.n_children[i]])
        return torch.cat(parts)

    # --------------------------------------------------------------------------- calibrate
    def calibrate(
        self,
        data: Split | None = None,
        *,
        method: str = "risk",
        target_risk: float = 0.05,
        delta: float = 0.05,
        coverage: float | None = None,
        threshold: float | dict[str, float] = 0.96,
    ) -> dict[str, Any]:
        """Set the abstention thresholds on held-out data ``data`` (a :class:`Split`).

        * ``method="risk"``: the largest coverage whose selective risk is at most
          ``target_risk`` with probability at least ``1 - delta`` (SGR, binomial bound).
        * ``method="coverage"``: accept the given fraction of the calibration inputs.
        * ``method="fixed"``: a given threshold (0.96 as in Neural-Branching) or one per node;
          needs no data.

        The guarantee holds for calibration data that played no part in fitting, so inputs
        that :meth:`fit` used (training or early stopping, recorded in ``fitted_rows_``) are
        refused: hold part of the validation split out, e.g. with ``data.val.split(0.5)``, as
        ``branchnet tree fit`` does. A loaded tree has no such record and cannot check.
        """
        lay = self._require_fit()
        _check_choice("method", method, ("risk", "coverage", "fixed"))
        info: dict[str, Any] = {"method": method}
        if method == "fixed":
            if isinstance(threshold, dict):
                unknown = sorted(set(threshold) - set(lay.nodes))
                if unknown:
                    raise TreeError(f"thresholds for unknown nodes {unknown}; nodes: {lay.nodes}")
                info["thresholds"] = {n: float(threshold.get(n, float("-inf"))) for n in lay.nodes}
            else:
                info["threshold"] = float(threshold)
        else:
            calib = self._held_out(data, method)
            saved = self.calibration_
            self.calibration_ = {}
            self._apply_thresholds()
            pred = self.predict(calib.x)
            self.calibration_ = saved
            kappa, correct = pred.confidence, (pred.leaf == calib.y)
            if method == "coverage":
                if coverage is None or not 0 < coverage <= 1:
                    raise TreeError(f"coverage must be in (0, 1], got {coverage}")
                info.update(threshold=float(coverage_threshold(kappa, coverage)),
                            target_coverage=coverage)
            else:
                res = sgr_threshold(kappa, correct, target_risk=target_risk, delta=delta)
                if not res.feasible:
                    warnings.warn(
                        f"no threshold reaches selective risk <= {target_risk} with confidence "
                        f"{1 - delta} on {len(calib)} calibration inputs (best bound "
                        f"{res.risk_bound:.3f}); the tree will abstain on every input. Use more "
                        "calibration data, a larger target_risk or a larger delta.", stacklevel=2)
                info.update(threshold=float(res.threshold), risk_bound=float(res.risk_bound),
                            target_risk=target_risk, delta=delta, feasible=bool(res.feasible),
                            calibration_coverage=float(res.coverage),
                            calibration_risk=float(res.empirical_risk))
            info["n_calibration"] = len(calib)
        self.calibration_ = info
        self._apply_thresholds()
        return info

    def _held_out(self, data: Any, method: str) -> Split:
        """``data`` as a Split, refused if any of its inputs took part in fitting."""
        hint = ("the risk guarantee needs held-out data: split the validation set, e.g. select, "
                "calib = data.val.split(0.5), fit(data, val=select) and calibrate(calib)")
        if isinstance(data, Data):
            raise TreeError(f"calibrate got a Data, whose val split fit(data) uses for early "
                            f"stopping; {hint}")
        if not isinstance(data, Split):
            raise TreeError(f"method={method!r} needs calibration data as a Split, got "
                            f"{type(data).__name__}")
        if self.fitted_rows_ is not None:
            used = int(np.isin(_row_hashes(data.x), self.fitted_rows_).sum())
            if used:
                raise TreeError(f"{used} of {len(data)} calibration inputs were used to fit this "
                                f"tree (training or early stopping); {hint}")
        return data

    def thresholds_list(self) -> list[float]:
        lay = self._require_fit()
        c = self.calibration_
        if "thresholds" in c:
            return [float(c["thresholds"][n]) for n in lay.nodes]
        return [float(c.get("threshold", float("-inf")))] * len(lay.nodes)

    def _apply_thresholds(self) -> None:
        self.router_.thresholds.copy_(torch.tensor(self.thresholds_list()))

    # ------------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> Path:
        """Write ``tree.json`` and ``weights.safetensors`` into the folder ``path``."""
        lay = self._require_fit()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # a pretrained backbone is rebuilt from its own files: only what trained here is saved
        state = (self.parent.saved_state() if hasattr(self.parent, "saved_state")
                 else self.parent.state_dict())
        weights = {f"parent.{k}": v for k, v in state.items()}
        head_specs = {}
        for i, tapped in self.heads_.items():
            weights.update({f"heads.{i}.{k}": v for k, v in tapped.module.state_dict().items()})
            spec = ({"kind": "constant"} if isinstance(tapped.module, ConstantHead)
                    else models.spec_of(tapped.module))
            head_specs[str(i)] = {"spec": spec, "tap": tapped.layer}
        if self.selfcheck_ is not None:
            weights.update({f"selfcheck.{k}": v for k, v in self.selfcheck_.state_dict().items()})
        novelty = None
        if getattr(self, "novelty_", None) is not None:
            novelty, tensors = self.novelty_.state()
            weights.update({f"novelty.{k}": v for k, v in tensors.items()})
        fd = getattr(self, "fit_data_", None) or {}
        weights.update({f"fit.{k}": fd[k] for k in ("train_y", "val_y", "val_logits")
                        if fd.get(k) is not None})
        meta = {
            "format": "branchnet.tree", "version": FORMAT_VERSION,
            "classes": lay.classes, "hierarchy": lay.hierarchy.to_dict(), "tap": self.tap,
            "router": self.router, "node_input": self.node_input,
            "branch_tap": self.branch_tap, "policy": self.policy, "score": self.confidence,
            "backoff": self.backoff, "parent_labels": self.parent_labels,
            "parent_spec": zoo.spec_of(self.parent), "heads": head_specs,
            "sources": self.sources_, "preprocessing": self.preprocessing_,
            "input_shape": list(self.input_shape_ or ()),
            "calibration": _jsonable(self.calibration_), "fit_summary": _jsonable(self.fit_summary_),
            "selfcheck": None if self.selfcheck_ is None else {
                k: getattr(self.selfcheck_, k) for k in ("in_features", "hidden", "dropout")},
            "novelty": _jsonable(novelty), "parent_classes": self.parent_classes_,
            # where the activations it was fitted on are cached (grow and make_novelty read them)
            "fit_data": {k: fd[k] for k in ("cache", "train", "val") if k in fd} or None,
        }
        save_weights(weights, path / "weights.safetensors")
        write_json(path / "tree.json", meta)
        return path

    @classmethod
    def load(cls, path: str | Path, parent: nn.Module | None = None,
             heads: dict[str, nn.Module] | None = None) -> BranchTree:
        """Rebuild a saved tree. Models not built by branchnet must be passed in again."""
        meta, weights = read_saved(path, "tree.json", "branchnet.tree", "BranchTree")
        parent = load_saved_parent(meta, weights, parent, TreeError(
            "this tree's parent is a custom module: pass parent=... to load()"))
        layout = TreeLayout(Hierarchy.from_dict(meta["hierarchy"]), meta["classes"])
        tree = cls(parent, meta["tap"], hierarchy=layout.hierarchy, router=meta["router"],
                   node_input=meta["node_input"], branch_tap=meta["branch_tap"],
                   policy=meta["policy"], confidence=meta["score"], backoff=meta["backoff"],
                   train_parent=False, parent_labels=meta["parent_labels"])
        tree.classes_, tree.layout_, tree.hierarchy_ = list(layout.classes), layout, layout.hierarchy
        tree.sources_ = [int(s) for s in meta["sources"]]
        tree.heads_ = {}
        for key, hs in meta["heads"].items():
            node = layout.nodes[int(key)]
            if heads and node in heads:
                module = heads[node]
            elif hs["spec"] and hs["spec"].get("kind") == "constant":
                module = ConstantHead()
            elif hs["spec"]:
                module = models.build(hs["spec"])
            else:
                raise TreeError(f"the head of {node!r} is a custom module: pass heads={{...}}")
            _load_prefixed(module, weights, f"heads.{key}.", f"head {node!r}")
            tree.heads_[int(key)] = Tapped(module.eval().requires_grad_(False), hs["tap"])
        tree.preprocessing_ = meta["preprocessing"]
        tree.input_shape_ = tuple(meta["input_shape"])  # () for texts
        tree.calibration_ = _from_jsonable(meta["calibration"])
        tree.fit_summary_ = meta["fit_summary"]
        tree.selfcheck_ = None
        if meta.get("selfcheck"):
            tree.selfcheck_ = SelfCheckHead(**meta["selfcheck"])
            _load_prefixed(tree.selfcheck_, weights, "selfcheck.", "self-check")
            tree.selfcheck_.eval().requires_grad_(False)
        tree.fitted_rows_ = None  # not saved: a loaded tree cannot check calibration data
        tree.parent_classes_ = int(meta.get("parent_classes", len(layout.classes)))
        fit = {k[4:]: v for k, v in weights.items() if k.startswith("fit.")}
        tree.fit_data_ = ({**meta["fit_data"], "val_logits": None, **fit}
                          if meta.get("fit_data") else None)
        tree._build_router()
        tree.novelty_ = None
        if meta.get("novelty"):
            tree.novelty_ = TreeNovelty.from_state(_from_jsonable(meta["novelty"]), {
                k[8:]: v for k, v in weights.items() if k.startswith("novelty.")})
        return tree

    def to_torchscript(self, path: str | Path | None = None,
                       example: torch.Tensor | None = None, *,
                       paths_only: bool = False) -> torch.jit.ScriptModule:
        """Trace the whole tree (parent, heads, routing, thresholds) into TorchScript.

        The traced module returns ``(leaf, path_nodes, path_conf, stop_level, leaf_probs)``,
        the same tensors :meth:`predict` builds its :class:`Prediction` from: the all-heads
        forward of :class:`TreeRouter`. With ``paths_only=True`` (``hard`` / ``threshold``
        policies) it traces :meth:`TreeRouter.forward_paths` instead and returns the first
        four only; traced, every head runs on the inputs at its node, an empty batch where none
        are (the eager path skips those nodes), so the trace holds for any batch.
        """
        self._require_fit()
        if paths_only and not self._paths_only():
            raise TreeError(f"paths_only=True routes one child per node (policies "
                            f"{list(PATH_POLICIES)}); the {self.policy} policy needs every head")
        if self.input_shape_ == ():
            raise TreeError("a tree on texts cannot be traced to TorchScript: its parent "
                            "tokenizes strings in Python; save() it and BranchTree.load() instead")
        if example is None:
            if not self.input_shape_:
                raise TreeError("pass example=... (a batch of inputs) to trace the tree")
            example = torch.zeros(2, *self.input_shape_)
        with torch.no_grad():
            module = PathsOnly(self.router_) if paths_only else self.router_
            traced = torch.jit.trace(module, (example,), check_trace=False)
        if path is not None:
            torch.jit.save(traced, str(path))
        return traced

    def grow(self, data: Data | Split, *, under: str, group: str | None = None,
             classes: list[str] | None = None) -> BranchTree:
        """Add new classes under the internal node ``under`` without retraining the parent or
        any other branch: as new leaves of ``under``, or with ``group`` as a new branch (an
        internal node of that name holding them). ``data`` is a :class:`Data` of the new
        classes (train split to train, val split to stop early) or a :class:`Split` with
        ``classes=[names]``; inputs prepared like the tree's (``load(..., statistics=
        tree.preprocessing_)``). Only ``under``'s head (and the new branch's) trains, on the
        cached activations of the rows fitted so far and of the new inputs; the record is
        appended to ``fit_summary_["grown"]``. Calibrate again afterwards.

        >>> import branchnet as bn
        >>> data = bn.data.load("digits", seed=0)
        >>> old, new = data.select_classes([0, 1, 2, 3]), data.select_classes([4, 5])
        >>> hier = {"a": ["0", "1"], "b": ["2", "3"]}
        >>> tree = bn.BranchTree(bn.models.mlp([64, 64], 4), tap="hidden.0", hierarchy=hier,
        ...                      parent_train={"epochs": 2}, head_train={"epochs": 2},
        ...                      workdir=__import__("tempfile").mkdtemp()).fit(old)
        >>> tree.grow(new, under="b").hierarchy_.children("b")
        ['2', '3', '4', '5']
        """
        _grow(self, data, under=under, group=group, classes=classes)
        return self

    def __repr__(self) -> str:
        state = "fitted" if hasattr(self, "router_") else "not fitted"
        return (f"BranchTree(tap={self.tap!r}, router={self.router!r}, "
                f"policy={self.policy!r}, {state})")


#: the self-check branch's options (see ``BranchTree(selfcheck=...)``)
SELFCHECK_DEFAULTS: dict[str, Any] = {"target": "tcp", "fraction": 0.2, "hidden": 128,
                                      "dropout": 0.1, "train": {}}
def _what(shape: tuple[int, ...]) -> str:
    return "texts" if shape == () else f"inputs of shape {shape}"


def _probe_of(parent: nn.Module) -> tuple[nn.Module, str] | None:
    """``(probe, probe_layer)`` of a frozen backbone with a trainable probe (such as
    :class:`~branchnet.text.TextParent`), else None."""
    probe, layer = getattr(parent, "probe", None), getattr(parent, "probe_layer", None)
    return (probe, layer) if isinstance(probe, nn.Module) and isinstance(layer, str) else None


#: how a hierarchy is induced: ``{"induce": ..., "groups": ..., "depth": ..., "seed": ...}``
INDUCE_METHODS = ("confusion", "features", "weights")


def induce_spec(hierarchy: Any, parent_labels: str = "fine") -> dict[str, Any] | None:
    """The induction asked for by a hierarchy given as ``{"induce": METHOD, "groups": N,
    "depth": D}`` (with defaults), or None for any other hierarchy.

    >>> induce_spec({"induce": "weights", "groups": 3})
    {'induce': 'weights', 'groups': 3, 'depth': 1}
    """
    if not (isinstance(hierarchy, dict) and "induce" in hierarchy):
        return None
    spec = {"induce": None, "groups": 2, "depth": 1, **hierarchy}
    unknown = sorted(set(spec) - {"induce", "groups", "depth", "seed"})
    if unknown:
        raise TreeError(f"unknown hierarchy induction option(s) {unknown}; valid: induce, "
                        "groups, depth, seed")
    _check_choice("hierarchy induce", spec["induce"], INDUCE_METHODS)
    for key, low in (("groups", 2), ("depth", 1)):
        if not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < low:
            raise TreeError(f"hierarchy {key} must be an integer >= {low}, got {spec[key]!r}")
    if parent_labels != "fine":
        raise TreeError("an induced hierarchy needs a parent trained on the fine classes "
                        f"(parent_labels='fine'), got parent_labels={parent_labels!r}: its "
                        "groups do not exist until the parent is trained")
    return spec


def _check_node_examples(layout: TreeLayout, train: Split, val: Split) -> None:
    for i, node in enumerate(layout.nodes):
        for name, split in (("training", train), ("validation", val)):
            if layout.n_children[i] > 1 and not (layout.slot_of_label(node, split.y) >= 0).any():
                raise TreeError(f"node {node!r} has no {name} examples (classes "
                                f"{layout.hierarchy.leaves_under(node)}); every node needs both")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TreeError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _load_prefixed(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str,
                   what: str) -> None:
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the saved weights do not fit the {what}: {e}") from e


def _from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`_jsonable` for infinities (thresholds of -inf / +inf)."""
    if isinstance(obj, dict):
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if isinstance(obj, float) and abs(obj) >= 1e308:
        return math.copysign(math.inf, obj)
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    return obj


