"""Batched access to tensors: datasets that hand out whole batches, not rows.

``torch.utils.data.DataLoader`` calls ``dataset.__getitems__(indices)`` when a dataset has it,
so a batch is one indexing operation instead of ``batch_size`` Python calls and a collate.
Standard samplers (including ``DistributedSampler``) keep working.

Example:
    >>> import torch
    >>> ds = TensorPairs(torch.arange(10.0).view(5, 2), torch.arange(5))
    >>> x, y = next(iter(make_loader(ds, batch_size=2)))
    >>> x.shape, y.tolist()
    (torch.Size([2, 2]), [0, 1])
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def collate_batch(batch: Any) -> Any:
    """``collate_fn`` for datasets with ``__getitems__``: a stacked ``(x, y)`` batch passes
    through; anything else (a list of samples) goes to torch's ``default_collate``.

    >>> x, y = collate_batch((torch.zeros(4, 2), torch.zeros(4)))
    >>> x.shape
    torch.Size([4, 2])
    """
    if isinstance(batch, tuple) and len(batch) == 2 and all(
            isinstance(b, torch.Tensor) for b in batch):
        return batch
    return default_collate(batch)


class TensorPairs(Dataset):
    """``(x[i], y[i])`` pairs over two tensors with batched ``__getitems__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.x[index], self.y[index]


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch, drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed at epoch ``e`` sees the
    same order as an uninterrupted one (``DistributedSampler`` does the same under DDP).
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader that fetches whole batches through ``__getitems__`` when available;
    shuffling is reproducible per epoch (:class:`EpochShuffle`).

    A dataset that needs its own order when shuffled (P x K batches, one stream per branch)
    provides ``make_sampler(seed) -> Sampler`` with ``set_epoch``; its indices (any objects)
    are handed to ``__getitems__`` as they come, ``batch_size`` at a time.
    """
    batched = hasattr(dataset, "__getitems__")
    sampler: Sampler | None = None
    if shuffle:
        make = getattr(dataset, "make_sampler", None)
        sampler = make(seed) if make is not None else EpochShuffle(len(dataset), seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch if batched else None,
        persistent_workers=num_workers > 0,
    )
