"""The networks of CrIBo: a Vision Transformer backbone and the CrIBo head (torch).

CrIBo (Lebailly, Stegmüller et al., "Self-Supervised Learning via Cross-Image
Object-Level Bootstrapping", ICLR 2024) trains a ViT student and an EMA teacher,
each with a DINO-style projection head that has two last layers: one for the
image-level [CLS] output and one for object representations (docs/method.md §5).

Parameter names follow the published DINO / CrIBo ViT exactly, so their
checkpoints load unchanged::

    cls_token, pos_embed, patch_embed.proj.{weight,bias},
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj,
    blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2, norm

and the head's names follow the CrIBo reference head::

    mlp.{0,2,4}.{weight,bias}, last_layer.weight_{g,v}, last_layer_c.weight_{g,v}

Usage::

    from cribo import models
    vit = models.vit_small(patch_size=16, drop_path_rate=0.1)
    cls, patches = vit(images)                 # (B,3,H,W) -> (B,D), (B,N,D)
    head = models.CriboHead(vit.embed_dim)
    g = head.forward_global(cls)               # (B,65536)
    o = head.forward_objects(objects)          # (M,D) -> (M,65536)
    teacher, report = models.load_pretrained("cribo_vits16_coco.pth")
    print(report)

This module needs torch; ``import cribo`` does not import it.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VisionTransformer", "vit", "vit_tiny", "vit_small", "vit_base",
    "CriboHead", "WeightNormLinear", "DropPath",
    "LoadReport", "load_pretrained",
]

#: LayerNorm epsilon of every published DINO / CrIBo ViT (their presets pass 1e-6).
LAYER_NORM_EPS = 1e-6
#: Width of one attention head in every published DINO / CrIBo ViT; used to infer
#: the number of heads from a checkpoint, whose tensors do not record it.
HEAD_DIM = 64


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample (training only).

    In training mode each sample's branch output is zeroed with probability
    ``p`` and the kept ones are scaled by ``1 / (1 - p)``; in eval mode (or with
    ``p = 0``) it is the identity.  CrIBo uses ``p = 0.1`` on the student (docs/method.md §6).

    Args:
        p: Drop probability in [0, 1).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, ...), same shape."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches, linearly embedded by a strided convolution.

    Args:
        patch_size: Patch side ``p`` in pixels.
        embed_dim: Token width ``D``.
        in_chans: Image channels.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) with ``N = (H/p)(W/p)``, row-major patch order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection.

    Args:
        dim: Token width ``D``.
        num_heads: Number of heads ``h`` (``D`` divisible by ``h``).
        qkv_bias: Whether ``qkv`` has a bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D); softmax(q k^T / sqrt(D/h)) v per head."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)           # each (B, h, T, D/h)
        y = F.scaled_dot_product_attention(q, k, v)               # (B, h, T, D/h)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Token-wise MLP ``fc1 -> GELU -> fc2``: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches.

    Args:
        dim: Token width ``D``.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: Whether the ``qkv`` projection has a bias.
        drop_path: Stochastic-depth probability of this block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------
# Vision Transformer
# ---------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """The ViT backbone of DINO / CrIBo, returning the [CLS] output and the patch tokens.

    Architecture and parameter names as the published DINO / CrIBo ViT (their
    checkpoints load unchanged, see :func:`load_pretrained`): patch embedding,
    a learned [CLS] token and positional embedding, ``depth`` pre-norm blocks
    with stochastic depth increasing linearly from 0 to ``drop_path_rate``,
    and a final LayerNorm (eps 1e-6).  The positional embedding is learned for
    an ``img_size x img_size`` input and interpolated bicubically (as DINO does)
    for any other ``H x W`` divisible by the patch size.

    CrIBo (ICLR 2024) clusters the teacher's final patch tokens and pools the
    student's (docs/method.md §2-§3); the [CLS] output feeds the global DINO loss (§5).

    Args:
        img_size: Side of the square training resolution the positional
            embedding is stored for (``img_size / patch_size`` positions a side).
        patch_size: Patch side ``p`` in pixels.
        embed_dim: Token width ``D``.
        depth: Number of transformer blocks.
        num_heads: Attention heads (``embed_dim`` divisible by it).
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: Whether the ``qkv`` projections have a bias (True in DINO/CrIBo).
        drop_path_rate: Stochastic depth of the last block, in [0, 1).

    Attributes:
        embed_dim: ``D``.  ``num_features`` is the same (DINO's name).
        patch_size: ``p``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size),
                            ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VisionTransformer: {name} must be a positive int, got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"VisionTransformer: img_size ({img_size}) must be a multiple of "
                             f"patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"VisionTransformer: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads}) (DINO/CrIBo use heads of {HEAD_DIM})")
        if not mlp_ratio > 0:
            raise ValueError(f"VisionTransformer: mlp_ratio must be > 0, got {mlp_ratio}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"VisionTransformer: drop_path_rate must be in [0, 1), "
                             f"got {drop_path_rate}")

        self.img_size = img_size
        self.patch_size = patch_size
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # stochastic depth rises linearly over the blocks: 0 for the first, the rate for the last
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias, drop_path_rate=self.drop_path_rate)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Positional embedding for an ``h x w`` grid of patches.

        The stored grid (``img_size/p`` a side) is resized bicubically, exactly as
        DINO does (scale factor ``(h + 0.1) / g``, ``(w + 0.1) / g``, where the
        0.1 guards the floor of the output size against rounding), so features
        match those of the published code at every resolution.

        Args:
            h: Patch rows (``H / p``).
            w: Patch columns (``W / p``).

        Returns:
            (1, 1 + h*w, D): the [CLS] position first, then the patches row-major.
        """
        n = self.pos_embed.shape[1] - 1
        g = math.isqrt(n)
        if h == g and w == g:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        cls_pos = self.pos_embed[:, :1]
        grid = self.pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)   # (1, D, g, g)
        grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / g, (w + 0.1) / g),
                             mode="bicubic", align_corners=False).to(self.pos_embed.dtype)
        if grid.shape[-2:] != (h, w):   # cannot happen for h, w >= 1; guards the float trick
            raise RuntimeError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, "
                               f"expected {(h, w)}")
        return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)), dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a batch of images.

        Args:
            x: (B, 3, H, W) images, ``H`` and ``W`` multiples of ``patch_size``.

        Returns:
            cls: (B, D) the [CLS] token after the final LayerNorm.
            patches: (B, N, D) the patch tokens after the final LayerNorm,
                ``N = (H/p) * (W/p)``, row-major (patch ``(r, c)`` at ``r * W/p + c``).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VisionTransformer: x must be (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"VisionTransformer: H and W must be multiples of patch_size={p}, "
                             f"got {H}x{W}")
        tokens = self.patch_embed(x)                                          # (B, N, D)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)  # (B, 1+N, D)
        tokens = tokens + self.interpolate_pos_embed(H // p, W // p)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:]


def _init_weights(m: nn.Module) -> None:
    """DINO's initialisation: Linear weights truncated normal (std 0.02), biases 0;
    LayerNorm weight 1, bias 0.  (The patch convolution keeps torch's default.)"""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit(embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
        **kwargs: Any) -> VisionTransformer:
    """A ViT of any size; ``kwargs`` go to :class:`VisionTransformer`
    (``img_size``, ``mlp_ratio``, ``qkv_bias``, ``drop_path_rate``)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny: D=192, 12 blocks, 3 heads (5.5M parameters at p=16)."""
    return vit(192, 12, 3, patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Small: D=384, 12 blocks, 6 heads (21.7M parameters at p=16); CrIBo's main model."""
    return vit(384, 12, 6, patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Base: D=768, 12 blocks, 12 heads (85.8M parameters at p=16)."""
    return vit(768, 12, 12, patch_size, **kwargs)


# ---------------------------------------------------------------------------
# Head
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Loading published checkpoints
# ---------------------------------------------------------------------------

#: Prefixes the published checkpoints put in front of backbone keys: DDP's
#: ``module.``, the multi-crop wrapper's ``backbone.``, torch.compile's ``_orig_mod.``.
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
#: Keys (after the prefixes) of the projection head, which a backbone skips.
_HEAD_PREFIX = "head."


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: The checkpoint path, or ``"<state dict>"``.
        entry: The checkpoint entry used (e.g. ``"teacher"``), None for a bare state dict.
        config: The architecture of the model loaded into.
        loaded: Model keys filled from the checkpoint.
        missing: Model keys the checkpoint lacks (left as they were).
        unexpected: Checkpoint keys (prefixes stripped) the model lacks (ignored).
        mismatched: ``(key, checkpoint shape, model shape)`` for keys of different shapes (ignored).
        skipped: Head keys (``head.*``) deliberately left out.
    """

    source: str
    entry: str | None
    config: dict[str, Any]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing else was in the checkpoint."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        where = self.source + (f" [{self.entry!r}]" if self.entry else " (bare state dict)")
        arch = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "drop_path_rate")
        lines = [f"load_pretrained: {where}",
                 f"  architecture: {arch}",
                 f"  loaded {len(self.loaded)} tensors" +
                 (f"; skipped {len(self.skipped)} head tensors" if self.skipped else "")]
        if self.ok:
            lines.append("  all model keys loaded, none unexpected")
        for title, names in (("missing (left as initialised)", self.missing),
                             ("unexpected (ignored)", self.unexpected),
                             ("shape mismatch (ignored)",
                              [f"{k} {tuple(a)} in checkpoint vs {tuple(b)} in model"
                               for k, a, b in self.mismatched])):
            if names:
                lines.append(f"  {title}: {len(names)}")
                lines += [f"    {n}" for n in names[:20]]
                if len(names) > 20:
                    lines.append(f"    ... and {len(names) - 20} more")
        return "\n".join(lines)


def _read_checkpoint(path: str | os.PathLike, who: str = "load_pretrained") -> Any:
    """torch.load(weights_only=True) onto the CPU, with errors that say what the file is.

    Raises:
        FileNotFoundError: no file at ``path``, or a folder.
        ValueError: naming the file: empty, truncated (a zip checkpoint whose
            end is missing), text (a Git LFS pointer, an HTML page, ...), an
            unknown format, corrupt data, or Python objects beyond tensors and
            plain containers.  The message never suggests unsafe loading:
            cribo does not unpickle arbitrary objects.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{who}: {path!r} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: no checkpoint file at {path!r}")
    # Training checkpoints of DINO/CrIBo also pickle their argparse.Namespace;
    # that class only holds attributes, so it is safe to allow.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        # ``from None``: torch's own message advises weights_only=False, which
        # would run whatever code a corrupt or hostile file holds.
        raise ValueError(_unreadable_checkpoint(path, exc, who)) from None


def _unreadable_checkpoint(path: str, exc: BaseException, who: str) -> str:
    """Why ``torch.load`` failed on ``path``, in words, without torch's advice."""
    import re
    import zipfile

    size = os.path.getsize(path)
    where = f"{who}: cannot read the checkpoint {path!r} ({size:,} bytes)"
    with open(path, "rb") as fh:
        head = fh.read(512)
    msg = str(exc)
    if size == 0:
        return f"{where}: the file is empty (an interrupted save or copy?)"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if not zipfile.is_zipfile(path):
            return (f"{where}: it is truncated -- a torch checkpoint (zip archive) whose end "
                    "is missing, as an interrupted save, copy or download leaves it")
    text = _as_text(head)
    if head[:1] != b"\x80" and head[:2] != b"PK" and text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        hint = ""
        if text.startswith("version https://git-lfs"):
            hint = "; it is a Git LFS pointer: fetch the real file (git lfs pull)"
        elif text.lstrip().lower().startswith(("<!doctype html", "<html")):
            hint = "; it is an HTML page: the download probably failed"
        return f"{where}: it is a text file, not a checkpoint (it starts {first!r}){hint}"
    found = re.search(r"GLOBAL ([\w.]+)", msg)
    if found:
        return (f"{where}: it holds Python objects other than tensors and plain containers "
                f"(first: {found.group(1)}), which cribo does not unpickle: it reads only "
                "tensors, numbers, strings and containers. Save the model's state dict "
                "where the checkpoint was made (torch.save(model.state_dict(), ...)) and "
                "give that file")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the|$)", msg,
                       re.S)
    why = (detail.group(1).strip().splitlines()[0] if detail else
           (msg.strip().splitlines()[0] if msg.strip() and "weights_only" not in msg
            else ""))
    why = f" ({type(exc).__name__}: {why})" if why else f" ({type(exc).__name__})"
    if head[:2] == b"PK":
        return f"{where}: the torch checkpoint (zip archive) is corrupt{why}"
    if head[:1] == b"\x80":
        return (f"{where}: it is corrupt, truncated, or a pickle file not written by "
                f"torch.save{why}")
    return (f"{where}: it is not a torch checkpoint (unknown format, first bytes "
            f"{head[:8].hex(' ')}){why}")


def _as_text(head: bytes) -> str | None:
    """``head`` decoded, if it looks like the start of a text file."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:   # not just a character cut at the end
            return None
        text = head[:e.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\t\n\r" for c in text) else None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _infer_config(sd: Mapping[str, Tensor], num_heads: int | None, source: str) -> dict[str, Any]:
    """Rebuild the ViT's constructor arguments from the tensors' shapes."""
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"load_pretrained: cannot infer the architecture from {source}: "
                         f"no {', '.join(absent)} among its keys (first keys: "
                         f"{', '.join(list(sd)[:5])}); pass model=")
    embed_dim, _, patch_size, _ = sd["patch_embed.proj.weight"].shape
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"load_pretrained: pos_embed of {source} has {n} patch positions, "
                         "not a square grid; pass model=")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if num_heads is None:
        if embed_dim % HEAD_DIM:
            raise ValueError(f"load_pretrained: the checkpoint does not record the number of "
                             f"heads and embed_dim={embed_dim} is not a multiple of {HEAD_DIM}; "
                             "pass num_heads= or model=")
        num_heads = embed_dim // HEAD_DIM
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in sd)


def load_pretrained(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    model: VisionTransformer | None = None, *, key: str | None = "teacher",
                    strict: bool = False, num_heads: int | None = None,
                    ) -> tuple[VisionTransformer, LoadReport]:
    """Load a published DINO / CrIBo ViT backbone (or one saved by cribo).

    Accepted layouts:

    * a training checkpoint: a dict with ``student`` / ``teacher`` entries whose
      keys carry ``module.`` (DDP) and/or ``backbone.`` (multi-crop wrapper)
      prefixes and include the head's ``head.*`` keys (skipped here); ``key``
      picks the entry (the teacher is what the paper evaluates);
    * a bare backbone state dict (``cls_token``, ``pos_embed``, ``blocks.0...``),
      with or without those prefixes.

    Args:
        path_or_state_dict: A file (read with ``torch.load(weights_only=True)``
            onto the CPU) or an already loaded dict.
        model: The backbone to fill; if None, one is built with the architecture
            inferred from the tensors (width, depth and patch size from the
            shapes; heads as ``embed_dim / 64`` unless ``num_heads`` is given;
            ``img_size`` from the positional embedding).
        key: The entry of a training checkpoint to load; ignored for a bare
            state dict.
        strict: If True, any missing, unexpected or mismatched key raises a
            ValueError naming them, and the model is left unchanged.
        num_heads: Number of attention heads when ``model`` is None (the
            checkpoint does not record it).

    Returns:
        ``(model, report)``; ``print(report)`` lists what was loaded, missing,
        unexpected and skipped.  Without ``strict``, an incomplete load also
        emits a warning.

    Raises:
        FileNotFoundError: No file at the path.
        ValueError: An unreadable or corrupt file, a checkpoint without the
            requested entry, an architecture that cannot be inferred, or (with
            ``strict``) keys that do not match.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "<state dict>", path_or_state_dict
    else:
        source = repr(os.fspath(path_or_state_dict))
        obj = _read_checkpoint(path_or_state_dict)

    entry: str | None = None
    if (key is not None and isinstance(obj, Mapping) and key in obj
            and not isinstance(obj[key], Tensor)):
        entry, obj = key, obj[key]
    elif not _is_state_dict(obj):
        entries = (", ".join(repr(k) for k in obj) if isinstance(obj, Mapping)
                   else type(obj).__name__)
        raise ValueError(f"load_pretrained: {source} is neither a state dict nor a checkpoint "
                         f"with a {key!r} entry (it has: {entries}); pass key= one of its entries")
    if not _is_state_dict(obj):
        raise ValueError(f"load_pretrained: entry {entry!r} of {source} is not a state dict of "
                         "tensors")

    state: dict[str, Tensor] = {}
    skipped: list[str] = []
    for k, v in obj.items():
        name = _strip_prefixes(k)
        if name.startswith(_HEAD_PREFIX):
            skipped.append(k)
        else:
            state[name] = v

    if model is None:
        model = VisionTransformer(**_infer_config(state, num_heads, source))
    own = model.state_dict()
    report = LoadReport(source=source, entry=entry, config=model.config(), skipped=skipped)
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                         for k in own if k in state and state[k].shape != own[k].shape]
    bad = {k for k, _, _ in report.mismatched}
    report.loaded = [k for k in own if k in state and k not in bad]

    if strict and not report.ok:
        raise ValueError(f"load_pretrained(strict=True): the checkpoint does not match the "
                         f"model; nothing was loaded.\n{report}")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if not report.ok:
        warnings.warn(f"load_pretrained: incomplete load\n{report}", stacklevel=2)
    return model, report
