"""The CrIBo objective for torch modules (docs/method.md §2-§5 on autograd).

One call of :class:`CriboObjective` does, for a batch of B images seen in two
views (Lebailly, Stegmüller et al., ICLR 2024, §3):

1. clusters the teacher's final patch tokens of both views jointly (C kernel);
2. pools teacher and student tokens into per-view object representations, the
   student's with gradient (``pool_backward`` inside a ``torch.autograd.Function``);
3. looks the teacher objects up in the memory queue (nearest neighbours with cycle
   checks), then pushes them;
4. runs the heads on the CLS outputs, the objects and the retrieved neighbours;
5. computes the three losses and their gradient w.r.t. the student's logits in one
   fused C pass, and updates the centres.

The autograd nodes of steps 2 and 5 live in :mod:`cribo.nn.autograd`.  CPU
float32 tensors reach the C kernels without copies (``Tensor.numpy()`` shares
memory); tensors on another device, or in another dtype, are copied to host
float32 and the results copied back -- correct, but the copies cost time, so on a
GPU the C operators run on the CPU side of the step.

**Two engines** (``backend``): ``"c"`` runs the steps above with the C core
on host NumPy arrays, as described; ``"torch"`` runs them with
:mod:`cribo.nn.torch_ops` on the tokens' device (clustering with the same
per-image seeds, pooling with autograd, a device queue, the losses' explicit
gradient handed to autograd, centres updated in place), with no host copy of
tokens, objects or logits: the one host read of a step is the logged scalars
(terms, statistics and the finiteness flags), in :func:`_host_scalars` at its
end -- so a NaN or an infinity is reported there, after the step's objects
entered the queue (the run stops on it).  ``"auto"`` (the default) picks
``"c"`` for CPU tokens and ``"torch"`` otherwise, once, on the first call.
The queue's checkpoint format is the same for both, so a run saved on one
engine resumes on the other.  (About 550 lines: the two engines run the same
five steps on the same state -- queue, centres, checkpoint format -- and stay
side by side so that a change to one is seen next to the other.)

Under ``torch.distributed`` (world size > 1) every process's objects enter every
queue in rank order, the cycle checks and the loss normalisation use the objects
of all processes, and the centres are averaged over all processes' rows, so P
processes with batch b compute what one process with batch P*b computes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..ops.clustering import cluster
from ..ops.losses import CriboLosses
from ..ops.pooling import pool
from ..ops.queue import ObjectQueue
from . import torch_ops
from .autograd import (Labels, NonFiniteError, check_finite, device_losses, fused_losses,
                       host_float32, student_logits)

# NonFiniteError and student_logits are defined in cribo.nn.autograd and named
# here too: the objective raises the one and takes the other's output.
__all__ = ["CriboObjective", "CriboStudent", "ObjectiveOutput", "NonFiniteError",
           "student_logits", "image_seeds", "BACKENDS"]

#: The engines of :class:`CriboObjective` (see the module docstring).
BACKENDS = ("auto", "c", "torch")

#: What the objective asks of the student: given the teacher's cluster labels
#: (B, 2, N) and valid clusters (B, K) -- NumPy arrays with the C backend, tensors
#: on the tokens' device with the torch backend -- the student's global logits
#: (2, B, L) and object logits (2, M, L) of the M valid objects, with gradient.
StudentFn = Callable[[Labels, Labels], Tuple[torch.Tensor, torch.Tensor]]


class CriboStudent(nn.Module):
    """Backbone and head as one module, so that DDP sees the whole student in one
    ``forward`` (the teacher's clustering, which the student's pooling needs, is
    done before it is called).

    ``forward(images, labels, valid)``: images (B, 2, 3, H, W) -> global logits
    (2, B, L) and object logits (2, M, L).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: Labels,
                valid: Labels) -> Tuple[torch.Tensor, torch.Tensor]:
        B = images.shape[0]
        t0 = time.perf_counter()
        cls, tokens = self.backbone(images.flatten(0, 1))
        t1 = time.perf_counter()
        out = student_logits(cls.view(B, 2, -1), tokens.view(B, 2, tokens.shape[1], -1),
                             self.head, labels, valid)
        t2 = time.perf_counter()
        # Wall-clock split for the step profile; the backward pass stamps the moment
        # the gradient reaches the backbone's output (heads + pooling done).
        self.timings = {"student_backbone_forward": t1 - t0, "student_heads_forward": t2 - t1}
        if tokens.requires_grad:
            tokens.register_hook(self._stamp)
        return out

    def _stamp(self, grad: torch.Tensor) -> torch.Tensor:
        self.timings["backbone_grad_ready"] = time.perf_counter()
        return grad


def image_seeds(seed: int, step: int, image_ids: np.ndarray) -> np.ndarray:
    """(B,) clustering seeds that depend only on (seed, step, image id): an image's
    initialisation never depends on its batch-mates or on how a batch is split."""
    ids = np.asarray(image_ids, np.uint64)
    with np.errstate(over="ignore"):
        h = ids * np.uint64(0x9E3779B97F4A7C15) + np.uint64(step) * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    return (h >> np.uint64(1)).astype(np.int64)


@dataclass
class ObjectiveOutput:
    """What one step of the objective returns.

    Attributes:
        loss: scalar tensor to call ``backward()`` on (the weighted total).
        terms: the unweighted terms ``global``, ``objects``, ``neighbours`` and the
            weighted ``total`` (floats; over all processes in a distributed run).
        stats: ``objects_per_image`` (valid clusters per image), ``n_objects`` (M),
            ``consistent`` (fraction of look-ups that passed the cycle check),
            ``queue_images``.
        labels: (B, 2, N) int64 cluster labels of this process's images (a NumPy
            array with the C backend, a tensor on the tokens' device with torch).
        valid: (B, K) bool valid clusters (likewise).
        extra: ``match``, the queue look-up (:class:`cribo.Match`, or
            :class:`cribo.nn.torch_ops.Match` of device tensors); ``backend``.
        timings: wall-clock seconds of this call's parts (clustering, pooling,
            queue, student_forward, teacher_heads, losses).
    """

    loss: torch.Tensor
    terms: Dict[str, float]
    stats: Dict[str, float]
    labels: Labels
    valid: Labels
    extra: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


class CriboObjective(nn.Module):
    """The CrIBo loss around a student/teacher pair of backbones and heads.

    The module owns the object queue and the two centres (buffers), so its
    ``state_dict()`` checkpoints them (the queue through ``get_extra_state``).

    Args:
        out_dim: L, width of the heads' global output.
        embed_dim: d, width of the backbone's tokens (the queue's width).
        out_dim_objects: width of the object output (default: out_dim).
        n_clusters: K per image (64 in the reference).
        queue_capacity: images held by the queue (25 000 in the reference).
        pos_weight, sinkhorn_lambda, sinkhorn_iters, n_iters: clustering, docs/method.md §2.
        student_temp: tau_s.
        center_momentum: centre EMA momentum.
        weights: (w_global, w_objects, w_neighbours); (1, 0, 0) is DINO.
        exclude_same_image: never match an object to a queue entry of its own image.
        seed: base seed of the clustering initialisation.
        backend: ``"c"``, ``"torch"`` or ``"auto"`` (``"c"`` for CPU tokens,
            ``"torch"`` otherwise, decided on the first call from the teacher
            tokens' device); see the module docstring.

    Example:
        >>> obj = CriboObjective(out_dim=4096, embed_dim=192, n_clusters=16, queue_capacity=512)
        >>> student = CriboStudent(backbone, head)
        >>> out = obj(lambda l, v: student(images, l, v), t_cls, t_tok, positions,
        ...           t_head, image_ids=ids, step=it, teacher_temp=0.04)
        >>> out.loss.backward()
    """

    def __init__(self, out_dim: int, embed_dim: int, *, out_dim_objects: Optional[int] = None,
                 n_clusters: int = 64, queue_capacity: int = 25000, pos_weight: float = 2.0,
                 sinkhorn_lambda: float = 20.0, sinkhorn_iters: int = 5, n_iters: int = 5,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 weights: Sequence[float] = (1.0, 1.0, 1.0), exclude_same_image: bool = True,
                 seed: int = 0, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"CriboObjective: backend must be one of {BACKENDS}, got "
                             f"{backend!r}")
        self.backend = backend
        #: The engine in use ("c" or "torch"), None until the first call resolves "auto".
        self.engine: Optional[str] = None if backend == "auto" else backend
        if len(weights) != 3 or any(w < 0 for w in weights):
            raise ValueError(f"CriboObjective: weights must be three non-negative numbers "
                             f"(global, objects, neighbours), got {weights!r}")
        self.n_clusters = int(n_clusters)
        self.pos_weight = float(pos_weight)
        self.sinkhorn_lambda = float(sinkhorn_lambda)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.n_iters = int(n_iters)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.weights = tuple(float(w) for w in weights)
        self.seed = int(seed)
        # A C queue until a call on the torch engine moves it to the tokens' device.
        self.queue: Any = ObjectQueue(queue_capacity, embed_dim,
                                      exclude_same_image=exclude_same_image)
        self.register_buffer("center_global", torch.zeros(out_dim))
        self.register_buffer("center_objects", torch.zeros(out_dim_objects or out_dim))

    # The queue is checkpointed with the module, as host tensors, so that checkpoints
    # load with torch.load(weights_only=True); both engines' queues give and take
    # the same state (cribo.ObjectQueue's layout), so checkpoints cross engines.
    def get_extra_state(self) -> Dict[str, Any]:
        q = self.queue.state_dict()
        return {"queue": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                          for k, v in q.items()}}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        q = state["queue"]
        self.queue.load_state_dict({k: v.numpy() if torch.is_tensor(v) else v
                                    for k, v in q.items()})

    def _clustering(self, pos_weight: Optional[float], step: int, ids: np.ndarray
                    ) -> Dict[str, Any]:
        """The clustering's hyper-parameters at this step, for either engine (the
        per-image seeds depend only on the seed, the step and the image ids)."""
        return dict(pos_weight=self.pos_weight if pos_weight is None else pos_weight,
                    sinkhorn_lambda=self.sinkhorn_lambda, sinkhorn_iters=self.sinkhorn_iters,
                    n_iters=self.n_iters, seed=image_seeds(self.seed, step, ids))

    def _engine_for(self, device: torch.device) -> str:
        """Resolves the engine (once) and puts the queue where that engine needs it."""
        if self.engine is None:
            self.engine = "c" if device.type == "cpu" else "torch"
        if self.engine == "torch":
            if not isinstance(self.queue, torch_ops.ObjectQueue) or self.queue.device != device:
                q = torch_ops.ObjectQueue(self.queue.capacity, self.queue.dim,
                                          exclude_same_image=self.queue.exclude_same_image,
                                          device=device)
                q.load_state_dict(self.queue.state_dict())
                self.queue = q
        elif not isinstance(self.queue, ObjectQueue):
            q = ObjectQueue(self.queue.capacity, self.queue.dim,
                            exclude_same_image=self.queue.exclude_same_image)
            q.load_state_dict(self.queue.state_dict())
            self.queue = q
        return self.engine

    def forward(self, student: StudentFn, teacher_cls: torch.Tensor,
                teacher_tokens: torch.Tensor, positions: Any, teacher_head: nn.Module, *,
                image_ids: Any = None,
                step: int = 0, teacher_temp: float = 0.07,
                teacher_temp_objects: Optional[float] = None,
                pos_weight: Optional[float] = None,
                use_objects: bool = True,
                use_neighbours: bool = True) -> ObjectiveOutput:
        """One step of the objective.

        Args:
            student: called as ``student(labels, valid)`` once the teacher's side is
                done; returns the student's global logits (2, B, L) and object
                logits (2, M, L) with gradient -- e.g. a :class:`CriboStudent`
                (``lambda l, v: model(images, l, v)``) or :func:`student_logits`.
            teacher_cls: (B, 2, d) the teacher's CLS outputs [image, view].
            teacher_tokens: (B, 2, N, d) the teacher's final patch tokens (after
                the backbone's last LayerNorm).  Run the backbone on the views
                interleaved image by image ([img0 view1, img0 view2, img1 view1,
                ...]) and ``view(B, 2, N, d)`` costs nothing.
            positions: (B, 2, N, 2) patch centres in the original image frame.
            teacher_head: module with ``forward_global(x)`` and
                ``forward_objects(x)``, (R, d) -> (R, L).
            image_ids: (B,) source image ids (seed the clustering per image and keep
                an object from matching its own copy in the queue).
            step: global iteration (varies the clustering initialisation).
            teacher_temp: tau_t of the global term at this step.
            teacher_temp_objects: tau_t of the object terms (default: teacher_temp).
            pos_weight: positional weight at this step (default: the constructor's).
            use_objects: include the object terms (cross-view and cross-image);
                when False only the global term is trained, as in a curriculum
                that shapes the features before bootstrapping their clusters.  The
                clustering, queue and centres run either way.
            use_neighbours: compute the cross-image term (the queue is looked up and
                filled either way; CrIBo starts the term after the first epoch).

        Returns:
            An :class:`ObjectiveOutput`.

        Raises:
            NonFiniteError: the teacher's tokens, CLS outputs or logits, or the
                student's tokens or logits, hold a NaN or an infinity (a diverging
                run), named in the message.
        """
        B = teacher_tokens.shape[0]
        # The image ids seed the clustering on the host (as the C core draws them).
        ids = (np.arange(B) if image_ids is None else
               (image_ids.detach().cpu().numpy() if torch.is_tensor(image_ids)
                else np.asarray(image_ids))).astype(np.int64)
        if self._engine_for(teacher_tokens.device) == "torch":
            return self._forward_torch(
                student, teacher_cls, teacher_tokens, positions, teacher_head, ids, step,
                teacher_temp, teacher_temp_objects, pos_weight, use_objects, use_neighbours)
        world = dist.world_size()
        distributed = world > 1
        B, _, N, d = teacher_tokens.shape
        K = self.n_clusters
        pos = positions.detach().cpu().numpy() if torch.is_tensor(positions) else positions

        tick = time.perf_counter
        timings: Dict[str, float] = {}
        t = tick()
        # A diverging network is reported here, by name, before the C operators'
        # input checks see its NaN/inf (they would only say "tokens must be finite").
        check_finite(teacher_tokens, "the teacher's patch tokens")
        check_finite(teacher_cls, "the teacher's CLS outputs")
        # 1. Joint-space clustering of the teacher's tokens.
        t_tok = host_float32(teacher_tokens)
        c = cluster(t_tok, pos, K, **self._clustering(pos_weight, step, ids))
        valid = c.valid
        counts = valid.sum(1)
        timings["clustering"], t = tick() - t, tick()

        # 2. The teacher's objects (the student's are pooled in student()).
        t_obj = pool(t_tok, c.labels, K)
        t1 = np.ascontiguousarray(t_obj[:, 0][valid])
        t2 = np.ascontiguousarray(t_obj[:, 1][valid])
        M = t1.shape[0]
        obj_ids = np.repeat(ids, counts)
        timings["pooling"], t = tick() - t, tick()

        # 3. Queue: look up, then push (the batch is never matched against itself).
        if distributed:
            all1, sizes = dist.all_gather_rows(t1)
            all2, _ = dist.all_gather_rows(t2)
            all_counts, _ = dist.all_gather_rows(counts.astype(np.int64))
            all_ids, _ = dist.all_gather_rows(ids)
            offset = int(sizes[:dist.rank()].sum())
            match = self.queue.match(t1, t2, obj_ids, batch=(all1, all2), offset=offset)
            self.queue.push(all1, all2, all_counts, image_ids=all_ids)
        else:
            match = self.queue.match(t1, t2, obj_ids)
            self.queue.push(t1, t2, counts, image_ids=ids)
        timings["queue"], t = tick() - t, tick()

        # 4. Heads: the student's (with gradient), the teacher's on its objects and
        #    on the retrieved neighbours.
        dev = teacher_tokens.device
        sg, so = student(c.labels, valid)
        check_finite(sg, "the student's global logits")
        check_finite(so, "the student's object logits")
        timings["student_forward"], t = tick() - t, tick()
        L = sg.shape[-1]
        with torch.no_grad():
            tg = teacher_head.forward_global(teacher_cls.transpose(0, 1).reshape(2 * B, d))
            to = teacher_head.forward_objects(torch.from_numpy(np.concatenate([t1, t2])).to(dev))
            w_obj = self.weights[1] if use_objects else 0.0
            use_neighbours = use_neighbours and use_objects
            w_nn = self.weights[2] if use_neighbours else 0.0
            tn = None
            if use_neighbours and M > 0 and (match.mask1.any() or match.mask2.any()):
                targets = torch.from_numpy(np.concatenate([match.targets1, match.targets2]))
                tn_t = teacher_head.forward_objects(targets.to(dev))
                check_finite(tn_t, "the teacher's logits of the queue neighbours")
                tn = host_float32(tn_t).reshape(2, M, -1)
            check_finite(tg, "the teacher's global logits")
            check_finite(to, "the teacher's object logits")

        timings["teacher_heads"], t = tick() - t, tick()
        # 5. Losses with the fused C gradient; centres.
        Z = (int(match.mask1.sum()), int(match.mask2.sum()))
        den = None
        if distributed:
            tot = torch.tensor([B, M, Z[0], Z[1]], dtype=torch.int64)
            den = tuple(int(v) for v in dist.all_reduce_sum(tot))
        # DDP averages gradients over processes; each process holds a share of the
        # global loss, so its gradient is scaled by the world size to sum instead.
        loss, res = fused_losses(
            sg, so, host_float32(tg).reshape(2, B, L), host_float32(to).reshape(2, M, -1), tn,
            match.mask1, match.mask2, center_global=host_float32(self.center_global),
            center_objects=host_float32(self.center_objects), student_temp=self.student_temp,
            teacher_temp=teacher_temp, teacher_temp_objects=teacher_temp_objects,
            weights=(self.weights[0], w_obj, w_nn), center_momentum=self.center_momentum,
            denominators=den, grad_scale=float(world))
        self._update_centers(res, tg, to, distributed)
        timings["losses"] = tick() - t

        terms = {"global": res.global_, "objects": res.objects, "neighbours": res.neighbours,
                 "total": res.total}
        n_lookups = 2 * M
        consistent = float(Z[0] + Z[1])
        if distributed:
            vec = torch.tensor([terms["global"], terms["objects"], terms["neighbours"],
                                terms["total"], consistent, float(n_lookups)],
                               dtype=torch.float64)
            dist.all_reduce_sum(vec)
            terms = dict(zip(("global", "objects", "neighbours", "total"), vec[:4].tolist()))
            consistent, n_lookups = float(vec[4]), int(vec[5])
        stats = {"objects_per_image": float(counts.mean()), "n_objects": float(M),
                 "consistent": consistent / n_lookups if n_lookups else 0.0,
                 "queue_images": float(len(self.queue))}
        return ObjectiveOutput(loss=loss, terms=terms, stats=stats, labels=c.labels,
                               valid=valid, extra={"match": match, "backend": "c"},
                               timings=timings)

    @torch.no_grad()
    def _update_centers(self, res: CriboLosses, tg: torch.Tensor, to: torch.Tensor,
                        distributed: bool) -> None:
        if not distributed:
            self.center_global.copy_(torch.from_numpy(res.center_global))
            self.center_objects.copy_(torch.from_numpy(res.center_objects))
            return
        m = self.center_momentum
        for buf, rows in ((self.center_global, tg), (self.center_objects, to)):
            s = torch.cat([rows.detach().double().sum(0).cpu(),
                           torch.tensor([rows.shape[0]], dtype=torch.float64)])
            dist.all_reduce_sum(s)
            if s[-1] > 0:
                mean = (s[:-1] / s[-1]).to(buf.dtype).to(buf.device)
                buf.mul_(m).add_(mean, alpha=1.0 - m)

    # ------------------------------------------------------------------ torch engine
    def _forward_torch(self, student: StudentFn, teacher_cls: torch.Tensor,
                       teacher_tokens: torch.Tensor, positions: Any, teacher_head: nn.Module,
                       ids: np.ndarray, step: int, teacher_temp: float,
                       teacher_temp_objects: Optional[float], pos_weight: Optional[float],
                       use_objects: bool, use_neighbours: bool) -> ObjectiveOutput:
        """:meth:`forward` with :mod:`cribo.nn.torch_ops` on the tokens' device.  The
        shapes (M objects) are known on the host from boolean indexing; the only
        value read on the host is :func:`_host_scalars` at the end."""
        world = dist.world_size()
        distributed = world > 1
        B, _, N, d = teacher_tokens.shape
        K = self.n_clusters
        dev = teacher_tokens.device
        f64 = torch.float64
        tick = time.perf_counter
        timings: Dict[str, float] = {}
        t = tick()
        bad: Dict[str, torch.Tensor] = {}  # what -> 0-d "holds a NaN/inf", read at the end
        t_tok = teacher_tokens.detach().float()
        bad["the teacher's patch tokens"] = _nonfinite(t_tok)
        bad["the teacher's CLS outputs"] = _nonfinite(teacher_cls)
        pos = (positions.detach() if torch.is_tensor(positions)
               else torch.as_tensor(np.asarray(positions))).to(dev, torch.float32)
        # 1. Joint-space clustering (the C core's per-image seeds, drawn on the host).
        c = torch_ops.cluster(t_tok, pos, K, **self._clustering(pos_weight, step, ids))
        valid = c.valid
        counts = valid.sum(1)
        timings["clustering"], t = tick() - t, tick()

        # 2. The teacher's objects.
        t_obj = torch_ops.pool(t_tok, c.labels, K, check_values=False)
        t1, t2 = t_obj[:, 0][valid], t_obj[:, 1][valid]
        M = t1.shape[0]
        ids_dev = torch.as_tensor(ids, device=dev)
        obj_ids = torch.repeat_interleave(ids_dev, counts, output_size=M)
        timings["pooling"], t = tick() - t, tick()

        # 3. Queue: look up, then push.
        if distributed:
            all1, sizes = dist.all_gather_tensor_rows(t1)
            all2, _ = dist.all_gather_tensor_rows(t2)
            all_counts, _ = dist.all_gather_tensor_rows(counts)
            all_ids, _ = dist.all_gather_tensor_rows(ids_dev)
            offset = sum(sizes[:dist.rank()])
            match = self.queue.match(t1, t2, obj_ids, batch=(all1, all2), offset=offset)
            self.queue.push(all1, all2, all_counts, image_ids=all_ids)
        else:
            match = self.queue.match(t1, t2, obj_ids)
            self.queue.push(t1, t2, counts, image_ids=ids_dev)
        timings["queue"], t = tick() - t, tick()

        # 4. Heads.
        sg, so = student(c.labels, valid)
        bad["the student's global logits"] = _nonfinite(sg)
        bad["the student's object logits"] = _nonfinite(so)
        timings["student_forward"], t = tick() - t, tick()
        L = sg.shape[-1]
        w_obj = self.weights[1] if use_objects else 0.0
        use_neighbours = use_neighbours and use_objects
        w_nn = self.weights[2] if use_neighbours else 0.0
        with torch.no_grad():
            tg = teacher_head.forward_global(teacher_cls.transpose(0, 1).reshape(2 * B, d))
            to = teacher_head.forward_objects(torch.cat([t1, t2]))
            tn = None
            if use_neighbours and M > 0:
                # Rows outside the cycle masks are ignored by the losses (the C
                # engine skips this head when no row passed; the result is the same).
                tn = teacher_head.forward_objects(torch.cat([match.targets1, match.targets2]))
                bad["the teacher's logits of the queue neighbours"] = _nonfinite(tn)
                tn = tn.float().reshape(2, M, -1)
            bad["the teacher's global logits"] = _nonfinite(tg)
            bad["the teacher's object logits"] = _nonfinite(to)
        timings["teacher_heads"], t = tick() - t, tick()

        # 5. Losses (explicit gradient on autograd); centres.
        Z = torch.stack([match.mask1.sum(), match.mask2.sum()])
        den = None
        if distributed:
            den = dist.all_reduce_sum(torch.cat([torch.tensor([B, M], device=dev), Z]))
        loss, res = device_losses(
            sg, so, tg.float().reshape(2, B, L), to.float().reshape(2, M, -1), tn,
            match.mask1, match.mask2, center_global=self.center_global.to(dev),
            center_objects=self.center_objects.to(dev), student_temp=self.student_temp,
            teacher_temp=teacher_temp, teacher_temp_objects=teacher_temp_objects,
            weights=(self.weights[0], w_obj, w_nn), center_momentum=self.center_momentum,
            denominators=den, grad_scale=float(world))
        with torch.no_grad():
            if distributed:
                m = self.center_momentum
                for buf, rows in ((self.center_global, tg), (self.center_objects, to)):
                    s = torch.cat([rows.detach().double().sum(0),
                                   torch.full((1,), rows.shape[0], dtype=f64, device=dev)])
                    dist.all_reduce_sum(s)
                    mean = (s[:-1] / s[-1].clamp(min=1)).to(buf.dtype).to(buf.device)
                    buf.copy_(torch.where(s[-1] > 0, buf * m + mean * (1.0 - m), buf))
            else:
                self.center_global.copy_(res.center_global)
                self.center_objects.copy_(res.center_objects)
        timings["losses"] = tick() - t

        # The logged scalars, summed over processes, and the finiteness flags.
        vec = torch.stack([res.global_, res.objects, res.neighbours, res.total,
                           Z.sum().to(f64), torch.tensor(2.0 * M, dtype=f64, device=dev)])
        if distributed:
            dist.all_reduce_sum(vec)
        flags = torch.stack([b.to(f64) for b in bad.values()])
        host = _host_scalars(torch.cat([vec, counts.to(f64).mean().reshape(1), flags]))
        for what, flag in zip(bad, host[7:]):
            if flag:
                raise NonFiniteError(f"{what} hold non-finite values (NaN or inf)")
        terms = dict(zip(("global", "objects", "neighbours", "total"), host[:4]))
        consistent, n_lookups = host[4], int(host[5])
        stats = {"objects_per_image": host[6], "n_objects": float(M),
                 "consistent": consistent / n_lookups if n_lookups else 0.0,
                 "queue_images": float(len(self.queue))}
        return ObjectiveOutput(loss=loss, terms=terms, stats=stats, labels=c.labels,
                               valid=valid, extra={"match": match, "backend": "torch"},
                               timings=timings)


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``t``'s device: ``t`` holds a NaN or an infinity."""
    t = t.detach()
    return ~torch.isfinite(t).all() if t.numel() else torch.zeros((), dtype=torch.bool,
                                                                  device=t.device)


def _host_scalars(values: torch.Tensor) -> List[float]:
    """The torch engine's one device-to-host read of a step: the logged scalars
    (terms, statistics) and the finiteness flags, as Python floats."""
    return values.detach().cpu().tolist()
