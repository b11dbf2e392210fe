"""Pairs of views for pretraining, and a reproducible torch DataLoader over them.

Reproducibility does not depend on the number of worker processes: item
``i`` of epoch ``e`` draws its augmentations from a generator seeded by
``(seed, e, i)`` alone, and the batches' composition from one seeded by
``(seed, e)``; nothing uses a worker's own random state.  torch is imported
only by :func:`make_loader`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ._index import image_index
from .views import TwoViewTransform

__all__ = ["TwoViewDataset", "EpochBatchSampler", "make_loader", "set_epoch"]

# Stream tags, so these generators never coincide with a data set's own
# ``default_rng([seed, split, index])`` for equal seeds.
_VIEWS_STREAM = 0x43724942  # "CrIB"
_ORDER_STREAM = 0x6F726465  # "orde"


def _check_nonneg(name: str, value: int) -> int:
    v = int(value)
    if v != value or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return v


class TwoViewDataset:
    """Wraps an image source into CrIBo's pretraining items (two views + positions).

    Args:
        source: any indexable with ``len``, whose items are an (H, W, 3) uint8
            image or a tuple whose first element is one (e.g.
            :class:`SyntheticScenes`, :class:`ImageFolder`,
            :class:`VOCSegmentation`; masks are ignored).
        transform: the two-view augmentation (default: docs/method.md §1 at 224 px,
            patch 16).
        seed: base seed of the augmentations.

    Items: ``ds[i]`` -> dict with

    - ``view1``, ``view2``: (3, S, S) float32, normalised views;
    - ``pos1``, ``pos2``: (N, 2) float32, each patch centre's (x, y) in the
      source image's pixel frame (see :mod:`cribo.data.views`), N = (S/p)^2;
    - ``image_id``: int64 scalar, ``i`` (for the queue's same-image exclusion).

    The augmentations of item ``i`` come from ``numpy.random.default_rng``
    seeded by ``(seed, epoch, i)``; call :meth:`set_epoch` (or the module's
    :func:`set_epoch` on a loader) before each epoch.
    """

    def __init__(self, source: Any, transform: Optional[TwoViewTransform] = None,
                 seed: int = 0) -> None:
        if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
            raise TypeError(f"TwoViewDataset: source must be indexable with a length, "
                            f"got {type(source).__name__}")
        self.source = source
        self.transform = TwoViewTransform() if transform is None else transform
        self.seed = _check_nonneg("TwoViewDataset: seed", seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentations of epoch ``epoch`` (>= 0)."""
        self.epoch = _check_nonneg("TwoViewDataset.set_epoch: epoch", epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index), _VIEWS_STREAM])

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return (f"TwoViewDataset({self.source!r}, size={self.transform.size}, "
                f"patch_size={self.transform.patch_size}, seed={self.seed}, epoch={self.epoch})")

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i = image_index(index, len(self.source), "TwoViewDataset")
        item = self.source[i]
        image = item[0] if isinstance(item, tuple) else item
        v1, v2 = self.transform(image, self.rng(i))
        return {"view1": v1.image, "view2": v2.image, "pos1": v1.positions,
                "pos2": v2.positions, "image_id": np.int64(i)}


class EpochBatchSampler:
    """Batches of indices: seeded per epoch, and split over processes by blocks.

    The order of epoch ``e`` is a permutation from ``(seed, e)`` (or
    ``0..n-1`` without shuffling).  With ``world_size`` processes, the global
    batch ``t`` is ``order[t*G : (t+1)*G]``, ``G = batch_size * world_size``,
    and process ``rank`` takes its ``rank``-th block of ``batch_size``, so P
    processes with batch b see, in rank order, exactly the batches of one
    process with batch P*b.  With ``drop_last`` the incomplete last global
    batch is dropped; otherwise it is kept (one process) or completed with
    indices from the start of the order (several processes, so every process
    runs the same number of steps).  ``set_epoch(e, start=t)`` begins epoch
    ``e`` at its batch ``t`` (a run resumed mid-epoch); the length stays the
    epoch's full number of steps.

    Args:
        n: number of items.
        batch_size: items per batch per process.
        shuffle, seed, drop_last: as above.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n = _check_nonneg("EpochBatchSampler: n", n)
        if int(batch_size) < 1:
            raise ValueError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"EpochBatchSampler: need 0 <= rank < world_size, "
                             f"got rank {rank}, world_size {world_size}")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed = _check_nonneg("EpochBatchSampler: seed", seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the order of epoch ``epoch`` (>= 0), from its batch ``start``."""
        self.epoch = _check_nonneg("EpochBatchSampler.set_epoch: epoch", epoch)
        self.start = _check_nonneg("EpochBatchSampler.set_epoch: start", start)

    def __len__(self) -> int:
        G = self.batch_size * self.world_size
        return self.n // G if self.drop_last else -(-self.n // G)

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, _ORDER_STREAM])
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        G, b, steps = self.batch_size * self.world_size, self.batch_size, len(self)
        if not self.drop_last and self.world_size > 1 and self.n:
            order = np.resize(order, steps * G)  # wraps around to complete the last batch
        for t in range(self.start, steps):
            lo = t * G + self.rank * b
            batch = order[lo:min(lo + b, len(order))].tolist()
            if batch:
                yield batch


def make_loader(dataset: Any, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                seed: int = 0, drop_last: bool = True, distributed: bool = False,
                pin_memory: bool = False) -> Any:
    """A torch DataLoader over ``dataset`` with an :class:`EpochBatchSampler`.

    Items are collated by torch's default collate: for a
    :class:`TwoViewDataset`, a dict of tensors ``view1``/``view2``
    (B, 3, S, S) float32, ``pos1``/``pos2`` (B, N, 2) float32, ``image_id``
    (B,) int64.  Worker processes are started afresh for every epoch (not
    persistent) so that the epoch set with :func:`set_epoch` reaches them;
    the batches are the same for any ``num_workers``.

    Args:
        dataset: an indexable with ``len`` (usually a :class:`TwoViewDataset`).
        batch_size: items per batch (per process when ``distributed``).
        num_workers: worker processes (0: load in this process).
        shuffle: a new seeded order every epoch.
        seed: seed of the order.
        drop_last: drop the incomplete last batch.
        distributed: split each global batch over the processes of the
            initialised default ``torch.distributed`` group (see
            :class:`EpochBatchSampler`).
        pin_memory: page-locked batches (for CUDA training).

    Returns:
        ``torch.utils.data.DataLoader``; call ``set_epoch(loader, e)`` before
        iterating epoch ``e``.

    Raises:
        RuntimeError: ``distributed`` without an initialised process group.
        ValueError: the data set holds not even one batch with ``drop_last``.
    """
    import torch.utils.data  # lazily: only the loader needs torch

    if int(num_workers) < 0:
        raise ValueError(f"make_loader: num_workers must be >= 0, got {num_workers}")
    rank, world = 0, 1
    if distributed:
        from .. import distributed as dist

        if not dist.initialized():
            raise RuntimeError("make_loader: distributed=True needs an initialised process group "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        rank, world = dist.rank(), dist.world_size()
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world)
    if len(sampler) == 0:
        raise ValueError(f"make_loader: {len(dataset)} items make no full batch of "
                         f"{batch_size} x {world} process(es); lower batch_size or "
                         f"set drop_last=False")
    epoch = getattr(dataset, "epoch", 0)
    sampler.set_epoch(epoch if isinstance(epoch, int) else 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=int(num_workers),
                                       pin_memory=pin_memory, persistent_workers=False,
                                       worker_init_fn=_worker_ignores_interrupts)


def _worker_ignores_interrupts(_: int) -> None:
    """Workers leave SIGINT to the main process, which stops the run after its
    current step (a Ctrl-C reaches every process of the terminal's group, and a
    worker it stopped would fail the step)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def set_epoch(loader: Any, epoch: int, start: int = 0) -> None:
    """Sets the epoch of a loader's batch sampler and of its data set (where they have
    one); the sampler begins the epoch at its batch ``start`` (default 0)."""
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, EpochBatchSampler):
        sampler.set_epoch(epoch, start)
    elif start:
        raise ValueError("set_epoch: start > 0 needs a loader made by make_loader")
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
