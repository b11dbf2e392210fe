"""Straightforward torch-on-CPU implementations of the CrIBo operators, written
the way the published CrIBo reference training code (main_cribo.py:
Clustering.compute_assignments / sinkhorn / compute_student_centroids,
get_nn_centroids, CrIBoLoss) does it, on float32 CPU tensors:

* clustering: batched over the images; the positional cost through the dense
  (B, 2N, 2N, K) tensor ``dist[b,n,m] * A[b,m,k]`` whose zeros are replaced
  by 1e5 where the column has a non-zero entry, then a min over m; plain-exp
  Sinkhorn on the whole batch with ``nan_to_num``. Differences from the
  reference, all so that its output follows docs/method.md and can be validated:
  (1) min-max normalisation of the cost PER IMAGE (the reference uses the
  batch-wide min and max; a deviation, docs/method.md §2), with a constant cost giving zeros;
  (2) ties in the hard assignment go to the lowest cluster (``argmax``; the
  reference puts a tied token in every tied cluster); (3) initial indices
  passed in (the reference draws them with ``multinomial``); (4) the
  distance matrix is ``torch.cdist(..., compute_mode=
  'donot_use_mm_for_euclid_dist')`` computed once (the reference recomputes
  ``sqrt(sum(diff**2))`` every outer iteration; the matmul form of cdist
  would not give exact zeros on the diagonal, which the cost depends on).
* pooling: ``einsum('bvnd,bvnk->bvkd')`` with the one-hot assignment,
  columns L1-normalised per view; backward by autograd.
* queue: ``F.normalize`` of the whole queue on every look-up, full
  ``queries @ queue.T`` similarity per view, argmax, the two cycle checks by
  further similarity matrices against the batch; push = ``torch.cat`` of the
  new block in front of the old queue (a full copy, as the reference).
* losses: ``log_softmax`` of the student, ``softmax`` of the centred teacher,
  the cross-entropies summed as in docs/method.md §5 (the paper's Z1/Z2, terms
  summed, not halved -- deviations from the reference), ``loss.backward()`` on
  student logits that require grad, and the DINO-style centre update under
  ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common import CriboLosses, Match

# ============================================================================
# Clustering (docs/method.md §2)
# ============================================================================


@dataclass
class Clustering:
    labels: torch.Tensor  # (B, 2, N) int64
    valid: torch.Tensor  # (B, K) bool
    counts: torch.Tensor  # (B, 2, K) int64
    plan: torch.Tensor  # (B, 2N, K) float32


@torch.no_grad()
def sinkhorn(M: torch.Tensor, r: torch.Tensor, c: torch.Tensor, lambda_: float,
             iterations: int) -> torch.Tensor:
    """The reference's plain-exp Sinkhorn on a (B, n, K) cost."""
    P = torch.exp(-lambda_ * M)
    P /= P.sum(dim=(1, 2), keepdim=True)
    for _ in range(iterations):
        u = P.sum(dim=2, keepdim=True)
        P *= r / u
        u = P.sum(dim=1, keepdim=True)
        P *= c / u
    return torch.nan_to_num(P, nan=1e-8)


@torch.no_grad()
def cluster(tokens: torch.Tensor, positions: torch.Tensor, n_clusters: int, *,
            init: torch.Tensor, pos_weight: float = 2.0, sinkhorn_lambda: float = 20.0,
            sinkhorn_iters: int = 5, n_iters: int = 5,
            update_marginals: bool = True) -> Clustering:
    """tokens (B, 2, N, d), positions (B, 2, N, 2), init (B, K) int64."""
    B, _, N, d = tokens.shape
    n, k = 2 * N, n_clusters
    z = F.normalize(tokens.reshape(B, n, d), dim=-1)
    pos = positions.reshape(B, n, 2)

    r = torch.ones(B, n, 1) / n
    c = torch.ones(B, 1, k) / k
    index = F.one_hot(init, n).float()  # (B, K, n)
    centroids = torch.einsum("bnd,bkn->bkd", z, index)
    assignment = index.permute(0, 2, 1)  # (B, n, K)
    dist = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")  # (B, n, n)

    P = torch.zeros(B, n, k)
    for _ in range(n_iters):
        sem_similarity = torch.einsum("bnd,bkd->bnk", z, centroids)

        # dense positional tensor (B, n, n, K): distance to each member of each cluster
        pos_similarity = torch.einsum("BNn,Bnk->BNnk", dist, assignment)
        tmp = (pos_similarity != 0.0).sum(dim=2, keepdim=True)
        pos_similarity[torch.logical_and(pos_similarity == 0.0, tmp != 0)] = 1e5
        del tmp
        pos_similarity = pos_similarity.amin(dim=2)  # (B, n, K)

        avg_cost = pos_similarity.mean(dim=(1, 2), keepdim=True)
        pos_similarity = torch.where(pos_similarity == 0.0, avg_cost, pos_similarity)
        mx = pos_similarity.amax(dim=(1, 2), keepdim=True)
        pos_similarity = pos_similarity / torch.where(mx > 0, mx, torch.ones_like(mx))

        M = -sem_similarity + pos_weight * pos_similarity
        lo = M.amin(dim=(1, 2), keepdim=True)  # per image (docs/method.md §2 deviation)
        span = M.amax(dim=(1, 2), keepdim=True) - lo
        M = torch.where(span > 0, (M - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                        torch.zeros_like(M))

        P = sinkhorn(M, r, c, sinkhorn_lambda, sinkhorn_iters)
        hard = F.one_hot(P.argmax(dim=-1), k).float()  # ties -> lowest k
        assignment = hard
        if update_marginals:
            c = hard.sum(dim=1, keepdim=True) + 1e-2
            c /= c.sum(dim=-1, keepdim=True)
        centroids = F.normalize(torch.einsum("bnd,bnk->bkd", z, assignment), dim=-1)

    labels = assignment.argmax(dim=-1).reshape(B, 2, N)
    counts = assignment.reshape(B, 2, N, k).sum(dim=2).long()
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return Clustering(labels=labels, valid=valid, counts=counts, plan=P)


# ============================================================================
# Pooling (docs/method.md §3)
# ============================================================================


def pool_forward_backward(tokens: torch.Tensor, labels: torch.Tensor, n_clusters: int,
                          grad_objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects (B, 2, K, d) and d tokens (B, 2, N, d) for upstream grad_objects."""
    tok = tokens.detach().requires_grad_(True)
    A = F.one_hot(labels, n_clusters).float()  # (B, 2, N, K)
    cnt = A.sum(dim=2, keepdim=True)
    cnt[cnt == 0.0] = 1.0
    A = A / cnt
    objects = torch.einsum("bvnd,bvnk->bvkd", tok, A)
    objects.backward(grad_objects)
    return objects.detach(), tok.grad


# ============================================================================
# Object queue (docs/method.md §4)
# ============================================================================


class ObjectQueue:
    """Queue of two (2, R, d) tensors, newest first (the reference's centroids_queue)."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.queue = torch.zeros(2, 0, dim)
        self.cpv = torch.zeros(0, dtype=torch.long)  # objects per image

    def load(self, q1: torch.Tensor, q2: torch.Tensor, counts: torch.Tensor) -> None:
        self.queue = torch.stack([q1, q2])
        self.cpv = counts.clone()

    @torch.no_grad()
    def push(self, objects1: torch.Tensor, objects2: torch.Tensor, counts: torch.Tensor) -> None:
        cpv = torch.cat([counts, self.cpv])[: self.capacity]
        rows = int(cpv.sum())
        new = torch.stack([objects1, objects2])
        self.queue = torch.cat([new, self.queue], dim=1)[:, :rows]
        self.cpv = cpv

    @torch.no_grad()
    def match(self, objects1: torch.Tensor, objects2: torch.Tensor) -> Match:
        t1 = F.normalize(objects1, p=2, dim=-1)
        t2 = F.normalize(objects2, p=2, dim=-1)
        queue_normalized = F.normalize(self.queue, p=2, dim=-1)  # whole queue, every step
        ar = torch.arange(t1.shape[0])

        similarity = t1 @ queue_normalized[0].T
        idx1 = similarity.argmax(dim=-1)
        sim1 = similarity[ar, idx1]
        similarity2 = t2 @ queue_normalized[1].T
        idx2 = similarity2.argmax(dim=-1)
        sim2 = similarity2[ar, idx2]

        cycle1 = (queue_normalized[1][idx1] @ t2.T).argmax(dim=-1)
        cycle2 = (queue_normalized[0][idx2] @ t1.T).argmax(dim=-1)
        return Match(index1=idx1, index2=idx2, mask1=cycle1 == ar, mask2=cycle2 == ar,
                     targets1=self.queue[0][idx1], targets2=self.queue[1][idx2],
                     similarity1=sim1, similarity2=sim2)


# ============================================================================
# Losses (docs/method.md §5)
# ============================================================================


def cribo_losses(student_global: torch.Tensor, teacher_global: torch.Tensor,
                 student_objects: torch.Tensor, teacher_objects: torch.Tensor,
                 teacher_neighbours: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor, *,
                 center_global: torch.Tensor, center_objects: torch.Tensor,
                 student_temp: float, teacher_temp: float,
                 teacher_temp_objects: float | None,
                 weights: tuple[float, float, float],
                 center_momentum: float) -> CriboLosses:
    """Reference-style loss (CrIBoLoss.forward) + autograd backward + centres
    (hyper-parameters as for numpy_baseline.cribo_losses)."""
    tt_o = teacher_temp if teacher_temp_objects is None else teacher_temp_objects
    wg, wo, wn = weights
    sg = student_global.detach().requires_grad_(True)  # leaf logits, (2, B, L)
    so = student_objects.detach().requires_grad_(True)  # (2, M, L)

    # global
    student_out = sg / student_temp
    teacher_out = F.softmax((teacher_global - center_global) / teacher_temp, dim=-1).detach()
    loss_g = (torch.sum(-teacher_out[0] * F.log_softmax(student_out[1], dim=-1), dim=-1).mean()
              + torch.sum(-teacher_out[1] * F.log_softmax(student_out[0], dim=-1), dim=-1).mean())

    # objects
    student_cent = so / student_temp
    teacher_cent = F.softmax((teacher_objects - center_objects) / tt_o, dim=-1)
    teacher_nn = F.softmax((teacher_neighbours - center_objects) / tt_o, dim=-1)
    loss_o = (torch.sum(-teacher_cent[0] * F.log_softmax(student_cent[1], dim=-1), dim=-1).mean()
              + torch.sum(-teacher_cent[1] * F.log_softmax(student_cent[0], dim=-1), dim=-1).mean())

    loss_nn = torch.zeros(())
    n1, n2 = mask1.sum(), mask2.sum()
    if n1 > 0:
        loss_nn = loss_nn + torch.sum(-teacher_nn[0] * F.log_softmax(student_cent[1], dim=-1),
                                      dim=-1)[mask1].sum() / n1
    if n2 > 0:
        loss_nn = loss_nn + torch.sum(-teacher_nn[1] * F.log_softmax(student_cent[0], dim=-1),
                                      dim=-1)[mask2].sum() / n2

    loss = wg * loss_g + wo * loss_o + wn * loss_nn
    loss.backward()

    with torch.no_grad():  # update_center
        L = teacher_global.shape[-1]
        batch_center = teacher_global.reshape(-1, L).sum(dim=0) / (2 * teacher_global.shape[1])
        cg = center_global * center_momentum + batch_center * (1 - center_momentum)
        batch_center_c = teacher_objects.reshape(-1, L).sum(dim=0) / (2 * teacher_objects.shape[1])
        co = center_objects * center_momentum + batch_center_c * (1 - center_momentum)
    return CriboLosses(total=float(loss.detach()), global_=float(loss_g.detach()),
                       objects=float(loss_o.detach()), neighbours=float(loss_nn.detach()), grad_global=sg.grad, grad_objects=so.grad,
                       center_global=cg, center_objects=co)


def describe() -> dict[str, Any]:
    return {"clustering": "batched; dense (B,2N,2N,K) positional tensor; plain-exp Sinkhorn; "
                          "PER-IMAGE min-max (docs/method.md §2; the reference's is batch-wide "
                          "min-max); argmax ties to lowest k; cdist without the matmul path",
            "pool": "einsum with L1-normalised one-hot assignment; autograd backward",
            "queue": "F.normalize of the whole queue per look-up; full queries @ queue.T per view; "
                     "argmax; cycle checks; push = torch.cat (full copy)",
            "loss": "log_softmax + softmax teacher; loss.backward() on leaf student logits; "
                    "centre update under no_grad"}
