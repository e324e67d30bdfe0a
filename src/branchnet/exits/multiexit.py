"""A multi-exit network on a frozen parent: exit heads at several taps, trained on the
activation cache, and inference that really stops the parent at the exit.

:class:`MultiExit` puts one :class:`~branchnet.exits.heads.ExitHead` on each tap (all taps
cached in one pass of the parent; SDN's "IC-only" training: the parent never changes) and takes
the parent's own output as the last exit. An input leaves at the first early exit whose score
(:mod:`branchnet.exits.rules`: max softmax, margin, entropy or PABEE's patience) reaches the
threshold; the threshold is fixed by hand (SDN-style), or :meth:`MultiExit.calibrate` chooses it
on held-out data so that P(early answer ≠ full model's answer) ≤ ε (or the accuracy drop ≤ ε)
with probability ≥ 1 − δ (:mod:`branchnet.exits.calibrate`).

:meth:`MultiExit.predict` runs the parent stage by stage (:mod:`branchnet.exits.stages`): after
each tap only the inputs still undecided go on, batch-wise. Every answer records its exit and
its FLOPs (:mod:`branchnet.exits.flops`). :meth:`MultiExit.exit_probs` gives every exit's
probabilities from the cache instead, for calibration and for the accuracy-FLOPs curve of any
threshold without running the parent again; both give the same answers (a test).

Example:
    >>> import torch
    >>> from branchnet import models
    >>> from branchnet.data import load
    >>> data = load("digits", seed=0, progress=False)
    >>> parent = models.mlp([64, 64, 32], 10)
    >>> _ = parent.eval()
    >>> me = MultiExit(parent, ["hidden.0"], head_train={"epochs": 2}, progress=False)
    >>> me = me.fit(data).calibrate(data.val, epsilon=0.2, delta=0.1)
    >>> pred = me.predict(data.test.x)
    >>> pred.exits.shape == data.test.y.shape, set(pred.exits.tolist()) <= {0, 1}
    (True, True)
"""

from __future__ import annotations

import inspect
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from branchnet import zoo
from branchnet.cache import ActivationCache
from branchnet.checkpoint import CheckpointError, save_weights
from branchnet.data import Split, Texts
from branchnet.data.imagefolder import default_cache_dir
from branchnet.engine import TrainConfig, fit
from branchnet.exits.calibrate import KINDS, ExitCalibration, ExitError, calibrate_exit_threshold, exit_at
from branchnet.exits.flops import stage_flops
from branchnet.exits.heads import ExitHead
from branchnet.exits.rules import RULES, exit_scores, patience_step
from branchnet.exits.stages import Stages, split
from branchnet.fileio import write_json
from branchnet.saved_model import load_saved_parent, model_outputs, read_saved
from branchnet.taps import layer_names
from branchnet.tree.tree import (
    _as_inputs,
    _fit_brief,
    _fit_inputs,
    _from_jsonable,
    _jsonable,
    _probe_of,
    _train_config,
)

__all__ = ["ExitPrediction", "MultiExit"]

FORMAT = "branchnet.exits"
FORMAT_VERSION = 1
HEAD_TRAIN_DEFAULTS = {"epochs": 60, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-4,
                       "patience": 8}


@dataclass
class ExitPrediction:
    """What :meth:`MultiExit.predict` returns: per input its class index ``labels [N]``, the
    exit it took ``exits [N]`` (``0 .. E-1`` early, ``E`` the full parent), the class
    probabilities ``probs [N, C]`` of that exit and its cost ``flops [N]``."""

    labels: torch.Tensor
    exits: torch.Tensor
    probs: torch.Tensor
    flops: torch.Tensor
    classes: list[str]
    exit_names: list[str]

    def rows(self) -> list[dict[str, Any]]:
        """One row per input: prediction, exit name, confidence, FLOPs."""
        return [{"prediction": self.classes[int(c)], "exit": self.exit_names[int(e)],
                 "probability": float(p.max()), "flops": float(f)}
                for c, e, p, f in zip(self.labels, self.exits, self.probs, self.flops,
                                      strict=True)]

    def histogram(self) -> dict[str, int]:
        """Inputs per exit."""
        counts = torch.bincount(self.exits, minlength=len(self.exit_names))
        return dict(zip(self.exit_names, counts.tolist(), strict=True))


def _check_threshold(value: Any, n_exits: int) -> float | list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    if (isinstance(value, (list, tuple)) and len(value) == n_exits
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return [float(v) for v in value]
    raise ExitError(f"threshold must be a number or a list of {n_exits} numbers (one per early "
                    f"exit), got {value!r}")


class MultiExit:
    """Exit heads on the taps of a frozen ``parent`` (see the module docstring).

    Args:
        parent: the frozen network (any ``nn.Module``, or a text parent); its output is the
            last exit.
        taps: the early exits' layers, in the order the parent runs them.
        head: ``{hidden, pool, dropout}`` of each :class:`ExitHead` (default linear, pool 2).
        rule: ``msp``, ``margin``, ``entropy`` or ``patience``.
        threshold: a fixed threshold (a number, or one per early exit); :meth:`calibrate`
            replaces it.
        train_probe: train the probe of a probe parent (a frozen backbone whose ``probe``
            reads ``probe_layer``, such as :class:`~branchnet.text.TextParent`) on cached
            features first: its output is the last exit.
        head_train: training of each head (``TrainConfig`` or a dict).
        probe_train: training of the probe (default: as ``head_train``).
        workdir: checkpoints (resumable); default a temporary folder.
        cache_dir: the activation cache (default ``$BRANCHNET_CACHE_DIR/activations``).
        cache_dtype: ``float32`` (default: the staged features then equal the cached ones) or
            ``float16``.
    """

    def __init__(self, parent: nn.Module, taps: list[str], *, head: dict[str, Any] | None = None,
                 rule: str = "msp", threshold: float | list[float] | None = None,
                 train_probe: bool = False, head_train: TrainConfig | dict | None = None,
                 probe_train: TrainConfig | dict | None = None,
                 workdir: str | Path | None = None, cache_dir: str | Path | None = None,
                 cache_dtype: str = "float32", progress: bool = True) -> None:
        self.parent, self.taps, self.head = parent, taps, head
        self.rule, self.threshold, self.train_probe = rule, threshold, train_probe
        self.head_train, self.probe_train = head_train, probe_train
        self.workdir, self.cache_dir = workdir, cache_dir
        self.cache_dtype, self.progress = cache_dtype, progress
        if rule not in RULES:
            raise ExitError(f"rule must be one of {list(RULES)}, got {rule!r}")
        if cache_dtype not in ("float32", "float16"):
            raise ExitError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
        if not isinstance(taps, (list, tuple)) or not all(isinstance(t, str) for t in taps):
            raise ExitError(f"taps must be a list of layer names, got {taps!r}")
        self.stages_: Stages = split(parent, list(taps))  # unknown / out-of-order taps: here
        _check_threshold(threshold, len(taps))
        unknown = set(head or {}) - {"hidden", "pool", "dropout"}
        if unknown:
            raise ExitError(f"head takes hidden, pool and dropout, got {sorted(unknown)}")
        if train_probe and _probe_of(parent) is None:
            raise ExitError("train_probe=True needs a parent with a probe and a probe_layer "
                            f"(a text parent); {type(parent).__name__} has none")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments as given."""
        return {name: getattr(self, name)
                for name in list(inspect.signature(type(self).__init__).parameters)[1:]}

    @property
    def n_exits(self) -> int:
        """Early exits (the parent's output is exit ``n_exits``)."""
        return len(self.taps)

    @property
    def exit_names(self) -> list[str]:
        return [*self.taps, "full"]

    # ------------------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any = None, *, val: Any = None, classes: list[str] | None = None,
            preprocessing: dict[str, Any] | None = None, resume: bool = False) -> MultiExit:
        """Cache the taps (one pass of the parent), train the probe (``train_probe``) and one
        head per tap, and count each stage's FLOPs. ``X``: a Data (its train and val splits),
        a Split, or inputs with labels ``y``; ``val``: a Split for early stopping (default a
        tenth of the training split)."""
        train, val, classes, preprocessing = _fit_inputs(X, y, val, classes, preprocessing)
        if val is None:
            train, val = train.split(0.1, seed=0)
        if self.workdir is not None:
            return self._fit(train, val, classes, preprocessing, Path(self.workdir), resume)
        with tempfile.TemporaryDirectory(prefix="branchnet-exits-") as tmp:
            return self._fit(train, val, classes, preprocessing, Path(tmp), False)

    def _cache(self) -> ActivationCache:
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir() / "activations"
        return ActivationCache(root, dtype=getattr(torch, self.cache_dtype))

    def _layers(self) -> list[str]:
        """The layers to cache: the taps, and what gives the parent's output from the cache."""
        probe = _probe_of(self.parent)
        extra = [probe[1]] if probe else ([self.output_layer_] if self.output_layer_ else [])
        return list(dict.fromkeys([*self.taps, *extra]))

    def _fit(self, train: Split, val: Split, classes: list[str], preprocessing: dict[str, Any],
             workdir: Path, resume: bool) -> MultiExit:
        cfg = _train_config(self.head_train, self.progress, default=HEAD_TRAIN_DEFAULTS)
        self.classes_, self.preprocessing_ = list(classes), dict(preprocessing)
        self.input_shape_ = tuple(train.x.shape[1:])
        self.parent.eval().requires_grad_(False)
        self.output_layer_ = None if _probe_of(self.parent) else _output_layer(
            self.parent, train.x[:2])
        cache = self._cache()
        acts = {name: cache.get_many(self.parent, self._layers(), s,
                                     preprocessing=self.preprocessing_, progress=self.progress)
                for name, s in (("train", train), ("val", val))}
        summary: dict[str, Any] = {"heads": {}}
        probe = _probe_of(self.parent)
        if self.train_probe and probe is not None:
            module, layer = probe
            module.train().requires_grad_(True)
            pcfg = (cfg if self.probe_train is None else
                    _train_config(self.probe_train, self.progress, default=HEAD_TRAIN_DEFAULTS))
            res = fit(module, acts["train"][layer].dataset(train.y, flatten=True),
                      acts["val"][layer].dataset(val.y, flatten=True), pcfg,
                      workdir=workdir / "probe", resume=resume,
                      description=f"probe on {layer}")
            summary["probe"] = {**_fit_brief(res), "layer": layer}
            self.parent.eval().requires_grad_(False)
        opts = {"hidden": 0, "pool": 2, "dropout": 0.0, **(self.head or {})}
        self.heads_: list[ExitHead] = []
        for k, tap in enumerate(self.taps):
            torch.manual_seed(cfg.seed + k)
            head = ExitHead(tuple(acts["train"][tap].shape[1:]), len(classes), **opts)
            res = fit(head, acts["train"][tap].dataset(train.y), acts["val"][tap].dataset(val.y),
                      cfg, workdir=workdir / "heads" / f"{k:02d}", resume=resume,
                      description=f"exit {k} on {tap}")
            summary["heads"][tap] = _fit_brief(res)
            self.heads_.append(head.eval().requires_grad_(False))
        self.flops_ = stage_flops(self.stages_, self.heads_, train.x[:32])
        self.fit_summary_ = summary
        self.calibration_: dict[str, Any] | None = None
        return self

    def _require_fit(self) -> None:
        if not hasattr(self, "heads_"):
            raise ExitError("this MultiExit is not fitted yet: call fit() first")

    # ----------------------------------------------------------------------------- FLOPs
    @property
    def parent_flops(self) -> float:
        """FLOPs per input of the parent alone (every stage, no heads)."""
        self._require_fit()
        f = self.flops_
        return f["start"] + sum(f["stages"]) + f["finish"][0]

    @property
    def exit_flops(self) -> list[float]:
        """FLOPs per input of answering at each exit: the parent up to that tap and every head
        on the way (the full exit: the whole parent and all heads)."""
        self._require_fit()
        f, out, run = self.flops_, [], self.flops_["start"]
        for s, h in zip(f["stages"], f["heads"], strict=True):
            run += s + h
            out.append(run)
        return [*out, run + f["finish"][0]]

    # ------------------------------------------------------------------ exits from cache
    def exit_probs(self, x: Any) -> torch.Tensor:
        """``[N, E + 1, C]``: every exit's class probabilities (the last: the parent's), from
        the activation cache (filled on first use, one pass of the parent)."""
        self._require_fit()
        data = x if isinstance(x, Split) else Split(_as_inputs(x), torch.zeros(
            len(x), dtype=torch.long))
        acts = self._cache().get_many(self.parent, self._layers(), data,
                                      preprocessing=self.preprocessing_, progress=self.progress)
        with torch.inference_mode():
            cols = [torch.softmax(h(acts[t].as_tensor()), 1)
                    for h, t in zip(self.heads_, self.taps, strict=True)]
            probe = _probe_of(self.parent)
            if probe:
                out = probe[0](acts[probe[1]].as_tensor().flatten(1))
            elif self.output_layer_:
                out = acts[self.output_layer_].as_tensor().flatten(1)
            else:  # the forward computes more after its last layer: run it
                out = model_outputs(self.parent, data.x)
            cols.append(torch.softmax(out.float(), 1))
        return torch.stack(cols, dim=1)

    def decide(self, probs: torch.Tensor, threshold: float | list[float] | None = None, *,
               rule: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(answers [N], exits [N])`` of the exit rule (default this one's) at ``threshold``
        (default the fitted one) on every exit's probabilities ``probs [N, E + 1, C]``."""
        scores = exit_scores(probs[:, :-1], rule or self.rule)
        thr = self._threshold(threshold)
        exits = exit_at(scores, thr)
        answers = probs.argmax(dim=2).gather(1, exits[:, None])[:, 0]
        return answers, exits

    def _threshold(self, threshold: float | list[float] | None = None) -> float | list[float]:
        thr = _check_threshold(threshold if threshold is not None else self.threshold_,
                               self.n_exits)
        if thr is None:
            raise ExitError("no exit threshold: pass threshold=... or call calibrate() first")
        return thr

    @property
    def threshold_(self) -> float | list[float] | None:
        cal = getattr(self, "calibration_", None)
        return cal["threshold"] if cal else self.threshold

    # --------------------------------------------------------------------- calibration
    def calibrate(self, data: Any, *, epsilon: float = 0.05, delta: float = 0.1,
                  kind: str = "consistency") -> MultiExit:
        """Choose the threshold on held-out ``data`` (a Split the heads did not train on) so
        that the ``kind`` risk (``consistency``: answer ≠ the full model's; ``accuracy``:
        wrong where the full model is right) is ≤ ``epsilon`` with probability ≥ 1 −
        ``delta``. Infeasible targets fall back to the full model for every input (threshold
        ``inf``), and :attr:`calibration_` says so."""
        self._require_fit()
        if kind not in KINDS:
            raise ExitError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if not isinstance(data, Split):
            raise ExitError(f"calibrate expects a Split of held-out inputs and labels, got "
                            f"{type(data).__name__}")
        cal = self.threshold_for(self.exit_probs(data), data.y, epsilon=epsilon, delta=delta,
                                 kind=kind)
        self.calibration_ = {**cal.to_dict(), "rule": self.rule}
        self.calibration_result_: ExitCalibration = cal
        return self

    def threshold_for(self, probs: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                      delta: float, kind: str) -> ExitCalibration:
        """The Learn-then-Test threshold of this rule on held-out exit probabilities
        ``probs [N, E + 1, C]`` with labels ``y`` (what :meth:`calibrate` sets)."""
        scores = exit_scores(probs[:, :-1], self.rule)
        answers = probs.argmax(dim=2)
        grid = (np.arange(1, self.n_exits + 1, dtype=float) if self.rule == "patience" else None)
        return calibrate_exit_threshold(scores, answers[:, :-1], answers[:, -1], y,
                                        epsilon=epsilon, delta=delta, kind=kind, grid=grid)

    # ----------------------------------------------------------------- staged inference
    def predict(self, x: Any, *, batch_size: int = 256,
                threshold: float | list[float] | None = None) -> ExitPrediction:
        """Answer each input at its exit, running the parent stage by stage: after each tap
        only the undecided inputs of a batch go on."""
        self._require_fit()
        thr = self._threshold(threshold)
        thresholds = thr if isinstance(thr, list) else [thr] * self.n_exits
        x = _as_inputs(x)
        n = len(x)
        probs = torch.empty(n, len(self.classes_))
        exits = torch.empty(n, dtype=torch.long)
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            self._predict_batch(x[start:start + batch_size], rows, thresholds, probs, exits)
        return ExitPrediction(probs.argmax(1), exits, probs,
                              torch.tensor(self.exit_flops)[exits], self.classes_,
                              self.exit_names)

    def _predict_batch(self, xb: Any, rows: torch.Tensor, thresholds: list[float],
                       probs: torch.Tensor, exits: torch.Tensor) -> None:
        st = self.stages_
        with torch.inference_mode():
            state = st.start(xb)
            count = previous = None
            for k, head in enumerate(self.heads_):
                state, feats = st.run(k, state)
                p = torch.softmax(head(feats.float()), 1).cpu()
                answer = p.argmax(1)
                if self.rule == "patience":
                    count = patience_step(count, previous, answer)
                    score = count
                else:
                    score = exit_scores(p[:, None], self.rule)[:, 0]
                done = score >= thresholds[k]
                if done.any():
                    probs[rows[done]], exits[rows[done]] = p[done], k
                    keep = torch.nonzero(~done).flatten()
                    if len(keep) == 0:
                        return
                    rows, state = rows[keep], st.select(state, keep)
                    if count is not None:
                        count = count[keep]
                    answer = answer[keep]
                previous = answer
            probs[rows] = torch.softmax(st.finish(state).float(), 1).cpu()
            exits[rows] = self.n_exits

    # -------------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """``exits.json`` and ``weights.safetensors`` in the folder ``path`` (the parent's own
        weights, or only the probe of a pretrained backbone, and every head)."""
        self._require_fit()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = (self.parent.saved_state() if hasattr(self.parent, "saved_state")
                 else self.parent.state_dict())
        weights = {f"parent.{k}": v for k, v in state.items()}
        for k, h in enumerate(self.heads_):
            weights.update({f"heads.{k}.{n}": v for n, v in h.state_dict().items()})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "taps": self.taps,
                "rule": self.rule, "threshold": self.threshold, "classes": self.classes_,
                "preprocessing": self.preprocessing_, "input_shape": list(self.input_shape_),
                "parent_spec": zoo.spec_of(self.parent), "output_layer": self.output_layer_,
                "heads": [h.spec() for h in self.heads_], "flops": self.flops_,
                "calibration": self.calibration_, "fit_summary": self.fit_summary_,
                "cache_dtype": self.cache_dtype}
        save_weights(weights, path / "weights.safetensors")
        write_json(path / "exits.json", _jsonable(meta))
        return path

    @classmethod
    def load(cls, path: str | Path, parent: nn.Module | None = None, *,
             cache_dir: str | Path | None = None, progress: bool = True) -> MultiExit:
        """A saved MultiExit; a parent not built by branchnet must be passed in again."""
        meta, weights = read_saved(path, "exits.json", FORMAT, "MultiExit")
        parent = load_saved_parent(meta, weights, parent, ExitError(
            "this MultiExit's parent is a custom module: pass parent=..."))
        me = cls(parent, meta["taps"], rule=meta["rule"], threshold=meta["threshold"],
                 cache_dir=cache_dir, cache_dtype=meta["cache_dtype"], progress=progress)
        me.heads_ = []
        for k, spec in enumerate(meta["heads"]):
            head = ExitHead(**spec)
            try:
                head.load_state_dict({n[len(f"heads.{k}."):]: v for n, v in weights.items()
                                      if n.startswith(f"heads.{k}.")})
            except RuntimeError as e:
                raise CheckpointError(f"{path / 'weights.safetensors'} does not fit exit head "
                                      f"{k}: {e}") from e
            me.heads_.append(head.eval().requires_grad_(False))
        me.classes_, me.preprocessing_ = meta["classes"], meta["preprocessing"]
        me.input_shape_ = tuple(meta["input_shape"])
        me.output_layer_, me.flops_ = meta["output_layer"], meta["flops"]
        me.calibration_ = _from_jsonable(meta["calibration"])
        me.fit_summary_ = meta["fit_summary"]
        return me

    def __repr__(self) -> str:
        state = "fitted" if hasattr(self, "heads_") else "not fitted"
        return (f"MultiExit({type(self.parent).__name__}, taps={self.taps}, rule={self.rule!r}, "
                f"{state})")


def _output_layer(parent: nn.Module, x: Any) -> str | None:
    """The layer whose output *is* the parent's output (e.g. its last linear layer), so the
    cache holds the full model's answers; None when the forward computes more after it."""
    outputs: dict[str, Any] = {}
    names = layer_names(parent)
    handles = [parent.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n in names]
    try:
        with torch.inference_mode():
            out = parent(x if isinstance(x, Texts) else torch.as_tensor(x))
    finally:
        for h in handles:
            h.remove()
    same = [n for n in names if outputs.get(n) is out]
    return min(same, key=lambda n: (n.count("."), names.index(n))) if same else None
