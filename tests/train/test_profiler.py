"""The step profiler (cribo/train/profiler.py): seconds per phase from the marks
the loop takes, the coarse split always logged, the detailed one only with
--profile, which changes nothing that is computed."""
from __future__ import annotations

import json
import types

import pytest

torch = pytest.importorskip("torch")

from runs import TINY  # noqa: E402

import cribo.train.profiler as profiler_mod  # noqa: E402
from cribo.train.config import config_from_args  # noqa: E402
from cribo.train.loop import train  # noqa: E402
from cribo.train.profiler import StepProfiler  # noqa: E402

#: The t_* fields an "iter" record carried before the profiler existed (the loop's
#: own phases, the objective's parts, the student's forward), written by hand.
COARSE = {"data", "teacher_backbone_forward", "heads_backward", "backbone_backward",
          "optimizer_ema", "clustering", "pooling", "queue", "student_forward",
          "teacher_heads", "losses", "student_backbone_forward", "student_heads_forward",
          "step"}
#: What --profile adds.
DETAIL = {"batch_to_device", "objective", "clip_grad", "optimizer_step", "ema"}

#: One step's marks at hand-picked clock readings (seconds).
MARKS = [("start", 1.0), ("batch_on_device", 1.5), ("teacher_forward", 3.0),
         ("objective_done", 7.0), ("backward_start", 7.25), ("backward_end", 10.0),
         ("clipped", 10.5), ("optimizer_stepped", 11.5), ("ema_done", 13.0)]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def run_step(prof, clock, objective=None, student=None, end=14.0):
    clock.now = 0.25
    prof.waiting()
    for name, at in MARKS:
        clock.now = at
        prof.mark(name)
    clock.now = end
    return prof.step_done(objective, student)


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(profiler_mod, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


def test_the_coarse_phases_are_the_spans_between_their_marks(clock):
    prof = StepProfiler(enabled=True)
    t = run_step(prof, clock, objective={"clustering": 0.5, "losses": 0.125},
                 student={"student_backbone_forward": 2.0, "student_heads_forward": 1.0,
                          "backbone_grad_ready": 8.0})
    assert t == {"data": 0.75, "teacher_backbone_forward": 2.0,
                 "heads_backward": 0.75,      # backward start 7.25 -> backbone gradient 8
                 "backbone_backward": 2.0,    # 8 -> backward end 10
                 "optimizer_ema": 3.0,        # 10 -> 13
                 "clustering": 0.5, "losses": 0.125,
                 "student_backbone_forward": 2.0, "student_heads_forward": 1.0,
                 "step": 13.0}                # start 1 -> step_done at 14
    assert prof.epoch_means() == {}  # only --profile keeps them


def test_a_student_without_its_gradient_stamp_counts_the_whole_backward_as_backbone(clock):
    t = run_step(StepProfiler(enabled=True), clock)
    assert t["heads_backward"] == 0.0 and t["backbone_backward"] == 2.75


def test_off_the_profiler_times_nothing(clock):
    prof = StepProfiler(enabled=False)
    assert run_step(prof, clock, objective={"clustering": 1.0}) == {}
    assert prof.epoch_means() == {}


def test_detailed_adds_the_sub_phases_and_the_epoch_means(clock):
    prof = StepProfiler(enabled=False, detailed=True)  # --profile times every process
    t = run_step(prof, clock)
    assert set(t) == {"data", "teacher_backbone_forward", "heads_backward",
                      "backbone_backward", "optimizer_ema", "step"} | DETAIL
    assert (t["batch_to_device"], t["objective"], t["clip_grad"], t["optimizer_step"],
            t["ema"]) == (0.5, 4.0, 0.5, 1.0, 1.5)
    t2 = run_step(prof, clock, end=16.0)  # a second step, 2 s longer
    assert t2["step"] == 15.0
    means = prof.epoch_means()
    assert means["step"] == 14.0 and means["ema"] == 1.5 and set(means) == set(t)
    assert prof.epoch_means() == {}  # counted afresh


def _records(folder):
    recs = [json.loads(line) for line in open(folder / "log.jsonl")]
    return ([r for r in recs if r["type"] == "iter"], [r for r in recs if r["type"] == "epoch"])


def test_profile_is_opt_in_and_changes_nothing_computed(tmp_path):
    args = TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2", "--no-evaluate"]
    train(config_from_args(args + ["--output-dir", str(tmp_path / "off")]))
    train(config_from_args(args + ["--output-dir", str(tmp_path / "on"), "--profile"]))
    iters, epochs = _records(tmp_path / "off")
    assert len(iters) == 4 and len(epochs) == 2
    for r in iters:  # off: the timing fields of before, no more
        assert {k[2:] for k in r if k.startswith("t_")} == COARSE
    assert not any(k.startswith("t_") for r in epochs for k in r)
    iters_on, epochs_on = _records(tmp_path / "on")
    for r in iters_on:
        assert {k[2:] for k in r if k.startswith("t_")} == COARSE | DETAIL
        assert all(r[k] >= 0 for k in r if k.startswith("t_"))
        # the sub-phases split their phase (each field rounded to 1e-6 s)
        parts = r["t_clip_grad"] + r["t_optimizer_step"] + r["t_ema"]
        assert parts == pytest.approx(r["t_optimizer_ema"], abs=4e-6)
        assert r["t_batch_to_device"] <= r["t_teacher_backbone_forward"] + 1e-6
    for r in epochs_on:  # each phase's mean over the epoch's steps
        assert {k[2:] for k in r if k.startswith("t_")} == COARSE | DETAIL
        steps = [i["t_step"] for i in iters_on if i["epoch"] == r["epoch"]]
        assert r["t_step"] == pytest.approx(sum(steps) / len(steps), abs=2e-6)
    # The same run: every loss, and the final state, bit for bit.
    for a, b in zip(iters, iters_on):
        assert {k: v for k, v in a.items() if k.startswith("loss_")} == \
            {k: v for k, v in b.items() if k.startswith("loss_")}
    ca = torch.load(tmp_path / "off" / "checkpoint.pth", map_location="cpu", weights_only=True)
    cb = torch.load(tmp_path / "on" / "checkpoint.pth", map_location="cpu", weights_only=True)
    for k, v in ca["student"].items():
        assert torch.equal(v, cb["student"][k]), k
    # --profile is run control: the run with it continues the run without it.
    summary = train(config_from_args(args + ["--output-dir", str(tmp_path / "off"),
                                             "--profile"]))
    assert summary["already_complete"]
