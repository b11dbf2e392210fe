"""The one set of ``torch.distributed`` helpers every layer uses.

Every function works without an initialised process group (one process: rank 0
of 1), so callers never test ``is_initialized()`` themselves.  torch is imported
on first use, so :func:`launched_world_size` (the launcher's ``WORLD_SIZE``)
serves torch-free code too.  The collectives
move tensors on the device the caller gives them (the process group's device:
CPU for gloo, the GPU for NCCL).

>>> from cribo import distributed as dist
>>> if dist.is_main():
...     print(f"rank {dist.rank()} of {dist.world_size()}")
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["initialized", "rank", "world_size", "is_main", "all_gather_rows",
           "all_gather_tensor_rows", "all_reduce_sum", "launched_world_size"]


def launched_world_size() -> int:
    """The number of processes the launcher (``torchrun``) started, from its
    ``WORLD_SIZE``, before any process group exists; 1 when unset or malformed."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def cpu_share() -> int:
    """The CPU cores this process may run on, divided among the processes the
    launcher started on this machine (``torchrun``'s ``LOCAL_WORLD_SIZE``; 1 when
    unset or malformed), at least 1: what ``--threads 0`` gives each process, so
    that P processes on one machine do not each start a thread per core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        local = 1
    return max(cores // local, 1)


def initialized() -> bool:
    """True when a default process group is up (under ``torchrun``, after
    ``init_process_group``)."""
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    import torch

    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes; 1 without a process group."""
    import torch

    return torch.distributed.get_world_size() if initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files."""
    return rank() == 0


def all_reduce_sum(t: "torch.Tensor") -> "torch.Tensor":
    """Sums ``t`` over the processes in place (nothing without a process group);
    returns ``t``."""
    import torch

    if world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def all_gather_rows(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` (R_p, ...) from every process, concatenated in rank order,
    and each process's row count R_p (P,).  Processes may hold different R_p."""
    if world_size() == 1:
        return x, np.array([x.shape[0]], np.int64)
    import torch

    n = torch.tensor([x.shape[0]], dtype=torch.int64)
    sizes: List[torch.Tensor] = [torch.zeros_like(n) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, n)
    counts = np.array([int(s) for s in sizes], np.int64)
    buf = torch.zeros((int(counts.max()),) + tuple(x.shape[1:]),
                      dtype=torch.from_numpy(x[:0]).dtype)
    buf[: x.shape[0]] = torch.from_numpy(x)
    parts = [torch.zeros_like(buf) for _ in range(world_size())]
    torch.distributed.all_gather(parts, buf)
    rows = np.concatenate([p[: int(c)].numpy() for p, c in zip(parts, counts)])
    return rows, counts


def all_gather_tensor_rows(x: "torch.Tensor") -> Tuple["torch.Tensor", List[int]]:
    """:func:`all_gather_rows` for a tensor, on its device (NCCL-safe on a GPU).

    Args:
        x: (R_p, ...) this process's rows, on the process group's device.

    Returns:
        The (sum R_p, ...) rows of every process in rank order, on ``x``'s device,
        and each process's row count R_p as a list of ints (one host read of the
        P counts, which the concatenation needs; none in a single process).
    """
    if world_size() == 1:
        return x, [int(x.shape[0])]
    import torch

    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, n)
    counts = [int(c) for c in torch.cat(sizes).cpu()]
    buf = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    buf[: x.shape[0]] = x
    parts = [torch.zeros_like(buf) for _ in range(world_size())]
    torch.distributed.all_gather(parts, buf.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts
