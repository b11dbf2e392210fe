"""Dense evaluation of frozen patch features (docs/method.md §7): NN retrieval and a linear probe.

**Dense nearest-neighbour retrieval** ("in-context scene understanding",
Balažević et al., NeurIPS 2023; the protocol CrIBo reports, Lebailly,
Stegmüller et al., ICLR 2024, §4): a memory bank of L2-normalised final patch
tokens of augmented training views, each labelled with its patch's class
histogram (:func:`cribo.evaluation.bank.build_bank`); every validation
patch takes its ``k`` most cosine-similar bank entries (the C blocked search
:func:`cribo.topk_cosine` on the host, or :func:`cribo.nn.torch_ops.topk_cosine`
on the evaluation's GPU), weights them by ``softmax(similarity /
temperature)`` and sums their histograms; the class scores of the patch grid
are upsampled to the mask (bilinear on the scores, or nearest) and the argmax
is the prediction.  Scores: :mod:`cribo.evaluation.metrics`.

**Linear probe**: a linear layer on the same bank's features (standardised)
trained to the patches' majority labels with AdamW, then applied to every
validation patch; class probabilities are upsampled like the votes.

Validation images are encoded at :func:`~cribo.evaluation.features.eval_size`
(shorter side ``image_size``, the other a multiple of the patch size) and
scored at their mask's own resolution.

(About 550 lines, a third of them docstrings: the vote's two engines, the probe
and the evaluation that runs both share this one module.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..ops.queue import topk_cosine
from .bank import Bank, build_bank
from .features import (_bar, _device_of, class_names_of, encode, eval_size, patch_size_of,
                       resize_image)
from .metrics import IGNORE_INDEX, SegmentationScores, confusion_matrix

__all__ = [
    "knn_vote", "upsample_scores", "LinearProbe", "train_linear_probe",
    "RetrievalResult", "ProbeResult", "dense_evaluation", "evaluate_retrieval", "linear_probe",
]


# =============================================================================
# the two per-patch predictors
# =============================================================================

def knn_vote(queries: Any, bank_features: Any, bank_histograms: Any, *,
             k: int = 30, temperature: float = 0.02, chunk: int = 8192, device: Any = None,
             search: str = "auto", chunk_bytes: Optional[int] = None) -> np.ndarray:
    """Class scores of each query patch from its k nearest bank entries.

    ``votes[m] = sum_j softmax(s_m / temperature)_j * hist[idx_m[j]]`` where
    ``idx_m, s_m`` are the ``k`` most cosine-similar bank rows of query ``m``
    and their similarities (:func:`cribo.topk_cosine`: an exact ranking, ties to
    the lower index).  A query's votes depend on that query and the bank alone:
    the search ranks each query exactly, and the weights and sums are elementwise
    operations over the rows in a fixed order (float64, neighbour 0 to k-1), so
    neither ``chunk`` nor the thread count nor the BLAS kernel changes a bit of
    the result.

    **The device path** (``search="torch"``, or ``"auto"`` with a non-CPU
    ``device``): the bank and each chunk of queries become float32 tensors on
    ``device``, the search is :func:`cribo.nn.torch_ops.topk_cosine` (exact, ties
    to the lower index, scanned in blocks sized from ``chunk_bytes``) and the
    vote is the same float64 elementwise steps, neighbour 0 to k-1, on the
    device; only the (chunk, C) float32 votes come back to the host.  Its result
    equals the C path's up to the last bits of the float64 ``exp`` and of the
    float32 similarities (tests/evaluation/test_device_search.py), and is itself
    independent of ``chunk``.

    Args:
        queries: (M, D) float32 patch features (NumPy; a tensor on the torch path).
        bank_features: (Q, D) float32 bank features, Q >= k (NumPy; on the torch
            path also a tensor, used in place when already on ``device``).
        bank_histograms: (Q, C) float32 class fractions of the bank patches (as
            ``bank_features``).
        k: neighbours.
        temperature: softmax temperature of the similarity weights (> 0).
        chunk: queries per search call (bounds the (chunk, k, C) gather and the
            search's per-thread lists; the bank is read once per chunk).
        device: torch device of the torch path (default: the CPU path, the C search).
        search: ``"auto"`` (the C search on the host when ``device`` is None or
            the CPU, the torch search otherwise), ``"c"`` or ``"torch"`` (on
            ``device``, default the CPU).
        chunk_bytes: memory budget of one torch search step (default:
            :func:`cribo.nn.torch_ops.topk_cosine`'s); unused by the C search.

    Returns:
        (M, C) float32 votes (each row sums to the mass of its histograms, 1).
    """
    fn = "knn_vote"
    Q = bank_features.shape[0]
    if bank_histograms.shape[0] != Q:
        raise ValueError(f"{fn}: {Q} bank features but {bank_histograms.shape[0]} histograms")
    if not 1 <= k <= Q:
        raise ValueError(f"{fn}: k={k} needs a bank of at least k entries, the bank has {Q} "
                         "(use more training images, more augment passes or a larger "
                         "patches_per_image)")
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"{fn}: chunk must be >= 1, got {chunk}")
    if _search_engine(search, device, fn) == "torch":
        return _knn_vote_torch(queries, bank_features, bank_histograms, k, temperature, chunk,
                               device, chunk_bytes)
    M, C = queries.shape[0], bank_histograms.shape[1]
    out = np.empty((M, C), np.float32)
    hist = np.ascontiguousarray(bank_histograms, np.float32)
    for s in range(0, M, chunk):
        q = np.ascontiguousarray(queries[s:s + chunk], np.float32)
        idx, sim = topk_cosine(q, bank_features, k)
        sim = sim.astype(np.float64)
        w = np.exp((sim - sim[:, :1]) / temperature)                # sim[:, 0] is the max
        # Sums over the k neighbours as explicit elementwise steps in a fixed order
        # (not a reduction or einsum, whose order may depend on the array's shape).
        total = w[:, 0].copy()
        votes = w[:, :1] * hist[idx[:, 0]]
        for j in range(1, k):
            total += w[:, j]
            votes += w[:, j:j + 1] * hist[idx[:, j]]
        out[s:s + chunk] = votes / total[:, None]
    return out


def _search_engine(search: str, device: Any, fn: str) -> str:
    """``"c"`` or ``"torch"``: the engine that ``search`` and ``device`` ask for."""
    if search not in ("auto", "c", "torch"):
        raise ValueError(f"{fn}: search must be 'auto', 'c' or 'torch', got {search!r}")
    if search != "auto":
        return search
    if device is None:
        return "c"
    import torch

    return "c" if torch.device(device).type == "cpu" else "torch"


def _knn_vote_torch(queries: Any, bank_features: Any, bank_histograms: Any, k: int,
                    temperature: float, chunk: int, device: Any,
                    chunk_bytes: Optional[int]) -> np.ndarray:
    """:func:`knn_vote`'s device path (arguments checked there): (M, C) float32 NumPy votes."""
    import torch

    from ..nn.torch_ops.queue import DEFAULT_CHUNK_BYTES
    from ..nn.torch_ops.queue import topk_cosine as torch_topk_cosine

    dev = torch.device("cpu" if device is None else device)
    bank = torch.as_tensor(bank_features, dtype=torch.float32, device=dev)
    hist = torch.as_tensor(bank_histograms, dtype=torch.float32, device=dev)
    M, C = queries.shape[0], hist.shape[1]
    out = np.empty((M, C), np.float32)
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    with torch.no_grad():
        for s in range(0, M, chunk):
            q = torch.as_tensor(queries[s:s + chunk], dtype=torch.float32, device=dev)
            idx, sim = torch_topk_cosine(q, bank, k, chunk_bytes=budget)
            sim = sim.to(torch.float64)
            w = torch.exp((sim - sim[:, :1]) / temperature)          # sim[:, 0] is the max
            # the C path's steps: elementwise, float64, neighbour 0 to k-1
            total = w[:, 0].clone()
            votes = w[:, :1] * hist[idx[:, 0]]
            for j in range(1, k):
                total += w[:, j]
                votes += w[:, j:j + 1] * hist[idx[:, j]]
            out[s:s + chunk] = (votes / total[:, None]).to(torch.float32).cpu().numpy()
    return out


@dataclass
class LinearProbe:
    """A trained linear segmentation head on standardised patch features.

    ``scores(z) = ((z - mean) / std) @ weight.T + bias``.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32.
        mean, std: (D,) float32 standardisation from the training bank.
        train_accuracy: fraction of bank patches classified as their majority label.
        epochs: epochs trained.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    train_accuracy: float
    epochs: int = 0

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        """(M, D) features -> (M, C) float32 class probabilities (softmax)."""
        logits = ((z - self.mean) / self.std) @ self.weight.T + self.bias
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)


def train_linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, *,
                       epochs: int = 10, lr: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 1024, min_steps: int = 200, balanced: bool = False,
                       seed: int = 0, progress: bool = False) -> LinearProbe:
    """Fits a linear classifier ``D -> C`` to patch features (torch, AdamW).

    Features are standardised with the training mean and standard deviation;
    the layer starts at zero, the learning rate follows a cosine from ``lr`` to
    0 over ``epochs`` epochs of mini-batches (shuffled by a generator seeded
    with ``seed``), cross-entropy to the labels; weight decay on the weight only.
    A small bank gets more epochs, so that at least ``min_steps`` steps are taken.
    With ``balanced`` the cross-entropy weighs class ``c`` by ``Q / (C' n_c)``
    (``n_c`` its patches, ``C'`` the classes present), so that rare classes
    count as much as the background; off by default (the usual probe).
    It runs on one torch thread (restored afterwards): its steps are too small
    to gain from more, and on a busy machine extra threads only spin.

    Args:
        features: (Q, D) float32.
        labels: (Q,) int64 in ``0..C-1``.
        n_classes: C.
        epochs, lr, weight_decay, batch_size, min_steps, balanced, seed: optimisation
            (see above).
        progress: show a tqdm bar over the epochs.

    Returns:
        The :class:`LinearProbe`.
    """
    import torch

    Q, D = features.shape
    if Q == 0:
        raise ValueError("train_linear_probe: no training patches")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("train_linear_probe: need epochs >= 1, batch_size >= 1 and lr > 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_probe(features, labels, n_classes, epochs, lr, weight_decay, batch_size,
                          min_steps, balanced, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int,
               lr: float, weight_decay: float, batch_size: int, min_steps: int,
               balanced: bool, seed: int, progress: bool) -> LinearProbe:
    import torch
    import torch.nn.functional as F

    Q, D = features.shape
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    class_weight = None
    if balanced:
        n_c = torch.bincount(y, minlength=n_classes).double()
        present = int((n_c > 0).sum())
        class_weight = torch.where(n_c > 0, Q / (present * n_c.clamp_min(1)), 0).float()
    weight = torch.zeros(n_classes, D, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [weight], "weight_decay": weight_decay},
                             {"params": [bias], "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = (Q + batch_size - 1) // batch_size
    epochs = max(int(epochs), -(-int(min_steps) // steps_per_epoch))
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(int(seed))
    step = 0
    bar = _bar(epochs, "probe", progress)
    for _ in range(epochs):
        perm = torch.randperm(Q, generator=gen)
        for s in range(0, Q, batch_size):
            b = perm[s:s + batch_size]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / total))
            loss = F.cross_entropy(x[b] @ weight.T + bias, y[b], weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        bar.update(1)
    bar.close()
    with torch.no_grad():
        acc = float((torch.argmax(x @ weight.T + bias, 1) == y).float().mean())
    return LinearProbe(weight=weight.detach().numpy().copy(), bias=bias.detach().numpy().copy(),
                       mean=mean.numpy().copy(), std=std.numpy().copy(), train_accuracy=acc,
                       epochs=epochs)


def upsample_scores(scores: np.ndarray, size_hw: Tuple[int, int],
                    mode: str = "bilinear") -> np.ndarray:
    """Per-patch class scores -> per-pixel labels.

    Args:
        scores: (h, w, C) class scores of the patch grid.
        size_hw: the mask's ``(H, W)``.
        mode: ``"bilinear"`` (on the scores, half-pixel centres, then argmax) or
            ``"nearest"`` (each pixel takes the patch whose area its centre lies in).

    Returns:
        (H, W) int64 labels (argmax ties to the lower class).
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"upsample_scores: mode must be 'bilinear' or 'nearest', got {mode!r}")
    t = torch.from_numpy(np.ascontiguousarray(scores.transpose(2, 0, 1)))[None]
    if tuple(t.shape[-2:]) != tuple(size_hw):
        if mode == "bilinear":
            t = F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(t, size=tuple(size_hw), mode="nearest-exact")
    return t[0].argmax(0).numpy().astype(np.int64)


# =============================================================================
# results
# =============================================================================

@dataclass
class RetrievalResult(SegmentationScores):
    """Scores of dense NN retrieval (fields of :class:`SegmentationScores`, plus:)

    Attributes:
        k: neighbours per patch.
        temperature: softmax temperature of the similarity weights.
        bank_size: patches in the memory bank.
        image_size: resolution side of the training views / validation short side.
        seconds: wall time of the whole evaluation (bank, probe, search).
    """

    k: int = 30
    temperature: float = 0.02
    bank_size: int = 0
    image_size: int = 0
    seconds: float = 0.0


@dataclass
class ProbeResult(SegmentationScores):
    """Scores of the linear probe (fields of :class:`SegmentationScores`, plus:)

    Attributes:
        train_accuracy: patch accuracy on the bank it was trained on.
        epochs, lr, balanced: its optimisation.
        bank_size: training patches.
        image_size: as in :class:`RetrievalResult`.
        seconds: wall time of the whole evaluation.
    """

    train_accuracy: float = 0.0
    epochs: int = 0
    lr: float = 0.0
    balanced: bool = False
    bank_size: int = 0
    image_size: int = 0
    seconds: float = 0.0


# =============================================================================
# the evaluation
# =============================================================================

def dense_evaluation(backbone: Any, train_set: Any, val_set: Any, *, k: int = 30,
                     temperature: float = 0.02, image_size: Optional[int] = None,
                     patches_per_image: Optional[int] = 100, augment_passes: int = 2,
                     crop_scale: Tuple[float, float] = (0.5, 1.0), batch_size: int = 32,
                     query_chunk: int = 8192, upsample: str = "bilinear",
                     retrieval: bool = True, probe: bool = True, probe_epochs: int = 10,
                     probe_lr: float = 1e-2, probe_batch_size: int = 1024,
                     probe_balanced: bool = False, keep_predictions: int = 4, seed: int = 0,
                     device: Any = None, progress: bool = True, bank: Optional[Bank] = None,
                     search: str = "auto", search_bytes: Optional[int] = None,
                     ) -> Tuple[Optional[RetrievalResult], Optional[ProbeResult]]:
    """NN retrieval and the linear probe from one bank and one pass over the validation set.

    Args:
        backbone: network whose forward maps (B, 3, H, W) to ``(cls, patches)``,
            patches (B, N, D), with a ``patch_size`` attribute; put in eval mode.
        train_set, val_set: items ``(image (H, W, 3) uint8, mask (H, W) int)``,
            mask values ``0..C-1`` or 255 (ignored); ``class_names`` attribute
            (C names, background first) on the validation set.
        k: neighbours per validation patch.
        temperature: softmax temperature of the neighbour weights.
        image_size: side of the training views and short side of the validation
            images (default: ``backbone.img_size``); a multiple of the patch size.
        patches_per_image: bank cap per training view (:func:`sample_patches`).
        augment_passes: augmented views per training image (0: one plain view).
        crop_scale: area range of the training views' random resized crops.
        batch_size: images per forward pass.
        query_chunk: validation patches per top-k search call.
        upsample: ``"bilinear"`` or ``"nearest"`` (:func:`upsample_scores`).
        retrieval, probe: which of the two to run.
        probe_epochs, probe_lr, probe_batch_size, probe_balanced: the probe's
            optimisation (:func:`train_linear_probe`).
        keep_predictions: validation images whose predicted masks are kept.
        seed: seed of the bank's views and sampling and of the probe.
        device: torch device of the backbone and, off the CPU, of the top-k
            search and the vote (default: the backbone's).
        progress: tqdm bars.
        bank: a bank built before with the same settings (skips building it).
        search: the top-k search's engine, :func:`knn_vote`'s ``search``
            (``"auto"``: the C search on the host when ``device`` is the CPU, the
            torch search on ``device`` otherwise, the bank moved there once).
        search_bytes: memory budget of one torch search step (default:
            :func:`cribo.nn.torch_ops.topk_cosine`'s).

    Returns:
        ``(RetrievalResult or None, ProbeResult or None)``.
    """
    t0 = time.time()
    if hasattr(backbone, "eval"):
        backbone.eval()
    p = patch_size_of(backbone)
    if image_size is None:
        image_size = getattr(backbone, "img_size", None)
        if not isinstance(image_size, int):
            raise ValueError("dense_evaluation: pass image_size= (the backbone has no img_size)")
    names = class_names_of(val_set)
    C = len(names)
    if upsample not in ("bilinear", "nearest"):
        raise ValueError(f"dense_evaluation: upsample must be 'bilinear' or 'nearest', "
                         f"got {upsample!r}")
    if not (retrieval or probe):
        raise ValueError("dense_evaluation: nothing to do (retrieval=False and probe=False)")
    search_device = _device_of(backbone) if device is None else device
    engine = _search_engine(search, search_device, "dense_evaluation")
    if bank is None:
        bank = build_bank(backbone, train_set, image_size=image_size, n_classes=C,
                          patch_size=p, patches_per_image=patches_per_image,
                          augment_passes=augment_passes, crop_scale=crop_scale,
                          batch_size=batch_size, seed=seed, device=device, progress=progress)
    if len(bank) == 0:
        raise ValueError("dense_evaluation: the memory bank is empty (no labelled training "
                         "patches)")
    if retrieval and len(bank) < k:
        raise ValueError(f"dense_evaluation: k={k} but the bank has only {len(bank)} patches "
                         "(use more training images, augment passes or patches_per_image)")
    bank_features, bank_histograms = bank.features, bank.histograms
    if retrieval and engine == "torch":                 # on the device once, not per batch
        import torch

        bank_features = torch.as_tensor(bank.features, device=torch.device(search_device))
        bank_histograms = torch.as_tensor(bank.histograms, device=torch.device(search_device))
    head = (train_linear_probe(bank.features, bank.labels, C, epochs=probe_epochs, lr=probe_lr,
                               batch_size=probe_batch_size, balanced=probe_balanced, seed=seed,
                               progress=progress)
            if probe else None)

    n_val = len(val_set)
    conf = {"nn": np.zeros((n_val, C, C), np.int64), "probe": np.zeros((n_val, C, C), np.int64)}
    preds: Dict[str, Dict[int, np.ndarray]] = {"nn": {}, "probe": {}}
    bar = _bar(n_val, "val", progress)
    for s in range(0, n_val, batch_size):
        part = list(range(s, min(n_val, s + batch_size)))
        images, masks, grids = [], [], []
        for i in part:
            image, mask = val_set[i]
            image, mask = np.asarray(image), np.asarray(mask)
            if image.shape[:2] != mask.shape:
                raise ValueError(f"dense_evaluation: validation item {i} has image "
                                 f"{image.shape[:2]} but mask {mask.shape}")
            H, W = eval_size(mask.shape[0], mask.shape[1], image_size, p)
            images.append(resize_image(image, (H, W)))
            masks.append(mask)
            grids.append((H // p, W // p))
        z = encode(backbone, images, device, batch_size)
        for zi, (h, w) in zip(z, grids):
            if zi.shape[0] != h * w:
                raise ValueError(f"dense_evaluation: the backbone gave {zi.shape[0]} tokens for "
                                 f"a {h}x{w} patch grid")
        queries = np.concatenate(z)
        offsets = np.cumsum([0] + [zi.shape[0] for zi in z])
        scores = {}
        if retrieval:
            scores["nn"] = knn_vote(queries, bank_features, bank_histograms, k=k,
                                    temperature=temperature, chunk=query_chunk,
                                    device=search_device, search=engine,
                                    chunk_bytes=search_bytes)
        if head is not None:
            scores["probe"] = head.probabilities(queries)
        for j, i in enumerate(part):
            h, w = grids[j]
            for name, sc in scores.items():
                grid = sc[offsets[j]:offsets[j + 1]].reshape(h, w, C)
                pred = upsample_scores(grid, masks[j].shape, upsample)
                conf[name][i] = confusion_matrix(masks[j], pred, C, IGNORE_INDEX)
                if i < keep_predictions:
                    preds[name][i] = pred
        bar.update(len(part))
    bar.close()

    seconds = time.time() - t0
    indices = np.arange(n_val, dtype=np.int64)
    nn_result = probe_result = None
    if retrieval:
        nn_result = RetrievalResult(
            **SegmentationScores._fields_from(conf["nn"], names, indices, preds["nn"]),
            k=int(k), temperature=float(temperature), bank_size=len(bank),
            image_size=int(image_size), seconds=seconds)
    if head is not None:
        probe_result = ProbeResult(
            **SegmentationScores._fields_from(conf["probe"], names, indices, preds["probe"]),
            train_accuracy=head.train_accuracy, epochs=head.epochs, lr=float(probe_lr),
            balanced=bool(probe_balanced),
            bank_size=len(bank), image_size=int(image_size), seconds=seconds)
    return nn_result, probe_result


def evaluate_retrieval(backbone: Any, train_set: Any, val_set: Any, *, k: int = 30,
                       temperature: float = 0.02, image_size: Optional[int] = None,
                       patches_per_image: Optional[int] = 100, augment_passes: int = 2,
                       batch_size: int = 32, seed: int = 0, **kwargs: Any) -> RetrievalResult:
    """Dense nearest-neighbour retrieval mIoU (docs/method.md §7) of a frozen backbone.

    See :func:`dense_evaluation` for every argument (``kwargs``: ``crop_scale``,
    ``query_chunk``, ``upsample``, ``keep_predictions``, ``device``,
    ``progress``, ``bank``, ``search``, ``search_bytes``).

    Returns:
        :class:`RetrievalResult`: ``miou``, ``per_class_iou``, ``fg_iou``,
        ``pixel_acc``, ``confusion`` (C, C), ``per_image_confusion``
        (n_val, C, C) for :func:`paired_bootstrap`, ``predictions``.
    """
    result, _ = dense_evaluation(backbone, train_set, val_set, k=k, temperature=temperature,
                                 image_size=image_size, patches_per_image=patches_per_image,
                                 augment_passes=augment_passes, batch_size=batch_size,
                                 seed=seed, retrieval=True, probe=False, **kwargs)
    assert result is not None
    return result


def linear_probe(backbone: Any, train_set: Any, val_set: Any, *, epochs: int = 10,
                 lr: float = 1e-2, probe_batch_size: int = 1024, balanced: bool = False,
                 image_size: Optional[int] = None, patches_per_image: Optional[int] = 100,
                 augment_passes: int = 2, batch_size: int = 32, seed: int = 0,
                 **kwargs: Any) -> ProbeResult:
    """Linear segmentation mIoU of a frozen backbone.

    A linear layer is trained on the memory bank's patches (features ->
    majority labels, :func:`train_linear_probe`) and applied to every validation
    patch; see :func:`dense_evaluation` for the other arguments.

    Returns:
        :class:`ProbeResult` (same scores as :class:`RetrievalResult`).
    """
    _, result = dense_evaluation(backbone, train_set, val_set, image_size=image_size,
                                 patches_per_image=patches_per_image,
                                 augment_passes=augment_passes, batch_size=batch_size,
                                 seed=seed, retrieval=False, probe=True, probe_epochs=epochs,
                                 probe_lr=lr, probe_batch_size=probe_batch_size,
                                 probe_balanced=balanced, **kwargs)
    assert result is not None
    return result
