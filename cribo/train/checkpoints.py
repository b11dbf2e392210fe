"""The run folder's files, written so that no fault loses what was saved.

What :mod:`cribo.train` writes into ``output_dir``, and how:

- every file is written to ``<name>.tmp.<pid>`` in the same folder, flushed to
  disk (``fsync``) and renamed over ``<name>`` (:func:`atomic_save`), so a
  reader sees the old file or the new one, never a part of one: a kill, a
  power cut or a full disk in the middle of a save leaves the previous file
  intact.  A failed write removes its temporary file and raises
  :class:`OutputWriteError` naming the file and the cause ("No space left on
  device"), not torch's "unexpected pos";
- the folder is locked for the run (:func:`lock_folder`, ``flock`` on
  ``cribo.lock``): a second ``cribo pretrain`` into the same folder refuses
  at once (:class:`FolderLocked`, naming the other process).  The kernel
  releases the lock when its holder dies, however it dies, so a lock left by
  a killed run never blocks;
- temporary files found by the lock's new holder are a dead writer's (only
  the holder writes) and are removed (:func:`remove_stale_temporaries`);
- epoch snapshots ``checkpointNNNN.pth`` beside ``checkpoint.pth``
  (:func:`snapshot`): DINO's names, ``NNNN`` the 0-based index of the epoch
  just finished (its ``epoch`` field, the epochs done, is ``NNNN + 1``), hard
  links to the checkpoint where the file system has them (no copy: the
  checkpoint is always replaced by a rename, never rewritten in place), the
  newest N kept.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

from .run_folder import CHECKPOINT, CONFIG, LOCK, TEACHER_BACKBONE, snapshot_name

__all__ = ["OutputWriteError", "FolderLocked", "atomic_save", "atomic_write_text",
           "lock_folder", "remove_stale_temporaries", "snapshot", "list_snapshots"]

# The temporary files of the files cribo writes in a run folder (no others):
# the checkpoint, its snapshots (snapshot_name: the stem and 4+ digits), the
# teacher export and config.json.
_STEM, _EXT = os.path.splitext(CHECKPOINT)
_TMP = re.compile(rf"^(?P<name>{re.escape(_STEM)}(\d{{4,}})?{re.escape(_EXT)}|"
                  rf"{re.escape(TEACHER_BACKBONE)}|{re.escape(CONFIG)})\.tmp\.(?P<pid>\d+)$")
_SNAPSHOT = re.compile(rf"^{re.escape(_STEM)}(?P<index>\d{{4,}}){re.escape(_EXT)}$")


class OutputWriteError(RuntimeError):
    """Writing a file of the run folder failed (a full disk, a quota, an I/O
    error); the file it was to replace is intact and no temporary file is left."""


class FolderLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


# =============================================================================
# atomic writes
# =============================================================================

def _tmp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def _fsync_dir(folder: str) -> None:
    """Makes a rename in ``folder`` durable (where the platform allows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: str, e: OSError, what: str) -> OutputWriteError:
    cause = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        cause += " (the disk or the quota is full)"
    kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
            else f"{os.path.basename(path)} was not written")
    return OutputWriteError(f"cannot write {what} {path}: {cause}; {kept}, and no temporary "
                            f"file is left")


def _replace_atomically(path: str, fill: Any, what: str) -> None:
    """Calls ``fill(tmp)`` to create ``tmp = <path>.tmp.<pid>`` complete and synced,
    then renames it over ``path``.  On any failure or interruption the temporary
    file is removed and ``path`` is left as it was."""
    tmp = _tmp_name(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e, what) from e
        # torch.save reports a failed write through its zip writer ("unexpected
        # pos ..."); the file object's own OSError is the real cause.
        ctx = e.__context__
        if isinstance(e, RuntimeError) and isinstance(ctx, OSError):
            raise _write_error(path, ctx, what) from e
        raise
    _fsync_dir(os.path.dirname(path))


def _written_by(write: Any) -> Any:
    """A ``fill`` for :func:`_replace_atomically` that calls ``write(file)``."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return fill


def atomic_save(obj: Any, path: str, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path`` atomically (see the module docstring).

    Raises:
        OutputWriteError: the write failed (the message names the file and the
            cause; ``path`` is as it was, and no temporary file is left).
    """
    import torch

    _replace_atomically(path, _written_by(lambda fh: torch.save(obj, fh)), what)


def atomic_write_text(text: str, path: str, what: str = "file") -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_save`."""
    _replace_atomically(path, _written_by(lambda fh: fh.write(text.encode("utf-8"))), what)


def remove_stale_temporaries(folder: str) -> List[str]:
    """Removes the ``<name>.tmp.<pid>`` files of ``folder`` and returns their names
    (``<name>``: a file cribo writes there: ``checkpoint.pth``, its snapshots,
    ``teacher_backbone.pth``, ``config.json``).

    Call it holding the folder's lock (:func:`lock_folder`): only the lock's
    holder writes there, so every temporary file it finds at start was left by a
    writer that died mid-write (the process id in the name is not reliable
    evidence of that: a requeued job in a new container often gets the same id).
    """
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if _TMP.match(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return sorted(removed)


# =============================================================================
# the folder lock
# =============================================================================

_HELD: Dict[str, List[Any]] = {}  # real path -> [fd, depth]: re-entrant in one process


def _describe_holder(lock_path: str) -> str:
    try:
        with open(lock_path) as fh:
            info = dict(line.split("=", 1) for line in fh.read().splitlines() if "=" in line)
    except (OSError, ValueError):
        info = {}
    if "pid" not in info:
        return "another process"
    since = f", since {info['since']}" if "since" in info else ""
    return f"pid {info['pid']} on {info.get('host', '?')}{since}"


@contextmanager
def lock_folder(folder: str) -> Iterator[None]:
    """Holds ``folder``'s lock (``flock`` on ``folder/cribo.lock``) for the block.

    Re-entrant within a process.  The lock file keeps the holder's pid, host and
    start time, for the refusal message of the next process.  Without ``fcntl``
    (Windows) the folder is not locked.

    Raises:
        FolderLocked: another live process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # no flock: run unlocked
        yield
        return
    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = os.path.join(folder, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderLocked(
                f"{folder} is in use by another cribo pretrain ({_describe_holder(path)}); "
                f"wait for it to finish, stop it, or choose another --output-dir") from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                      f"since={time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())
    except OSError:
        pass  # the lock holds without its description (e.g. a full disk)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the flock (the file stays: a later run reuses it)


# =============================================================================
# epoch snapshots
# =============================================================================

def list_snapshots(folder: str) -> List[Tuple[int, str]]:
    """(epoch index, path) of the snapshots in ``folder``, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m["index"]), os.path.join(folder, n)) for n in names
             if (m := _SNAPSHOT.match(n))]
    return sorted(found)


def snapshot(checkpoint: str, epoch_index: int, keep: int) -> str:
    """Adds ``checkpointNNNN.pth`` beside ``checkpoint`` and keeps the newest ``keep``.

    The snapshot is a hard link to ``checkpoint`` (a copy where the file system
    has no links), made under a temporary name and renamed into place, so it is
    complete or absent.  Older snapshots beyond the newest ``keep`` are removed;
    ``checkpoint`` itself never is.

    Returns:
        The snapshot's path.
    """
    if keep < 1:
        raise ValueError(f"snapshot: keep must be >= 1, got {keep}")
    folder = os.path.dirname(checkpoint)
    path = os.path.join(folder, snapshot_name(epoch_index))

    def link_or_copy(tmp: str) -> None:
        try:
            os.link(checkpoint, tmp)
        except OSError:  # no hard links here: copy
            shutil.copyfile(checkpoint, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())

    _replace_atomically(path, link_or_copy, "snapshot")
    for _, old in list_snapshots(folder)[:-keep]:
        try:
            os.unlink(old)
        except FileNotFoundError:
            pass
    return path
