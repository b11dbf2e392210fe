"""The one table of named ViT architectures (torch-free).

=============  =========  =====  =====  =====================================
name           embed_dim  depth  heads  parameters at patch 16
=============  =========  =====  =====  =====================================
``vit_tiny``   192        12     3      5.5M
``vit_small``  384        12     6      21.7M (CrIBo's main model)
``vit_base``   768        12     12     85.8M
=============  =========  =====  =====  =====================================

Every published DINO / CrIBo ViT has heads of width :data:`HEAD_DIM`, which is
how a checkpoint's number of heads is inferred (its tensors do not record it).
``cribo.nn.backbone``'s builders, the training configuration's ``arch`` and
checkpoint loading all read this table.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional

__all__ = ["Architecture", "ARCHITECTURES", "HEAD_DIM", "architecture", "heads_of_config"]

#: Width of one attention head in every published DINO / CrIBo ViT.
HEAD_DIM = 64


class Architecture(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int


ARCHITECTURES: Dict[str, Architecture] = {
    "vit_tiny": Architecture(192, 12, 3),
    "vit_small": Architecture(384, 12, 6),
    "vit_base": Architecture(768, 12, 12),
}


def architecture(name: str) -> Architecture:
    """The (embed_dim, depth, num_heads) of a named architecture."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from "
                         f"{sorted(ARCHITECTURES)}") from None


def heads_of_config(cfg: Mapping[str, Any]) -> Optional[int]:
    """The number of heads a training configuration (``TrainConfig.to_dict()``)
    builds: its named architecture's, or ``num_heads`` for ``arch`` 'custom';
    None when the configuration does not say."""
    arch = cfg.get("arch", "custom")
    if arch == "custom":
        h = cfg.get("num_heads")
        return int(h) if isinstance(h, int) else None
    a = ARCHITECTURES.get(arch)
    return a.num_heads if a is not None else None
