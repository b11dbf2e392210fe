"""cribo pretrain end to end: a short run, resume equality, two gloo processes
against one, checkpoints that load, configuration errors, a non-finite stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runs import TINY, free_port  # noqa: E402

from cribo.train.config import config_from_args  # noqa: E402
from cribo.train.faults import NonFiniteLoss  # noqa: E402
from cribo.train.loop import train  # noqa: E402


def cfg_for(tmp_path, *extra, name="run"):
    return config_from_args(TINY + ["--output-dir", str(tmp_path / name)] + list(extra))


def params(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck["student"], ck


def test_short_run_writes_checkpoints_logs_and_learns_something(tmp_path):
    cfg = cfg_for(tmp_path, "--epochs", "2", "--batch-size", "8")
    out = train(cfg)
    d = tmp_path / "run"
    for f in ("checkpoint.pth", "teacher_backbone.pth", "log.jsonl", "config.json"):
        assert (d / f).exists(), f
    records = [json.loads(line) for line in open(d / "log.jsonl")]
    assert records[0]["type"] == "run" and records[0]["config"]["epochs"] == 2
    assert "git" in records[0] and records[0]["torch"] == torch.__version__
    iters = [r for r in records if r["type"] == "iter"]
    assert len(iters) == 2 * (48 // 8)
    assert all(np.isfinite(r["loss_total"]) for r in iters)
    assert iters[0]["loss_neighbours"] == 0.0  # the cross-image term starts at epoch 1
    assert any(r["loss_neighbours"] > 0 for r in iters if r["epoch"] == 1)
    assert len(out["history"]) == 2
    # The checkpoint holds everything needed to continue.
    _, ck = params(d / "checkpoint.pth")
    for key in ("student", "teacher", "optimizer", "objective", "epoch", "iteration", "rng"):
        assert key in ck
    assert ck["epoch"] == 2 and ck["iteration"] == 12
    # The teacher backbone loads through cribo.nn like a published checkpoint.
    from cribo.nn import load_pretrained

    model, report = load_pretrained(str(d / "teacher_backbone.pth"), num_heads=2)
    assert not report.missing and not report.unexpected
    model2, report2 = load_pretrained(str(d / "checkpoint.pth"), key="teacher", num_heads=2)
    assert not report2.missing
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[1], model2(x)[1])


def test_resume_after_interruption_ends_with_the_same_parameters(tmp_path):
    full = cfg_for(tmp_path, "--epochs", "3", "--batch-size", "8", name="full")
    train(full)

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, stats):
        if epoch == 0:
            raise Interrupt

    part = cfg_for(tmp_path, "--epochs", "3", "--batch-size", "8", name="part")
    with pytest.raises(Interrupt):
        train(part, on_epoch_end=stop_after_first)
    resumed = cfg_for(tmp_path, "--epochs", "3", "--batch-size", "8", "--resume", name="part")
    train(resumed)
    a, ca = params(tmp_path / "full" / "checkpoint.pth")
    b, cb = params(tmp_path / "part" / "checkpoint.pth")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for k in ca["teacher"]:
        torch.testing.assert_close(ca["teacher"][k], cb["teacher"][k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(ca["objective"]["center_objects"],
                               cb["objective"]["center_objects"], rtol=0, atol=0)


def _adam_step_bounds(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> np.ndarray:
    """(steps,) c_t with |m_hat_t / sqrt(v_hat_t)| <= c_t for ANY gradients g_1..g_t.

    m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2, so by
    Cauchy-Schwarz |m_t| <= (1-b1) sqrt(sum_k (b1^2/b2)^k) sqrt(v_t / (1-b2)),
    k < t; with the bias corrections (1-b1^t) and (1-b2^t) this is c_t (1 at
    t = 1, about 1 for the first steps, at most ~7.3 for b = (0.9, 0.999)).  An
    AdamW step without weight decay moves a parameter by at most lr_t * c_t.
    """
    t = np.arange(1, steps + 1)
    r = beta1 ** 2 / beta2
    geometric = np.sqrt((1 - r ** t) / (1 - r))
    return ((1 - beta1) * np.sqrt(1 - beta2 ** t) / ((1 - beta1 ** t) * np.sqrt(1 - beta2))
            * geometric)


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path, backend):
    from cribo.train.schedules import cosine_schedule
    from cribo.train.build import build_models

    common = ["--epochs", "2", "--drop-path", "0", "--n-images", "32", "--no-evaluate",
              "--backend", backend]
    one = cfg_for(tmp_path, *common, "--batch-size", "8", name="one")
    torch.manual_seed(one.seed)  # as train() does before building its networks
    init = build_models(one)["student"].state_dict()
    train(one)
    port = free_port()
    argv = TINY + common + ["--batch-size", "4", "--output-dir", str(tmp_path / "two")]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CRIBO_NUM_THREADS="1",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "cribo", "pretrain", *argv],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o
    a, _ = params(tmp_path / "one" / "checkpoint.pth")
    b, _ = params(tmp_path / "two" / "checkpoint.pth")
    # The key slice of each attention's qkv bias, [dim:2*dim], has an exactly zero
    # gradient in exact arithmetic (q . (k + b_k) adds the same q . b_k to all of
    # a query's logits, and the softmax ignores it), so both runs would leave it
    # at its initial value.  In float32 its gradient is rounding noise, which
    # differs with the batch split, and Adam's normalised step turns noise of any
    # size into a step of up to lr_t * c_t (_adam_step_bounds): that slice can
    # only be held to the sum of those bounds over the run's steps (biases have
    # no weight decay).  Everything else is held as tightly as before.
    n_steps = one.epochs * (one.n_images // one.batch_size)
    lr = cosine_schedule(one.lr * one.batch_size / 256.0, one.min_lr, one.epochs,
                         one.n_images // one.batch_size, one.warmup_epochs)
    assert len(lr) == n_steps
    drift = float(np.sum(lr * _adam_step_bounds(n_steps)))  # per run, from the start
    key_slices = 0
    for k in a:
        if k.endswith("attn.qkv.bias"):
            dim = a[k].numel() // 3
            key = slice(dim, 2 * dim)
            for part in (slice(0, dim), slice(2 * dim, 3 * dim)):  # query, value
                torch.testing.assert_close(a[k][part], b[k][part], rtol=2e-4, atol=2e-5, msg=k)
            for run in (a, b):
                assert float((run[k][key] - init[k][key]).abs().max()) <= drift, k
            assert float((a[k][key] - b[k][key]).abs().max()) <= 2 * drift, k
            key_slices += 1
        else:
            torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=2e-5, msg=k)
    assert key_slices == one.depth


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "--epochs", "2", "--batch-size", "8")
    from cribo.nn import objective as objective_mod

    original = objective_mod.CriboObjective.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 9:  # in the second epoch (6 steps per epoch)
            out.terms["total"] = float("nan")
        return out

    monkeypatch.setattr(objective_mod.CriboObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="last checkpoint"):
        train(cfg)
    _, ck = params(tmp_path / "run" / "checkpoint.pth")
    assert ck["epoch"] == 1  # the epoch-1 checkpoint, untouched


def test_config_file_and_unknown_options(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 7\nn_clusters = 5\nw_neighbours = 0.0\n')
    cfg = config_from_args(["--config", str(toml), "--epochs", "9"])
    assert cfg.epochs == 9 and cfg.n_clusters == 5 and cfg.w_neighbours == 0.0  # flags win
    bad = tmp_path / "bad.toml"
    bad.write_text("epoch = 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epoch'\]"):
        config_from_args(["--config", str(bad)])
    with pytest.raises(SystemExit):
        config_from_args(["--no-such-flag"])
    with pytest.raises(ValueError, match="--n-clusters must be in"):
        config_from_args(["--n-clusters", "1000"])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        config_from_args(["--config", str(tmp_path / "missing.toml")])


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "cribo", "pretrain", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    from dataclasses import fields

    from cribo.train.config import TrainConfig

    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out.stdout, f.name


def test_view_augmentations_follow_the_options_and_blur_scales_with_the_view():
    from cribo.train.build import build_data

    cfg = config_from_args(["--img-size", "112", "--color-jitter", "0.1", "0.2", "0.3", "0.5",
                            "--grayscale-p", "0.7", "--blur-sigma", "0.2", "1.0",
                            "--crop-scale", "0.5", "1.0"])
    tf = build_data(cfg).transform
    for view in (tf.view1, tf.view2):
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.1, 0.2, 0.3, 0.5)
        assert view.grayscale_p == 0.7 and view.scale == (0.5, 1.0)
        assert view.blur_sigma == pytest.approx((0.1, 0.5))  # 112 px = half of 224
    assert (tf.view1.blur_p, tf.view2.blur_p, tf.view2.solarize_p) == (1.0, 0.1, 0.2)


def test_frozen_patch_embedding_and_object_temperature(tmp_path):
    from cribo.train.build import build_models

    cfg = cfg_for(tmp_path, "--epochs", "2", "--batch-size", "8", "--freeze-patch-embed",
                  "--warmup-teacher-temp-objects", "0.05", "--teacher-temp-objects", "0.09",
                  "--warmup-teacher-temp", "0.04", "--teacher-temp", "0.07")
    torch.manual_seed(cfg.seed)  # as train() does before building its networks
    init = build_models(cfg)["student"].state_dict()
    train(cfg)
    student, ck = params(tmp_path / "run" / "checkpoint.pth")
    for name, value in init.items():
        moved = not torch.equal(student[name], value)
        if name.startswith("backbone.patch_embed."):
            assert not moved, name
            assert torch.equal(ck["teacher"][name], value), name
        elif name.startswith("backbone.blocks.0.attn.qkv.weight"):
            assert moved, name
    iters = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")][1:]
    iters = [r for r in iters if r["type"] == "iter"]
    # 1 warm-up epoch from 0.05 to 0.09; the global term keeps its own schedule.
    assert [r["teacher_temp_objects"] for r in iters if r["epoch"] == 0] == [0.05] * 6
    assert [r["teacher_temp_objects"] for r in iters if r["epoch"] == 1] == [0.09] * 6
    assert all(r["teacher_temp"] == pytest.approx(0.07 if r["epoch"] else 0.04) for r in iters)


def test_object_terms_start_after_the_global_term(tmp_path):
    """--objects-start-epoch 1: epoch 0 trains the global term alone (the object
    terms are measured but weigh 0), the object term joins at epoch 1 and the
    cross-image term nn_start_epoch (1) epochs later."""
    cfg = cfg_for(tmp_path, "--epochs", "3", "--batch-size", "8", "--objects-start-epoch", "1")
    train(cfg)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    iters = [r for r in recs if r["type"] == "iter"]
    by_epoch = {e: [r for r in iters if r["epoch"] == e] for e in range(3)}
    for r in by_epoch[0]:
        assert r["w_objects"] == 0.0 and r["w_neighbours"] == 0.0
        assert r["loss_objects"] > 0
        assert r["loss_total"] == pytest.approx(r["loss_global"], rel=1e-6)
    for r in by_epoch[1]:
        assert r["w_objects"] == 1.0 and r["w_neighbours"] == 0.0
        assert r["loss_total"] == pytest.approx(r["loss_global"] + r["loss_objects"], rel=1e-6)
    assert all(r["w_neighbours"] == 1.0 for r in by_epoch[2])
    assert any(r["loss_neighbours"] > 0 for r in by_epoch[2])


@pytest.mark.parametrize("flag", ["--objects-start-epoch", "--nn-start-epoch"])
def test_negative_start_epochs_are_rejected(flag):
    with pytest.raises(ValueError, match=f"{flag} must be an integer >= 0"):
        config_from_args(TINY + [flag, "-1"])


def test_object_terms_start_half_way_unless_set():
    assert config_from_args(["--epochs", "6"]).objects_start == 3
    assert config_from_args(["--epochs", "3"]).objects_start == 1
    assert config_from_args(["--epochs", "1"]).objects_start == 0
    assert config_from_args(["--epochs", "6", "--objects-start-epoch", "0"]).objects_start == 0
    assert config_from_args(["--preset", "vit_small"]).objects_start == 0
    with pytest.raises(ValueError, match=r"--objects-start-epoch \(4\) must be < --epochs \(4\)"):
        config_from_args(["--epochs", "4", "--objects-start-epoch", "4"])
    # The global term alone may leave them off for good.
    config_from_args(["--epochs", "4", "--objects-start-epoch", "4", "--w-objects", "0"])
