"""Metric learning for virtual-branch ensembles: P x K batches per branch, batch-hard triplets.

- :class:`PKBatches` serves every branch its own P x K batches (P classes, ``K_per_class``
  images each; optionally all P classes from one group, e.g. one alphabet, and each branch
  restricted to its own disjoint set of groups), in the ``(B, K, ...)`` / ``(B, K)`` layout of
  virtual models, through :func:`branchnet.data.batches.make_loader`.
- :func:`batch_hard_triplet_loss` (Hermans et al. 2017): for every anchor, the farthest
  positive and the nearest negative of the batch, Euclidean (not squared) distance, soft
  margin ``softplus(d_ap - d_an)`` (numerically stable; the original's ``log(1 + x)`` gave NaN
  for ``x < -1``) or hinge ``max(0, margin + d_ap - d_an)``.
- :class:`BranchTripletLoss` / :func:`embedding_score`: ``loss_fn`` / ``score_fn`` for
  :func:`branchnet.engine.fit`.
- :func:`embed`, :func:`ensemble_embedding`, :func:`embedding_fn`: embeddings of a trained
  model for evaluation (e.g. :func:`branchnet.virtual.oneshot.oneshot_accuracy`).

Training with :func:`branchnet.engine.fit` needs ``TrainConfig.batch_size == P * K_per_class``
(the engine cuts its chunks into minibatches of ``batch_size`` rows, and the sampler's blocks
are P x K rows long).

The loss is written directly rather than through pytorch-metric-learning, whose defaults
differ (``LpDistance`` normalises embeddings, ``AvgNonZeroReducer`` averages only the non-zero
losses, soft margin = ``smooth_loss`` with ``margin=0``); with those overridden it gives the
same value, which a test checks, as it checks a brute-force loop.

Under DDP (``devices > 1``) Lightning shards the sampler's positions across processes, which
breaks the P x K blocks; train P x K batches on one process.

Example:
    >>> import torch
    >>> ds = PKBatches(torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8),
    ...                torch.arange(40) % 5, branches=2, P=2, K_per_class=3, steps_per_epoch=4)
    >>> x, y = ds.__getitems__(list(ds.make_sampler(seed=0))[:6])
    >>> x.shape, x.dtype, y.shape
    (torch.Size([6, 2, 1, 4, 4]), torch.float32, torch.Size([6, 2]))
    >>> emb = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
    >>> float(batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.2))
    0.0
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler

from branchnet.data.omniglot import scale_images

__all__ = [
    "BranchTripletLoss",
    "PKBatches",
    "PKSampler",
    "batch_hard_triplet_loss",
    "embed",
    "embedding_fn",
    "embedding_score",
    "ensemble_embedding",
]

Margin = str | float


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor of ``x``; a read-only numpy array (e.g. from a safetensors cache) is copied."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_margin(margin: Margin) -> Margin:
    if margin == "soft":
        return "soft"
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not margin >= 0:
        raise ValueError(f"margin must be 'soft' or a number >= 0, got {margin!r}")
    return float(margin)


# --- P x K batches -------------------------------------------------------------------------


class PKBatches(Dataset):
    """P x K batches for each of ``branches`` branches, as one dataset of positions.

    ``x`` ``(N, ...)``: uint8 images are scaled to [-1, 1] here, per batch, with
    :func:`branchnet.data.omniglot.scale_images` (the scaling evaluation uses too); float
    inputs are passed through unchanged (already prepared). ``labels`` ``(N,)`` ints;
    ``groups`` ``(N,)`` ints or None (e.g. the alphabet of each row; every class must lie in
    one group).

    An epoch is ``steps_per_epoch`` blocks of ``P * K_per_class`` positions; in every block each
    branch independently draws P distinct classes — with ``groups``, all from one group drawn
    uniformly among its groups with at least P classes ("within alphabets") — and
    ``K_per_class`` rows of each class (without replacement; with replacement for a class with
    fewer rows, so the block stays full). Blocks are class-major (class 0's rows, then class
    1's, ...). ``disjoint_groups=True`` splits the groups into ``branches`` disjoint sets
    (seeded by ``seed``, sizes differing by at most one; see ``branch_groups``) and each
    branch draws only from its own set.

    Fewer than P classes (in total, or in every group of some branch) raises ``ValueError``.

    ``make_sampler(seed)`` gives the training order (a :class:`PKSampler`, new draws each
    epoch from ``(seed, epoch)``). Positions are ``branches``-tuples of row indices;
    ``__getitems__`` returns ``x`` ``(B, branches, ...)`` and ``y`` ``(B, branches)``. Plain int
    positions ``i`` (a loader without ``shuffle``, e.g. the engine's validation loader) mean
    position ``i`` of the fixed order of ``PKSampler(self, seed)`` at epoch 0.
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        branches: int,
        P: int,
        K_per_class: int,
        steps_per_epoch: int,
        groups: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        disjoint_groups: bool = False,
        seed: int = 0,
    ):
        self.x = _tensor(x)
        y = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
        if len(y) != len(self.x):
            raise ValueError(f"x has {len(self.x)} rows but labels has {len(y)}")
        if len(y) and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        self.labels = torch.as_tensor(y, dtype=torch.long)
        self.branches = _check_int(branches, "branches", 1)
        self.P = _check_int(P, "P (classes per batch)", 2)
        self.K_per_class = _check_int(K_per_class, "K_per_class (images per class)", 2)
        self.steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
        self.seed = int(seed)
        self.disjoint_groups = bool(disjoint_groups)
        self.rows_of = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        if groups is None:
            if self.disjoint_groups:
                raise ValueError("disjoint_groups=True needs groups (e.g. the alphabet of each row)")
            g = np.zeros(len(y), dtype=np.int64)
        else:
            g = np.asarray(torch.as_tensor(groups).cpu()).reshape(-1)
            if len(g) != len(y):
                raise ValueError(f"groups has {len(g)} entries but labels has {len(y)}")
        self.groups = None if groups is None else torch.as_tensor(g, dtype=torch.long)
        classes_of: dict[int, list[int]] = {}
        for c, rows in self.rows_of.items():
            gs = np.unique(g[rows])
            if len(gs) != 1:
                raise ValueError(f"class {c} has rows in several groups {gs.tolist()}; every class "
                                 "must belong to exactly one group")
            classes_of.setdefault(int(gs[0]), []).append(c)
        self.classes_of = {k: np.array(sorted(v)) for k, v in sorted(classes_of.items())}
        all_groups = list(self.classes_of)
        if self.disjoint_groups:
            if len(all_groups) < self.branches:
                raise ValueError(f"disjoint_groups needs at least one group per branch: "
                                 f"{len(all_groups)} groups for {self.branches} branches")
            perm = np.random.default_rng([self.seed, 7]).permutation(all_groups).tolist()
            self.branch_groups = [sorted(perm[k :: self.branches]) for k in range(self.branches)]
        else:
            self.branch_groups = [list(all_groups) for _ in range(self.branches)]
        # groups a branch can draw a batch from: those with at least P classes
        self.eligible = [[k for k in gs if len(self.classes_of[k]) >= self.P] for gs in self.branch_groups]
        for b, el in enumerate(self.eligible):
            if not el:
                sizes = {k: len(self.classes_of[k]) for k in self.branch_groups[b]}
                what = ("in total" if groups is None
                        else f"in any group of branch {b} (classes per group: {sizes})")
                raise ValueError(f"P={self.P} classes per batch, but there are fewer than {self.P} "
                                 f"classes {what}; lower P or add classes")
        self._fixed: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        """Rows of one P x K block: ``P * K_per_class`` (the engine's ``batch_size``)."""
        return self.P * self.K_per_class

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def make_sampler(self, seed: int = 0) -> PKSampler:
        """The sampler :func:`~branchnet.data.batches.make_loader` uses when shuffling."""
        return PKSampler(self, seed)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch of row indices, ``(steps_per_epoch * P * K_per_class, branches)``."""
        P, K = self.P, self.K_per_class
        out = np.empty((self.steps_per_epoch, P * K, self.branches), dtype=np.int64)
        for step in range(self.steps_per_epoch):
            for b in range(self.branches):
                el = self.eligible[b]
                group = el[int(rng.integers(len(el)))]
                classes = rng.choice(self.classes_of[group], size=P, replace=False)
                for p, c in enumerate(classes):
                    rows = self.rows_of[int(c)]
                    out[step, p * K : (p + 1) * K, b] = rng.choice(rows, size=K, replace=len(rows) < K)
        return out.reshape(-1, self.branches)

    def _rows(self, idx: Sequence[Any]) -> torch.Tensor:
        if len(idx) and isinstance(idx[0], (numbers.Integral, torch.Tensor)) and np.ndim(idx[0]) == 0:
            if self._fixed is None:
                self._fixed = self.draw(PKSampler.rng(self.seed, 0))
            pos = np.asarray([int(i) for i in idx])
            if pos.min() < 0 or pos.max() >= len(self):
                raise IndexError(f"positions must lie in [0, {len(self)}), got min {pos.min()}, "
                                 f"max {pos.max()}")
            rows = torch.as_tensor(self._fixed[pos])
        else:
            rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if rows.ndim != 2 or rows.shape[1] != self.branches:
            raise ValueError(f"positions must be ints or {self.branches}-tuples of row indices (one per "
                             f"branch), got shape {tuple(rows.shape)}")
        return rows

    def __getitems__(self, idx: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(idx)
        x = self.x[rows]
        if x.dtype == torch.uint8:
            x = scale_images(x)
        return x, self.labels[rows]

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class PKSampler(Sampler[tuple[int, ...]]):
    """The positions of one epoch of a :class:`PKBatches`: ``branches``-tuples of row indices,
    drawn from ``(seed, epoch)`` alone (``set_epoch``), so a resumed run sees the same batches."""

    def __init__(self, dataset: PKBatches, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    @staticmethod
    def rng(seed: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), int(epoch), 0x9B])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        rows = self.dataset.draw(self.rng(self.seed, self.epoch))
        return iter([tuple(r) for r in rows.tolist()])


# --- losses and scores ---------------------------------------------------------------------


def _distances(emb: torch.Tensor) -> torch.Tensor:
    # exact pairwise Euclidean distances; cdist's backward is finite at zero distance
    return torch.cdist(emb, emb, compute_mode="donot_use_mm_for_euclid_dist")


def batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: Margin = "soft") -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) of embeddings ``(B, D)`` with ``labels`` ``(B,)``.

    For every anchor a: ``x = max_p d(a, p) - min_n d(a, n)`` over the batch (positives: same
    label, not a itself; negatives: other labels), ``d`` Euclidean. Loss per anchor:
    ``softplus(x)`` for ``margin="soft"``, ``max(0, margin + x)`` for a number. Returns the mean
    over anchors that have a positive and a negative (0, still attached to the graph, when
    none has).

    >>> emb = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    >>> float(batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=1.0))  # only anchor 3.0
    0.25
    """
    margin = _check_margin(margin)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"emb must be (B, D) and labels (B,), got {tuple(emb.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.to(emb.device)
    d = _distances(emb)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return emb.sum() * 0.0
    hardest_pos = d.masked_fill(~pos, float("-inf")).amax(1)[valid]
    hardest_neg = d.masked_fill(~neg, float("inf")).amin(1)[valid]
    x = hardest_pos - hardest_neg
    loss = F.softplus(x) if margin == "soft" else F.relu(x + margin)
    return loss.mean()


def _branch_view(outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``outputs`` as ``(B, K, D)`` and ``y`` as ``(B, K)`` (a ``(B,)`` ``y`` is shared)."""
    if outputs.ndim == 2:
        outputs = outputs.unsqueeze(1)
    if outputs.ndim != 3:
        raise ValueError(f"embeddings must be (B, K, D) (or (B, D) for one branch), got "
                         f"{tuple(outputs.shape)}")
    B, K = outputs.shape[:2]
    if y.shape == (B,):
        return outputs, y.unsqueeze(1).expand(B, K)
    if y.shape == (B, K):
        return outputs, y
    raise ValueError(f"labels must be ({B},) or ({B}, {K}) for embeddings of shape "
                     f"{tuple(outputs.shape)}, got {tuple(y.shape)}")


class BranchTripletLoss(nn.Module):
    """Sum over branches of each branch's :func:`batch_hard_triplet_loss` on its own batch.

    ``outputs`` ``(B, K, D)``; ``y`` ``(B, K)`` (branch k's own labels, from :class:`PKBatches`)
    or ``(B,)`` (one batch for all branches). A ``loss_fn`` for :func:`branchnet.engine.fit`.

    >>> out = torch.tensor([[[0.0], [0.0]], [[1.0], [2.0]], [[3.0], [0.0]], [[5.0], [0.0]]])
    >>> float(BranchTripletLoss(margin=1.0)(out, torch.tensor([0, 0, 1, 1])))  # 0.25 + 1.5
    1.75
    """

    def __init__(self, margin: Margin = "soft"):
        super().__init__()
        self.margin = _check_margin(margin)

    def forward(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, labels = _branch_view(outputs, y)
        return torch.stack([batch_hard_triplet_loss(out[:, k], labels[:, k], self.margin)
                            for k in range(out.shape[1])]).sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin!r}"


def _loo_correct(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """In-batch leave-one-out precision@1: (correct, queries that have another same-label row)."""
    d = _distances(emb.float())
    d.fill_diagonal_(float("inf"))
    same = labels[:, None] == labels[None, :]
    has_pos = (same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)).any(1)
    nearest = d.argmin(1)
    correct = ((labels[nearest] == labels) & has_pos).sum()
    return correct, int(has_pos.sum())


@torch.no_grad()
def embedding_score(outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(n_correct, count)``: in-batch leave-one-out precision@1, a ``score_fn`` for
    :func:`branchnet.engine.fit`.

    With ``(B,)`` labels (one batch for all branches, e.g. validation): precision@1 of the
    ensemble embedding (:func:`ensemble_embedding`). With ``(B, K)`` labels (each branch its
    own batch, training): each branch's precision@1 on its own (L2-normalised) embeddings,
    summed over branches. Queries without another row of their label are not counted.

    >>> out = torch.tensor([[[0.0, 1.0]], [[0.1, 1.0]], [[1.0, 0.0]], [[1.0, 0.1]]])
    >>> embedding_score(out, torch.tensor([0, 0, 1, 1]))
    (tensor(4), 4)
    """
    out, labels = _branch_view(outputs, y)
    if y.ndim == 1:
        return _loo_correct(ensemble_embedding(out), y)
    correct, count = torch.zeros((), dtype=torch.long), 0
    for k in range(out.shape[1]):
        c, n = _loo_correct(F.normalize(out[:, k].float(), dim=-1), labels[:, k])
        correct, count = correct + c.cpu(), count + n
    return correct, count


# --- embeddings of a trained model ---------------------------------------------------------


def ensemble_embedding(emb: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The ensemble's embedding: ``(N, K, D) -> (N, K * D)``, each branch L2-normalised first
    (``normalize=True``), then concatenated, branch 0 first.

    Normalising gives every branch the same weight in Euclidean distances between
    concatenations (squared distance = sum of the branches' squared distances between unit
    vectors), whatever scale each branch learned. A ``(N, D)`` input is one branch.

    >>> ensemble_embedding(torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])).tolist()
    [[0.6000000238418579, 0.800000011920929, 0.0, 1.0]]
    """
    if emb.ndim == 2:
        emb = emb.unsqueeze(1)
    if emb.ndim != 3:
        raise ValueError(f"embeddings must be (N, K, D) or (N, D), got {tuple(emb.shape)}")
    if normalize:
        emb = F.normalize(emb, dim=-1)
    return emb.reshape(emb.shape[0], -1)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def embed(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Embeddings ``(N, K, D)`` (float32, CPU) of inputs ``x`` ``(N, ...)``, in eval mode without
    gradients (the model's training mode is restored afterwards).

    uint8 ``x`` is scaled with :func:`branchnet.data.omniglot.scale_images`, as in
    :class:`PKBatches`; float ``x`` is used as given. Batches ``(b, ...)`` go to the model as
    they are (a virtual model replicates one input over its branches); an output ``(b, D)``
    (a plain, one-branch model) becomes ``(b, 1, D)``.

    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> embed(net, torch.zeros(5, 1, 2, 2), batch_size=2).shape
    torch.Size([5, 1, 3])
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    x = _tensor(x)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size]
                xb = scale_images(xb) if xb.dtype == torch.uint8 else xb
                out = model(xb.to(device))
                if out.ndim == 2:
                    out = out.unsqueeze(1)
                if out.ndim != 3 or len(out) != len(xb):
                    raise ValueError(f"the model returned shape {tuple(out.shape)} for a batch of "
                                     f"{len(xb)}; expected (batch, K, D) or (batch, D)")
                outs.append(out.float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("embed needs at least one input row")
    return torch.cat(outs)


def embedding_fn(model: nn.Module, branch: int | None = None, normalize: bool = True,
                 batch_size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (N, E)`` for :func:`branchnet.virtual.oneshot.oneshot_accuracy` and retrieval:
    the ensemble embedding (``branch=None``; :func:`ensemble_embedding`) or one branch's
    embedding (L2-normalised when ``normalize``).

    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.Unflatten(1, (2, 3)))
    >>> embedding_fn(net)(torch.zeros(5, 4)).shape, embedding_fn(net, branch=1)(torch.zeros(5, 4)).shape
    (torch.Size([5, 6]), torch.Size([5, 3]))
    """

    def fn(x: torch.Tensor) -> torch.Tensor:
        e = embed(model, x, batch_size)
        if branch is None:
            return ensemble_embedding(e, normalize)
        if not -e.shape[1] <= branch < e.shape[1]:
            raise ValueError(f"branch {branch} out of range for a model with {e.shape[1]} branches")
        return F.normalize(e[:, branch], dim=-1) if normalize else e[:, branch]

    return fn
