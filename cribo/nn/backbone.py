"""The Vision Transformer backbone of CrIBo (torch), with DINO's parameter names.

Parameter names follow the published DINO / CrIBo ViT exactly, so their
checkpoints load unchanged (:mod:`cribo.nn.checkpoints`)::

    cls_token, pos_embed, patch_embed.proj.{weight,bias},
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj,
    blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2, norm

Usage::

    from cribo import nn
    vit = nn.vit_small(patch_size=16, drop_path_rate=0.1)
    cls, patches = vit(images)                 # (B,3,H,W) -> (B,D), (B,N,D)
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architectures import HEAD_DIM, architecture

#: The constructor's default size: CrIBo's main model.
_DEFAULT = architecture("vit_small")

__all__ = ["VisionTransformer", "vit", "vit_tiny", "vit_small", "vit_base", "DropPath",
           "LAYER_NORM_EPS"]

#: LayerNorm epsilon of every published DINO / CrIBo ViT (their presets pass 1e-6).
LAYER_NORM_EPS = 1e-6


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
        num_heads: Attention heads (``embed_dim`` divisible by it).  The defaults
            of these three are ``vit_small``'s (:mod:`cribo.nn.architectures`).
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: Whether the ``qkv`` projections have a bias (True in DINO/CrIBo).
        drop_path_rate: Stochastic depth of the last block, in [0, 1).

    Attributes:
        embed_dim: ``D``.  ``num_features`` is the same (DINO's name).
        patch_size: ``p``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = _DEFAULT.embed_dim, depth: int = _DEFAULT.depth,
                 num_heads: int = _DEFAULT.num_heads, mlp_ratio: float = 4.0,
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


def _named(name: str, patch_size: int, kwargs: dict[str, Any]) -> VisionTransformer:
    """The ViT of ``ARCHITECTURES[name]`` (:mod:`cribo.nn.architectures`)."""
    a = architecture(name)
    return vit(a.embed_dim, a.depth, a.num_heads, patch_size, **kwargs)


# The sizes are in the one table, cribo.nn.architectures.ARCHITECTURES.
def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny, sized by ``ARCHITECTURES["vit_tiny"]``; ``kwargs`` as :func:`vit`."""
    return _named("vit_tiny", patch_size, kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Small (CrIBo's main model), sized by ``ARCHITECTURES["vit_small"]``;
    ``kwargs`` as :func:`vit`."""
    return _named("vit_small", patch_size, kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Base, sized by ``ARCHITECTURES["vit_base"]``; ``kwargs`` as :func:`vit`."""
    return _named("vit_base", patch_size, kwargs)
