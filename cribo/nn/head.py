"""The CrIBo projection head (docs/method.md §5): a DINO head with two last layers.

One last layer maps the image-level [CLS] output, the other the pooled objects;
the names follow the CrIBo reference head so published checkpoints load::

    mlp.{0,2,4}.{weight,bias}, last_layer.weight_{g,v}, last_layer_c.weight_{g,v}

Usage::

    head = CriboHead(vit.embed_dim)
    g = head.forward_global(cls)               # (B,D) -> (B,65536)
    o = head.forward_objects(objects)          # (M,D) -> (M,65536)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import _init_weights

__all__ = ["CriboHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * V / ||V||_row``.

    The parameters are named ``weight_g`` (out, 1) and ``weight_v`` (out, in),
    the state-dict keys of ``torch.nn.utils.weight_norm`` that the DINO and
    CrIBo checkpoints hold.  It is written out here because that utility is
    deprecated and its modules cannot be deep-copied (needed for the EMA
    teacher), while ``torch.nn.utils.parametrizations.weight_norm`` stores the
    keys as ``parametrizations.weight.original{0,1}``.

    Args:
        in_features: Input width.
        out_features: Output width.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))   # nn.Linear's default, as in the reference
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))   # key order as weight_norm's
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> Tensor:
        """(out, in): each row of ``weight_v`` scaled to norm ``weight_g``."""
        row_norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)   # (out, 1)
        return self.weight_v * (self.weight_g / row_norm)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class CriboHead(nn.Module):
    """The CrIBo projection head: a DINO head with a second last layer for objects.

    ``x -> MLP (d -> hidden -> ... -> bottleneck, GELU between) -> L2-normalise ->``
    a weight-normalised bias-free linear layer, ``last_layer`` for the image-level
    [CLS] output and ``last_layer_c`` for object representations (docs/method.md §5;
    Lebailly, Stegmüller et al., ICLR 2024).  The MLP is shared by both.
    Parameter names are those of the CrIBo reference head (``mlp.0``, ``mlp.2``,
    ``mlp.4``, ``last_layer.weight_{g,v}``, ``last_layer_c.weight_{g,v}``).

    Args:
        in_dim: Backbone width ``d``.
        out_dim: Width ``L`` of the global output (65536 in the reference).
        out_dim_objects: Width of the object output; defaults to ``out_dim``.
        hidden_dim: Hidden width of the MLP.
        bottleneck_dim: Width of the L2-normalised bottleneck.
        nlayers: Linear layers in the MLP (>= 1; 1 maps ``d`` straight to the bottleneck).
        norm_last_layer: If True, the gains ``weight_g`` of both last layers stay
            fixed at 1 (not trainable), so every output unit has a unit-norm weight
            row; the reference CrIBo runs use False (gains trained).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, out_dim_objects: int | None = None,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 norm_last_layer: bool = False) -> None:
        super().__init__()
        out_dim_objects = out_dim if out_dim_objects is None else out_dim_objects
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim),
                            ("out_dim_objects", out_dim_objects), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CriboHead: {name} must be a positive int, got {value!r}")
        self.in_dim, self.out_dim, self.out_dim_objects = in_dim, out_dim, out_dim_objects
        self.bottleneck_dim = bottleneck_dim
        self.norm_last_layer = bool(norm_last_layer)

        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer_c = WeightNormLinear(bottleneck_dim, out_dim_objects)
        if self.norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)
            self.last_layer_c.weight_g.requires_grad_(False)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., bottleneck_dim), each row of unit L2 norm."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward_global(self, x: Tensor) -> Tensor:
        """Image-level logits: (..., d) [CLS] outputs -> (..., out_dim)."""
        return self.last_layer(self.bottleneck(x))

    def forward_objects(self, x: Tensor) -> Tensor:
        """Object logits: (..., d) object representations -> (..., out_dim_objects)."""
        return self.last_layer_c(self.bottleneck(x))

    def forward(self, x: Tensor, objects: bool = False) -> Tensor:
        """:meth:`forward_objects` if ``objects`` else :meth:`forward_global`."""
        return self.forward_objects(x) if objects else self.forward_global(x)
