"""Per-iteration schedules of docs/method.md §6, precomputed as arrays (DINO's way)."""
from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "teacher_temp_schedule", "pos_weight_schedule"]


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """(epochs * iters_per_epoch,) values: a linear warm-up from ``warmup_start`` to
    ``base`` over ``warmup_epochs``, then a cosine from ``base`` to ``final``."""
    total = epochs * iters_per_epoch
    warm = min(warmup_epochs * iters_per_epoch, total)
    head = np.linspace(warmup_start, base, warm) if warm > 0 else np.zeros(0)
    t = np.arange(total - warm)
    tail = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    out = np.concatenate([head, tail])
    assert len(out) == total
    return out


def teacher_temp_schedule(start: float, end: float, warmup_epochs: int, epochs: int,
                          iters_per_epoch: int) -> np.ndarray:
    """Per-iteration teacher temperature: ``linspace(start, end, warmup_epochs)[e]``
    during the warm-up, then ``end``; constant within an epoch (docs/method.md §5)."""
    per_epoch = np.full(epochs, end, dtype=np.float64)
    w = min(warmup_epochs, epochs)
    if warmup_epochs > 0:
        per_epoch[:w] = np.linspace(start, end, warmup_epochs)[:w]
    return np.repeat(per_epoch, iters_per_epoch)


def pos_weight_schedule(start: float, end: float, epochs: int,
                        iters_per_epoch: int) -> np.ndarray:
    """Per-iteration positional weight: ``linspace(start, end, epochs)[e]`` (docs/method.md §2:
    the reference's ``linspace(pos_alpha[1], pos_alpha[0], epochs)``)."""
    return np.repeat(np.linspace(start, end, epochs), iters_per_epoch)
