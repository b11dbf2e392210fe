"""What stops a run, and how: the exceptions of :func:`cribo.train.train`, Ctrl-C
(:class:`_StopRequest`) and the processes of a distributed run that stop
answering (:class:`_Heartbeat`).

=========================  =================================================
exception                  raised when
=========================  =================================================
:class:`NonFiniteLoss`     the loss, a network's outputs or the gradients
                           became non-finite (nothing of it is saved)
:class:`ResumeError`       the folder's checkpoint cannot be continued as asked
:class:`CheckpointError`   the checkpoint to continue from is unreadable
:class:`RankStopped`       another process stopped answering (named)
:class:`TrainingInterrupted`  SIGINT; the checkpoint holds every step done
=========================  =================================================
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import distributed as dist

__all__ = ["NonFiniteLoss", "ResumeError", "CheckpointError", "RankStopped",
           "TrainingInterrupted"]


class NonFiniteLoss(RuntimeError):
    """The run diverged: the loss, a network's outputs or the gradients became NaN
    or infinite.  Nothing of it was saved; the last checkpoint is left as it was."""


class ResumeError(ValueError):
    """The run folder's checkpoint cannot be continued as asked: it was written with
    other options (listed), or ``--resume`` found none."""


class CheckpointError(RuntimeError):
    """The checkpoint to continue from is unreadable, incomplete or non-finite."""


class RankStopped(RuntimeError):
    """In a distributed run, another process stopped answering (frozen, killed or
    unreachable); the message names it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped the run after a step; its checkpoint holds every step
    done (see ``checkpoint``, ``epoch``, ``step``, ``steps_per_epoch``)."""

    def __init__(self, message: str, checkpoint: str, epoch: int, step: int,
                 steps_per_epoch: int) -> None:
        super().__init__(message)
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step
        self.steps_per_epoch = steps_per_epoch


class _EpochInterrupted(Exception):
    """Raised inside an epoch when a stop was requested: ``step`` steps of the epoch
    are done; ``sums`` are their loss sums."""

    def __init__(self, step: int, sums: Dict[str, float]) -> None:
        super().__init__(step)
        self.step, self.sums = step, sums


class _StopRequest:
    """SIGINT (Ctrl-C) asks the loop to stop at the end of the current step.

    Installed only in the main thread (where Python delivers signals); a second
    SIGINT gets the previous handler back (Python's: KeyboardInterrupt at once).
    Calling the object tells whether a stop was asked; in a distributed run it is
    a collective (any process's request stops them all at the same step), so
    every process calls it at the same points.
    """

    def __init__(self, distributed: bool) -> None:
        self.requested, self.distributed = False, distributed
        self._installed, self._previous = False, None
        # Not where signals cannot be handled, nor where SIGINT is ignored on
        # purpose (a job started in the background by a shell script).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except (ValueError, OSError):
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous if self._previous is not None
                      else signal.default_int_handler)

    def __call__(self) -> bool:
        if self.distributed:
            flag = dist.all_reduce_sum(torch.tensor([int(self.requested)]))
            return bool(flag.item() > 0)
        return self.requested

    def restore(self) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)


class _Heartbeat:
    """Each process's liveness in the process group's store, to name the one that
    stopped answering when a collective fails.

    A daemon thread sets ``cribo/heartbeat/<rank>`` to "<beats> <iteration>" every
    ``interval`` seconds (0.05 s, longer with more than 16 processes, so that the
    store, in rank 0, serves at most ~320 beats a second).  A frozen (SIGSTOP) or
    killed process stops beating; a live one keeps beating even while it waits in
    a collective.  Clock-free: :meth:`diagnose` compares two readings of the
    counters, so a killed process is named within a few intervals.
    """

    def __init__(self) -> None:
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        self.rank, self.world = dist.rank(), dist.world_size()
        self.interval = 0.05 * max(1.0, self.world / 16)
        self.iteration = -1
        self.beats, self.failed = 0, False  # this process's beats that reached the store
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cribo-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> Optional["_Heartbeat"]:
        """A heartbeat for this process, or None where the process group has no
        store to keep it in (the run then goes without the diagnosis)."""
        try:
            return cls()
        except Exception:  # noqa: BLE001 -- a torch without _get_default_store
            return None

    @staticmethod
    def _key(rank: int) -> str:
        return f"cribo/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._done.is_set():
            try:
                self.store.set(self._key(self.rank), f"{self.beats} {self.iteration}")
            except Exception:  # noqa: BLE001 -- the store is gone; diagnose() says so
                self.failed = True
                return
            self.beats += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()

    def _read(self) -> Dict[int, Tuple[int, int]]:
        out = {}
        for r in range(self.world):
            if self.store.check([self._key(r)]):
                beats, it = self.store.get(self._key(r)).decode().split()
                out[r] = (int(beats), int(it))
        return out

    def diagnose(self) -> Optional[str]:
        """Which processes stopped answering (a sentence), or None if all still beat.

        First this process's next beat tells whether the store is there (a
        failed beat: its host, rank 0, is gone, and no more is asked of it); then
        the others' heartbeats are read twice, 3 intervals apart, in a helper
        thread (a frozen store never answers a read): no answer within 3 s also
        means rank 0 stopped.
        """
        store_gone = None if self.rank == 0 else (
            "rank 0 stopped answering: the store it hosts for the processes does not "
            "respond (frozen, killed, stopped by an error of its own -- see its output -- or "
            "its machine unreachable)")
        seen, deadline = self.beats, time.time() + 3.0
        while self.beats == seen and not self.failed and time.time() < deadline:
            time.sleep(self.interval / 5)
        if self.failed or self.beats == seen:
            return store_gone
        reads: List[Dict[int, Tuple[int, int]]] = []

        def probe() -> None:
            try:
                reads.append(self._read())
                time.sleep(3 * self.interval)
                reads.append(self._read())
            except Exception:  # noqa: BLE001 -- the store went away meanwhile
                pass

        helper = threading.Thread(target=probe, name="cribo-diagnosis", daemon=True)
        helper.start()
        helper.join(3.0 + 3 * self.interval)
        if len(reads) < 2:
            return store_gone
        first, second = reads
        stopped = [r for r in range(self.world) if r != self.rank and
                   (r not in second or first.get(r, (None,))[0] == second[r][0])]
        if stopped:
            seen = ", ".join(str(second[r][1]) if r in second else "never" for r in stopped)
            ranks = ", ".join(str(r) for r in stopped)
            return (f"rank{'s' if len(stopped) > 1 else ''} {ranks} stopped answering (last "
                    f"seen at iteration {seen}): no heartbeat for {3 * self.interval:.2g} s "
                    f"(frozen, killed, stopped by an error of its own -- see its output -- or "
                    f"its machine unreachable)")
        behind = [r for r in second if r != self.rank and second[r][1] < self.iteration]
        if behind:
            who = ", ".join(f"rank {r} (at iteration {second[r][1]})" for r in behind)
            return f"{who} is alive but stuck behind this process"
        return None


def _backend_error(e: BaseException) -> str:
    """The gist of a communication error: gloo's "[file:line] Read error [addr]:port:
    Connection reset by peer. This is typically ..." -> "Read error ...: Connection
    reset by peer"."""
    text = " ".join(str(e).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return f"{type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def _rank_stopped(error: BaseException, diagnosis: str, heartbeat: _Heartbeat,
                  dist_timeout: float, last_checkpoint: Optional[str]) -> RankStopped:
    """The RankStopped of a collective that failed (``error``) because of the
    process(es) ``diagnosis`` names; ``last_checkpoint``: the sentence about the
    last checkpoint (None: none was written)."""
    waited = (f"it waited {dist_timeout:g} s (--dist-timeout) in a collective"
              if "timed out" in str(error).lower() else _backend_error(error))
    then = "once every process can run, start the same command again to continue from it"
    last = (f"{last_checkpoint}; {then}" if last_checkpoint is not None else
            f"No checkpoint was written; {then.split(' to continue')[0]}")
    at = (f"at iteration {heartbeat.iteration}" if heartbeat.iteration >= 0
          else "before training")
    return RankStopped(f"{diagnosis}. This process (rank {dist.rank()}) stopped {at}: "
                       f"{waited}. {last}.")
