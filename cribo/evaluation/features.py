"""Frozen patch features for dense evaluation: backbones, views, labels, tokens.

* :func:`load_backbone` reads our checkpoints (``teacher_backbone.pth``,
  ``checkpoint.pth``, or a run folder) and published DINO / CrIBo ones through
  :func:`cribo.nn.load_pretrained`; :func:`random_init_like` gives the
  untrained-network floor of the same architecture.
* :func:`eval_size` is the validation resolution rule; :func:`train_view` draws an
  augmented training view (random resized crop + flip) with its mask.
* :func:`patch_histograms` labels each patch with its class histogram;
  :func:`encode` gives a backbone's L2-normalised final patch tokens.
* The memory bank built from these (its sampling rule, :class:`Bank`,
  :func:`build_bank`) is :mod:`cribo.evaluation.bank`.

Feature extraction uses torch; the rest is NumPy.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..data.views import Crop, normalize, resized_crop, sample_crop
from ..train.run_folder import CONFIG, TEACHER_BACKBONE
from .metrics import IGNORE_INDEX

__all__ = [
    "load_backbone", "random_init_like", "eval_size", "resize_image", "resize_mask",
    "train_view", "patch_histograms", "encode", "class_names_of", "patch_size_of",
]


# =============================================================================
# backbones
# =============================================================================

def _config_beside(path: str) -> Optional[Dict[str, Any]]:
    """The training config saved next to a checkpoint by ``cribo pretrain``, if any."""
    f = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return cfg if isinstance(cfg, dict) else None


def load_backbone(path: str, *, key: str = "teacher", num_heads: Optional[int] = None,
                  verbose: bool = False):
    """A ViT backbone from one of our checkpoints or a published one.

    Accepts ``teacher_backbone.pth`` (a bare state dict; the number of heads is
    read from the ``config.json`` that ``cribo pretrain`` writes beside it),
    ``checkpoint.pth`` (the ``key`` entry, heads from its ``config``), a run
    folder (its ``teacher_backbone.pth``), or any checkpoint
    :func:`cribo.nn.load_pretrained` reads (heads ``embed_dim / 64`` unless
    ``num_heads`` is given).

    Args:
        path: file or run folder.
        key: entry of a training checkpoint (``"teacher"``: what the paper evaluates).
        num_heads: attention heads, overriding what is read or inferred.
        verbose: print the load report.

    Returns:
        The :class:`cribo.nn.VisionTransformer` in eval mode; its attribute
        ``training_config`` holds the options of the ``cribo pretrain`` run that
        wrote the checkpoint (a dict), or None for a published checkpoint.

    Raises:
        FileNotFoundError: no such file, or a folder without
            ``teacher_backbone.pth``.
        ValueError: a file that is not a readable checkpoint (empty, truncated,
            corrupt, text, unknown format, or holding Python objects other
            than tensors); the message names the file and says which.
    """
    from .. import nn
    from ..nn.architectures import heads_of_config

    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, TEACHER_BACKBONE)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"load_backbone: {path} is a folder without "
                                    f"{TEACHER_BACKBONE}")
        path = f
    # Unreadable files (missing, empty, truncated, text, corrupt, foreign
    # objects) raise FileNotFoundError / ValueError naming the file; nothing
    # suggests loading it unsafely.
    obj = nn.read_checkpoint(path, who="load_backbone")
    cfg = obj.get("config") if isinstance(obj, Mapping) else None
    if not isinstance(cfg, Mapping):
        cfg = _config_beside(path)
    heads = num_heads
    if heads is None and isinstance(cfg, Mapping):
        heads = heads_of_config(cfg)
    model, report = nn.load_pretrained(obj, key=key, num_heads=heads)
    if verbose:
        print(str(report).replace("<state dict>", path))
    model.training_config = dict(cfg) if isinstance(cfg, Mapping) else None
    return model.eval()


def random_init_like(model_or_config: Any, seed: int = 0):
    """A freshly initialised ViT of the same architecture: the untrained floor.

    The weights are those of ``torch.manual_seed(seed)`` followed by
    ``VisionTransformer(**config)`` -- which is how ``cribo pretrain`` builds its
    student, so with the run's seed this is the run's own starting point.

    Args:
        model_or_config: a :class:`cribo.nn.VisionTransformer` (its
            ``config()`` is used) or that config as a dict.
        seed: the initialisation seed; the global torch RNG is left untouched.

    Returns:
        A :class:`cribo.nn.VisionTransformer` in eval mode, drop-path 0.
    """
    import torch

    from .. import nn

    if isinstance(model_or_config, Mapping):
        cfg = dict(model_or_config)
    elif hasattr(model_or_config, "config") and callable(model_or_config.config):
        cfg = dict(model_or_config.config())
    else:
        raise TypeError(f"random_init_like: expected a VisionTransformer or its config dict, "
                        f"got {type(model_or_config).__name__}")
    cfg["drop_path_rate"] = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = nn.VisionTransformer(**cfg)
    return model.eval()


def patch_size_of(backbone: Any) -> int:
    """The backbone's ``patch_size`` attribute (required of any backbone)."""
    p = getattr(backbone, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    if not isinstance(p, int) or p < 1:
        raise ValueError("dense evaluation: the backbone needs an int attribute patch_size "
                         f"(got {p!r}); pass patch_size=")
    return p


def class_names_of(dataset: Any) -> Tuple[str, ...]:
    """``dataset.class_names`` (index 0 the background), required for scoring."""
    names = getattr(dataset, "class_names", None)
    if names is None or len(names) < 2:
        raise ValueError(f"dense evaluation: {type(dataset).__name__} needs a class_names "
                         "attribute (background first, at least one object class)")
    return tuple(str(n) for n in names)


# =============================================================================
# views and labels
# =============================================================================

def eval_size(height: int, width: int, image_size: int, patch_size: int) -> Tuple[int, int]:
    """The resolution a validation image is encoded at.

    The shorter side becomes ``image_size`` (itself a multiple of the patch
    size); the longer side is scaled by the same factor and rounded to the
    nearest multiple of the patch size (at least one patch), so the aspect ratio
    is kept to within half a patch.  A square image becomes
    ``image_size x image_size``.

    Returns:
        ``(H', W')``, both multiples of ``patch_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"eval_size: image_size {image_size} must be a multiple of the "
                         f"patch size {patch_size}")
    short = min(height, width)
    scale = image_size / short

    def side(s: int) -> int:
        return image_size if s == short else max(patch_size,
                                                 int(round(s * scale / patch_size)) * patch_size)

    return side(height), side(width)


def resize_image(image: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8, bicubic (Pillow); unchanged if same size."""
    H, W = size_hw
    if image.shape[:2] == (H, W):
        return image
    return np.asarray(Image.fromarray(image, "RGB").resize((W, H), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, size_hw: Tuple[int, int],
                crop: Optional[Crop] = None) -> np.ndarray:
    """Nearest-neighbour resize of a label mask (optionally of a crop, flipped).

    Args:
        mask: (H, W) integer labels.
        size_hw: output ``(H', W')``.
        crop: the crop (and flip) to take first, as :func:`train_view` does.

    Returns:
        (H', W') int64.
    """
    H, W = size_hw
    m = np.asarray(mask)
    if crop is None:
        if m.shape == (H, W):
            return m.astype(np.int64, copy=False)
        crop = Crop(0, 0, m.shape[0], m.shape[1])
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    out = np.asarray(Image.fromarray(np.ascontiguousarray(m, np.float32), "F").resize(
        (W, H), Image.Resampling.NEAREST, box=box))
    if crop.flip:
        out = out[:, ::-1]
    return np.rint(out).astype(np.int64)


def train_view(image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator],
               image_size: int, patch_size: int,
               crop_scale: Tuple[float, float] = (0.5, 1.0)) -> Tuple[np.ndarray, np.ndarray]:
    """One view of a training image for the memory bank, with its mask.

    With a generator: a random resized crop (torchvision's sampling, area in
    ``crop_scale``, aspect ratio in [3/4, 4/3]) resized to ``image_size`` square
    (bicubic for the image, nearest for the mask), flipped left-right with
    probability 0.5 -- drawn from ``rng`` in that order.  Without: the image at
    the validation resolution (:func:`eval_size`), no flip.

    Returns:
        image (S, S, 3) uint8 (or (H', W', 3) without ``rng``) and its mask, int64.
    """
    h, w = image.shape[:2]
    if rng is None:
        size = eval_size(h, w, image_size, patch_size)
        return resize_image(image, size), resize_mask(mask, size)
    top, left, ch, cw = sample_crop(rng, h, w, scale=tuple(crop_scale))
    crop = Crop(top, left, ch, cw, flip=bool(rng.random() < 0.5))
    return (resized_crop(image, crop, image_size, "bicubic"),
            resize_mask(mask, (image_size, image_size), crop))


def patch_histograms(mask: np.ndarray, patch_size: int, n_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Class histogram of each patch of a mask (ignored pixels not counted).

    Args:
        mask: (H, W) integer labels in ``0..C-1`` or ``ignore_index``; H and W
            multiples of ``patch_size``.
        patch_size: p.
        n_classes: C (background included).

    Returns:
        (h*w, C) int64 pixel counts, patches row-major (as the ViT's tokens),
        ``h = H/p``, ``w = W/p``.  A patch of ignored pixels only has a zero row.
    """
    m = np.asarray(mask)
    H, W = m.shape
    p, C = int(patch_size), int(n_classes)
    if H % p or W % p:
        raise ValueError(f"patch_histograms: mask {H}x{W} is not a multiple of the patch size {p}")
    valid = m != ignore_index
    if valid.any():
        lo, hi = int(m[valid].min()), int(m[valid].max())
        if lo < 0 or hi >= C:
            raise ValueError(f"patch_histograms: labels must be in 0..{C - 1} or "
                             f"{ignore_index} (ignore), found {lo if lo < 0 else hi}")
    h, w = H // p, W // p
    lab = np.where(valid, m, C).astype(np.int64)                # ignore -> column C
    lab = lab.reshape(h, p, w, p).transpose(0, 2, 1, 3).reshape(h * w, p * p)
    idx = lab + (C + 1) * np.arange(h * w)[:, None]
    counts = np.bincount(idx.ravel(), minlength=h * w * (C + 1)).reshape(h * w, C + 1)
    return counts[:, :C].astype(np.int64)


# =============================================================================
# features
# =============================================================================

def encode(backbone: Any, images: Sequence[np.ndarray], device: Any = None,
           batch_size: int = 32) -> List[np.ndarray]:
    """L2-normalised final patch tokens of each image.

    Images of equal shape are batched together (up to ``batch_size``); each goes
    through :func:`cribo.data.normalize` (ImageNet mean/std) and the backbone,
    whose forward returns ``(cls, patches)`` with patches (B, N, D).

    Args:
        backbone: the network (a :class:`cribo.nn.VisionTransformer` or any
            module with the same forward).
        images: (H_i, W_i, 3) uint8 images, sides multiples of the patch size.
        device: torch device of the backbone (default: that of its parameters).
        batch_size: images per forward pass.

    Returns:
        One (N_i, D) float32 array per image, rows of unit norm (zero rows stay 0).
    """
    import torch
    import torch.nn.functional as F

    if device is None:
        device = _device_of(backbone)
    out: List[Optional[np.ndarray]] = [None] * len(images)
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                x = torch.from_numpy(np.stack([normalize(images[i]) for i in part])).to(device)
                _, patches = backbone(x)
                z = F.normalize(patches.float(), dim=-1).cpu().numpy()
                for j, i in enumerate(part):
                    out[i] = np.ascontiguousarray(z[j], dtype=np.float32)
    return out  # type: ignore[return-value]


def _device_of(backbone: Any) -> Any:
    """The torch device of ``backbone``'s parameters (the CPU when it has none)."""
    import torch

    try:
        return next(backbone.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _bar(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the [torch] extra; fall back to nothing
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

