"""CriboObjective (C operators inside autograd) against a plain torch-autograd
implementation of docs/method.md §2-§5 on small sizes: the loss and the gradient of every
student parameter agree."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import cribo  # noqa: E402
from cribo.nn.autograd import student_logits  # noqa: E402
from cribo.nn.objective import CriboObjective, image_seeds  # noqa: E402

B, N, D, L, K, P = 4, 9, 12, 24, 4, 5


class TinyBackbone(torch.nn.Module):
    """(B, 2, N, P) inputs -> CLS (B, 2, D) and tokens (B, 2, N, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(P, D)
        self.cls = torch.nn.Linear(D, D)

    def forward(self, x: torch.Tensor):
        tok = torch.tanh(self.proj(x))
        return self.cls(tok.mean(2)), tok


class TinyHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU())
        self.last_global = torch.nn.Linear(16, L, bias=False)
        self.last_objects = torch.nn.Linear(16, L, bias=False)

    def forward_global(self, x):
        return self.last_global(F.normalize(self.mlp(x), dim=-1))

    def forward_objects(self, x):
        return self.last_objects(F.normalize(self.mlp(x), dim=-1))


def H(student, teacher, center, tau_s, tau_t):
    """Row-wise H(softmax((t - C)/tau_t), softmax(s/tau_s)) with plain autograd."""
    p_t = F.softmax((teacher - center) / tau_t, dim=-1)
    return -(p_t * F.log_softmax(student / tau_s, dim=-1)).sum(-1)


def plain_step(obj, queue, s_cls, s_tok, t_cls, t_tok, pos, s_head, t_head, ids, step,
               tau_t, use_nn=True):
    """docs/method.md §2-§5 with torch autograd; clustering and look-up (no gradient) reuse cribo."""
    c = cribo.cluster(t_tok.detach().numpy(), pos, K, pos_weight=obj.pos_weight,
                      seed=image_seeds(obj.seed, step, ids))
    onehot = torch.from_numpy(np.eye(K, dtype=np.float32)[c.labels])       # (B,2,N,K)
    cnt = onehot.sum(2, keepdim=True)
    A = onehot / cnt.clamp(min=1)                                          # L1 columns
    s_obj = torch.einsum("bvnk,bvnd->bvkd", A, s_tok)
    t_obj = torch.einsum("bvnk,bvnd->bvkd", A, t_tok.detach())
    v = torch.from_numpy(c.valid)
    s1, s2, t1, t2 = s_obj[:, 0][v], s_obj[:, 1][v], t_obj[:, 0][v], t_obj[:, 1][v]
    m = queue.match(t1.numpy(), t2.numpy(), np.repeat(ids, c.valid.sum(1)))
    sg = s_head.forward_global(s_cls.transpose(0, 1).reshape(2 * B, D)).reshape(2, B, L)
    with torch.no_grad():
        tg = t_head.forward_global(t_cls.transpose(0, 1).reshape(2 * B, D)).reshape(2, B, L)
        to1, to2 = t_head.forward_objects(t1), t_head.forward_objects(t2)
        nn1 = t_head.forward_objects(torch.from_numpy(m.targets1))
        nn2 = t_head.forward_objects(torch.from_numpy(m.targets2))
    so1, so2 = s_head.forward_objects(s1), s_head.forward_objects(s2)
    Cg, Co = obj.center_global, obj.center_objects
    l_g = (H(sg[1], tg[0], Cg, 0.1, tau_t) + H(sg[0], tg[1], Cg, 0.1, tau_t)).mean()
    l_o = (H(so2, to1, Co, 0.1, tau_t) + H(so1, to2, Co, 0.1, tau_t)).mean()
    m1, m2 = torch.from_numpy(m.mask1), torch.from_numpy(m.mask2)
    l_nn = torch.zeros(())
    if use_nn and m1.any():
        l_nn = l_nn + H(so2, nn1, Co, 0.1, tau_t)[m1].sum() / m1.sum()
    if use_nn and m2.any():
        l_nn = l_nn + H(so1, nn2, Co, 0.1, tau_t)[m2].sum() / m2.sum()
    w = obj.weights
    return w[0] * l_g + w[1] * l_o + w[2] * l_nn, (l_g, l_o, l_nn)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 2.0, 1.5)])
def test_objective_matches_plain_autograd(weights):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    s_bb, s_head = TinyBackbone(), TinyHead()
    obj = CriboObjective(L, D, n_clusters=K, queue_capacity=6, weights=weights, seed=3)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2) * 8.0
    exercised_nn = False
    for step in range(3):  # the queue fills: later steps have cycle-consistent pairs
        t_bb, t_head = copy.deepcopy(s_bb), copy.deepcopy(s_head)
        x = torch.from_numpy(rng.standard_normal((B, 2, N, P)).astype(np.float32))
        pos = (grid + rng.uniform(0, 4, (B, 2, 1, 2))).astype(np.float32)
        ids = np.arange(B) + 10 * step
        queue_before = copy.deepcopy(obj.queue)
        centres = (obj.center_global.clone(), obj.center_objects.clone())
        tau_t = 0.05

        s_cls, s_tok = s_bb(x)
        with torch.no_grad():
            t_cls, t_tok = t_bb(x)
        out = obj(lambda lab, val: student_logits(s_cls, s_tok, s_head, lab, val),
                  t_cls, t_tok, pos, t_head, image_ids=ids, step=step, teacher_temp=tau_t)
        params = list(s_bb.parameters()) + list(s_head.parameters())
        g_c = torch.autograd.grad(out.loss, params)

        ref_obj = copy.deepcopy(obj)
        ref_obj.center_global.copy_(centres[0])
        ref_obj.center_objects.copy_(centres[1])
        s_cls, s_tok = s_bb(x)
        ref, (l_g, l_o, l_nn) = plain_step(ref_obj, queue_before, s_cls, s_tok, t_cls, t_tok,
                                           pos, s_head, t_head, ids, step, tau_t)
        g_r = torch.autograd.grad(ref, params)
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        assert out.terms["global"] == pytest.approx(l_g.item(), rel=1e-5)
        assert out.terms["objects"] == pytest.approx(l_o.item(), rel=1e-5, abs=1e-6)
        assert out.terms["neighbours"] == pytest.approx(l_nn.item(), rel=1e-5, abs=1e-6)
        for a, b in zip(g_c, g_r):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        exercised_nn = exercised_nn or l_nn.item() > 0
        # Centres moved towards this step's teacher outputs.
        assert not torch.equal(obj.center_global, centres[0])
    # The cross-image term (with its Z1/Z2 normalisation) was part of the comparison.
    assert exercised_nn


def test_use_objects_false_trains_the_global_term_only():
    """The curriculum switch (``objects_start_epoch``): with ``use_objects=False``
    the loss and every gradient are the global term's, as with weights (w, 0, 0),
    while the object terms are still measured and the queue still fills."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    s_bb, s_head = TinyBackbone(), TinyHead()
    t_bb, t_head = copy.deepcopy(s_bb), copy.deepcopy(s_head)
    full = CriboObjective(L, D, n_clusters=K, queue_capacity=6, weights=(0.7, 1.0, 1.0), seed=3)
    dino = CriboObjective(L, D, n_clusters=K, queue_capacity=6, weights=(0.7, 0.0, 0.0), seed=3)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2) * 8.0
    params = list(s_bb.parameters()) + list(s_head.parameters())
    for step in range(3):
        x = torch.from_numpy(rng.standard_normal((B, 2, N, P)).astype(np.float32))
        pos = (grid + rng.uniform(0, 4, (B, 2, 1, 2))).astype(np.float32)
        ids = np.arange(B) + 10 * step
        with torch.no_grad():
            t_cls, t_tok = t_bb(x)
        grads, outs = [], []
        for obj, use in ((full, False), (dino, True)):
            s_cls, s_tok = s_bb(x)
            out = obj(lambda lab, val: student_logits(s_cls, s_tok, s_head, lab, val),
                      t_cls, t_tok, pos, t_head, image_ids=ids, step=step,
                      teacher_temp=0.05, use_objects=use)
            grads.append(torch.autograd.grad(out.loss, params, allow_unused=True))
            outs.append(out)
        a, b = outs
        assert a.loss.item() == pytest.approx(0.7 * a.terms["global"], rel=1e-6)
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
        assert a.terms["objects"] > 0  # measured, not trained
        for ga, gb in zip(*grads):
            if ga is None or gb is None:
                assert ga is None or not ga.any()
                assert gb is None or not gb.any()
            else:
                torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    assert len(full.queue) == len(dino.queue) > 0


def test_objective_state_dict_carries_queue_and_centres():
    obj = CriboObjective(L, D, n_clusters=K, queue_capacity=6)
    rng = np.random.default_rng(1)
    o = rng.standard_normal((5, D)).astype(np.float32)
    obj.queue.push(o, o, [2, 3], image_ids=[1, 2])
    obj.center_global.fill_(0.5)
    state = obj.state_dict()
    other = CriboObjective(L, D, n_clusters=K, queue_capacity=6)
    other.load_state_dict(state)
    assert len(other.queue) == 2 and torch.equal(other.center_global, obj.center_global)
    np.testing.assert_array_equal(other.queue.objects1, obj.queue.objects1)


def test_image_seeds_depend_only_on_seed_step_and_id():
    a = image_seeds(0, 5, np.array([3, 7, 9]))
    b = image_seeds(0, 5, np.array([9, 3]))
    assert a[0] == b[1] and a[2] == b[0] and (a >= 0).all()
    assert image_seeds(0, 6, np.array([3]))[0] != a[0]
