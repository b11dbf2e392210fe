"""cribo.distributed: the launcher's process counts and each process's share of the cores."""
from __future__ import annotations

import os

import pytest

from cribo import distributed as dist


@pytest.mark.parametrize("env, want", [(None, 1), ("4", 4), ("0", 1), ("x", 1)])
def test_launched_world_size_reads_the_launchers_count(monkeypatch, env, want):
    if env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", env)
    assert dist.launched_world_size() == want


@pytest.mark.parametrize("cores, local, want", [(16, None, 16), (16, "4", 4), (16, "3", 5),
                                                 (2, "8", 1), (6, "bad", 6)])
def test_cpu_share_divides_the_cores_among_the_local_processes(monkeypatch, cores, local, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert dist.cpu_share() == want


def test_without_a_process_group_this_is_rank_0_of_1():
    assert (dist.initialized(), dist.rank(), dist.world_size(), dist.is_main()) == \
        (False, 0, 1, True)


def test_threads_0_gives_the_run_its_share_of_the_cores(tmp_path, monkeypatch):
    """`--threads 0` under torchrun with 2 local processes: each takes half the cores."""
    torch = pytest.importorskip("torch")
    import cribo
    from runs import TINY

    from cribo.train import config_from_args, train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # WORLD_SIZE unset: one process runs
    before = (torch.get_num_threads(), cribo.get_num_threads())
    try:
        # the last --threads wins over TINY's
        cfg = config_from_args(TINY + ["--threads", "0", "--epochs", "1", "--n-images", "16",
                                       "--batch-size", "8", "--no-evaluate",
                                       "--output-dir", str(tmp_path)])
        train(cfg)
        assert (torch.get_num_threads(), cribo.get_num_threads()) == (3, 3)
    finally:
        torch.set_num_threads(before[0])
        cribo.set_num_threads(before[1])
