"""Data for CrIBo: two augmented views with patch positions, data sets, a loader.

=========================  ===============================================
module                     holds
=========================  ===============================================
``cribo.data.views``       docs/method.md §1: crop/flip/colour/blur/solarise views and
                           each patch's position in the original image
``cribo.data.synthetic``   :class:`SyntheticScenes`, the embedded data set
``cribo.data.folders``     :class:`ImageFolder`, :func:`load_rgb` (16-bit
                           images scaled)
``cribo.data.voc``         :class:`VOCSegmentation`, :func:`read_class_names`
``cribo.data.loader``      :class:`TwoViewDataset`, :func:`make_loader`
=========================  ===============================================

>>> from cribo.data import (SyntheticScenes, TwoViewDataset, TwoViewTransform, make_loader,
...                         set_epoch)
>>> scenes = SyntheticScenes("train", n_images=2000, size=96)
>>> ds = TwoViewDataset(scenes, TwoViewTransform(size=64, patch_size=8), seed=0)
>>> loader = make_loader(ds, batch_size=64, num_workers=2, shuffle=True, seed=0)
>>> for epoch in range(epochs):
...     set_epoch(loader, epoch)
...     for batch in loader:   # view1/view2 (B,3,64,64), pos1/pos2 (B,64,2), image_id (B,)
...         ...

Only NumPy and Pillow are needed; torch is imported by :func:`make_loader`.
"""
from .folders import (IMAGE_EXTENSIONS, ImageFolder, ImageFolderWarning, UnreadableImageWarning,
                      load_rgb, to_rgb)
from .loader import EpochBatchSampler, TwoViewDataset, make_loader, set_epoch
from .voc import CLASS_LIST_FILES, VOC_CLASSES, VOCSegmentation, read_class_names
from .synthetic import CLASS_SPECS, PALETTE, SHAPES, TEXTURES, SceneObject, SyntheticScenes
from .views import (IMAGENET_MEAN, IMAGENET_STD, Crop, TwoViewTransform, View, ViewAugment,
                    ViewTransform, color_jitter, gaussian_blur, grayscale, normalize,
                    patch_positions, resized_crop, sample_crop, solarize)

__all__ = [
    # views (docs/method.md §1)
    "IMAGENET_MEAN", "IMAGENET_STD", "Crop", "View", "ViewAugment", "ViewTransform",
    "TwoViewTransform", "sample_crop", "resized_crop", "patch_positions",
    "color_jitter", "gaussian_blur", "grayscale", "solarize", "normalize",
    # data sets
    "SyntheticScenes", "SceneObject", "CLASS_SPECS", "PALETTE", "SHAPES", "TEXTURES",
    "ImageFolder", "VOCSegmentation", "UnreadableImageWarning", "ImageFolderWarning",
    "IMAGE_EXTENSIONS", "VOC_CLASSES", "CLASS_LIST_FILES", "load_rgb", "to_rgb",
    "read_class_names",
    # pretraining items and loading
    "TwoViewDataset", "EpochBatchSampler", "make_loader", "set_epoch",
]
