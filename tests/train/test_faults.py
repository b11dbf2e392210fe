"""Faults lose nothing: `cribo pretrain` under the faults a user or a cluster
inflicts (a diverging run, kills at any moment, a frozen or killed process of a
distributed run, two runs into one folder, a full disk, Ctrl-C, resuming with
other options, a requeued job), each with what it must leave behind and say.

Every run is tiny (tests/runs.py's TINY, one thread, no data workers);
the long versions are marked slow, each with a short version in CI.  One file,
longer than most, because every fault shares the same tiny runs and helpers
that inflict the faults and read what a run left behind."""
from __future__ import annotations

import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from runs import TINY, free_port  # noqa: E402

# Each monkeypatch below patches the module that calls the name (a patch on one
# that does not would leave the test vacuous).
import cribo.train.loop as loop_mod  # noqa: E402
import cribo.train.resume as resume_mod  # noqa: E402
import cribo.train.saving as saving_mod  # noqa: E402
from cribo.train.checkpoints import (FolderLocked, OutputWriteError, atomic_save,  # noqa: E402
                                     lock_folder, remove_stale_temporaries, snapshot)
from cribo.train.config import config_from_args  # noqa: E402
from cribo.train.faults import CheckpointError, NonFiniteLoss, ResumeError  # noqa: E402
from cribo.train.loop import train  # noqa: E402
from cribo.train.resume import RUN_CONTROL, config_differences  # noqa: E402
from cribo.train.saving import _teacher_backbone_state  # noqa: E402
import cribo.cli.pretrain as pretrain_cmd  # noqa: E402
from cribo.cli.pretrain import main  # noqa: E402

# 3 steps of 8 images per epoch, 3 epochs: long enough to stop mid-epoch.
SMALL = TINY + ["--n-images", "24", "--batch-size", "8", "--epochs", "3", "--no-evaluate"]
# 2 steps per epoch and a checkpoint plus a snapshot after each: a save-heavy run.
SAVES = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "6", "--no-evaluate",
                "--keep-checkpoints", "2"]


def cfg_of(args, out, *extra):
    return config_from_args(list(args) + ["--output-dir", str(out)] + list(extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Two checkpoints hold bit-identical networks, objective and optimizer state."""
    for part in ("student", "teacher", "objective"):
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[part][k]), f"{part}.{k}"
    assert a["objective"]["_extra_state"]["queue"].keys() == \
        b["objective"]["_extra_state"]["queue"].keys()
    for k, v in a["objective"]["_extra_state"]["queue"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, b["objective"]["_extra_state"]["queue"][k]), f"queue.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer.{i}.{k}"
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])


def all_finite(ck):
    return all(bool(torch.isfinite(t).all()) for t in _tensors(ck))


def _tensors(obj):
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _count(log, kind):
    return sum(f'"type": "{kind}"' in x for x in open(log)) if log.exists() else 0


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp." in n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of SMALL and SAVES: what every interrupted run must equal."""
    base = tmp_path_factory.mktemp("reference")
    out = {}
    for name, args in (("small", SMALL), ("saves", SAVES)):
        train(cfg_of(args, base / name))
        out[name] = load(base / name / "checkpoint.pth")
    return out


# =============================================================================
# a diverging run
# =============================================================================

def test_a_run_that_diverges_at_once_saves_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "4", "--lr", "1e40",
                      "--no-evaluate", "--output-dir", str(out)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cribo: error: the run diverged: ")
    assert "non-finite" in err[0] and "iteration " in err[0] and "--lr (now 1e+40)" in err[0]
    assert "No checkpoint was written before it" in err[0]
    # The epoch-1 state is NaN: nothing was written rather than a NaN checkpoint.
    assert not (out / "checkpoint.pth").exists() and not (out / "teacher_backbone.pth").exists()


def test_a_diverged_checkpoint_is_kept_and_resuming_it_names_the_cause(tmp_path):
    """--lr 1e6 keeps finite weights for an epoch, then the student's tokens overflow:
    the stop is NonFiniteLoss (not a C operator's "tokens must be finite"), the
    last good checkpoint stays, resuming from it says the same at once, and a lower
    --lr with --allow-config-change continues from it."""
    out = tmp_path / "run"
    args = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "4", "--lr", "1e6",
                   "--no-evaluate"]
    with pytest.raises(NonFiniteLoss) as first:
        train(cfg_of(args, out))
    msg = str(first.value)
    assert "the run diverged: the student's patch tokens hold" in msg
    assert f"The last checkpoint, {out / 'checkpoint.pth'} (after epoch 1 of 4), is intact" in msg
    assert "--allow-config-change" in msg and "--no-resume" in msg
    saved = (out / "checkpoint.pth").read_bytes()
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and all_finite(ck)
    with pytest.raises(NonFiniteLoss, match="after epoch 1 of 4"):
        train(cfg_of(args, out))
    assert (out / "checkpoint.pth").read_bytes() == saved
    summary = train(cfg_of(args, out, "--lr", "1e-3", "--allow-config-change"))
    assert summary["start_epoch"] == 1
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 4 and all_finite(ck)


def test_a_non_finite_gradient_stops_the_step_before_the_update(tmp_path, monkeypatch):
    original = loop_mod._clip_gradients
    calls = {"n": 0}

    def poisoned(model, clip):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, step 1 (2 steps per epoch)
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = \
                float("inf")
        return original(model, clip)

    monkeypatch.setattr(loop_mod, "_clip_gradients", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"the gradient of backbone\.\S+ is not finite at "
                                            r"iteration 2 \(epoch 2 of 2\)"):
        train(cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2",
                             "--no-evaluate"], out))
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and all_finite(ck)


def test_a_checkpoint_with_non_finite_values_is_not_continued(tmp_path):
    out = tmp_path / "run"
    cfg = cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2",
                         "--no-evaluate"], out)
    train(cfg)
    ck = load(out / "checkpoint.pth")
    ck["teacher"]["backbone.cls_token"][..., 0] = float("nan")  # as older versions wrote
    ck["epoch"] = 1
    torch.save(ck, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"non-finite values "
                                                        r"\(teacher\.backbone\.cls_token"):
        train(cfg)


def test_an_unreadable_checkpoint_is_explained_in_cribo_words(tmp_path):
    out = tmp_path / "run"
    cfg = cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "1",
                         "--no-evaluate"], out)
    train(cfg)
    full = (out / "checkpoint.pth").read_bytes()
    for content, says in ((b"", "the file is empty"), (full[:200], "it is truncated")):
        (out / "checkpoint.pth").write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            train(cfg)
        msg = str(e.value)
        assert f"cannot read the checkpoint '{out / 'checkpoint.pth'}'" in msg and says in msg
        assert "--no-resume" in msg and "weights_only" not in msg
        assert e.value.__cause__ is None and e.value.__suppress_context__  # torch's advice hidden


# =============================================================================
# the checkpoint is the commit point
# =============================================================================

def test_a_stale_or_missing_teacher_export_is_rewritten_from_the_checkpoint(tmp_path,
                                                                            monkeypatch, capsys):
    """Killed between the two writes of the old order (checkpoint, then export), a
    finished run kept an export one epoch old that nothing rewrote; re-invoked,
    the run now trains nothing and re-exports the checkpoint's teacher."""
    out = tmp_path / "run"
    cfg = cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2",
                         "--no-evaluate", "--keep-checkpoints", "2"], out)
    train(cfg)
    final = _teacher_backbone_state(load(out / "checkpoint.pth")["teacher"])
    older = _teacher_backbone_state(load(out / "checkpoint0000.pth")["teacher"])
    assert any(not torch.equal(final[k], older[k]) for k in final)

    def no_training(*a, **k):
        raise AssertionError("a complete run trained again")

    monkeypatch.setattr(loop_mod, "train_one_epoch", no_training)
    for damage in ("stale", "missing"):
        if damage == "stale":
            torch.save(older, out / "teacher_backbone.pth")
        else:
            os.unlink(out / "teacher_backbone.pth")
        capsys.readouterr()
        summary = train(cfg)
        assert summary["already_complete"] and summary["history"] == []
        stdout = capsys.readouterr().out
        assert "holds a complete run (2 epochs): nothing to train" in stdout
        assert "re-exported" in stdout
        export = load(out / "teacher_backbone.pth")
        assert export.keys() == final.keys()
        assert all(torch.equal(export[k], final[k]) for k in final), damage


def test_a_kill_between_the_two_writes_leaves_the_previous_checkpoint_in_charge(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    """The export is written first, the checkpoint last: a death in between leaves
    the epoch-1 checkpoint, and continuing re-exports it and redoes epoch 2."""
    out = tmp_path / "run"
    cfg = cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2",
                         "--no-evaluate"], out)
    original = saving_mod.atomic_save
    order = []

    class Killed(BaseException):
        pass

    def dies_before_the_second_checkpoint(obj, path, what="checkpoint"):
        order.append(os.path.basename(path))
        if order.count("checkpoint.pth") == 2:
            raise Killed
        original(obj, path, what)

    monkeypatch.setattr(saving_mod, "atomic_save", dies_before_the_second_checkpoint)
    with pytest.raises(Killed):
        train(cfg)
    assert order == ["teacher_backbone.pth", "checkpoint.pth"] * 2
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 1
    stale = load(out / "teacher_backbone.pth")  # epoch 2's teacher, ahead of the checkpoint
    assert not all(torch.equal(stale[k], v) for k, v in
                   _teacher_backbone_state(ck["teacher"]).items())
    monkeypatch.setattr(saving_mod, "atomic_save", original)
    capsys.readouterr()
    summary = train(cfg)
    # The export is put back in step with the checkpoint before training goes on.
    assert f"re-exported {out / 'teacher_backbone.pth'}" in capsys.readouterr().out
    assert summary["start_epoch"] == 1 and len(summary["history"]) == 1
    ck = load(out / "checkpoint.pth")
    export = load(out / "teacher_backbone.pth")
    want = _teacher_backbone_state(ck["teacher"])
    assert ck["epoch"] == 2 and all(torch.equal(export[k], want[k]) for k in want)


# =============================================================================
# distributed runs: a frozen process, a killed one
# =============================================================================

def _default_sigint():
    """In a child: SIGINT as a terminal delivers it, even under a runner that
    ignores it (a child inherits an ignored signal, and Python keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Gloo:
    """Two `cribo pretrain` processes on gloo; the lines of each, time-stamped."""

    LONG = TINY + ["--n-images", "16", "--batch-size", "4", "--epochs", "100", "--no-evaluate"]

    def __init__(self, out, *extra, args=LONG):
        port = free_port()
        args = list(args) + ["--output-dir", str(out), *extra]
        self.log = out / "log.jsonl"
        self.lines = [[], []]
        self.procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CRIBO_NUM_THREADS="1",
                       OMP_NUM_THREADS="1")
            p = subprocess.Popen([sys.executable, "-m", "cribo", "pretrain", *args], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=_default_sigint)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(p, self.lines[rank]), daemon=True).start()

    @staticmethod
    def _read(p, lines):
        for line in p.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    def wait_for_steps(self, n, timeout=120.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log.exists() and sum('"type": "iter"' in x for x in open(self.log)) >= n:
                return
            assert all(p.poll() is None for p in self.procs), self.lines
            time.sleep(0.02)
        raise AssertionError(f"no {n} steps in {timeout} s: {self.lines}")

    def error_line(self, rank, timeout):
        """(time, text) of the first 'cribo: error:' line of ``rank`` (None, None if
        none came in ``timeout`` s or the process ended without one)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = next(((t, x) for t, x in self.lines[rank] if x.startswith("cribo: error: ")),
                        None)
            if line is not None:
                return line
            if self.procs[rank].poll() is not None:
                time.sleep(0.2)  # the reader's last lines
                return next(((t, x) for t, x in self.lines[rank]
                             if x.startswith("cribo: error: ")), (None, None))
            time.sleep(0.01)
        return None, None

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait()


@pytest.mark.parametrize("frozen", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_frozen_process_stops_the_others_after_the_timeout_naming_it(tmp_path, frozen):
    """SIGSTOP one process of two: the other stops after --dist-timeout (not torch's
    default of many minutes) with one line naming the rank that stopped answering
    (rank 0 hosts the store, which then cannot be asked: it is named from that)."""
    timeout = 2.0
    job = _Gloo(tmp_path / "run", "--dist-timeout", str(timeout))
    other = 1 - frozen
    try:
        job.wait_for_steps(3)
        t0 = time.time()
        os.kill(job.procs[frozen].pid, signal.SIGSTOP)
        t_line, line = job.error_line(other, timeout + 30)
        assert line is not None, job.lines[other]
        assert job.procs[other].wait(timeout=30) == 1
        assert t_line - t0 < timeout + 6  # + 3 s for an unanswering store, + margin
        assert f"rank {frozen} stopped answering" in line
        if other == 0:
            assert "no heartbeat" in line
        assert f"it waited {timeout:g} s (--dist-timeout) in a collective" in line
        assert "is intact" in line and "start the same command again" in line
    finally:
        job.kill_all()


@pytest.mark.parametrize("killed", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_process_ends_the_run_in_under_a_second(tmp_path, killed):
    job = _Gloo(tmp_path / "run")
    other = 1 - killed
    try:
        job.wait_for_steps(3)
        t0 = time.time()
        job.procs[killed].kill()
        t_line, line = job.error_line(other, 30)
        assert line is not None, job.lines[other]
        assert job.procs[other].wait(timeout=30) == 1
        # The run ends (its last line) within a second; the interpreter's exit
        # (torch's teardown) follows.
        assert t_line - t0 < 1.0, t_line - t0
        assert f"rank {killed} stopped answering" in line and "Connection" in line
    finally:
        job.kill_all()


@pytest.mark.slow
def test_sigint_to_one_process_of_a_gloo_run_stops_both_at_the_same_step(tmp_path):
    """Whichever process gets the Ctrl-C, all stop after the same step (the request
    is shared by a collective), rank 0 saves it, and the continued run equals an
    uninterrupted one of two processes bit for bit."""
    args = TINY + ["--n-images", "24", "--batch-size", "4", "--epochs", "3", "--no-evaluate",
                   "--drop-path", "0"]
    full = _Gloo(tmp_path / "full", args=args)
    try:
        assert [p.wait(timeout=300) for p in full.procs] == [0, 0], full.lines
    finally:
        full.kill_all()
    job = _Gloo(tmp_path / "run", args=args)
    try:
        job.wait_for_steps(4)
        job.procs[1].send_signal(signal.SIGINT)
        assert [p.wait(timeout=120) for p in job.procs] == [130, 130], job.lines
    finally:
        job.kill_all()
    time.sleep(0.2)
    line = next(x for _, x in job.lines[0] if x.startswith("cribo: interrupted (SIGINT)"))
    assert "(launched as before, with 2 processes)" in line
    ck = load(tmp_path / "run" / "checkpoint.pth")
    assert 0 < ck["epoch_step"] < 3 and ck["world_size"] == 2
    again = _Gloo(tmp_path / "run", args=args)
    try:
        assert [p.wait(timeout=300) for p in again.procs] == [0, 0], again.lines
    finally:
        again.kill_all()
    assert_same_state(load(tmp_path / "run" / "checkpoint.pth"),
                      load(tmp_path / "full" / "checkpoint.pth"))


# =============================================================================
# two runs into one folder
# =============================================================================

def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_holder_does_not_block(
        tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cribo.train.checkpoints import lock_folder\n"
         f"with lock_folder({str(out)!r}):\n    print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "1",
                             "--no-evaluate"], out)
        t0 = time.time()
        with pytest.raises(FolderLocked, match=rf"{out} is in use by another cribo pretrain "
                                               rf"\(pid {holder.pid} on "):
            train(cfg)
        assert time.time() - t0 < 5
        assert sorted(os.listdir(out)) == ["cribo.lock"]  # nothing written
        from cribo.cli import main as cli_main

        assert cli_main(["pretrain", *TINY, "--batch-size", "8", "--no-evaluate", "--output-dir",
                         str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cribo: error: ") \
            and f"pid {holder.pid}" in err[0], err
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock; its lock file does not block.
    assert (out / "cribo.lock").exists()
    summary = train(cfg)
    assert len(summary["history"]) == 1


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with lock_folder(str(tmp_path)):
        with lock_folder(str(tmp_path)):
            pass
        probe = subprocess.run(
            [sys.executable, "-c", "from cribo.train.checkpoints import lock_folder\n"
             f"with lock_folder({str(tmp_path)!r}): pass"], capture_output=True, text=True)
        assert probe.returncode == 1 and "FolderLocked" in probe.stderr
        assert f"pid {os.getpid()}" in probe.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "from cribo.train.checkpoints import lock_folder\n"
         f"with lock_folder({str(tmp_path)!r}): pass"], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


# =============================================================================
# a full disk
# =============================================================================

def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"w": torch.ones(3)}, str(path))
    before = path.read_bytes()
    # The kernel's own ENOSPC: the temporary file is /dev/full.
    if os.path.exists("/dev/full"):
        os.symlink("/dev/full", f"{path}.tmp.{os.getpid()}")
        with pytest.raises(OutputWriteError, match=rf"cannot write the checkpoint {path}: No "
                                                   rf"space left on device .*the previous "
                                                   rf"checkpoint\.pth is intact"):
            atomic_save({"w": torch.zeros(1000)}, str(path), "the checkpoint")
        assert path.read_bytes() == before and temporaries(tmp_path) == []

    # A writer that fails the way a full disk does, half-way through.
    def full_disk(obj, fh):
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputWriteError, match="No space left on device") as e:
        atomic_save({"w": torch.zeros(1000)}, str(path), "the checkpoint")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == before and temporaries(tmp_path) == []


def test_a_full_disk_mid_run_stops_cleanly_and_the_run_continues_exactly(tmp_path, reference):
    """ENOSPC at the epoch-2 checkpoint: OutputWriteError naming the file, the
    epoch-1 checkpoint intact, no temporary file left; a temporary file left by a
    writer killed mid-write is removed at the next start; the continued run ends
    bit-identical to the uninterrupted one."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "run"
    cfg = cfg_of(SMALL, out)

    def disk_fills_up(epoch, stats):
        if epoch == 0:
            os.symlink("/dev/full", out / f"checkpoint.pth.tmp.{os.getpid()}")

    with pytest.raises(OutputWriteError) as e:
        train(cfg, on_epoch_end=disk_fills_up)
    msg = str(e.value)
    assert f"cannot write the checkpoint {out / 'checkpoint.pth'}: No space left on device" in msg
    assert "the previous checkpoint.pth is intact" in msg
    assert f"The last checkpoint, {out / 'checkpoint.pth'}, holds the state after epoch 1 " \
           f"of 3: once there is room, run the same command again" in msg
    # The export was written before the checkpoint failed: the message says it is ahead.
    assert f"{out / 'teacher_backbone.pth'} already holds the teacher after epoch 2 of 3, " \
           f"ahead of the checkpoint" in msg
    assert temporaries(out) == []
    assert load(out / "checkpoint.pth")["epoch"] == 1
    # A kill mid-write leaves a temporary file (a dead writer's): removed at start.
    (out / "checkpoint.pth.tmp.4194303").write_bytes(b"PK\x03\x04 half a zip")
    (out / "teacher_backbone.pth.tmp.12").write_bytes(b"")
    summary = train(cfg)
    assert summary["start_epoch"] == 1
    assert temporaries(out) == []
    assert_same_state(load(out / "checkpoint.pth"), reference["small"])


def test_stale_temporaries_are_removed_and_named(tmp_path):
    for name in ("checkpoint.pth.tmp.17", "teacher_backbone.pth.tmp.99999999",
                 "checkpoint0003.pth.tmp.5", "config.json.tmp.1"):
        (tmp_path / name).write_bytes(b"")
    for name in ("notes.tmp.txt", "mine.tmp.3", "checkpoint.pth.tmp.x"):  # not cribo's
        (tmp_path / name).write_bytes(b"keep")
    assert remove_stale_temporaries(str(tmp_path)) == sorted(
        ["checkpoint.pth.tmp.17", "teacher_backbone.pth.tmp.99999999",
         "checkpoint0003.pth.tmp.5", "config.json.tmp.1"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tmp.x", "mine.tmp.3",
                                            "notes.tmp.txt"]


# =============================================================================
# Ctrl-C
# =============================================================================

def _resume_args(line):
    """The arguments of the command the stop line gives (after 'cribo pretrain')."""
    cmd = shlex.split(line.split("to continue: ", 1)[1])
    assert cmd[:2] == ["cribo", "pretrain"] and cmd[-1] == "--resume", cmd
    return cmd[2:]


def test_sigint_stops_after_the_step_and_the_run_continues_exactly(tmp_path, monkeypatch,
                                                                   capsys, reference):
    """SIGINT in the 5th step (epoch 2, step 2 of 3): the step finishes, a checkpoint
    of it is written, one line says where it stopped and the command that
    continues, exit status 130; that command ends bit-identical to the
    uninterrupted run."""
    from cribo.nn.objective import CriboObjective

    original = CriboObjective.forward
    calls = {"n": 0}

    def ctrl_c_in_step_5(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(CriboObjective, "forward", ctrl_c_in_step_5)
    out = tmp_path / "run"
    argv = SMALL + ["--output-dir", str(out), "--no-resume"]
    handler = signal.getsignal(signal.SIGINT)
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        pytest.fail("SIGINT escaped as a KeyboardInterrupt")
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cribo: interrupted (SIGINT) at epoch 2 of 3, step 2 of "
                             f"3; {out / 'checkpoint.pth'} holds every step done; to continue: "
                             f"cribo pretrain ")
    ck = load(out / "checkpoint.pth")
    assert (ck["epoch"], ck["epoch_step"], ck["iteration"]) == (1, 2, 5)
    assert all_finite(ck)
    args = _resume_args(err[0])
    assert "--no-resume" not in args
    monkeypatch.setattr(CriboObjective, "forward", original)
    assert main(args) == 0
    assert_same_state(load(out / "checkpoint.pth"), reference["small"])
    # The epoch records too: the interrupted epoch's mean covers all its steps.
    epochs = [json.loads(x) for x in open(out / "log.jsonl") if '"type": "epoch"' in x]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]


def test_sigint_while_a_complete_run_sets_up_skips_the_evaluation(tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "run"
    argv = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "1", "--no-evaluate",
                   "--output-dir", str(out)]
    assert main(argv) == 0
    reported = []
    monkeypatch.setattr(pretrain_cmd, "_report", lambda *a: reported.append(a))
    original = resume_mod._repair_exports

    def ctrl_c_while_setting_up(*a):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*a)

    monkeypatch.setattr(resume_mod, "_repair_exports", ctrl_c_while_setting_up)
    capsys.readouterr()
    assert main(argv[:-3] + ["--evaluate", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"cribo: interrupted (SIGINT) before the evaluation; {out} holds a complete run" in err
    assert reported == []


def test_an_epoch_resumes_at_its_batch_and_data_workers_leave_sigint_to_the_run():
    """set_epoch(loader, e, start) yields exactly the rest of epoch e's batches; a
    data worker ignores the Ctrl-C that a terminal sends to the whole group (the
    run stops after its step; a worker it killed would fail that step)."""
    from cribo.data import make_loader, set_epoch

    data = list(range(40))
    loader = make_loader(data, 4, num_workers=0, seed=3)
    set_epoch(loader, 2)
    full = [b.tolist() for b in loader]
    set_epoch(loader, 2, start=6)
    assert [b.tolist() for b in loader] == full[6:] and len(loader) == 10
    set_epoch(loader, 3)
    assert [b.tolist() for b in loader] != full  # start is per call, epoch 3's own order
    loader = make_loader(data, 4, num_workers=1, seed=3)
    set_epoch(loader, 2)
    batches = iter(loader)
    got = [next(batches).tolist()]
    worker = batches._workers[0]
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.3)
    assert worker.is_alive()
    got += [b.tolist() for b in batches]
    assert got == full


@pytest.mark.slow
def test_sigint_to_a_real_process_with_data_workers(tmp_path, reference):
    """The same from outside, at random steps, with two data worker processes: the
    signal goes to the whole process group, as a terminal's Ctrl-C does."""
    out = tmp_path / "run"
    argv = SMALL + ["--output-dir", str(out), "--num-workers", "2"]
    rng = random.Random(9)
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-m", "cribo", "pretrain", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=_default_sigint)
        log = out / "log.jsonl"
        steps = _count(log, "iter") + rng.randint(1, 4)
        while _count(log, "iter") < steps and p.poll() is None:
            time.sleep(0.01)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:  # it finished first
            break
        assert p.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "to continue: cribo pretrain" in lines[0], lines
        argv = _resume_args(lines[0])
    if p.returncode != 0:
        done = subprocess.run([sys.executable, "-m", "cribo", "pretrain", *argv],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert_same_state(load(out / "checkpoint.pth"), reference["small"])


# =============================================================================
# resuming: other options, a requeued job
# =============================================================================

class _Stop(Exception):
    pass


def _stop_after_first_epoch(epoch, stats):
    if epoch == 0:
        raise _Stop


def test_resuming_with_other_options_is_refused_naming_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2", "--no-evaluate"]
    with pytest.raises(_Stop):
        train(cfg_of(args, out), on_epoch_end=_stop_after_first_epoch)
    config_json = (out / "config.json").read_bytes()
    ckpt = (out / "checkpoint.pth").read_bytes()
    for flag in ("--resume", None):  # explicit, and automatic
        extra = [flag] if flag else []
        with pytest.raises(ResumeError) as e:
            train(cfg_of(args, out, "--lr", "1e-3", "--n-images", "24", *extra))
        msg = str(e.value)
        assert f"{out} holds a checkpoint (after epoch 1 of 2) written with other options: " \
               "--n-images 16 -> 24, --lr 0.002 -> 0.001." in msg
        assert "--allow-config-change" in msg and "--no-resume" in msg
    assert (out / "config.json").read_bytes() == config_json
    assert (out / "checkpoint.pth").read_bytes() == ckpt
    # Run control may differ freely.
    summary = train(cfg_of(args, out, "--log-every", "5", "--threads", "2", "--save-every", "2",
                           "--keep-checkpoints", "1", "--dist-timeout", "30"))
    assert summary["start_epoch"] == 1
    # Another option, allowed: continued, and the change is said and logged.
    capsys.readouterr()
    summary = train(cfg_of(args, out, "--epochs", "3", "--allow-config-change"))
    assert summary["start_epoch"] == 2 and len(summary["history"]) == 1
    assert "with changed options (--allow-config-change): --epochs 2 -> 3" in \
        capsys.readouterr().out
    runs = [json.loads(x) for x in open(out / "log.jsonl") if '"type": "run"' in x]
    assert runs[-1]["config_changes"] == {"epochs": [2, 3]}
    assert json.load(open(out / "config.json"))["config"]["epochs"] == 3


def test_config_differences_ignore_run_control_and_count_processes():
    base = config_from_args([]).to_dict()
    control = {"output_dir": "elsewhere", "threads": 2, "num_workers": 0, "progress": False,
               "log_every": 1, "save_every": 3, "keep_checkpoints": 4, "dist_timeout": 9.0,
               "evaluate": False, "eval_k": 3, "eval_train_images": 5, "eval_val_images": 5,
               "resume": True, "allow_config_change": True, "device": "cpu", "backend": "torch",
               "preset": "cpu",
               "profile": True}
    assert set(control) == set(RUN_CONTROL)
    assert config_differences(base, {**base, **control}) == []
    changed = {**base, "lr": 0.5, "crop_scale": [0.5, 1.0]}
    assert config_differences(base, changed) == [("crop_scale", [0.25, 1.0], [0.5, 1.0]),
                                                 ("lr", 0.002, 0.5)]
    assert config_differences(base, base, saved_world=2, world=1) == [("processes", 2, 1)]
    # An option the checkpoint predates counts as its default.
    old = {k: v for k, v in base.items() if k != "nn_start_epoch"}
    assert config_differences(old, base) == []
    assert config_differences(old, {**base, "nn_start_epoch": 2}) == [("nn_start_epoch", 1, 2)]


def test_a_requeued_job_continues_and_resume_is_tri_state(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2", "--no-evaluate",
                   "--keep-checkpoints", "2"]
    # --resume with nothing to continue from is an error, before any work.
    with pytest.raises(ResumeError, match=rf"--resume: {out} holds no checkpoint\.pth"):
        train(cfg_of(args, out, "--resume"))
    # Unset: an empty folder starts afresh ...
    with pytest.raises(_Stop):
        train(cfg_of(args, out), on_epoch_end=_stop_after_first_epoch)
    # ... and the same command again (a requeued job) continues.
    summary = train(cfg_of(args, out))
    assert summary["start_epoch"] == 1 and len(summary["history"]) == 1
    # A finished run re-invoked trains nothing and says so; main() then evaluates.
    import cribo.evaluation.job

    def no_training(*a, **k):
        raise AssertionError("a complete run trained again")

    evaluated = []

    def fake_report(cfg, summary):
        evaluated.append(summary)
        return {"metrics": {n: {"value": 0.5, "floor": 0.4, "delta_ci": [0.0, 0.2]} for n in
                            ("retrieval mIoU", "retrieval fg/bg IoU", "linear probe mIoU")},
                "report_dir": str(out / "report")}

    monkeypatch.setattr(loop_mod, "train_one_epoch", no_training)
    monkeypatch.setattr(cribo.evaluation.job, "evaluate_and_report", fake_report)
    capsys.readouterr()
    assert main([a for a in args if a != "--no-evaluate"] + ["--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "holds a complete run (2 epochs): nothing to train" in stdout
    assert len(evaluated) == 1 and evaluated[0]["already_complete"]
    assert evaluated[0]["seconds"] > 0  # the run's training time, for the report
    assert "retrieval mIoU: 50.0 (untrained 40.0" in stdout
    monkeypatch.undo()
    # --no-resume starts afresh, replacing what the folder holds.
    capsys.readouterr()
    summary = train(cfg_of(args, out, "--no-resume"))
    assert summary["start_epoch"] == 0 and len(summary["history"]) == 2
    assert "starting afresh (--no-resume): removed checkpoint.pth, teacher_backbone.pth, " \
           "checkpoint0000.pth, checkpoint0001.pth" in capsys.readouterr().out
    runs = [json.loads(x) for x in open(out / "log.jsonl") if '"type": "run"' in x]
    assert len(runs) == 1 and runs[0]["start_epoch"] == 0


def test_an_ablation_continues_a_stopped_variant_and_evaluates_a_finished_one(tmp_path,
                                                                              monkeypatch):
    """cribo ablate calls train() per (variant, seed) and counts eval.json as done: a
    variant stopped mid-training continues, and one trained but not yet evaluated
    is evaluated without training again."""
    from cribo.evaluation.ablate import run_ablation

    common = TINY + ["--epochs", "2", "--batch-size", "16", "--eval-train-images", "6",
                     "--eval-val-images", "4", "--eval-k", "5"]
    run_dir = tmp_path / "full-seed0"
    starts = []

    def stopped_after_one_epoch(cfg, on_epoch_end=None):
        return train(cfg, on_epoch_end=_stop_after_first_epoch)  # raises _Stop

    monkeypatch.setattr(loop_mod, "train", stopped_after_one_epoch)
    with pytest.raises(_Stop):
        run_ablation(["full"], [0], str(tmp_path), common)
    assert load(run_dir / "checkpoint.pth")["epoch"] == 1 and not (run_dir / "eval.json").exists()

    def recorded(cfg, on_epoch_end=None):
        summary = train(cfg, on_epoch_end)
        starts.append((summary["start_epoch"], summary["already_complete"]))
        return summary

    monkeypatch.setattr(loop_mod, "train", recorded)
    run_ablation(["full"], [0], str(tmp_path), common)
    assert starts == [(1, False)]
    scores = json.load(open(run_dir / "eval.json"))
    os.unlink(run_dir / "eval.json")  # killed during the evaluation
    run_ablation(["full"], [0], str(tmp_path), common)
    assert starts == [(1, False), (2, True)]
    assert json.load(open(run_dir / "eval.json")) == scores


def test_epoch_snapshots_keep_the_newest_n_as_links(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(cfg_of(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "3",
                         "--no-evaluate", "--keep-checkpoints", "2"], out))
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert names == ["checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth"]
    for index in (1, 2):  # DINO's names: the 0-based index of the epoch just done
        assert load(out / f"checkpoint{index:04d}.pth")["epoch"] == index + 1
    assert os.stat(out / "checkpoint0002.pth").st_ino == os.stat(out / "checkpoint.pth").st_ino
    assert temporaries(out) == []
    # Without hard links (some file systems), a copy.
    def no_links(*a, **k):
        raise OSError(errno.EPERM, "hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    path = snapshot(str(out / "checkpoint.pth"), 7, keep=1)
    assert os.path.basename(path) == "checkpoint0007.pth"
    assert os.stat(path).st_ino != os.stat(out / "checkpoint.pth").st_ino
    assert open(path, "rb").read() == open(out / "checkpoint.pth", "rb").read()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint0")) == \
        ["checkpoint0007.pth"]


# =============================================================================
# kills at random moments
# =============================================================================

def _kill_loop(out, args, n_kills, reference_ck, seed):
    """Starts ``args`` in ``out`` again and again, each time killing it (SIGKILL)
    at a random moment of its training (after a random number of steps, a random
    fraction into the next) or as soon as a temporary file shows that a save is
    being written; after each kill every file it keeps loads, and the run
    finished at the end equals the uninterrupted one bit for bit."""
    rng = random.Random(seed)
    log = out / "log.jsonl"
    steps = config_from_args(list(args)).epochs * 2  # 2 steps per epoch
    kinds = []
    for k in range(n_kills):
        runs, done = _count(log, "run"), _count(log, "iter")
        p = subprocess.Popen([sys.executable, "-m", "cribo", "pretrain", *args,
                              "--output-dir", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while p.poll() is None and _count(log, "run") == runs:
                time.sleep(0.005)  # training starts
            start = load(out / "checkpoint.pth")["iteration"] if (out / "checkpoint.pth").exists() \
                else 0
            during_save = k % 2 == 0
            # A few steps on at most, so that the run needs many kills to finish.
            target = done + rng.randint(0, max(min(3, steps - start - 1), 0))
            while p.poll() is None:
                if during_save:
                    if temporaries(out):
                        break
                elif _count(log, "iter") >= target:
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
                time.sleep(0.0005)
            p.kill()
            p.wait()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if p.returncode == 0:  # it finished before the kill
            break
        kinds.append("save" if during_save else "random")
        if (out / "checkpoint.pth").exists():
            ck = resume_mod._read_checkpoint(str(out / "checkpoint.pth"))  # complete, finite
            assert 0 <= ck["epoch"] <= steps // 2
            export = load(out / "teacher_backbone.pth")  # written before the checkpoint
            assert export.keys() == _teacher_backbone_state(ck["teacher"]).keys()
        for name in os.listdir(out):
            if name.startswith("checkpoint0") and name.endswith(".pth"):
                assert load(out / name)["epoch"] == int(name[10:14]) + 1
    summary = train(cfg_of(args, out))
    assert temporaries(out) == []
    assert_same_state(load(out / "checkpoint.pth"), reference_ck)
    export = load(out / "teacher_backbone.pth")
    want = _teacher_backbone_state(reference_ck["teacher"])
    assert all(torch.equal(export[k], want[k]) for k in want)
    return kinds, summary


def test_kills_during_saves_and_mid_epoch_lose_nothing(tmp_path, reference):
    kinds, _ = _kill_loop(tmp_path / "run", SAVES, 2, reference["saves"], seed=1)
    assert kinds, "every run finished before it was killed"


@pytest.mark.slow
def test_many_kills_at_random_moments_lose_nothing(tmp_path):
    args = SAVES + ["--epochs", "12"]
    train(cfg_of(args, tmp_path / "reference"))
    reference_ck = load(tmp_path / "reference" / "checkpoint.pth")
    kinds, _ = _kill_loop(tmp_path / "run", args, 10, reference_ck, seed=2)
    assert len(kinds) >= 5, kinds
