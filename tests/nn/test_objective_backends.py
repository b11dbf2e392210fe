"""CriboObjective's two engines (backend "c" and "torch") agree on CPU: three
steps with the cross-image term (loss, every student gradient, labels), no host
round trip inside the torch engine's operators, checkpoints that cross engines,
and a tiny training run on each engine (docs/method.md §2-§5)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runs import TINY  # noqa: E402

from cribo.nn import CriboHead, vit  # noqa: E402
from cribo.nn import objective as objective_module  # noqa: E402
from cribo.nn import torch_ops  # noqa: E402
from cribo.nn.objective import CriboObjective, CriboStudent, NonFiniteError  # noqa: E402
from cribo.ops.queue import ObjectQueue  # noqa: E402

B, K, L, D = 4, 5, 48, 32


def networks():
    torch.manual_seed(0)
    backbone = vit(D, 2, 2, patch_size=8, img_size=32)
    student = CriboStudent(backbone, CriboHead(D, L, hidden_dim=32, bottleneck_dim=16))
    teacher = copy.deepcopy(student)
    # A teacher that differs from the student (as after some EMA steps).
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(B, 2, 3, 32, 32, generator=g)
    # Patch centres of a 4x4 grid of 8-px patches, shifted per view.
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    grid = torch.stack([xx, yy], -1).reshape(16, 2) * 8 + 4
    pos = grid[None, None] + torch.rand(B, 2, 1, 2, generator=g) * 6
    ids = np.arange(B) + B * step
    return images, pos.numpy(), ids


def objective(backend, capacity=8):
    return CriboObjective(L, D, n_clusters=K, queue_capacity=capacity, backend=backend)


def step_once(obj, student, teacher, step, use_neighbours=True):
    images, pos, ids = batch(step)
    with torch.no_grad():
        t_cls, t_tok = teacher.backbone(images.flatten(0, 1))
    t_cls, t_tok = t_cls.view(B, 2, -1), t_tok.view(B, 2, t_tok.shape[1], -1)
    student.zero_grad(set_to_none=True)
    out = obj(lambda lab, val: student(images, lab, val), t_cls, t_tok, pos, teacher.head,
              image_ids=ids, step=step, teacher_temp=0.04, teacher_temp_objects=0.05,
              use_neighbours=use_neighbours)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


def labels_of(out):
    lab = out.labels
    return lab.numpy() if torch.is_tensor(lab) else lab


def assert_close_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        scale = float(a[name].abs().max()) + 1e-12
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_three_steps_with_the_cross_image_term_match_the_c_engine():
    student, teacher = networks()
    objs = {b: objective(b) for b in ("c", "torch")}
    students = {b: copy.deepcopy(student) for b in objs}
    for step in range(3):
        res = {b: step_once(objs[b], students[b], teacher, step) for b in objs}
        (oc, gc), (ot, gt) = res["c"], res["torch"]
        assert oc.extra["backend"] == "c" and ot.extra["backend"] == "torch"
        np.testing.assert_array_equal(labels_of(ot), labels_of(oc))
        assert torch.is_tensor(ot.labels) and torch.is_tensor(ot.valid)
        torch.testing.assert_close(ot.loss, oc.loss, rtol=1e-4, atol=1e-6)
        for k in oc.terms:
            assert ot.terms[k] == pytest.approx(oc.terms[k], rel=1e-4, abs=1e-6), k
        assert ot.stats == pytest.approx(oc.stats)
        if step >= 1:  # the queue filled in step 0: the cross-image term is active
            assert oc.terms["neighbours"] > 0 and oc.stats["consistent"] > 0
        assert_close_grads(gc, gt)
        for c in ("center_global", "center_objects"):
            torch.testing.assert_close(getattr(objs["torch"], c), getattr(objs["c"], c),
                                       rtol=1e-5, atol=1e-6)
    assert isinstance(objs["torch"].queue, torch_ops.ObjectQueue)
    assert isinstance(objs["c"].queue, ObjectQueue)


def test_auto_picks_c_on_cpu_and_backend_is_checked():
    student, teacher = networks()
    obj = objective("auto")
    assert obj.engine is None
    out, _ = step_once(obj, student, teacher, 0)
    assert obj.engine == "c" and out.extra["backend"] == "c"
    with pytest.raises(ValueError, match="backend must be one of"):
        objective("cuda")


def test_no_host_round_trip_inside_the_torch_engine(monkeypatch):
    student, teacher = networks()
    obj = objective("torch")
    step_once(obj, student, teacher, 0)  # fills the queue: step 1 runs every part
    armed = {"on": False}
    calls = []

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def refuse(self, *args, **kwargs):
            if armed["on"]:
                calls.append(name)
                raise AssertionError(f"Tensor.{name}() inside the objective")
            return original(self, *args, **kwargs)
        return refuse

    for name in ("cpu", "numpy", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    host_scalars = objective_module._host_scalars
    reads = []

    def allowed(values):  # the one named place where the logged scalars are read
        armed["on"] = False
        try:
            reads.append(values.shape)
            return host_scalars(values)
        finally:
            armed["on"] = True

    monkeypatch.setattr(objective_module, "_host_scalars", allowed)
    images, pos, ids = batch(1)
    with torch.no_grad():
        t_cls, t_tok = teacher.backbone(images.flatten(0, 1))
    t_cls, t_tok = t_cls.view(B, 2, -1), t_tok.view(B, 2, t_tok.shape[1], -1)
    armed["on"] = True
    with pytest.raises(AssertionError):  # the guard is armed
        torch.zeros(1).item()
    calls.clear()
    out = obj(lambda lab, val: student(images, lab, val), t_cls, t_tok, pos, teacher.head,
              image_ids=ids, step=1, teacher_temp=0.04)
    out.loss.backward()
    armed["on"] = False
    assert calls == [] and len(reads) == 1
    assert out.terms["neighbours"] > 0


def test_torch_engine_names_a_non_finite_input():
    student, teacher = networks()
    obj = objective("torch")
    images, pos, ids = batch(0)
    with torch.no_grad():
        t_cls, t_tok = teacher.backbone(images.flatten(0, 1))
    t_cls, t_tok = t_cls.view(B, 2, -1), t_tok.view(B, 2, t_tok.shape[1], -1).clone()
    t_tok[1, 0, 3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="the teacher's patch tokens"):
        obj(lambda lab, val: student(images, lab, val), t_cls, t_tok, pos, teacher.head,
            image_ids=ids, step=0, teacher_temp=0.04)


@pytest.mark.parametrize("first,second", [("c", "torch"), ("torch", "c")])
def test_a_checkpoint_moves_between_engines(first, second):
    student, teacher = networks()
    a = objective(first)
    for step in range(2):
        step_once(a, student, teacher, step)
    state = a.state_dict()
    queue = state["_extra_state"]["queue"]
    assert all(torch.is_tensor(v) and v.device.type == "cpu" for k, v in queue.items()
               if k.startswith("object") or k.startswith("image"))
    b = objective(second)
    b.load_state_dict(copy.deepcopy(state))
    # The loaded state, saved again before any step, is the same state.
    back = b.state_dict()["_extra_state"]["queue"]
    for k, v in queue.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)
        else:
            assert back[k] == v
    oa, ga = step_once(a, copy.deepcopy(student), teacher, 2)
    ob, gb = step_once(b, copy.deepcopy(student), teacher, 2)
    assert oa.terms["neighbours"] > 0
    np.testing.assert_array_equal(labels_of(ob), labels_of(oa))
    torch.testing.assert_close(ob.loss, oa.loss, rtol=1e-4, atol=1e-6)
    assert ob.stats == pytest.approx(oa.stats)
    assert_close_grads(ga, gb)
    after_a, after_b = a.state_dict(), b.state_dict()
    for k in ("center_global", "center_objects"):
        torch.testing.assert_close(after_b[k], after_a[k], rtol=1e-5, atol=1e-6)
    qa, qb = after_a["_extra_state"]["queue"], after_b["_extra_state"]["queue"]
    for k in ("object_ids", "image_counts", "image_ids"):
        torch.testing.assert_close(qb[k], qa[k], rtol=0, atol=0)
    for k in ("objects1", "objects2"):
        torch.testing.assert_close(qb[k], qa[k], rtol=1e-5, atol=1e-5)


def _train_run(tmp_path, backend, epochs, monkeypatch):
    from cribo.train.config import config_from_args
    from cribo.train.loop import train

    engines = []
    forward = CriboObjective.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        engines.append(out.extra["backend"])
        return out

    monkeypatch.setattr(CriboObjective, "forward", recording)

    out_dir = tmp_path / backend
    cfg = config_from_args(TINY + ["--epochs", str(epochs), "--batch-size", "8",
                                   "--backend", backend, "--output-dir", str(out_dir)])
    assert cfg.backend == backend
    train(cfg)
    assert engines and set(engines) == {backend}  # --backend reached the objective
    records = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    losses = np.array([[r["loss_total"], r["loss_global"], r["loss_objects"],
                        r["loss_neighbours"]] for r in records if r["type"] == "iter"])
    ck = torch.load(out_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
    return losses, ck["teacher"]


def _compare_runs(tmp_path, epochs, monkeypatch):
    lc, tc = _train_run(tmp_path, "c", epochs, monkeypatch)
    lt, tt = _train_run(tmp_path, "torch", epochs, monkeypatch)
    assert lc.shape == lt.shape and len(lc) == epochs * 6
    np.testing.assert_allclose(lt, lc, rtol=1e-4, atol=1e-5)
    if epochs > 1:
        assert (lc[6:, 3] > 0).any()  # the cross-image term trained in epoch 1
    assert tc.keys() == tt.keys()
    for k in tc:
        torch.testing.assert_close(tt[k], tc[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_a_tiny_two_epoch_run_on_each_engine_gives_the_same_losses_and_teacher(tmp_path, monkeypatch):
    _compare_runs(tmp_path, 2, monkeypatch)  # about 1 s on CPU
