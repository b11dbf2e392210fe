"""cribo.nn.architectures: the one table of named ViTs drives the builders, the
number of heads of a training configuration, and unknown names are refused."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cribo import nn  # noqa: E402
from cribo.nn import architectures  # noqa: E402
from cribo.nn.architectures import (ARCHITECTURES, HEAD_DIM, Architecture,  # noqa: E402
                                    architecture, heads_of_config)

# The published sizes, as DINO's vit_tiny / vit_small / vit_base build them (CrIBo trains
# ViT-S/16 and ViT-B/16): (embed_dim, depth, heads), written out here, not read from the table.
PUBLISHED = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def vit_parameters(D: int, depth: int, p: int, img_size: int) -> int:
    """Parameters of a DINO ViT counted by hand: patch convolution, [CLS] token and
    positions, per block two LayerNorms, qkv, proj, fc1, fc2 (ratio 4), final norm."""
    n = (img_size // p) ** 2
    block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    return (3 * p * p * D + D) + D + (1 + n) * D + depth * block + 2 * D


def test_the_table_holds_the_published_sizes():
    assert {name: tuple(a) for name, a in ARCHITECTURES.items()} == PUBLISHED
    for name, a in ARCHITECTURES.items():
        assert a.embed_dim == a.num_heads * HEAD_DIM, name    # heads of 64 everywhere
        assert architecture(name) == a


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_entry_builds_its_vit(name):
    a = ARCHITECTURES[name]
    with torch.device("meta"):                                # no memory, no init cost
        m = getattr(nn, name)(patch_size=16, drop_path_rate=0.1)
    assert (m.embed_dim, m.depth, len(m.blocks), m.num_heads) == (a.embed_dim, a.depth,
                                                                   a.depth, a.num_heads)
    assert m.blocks[0].attn.qkv.weight.shape == (3 * a.embed_dim, a.embed_dim)
    assert sum(p.numel() for p in m.parameters()) == vit_parameters(a.embed_dim, a.depth, 16, 224)


def test_the_builders_read_the_table(monkeypatch):
    """Change an entry and its builder follows: no builder keeps numbers of its own."""
    for name in ARCHITECTURES:
        monkeypatch.setitem(ARCHITECTURES, name, Architecture(96, 2, 3))
        with torch.device("meta"):
            m = getattr(nn, name)(patch_size=8, img_size=32)
        assert (m.embed_dim, m.depth, m.num_heads) == (96, 2, 3), name
    assert architectures.ARCHITECTURES is ARCHITECTURES


def test_the_default_vit_is_vit_small():
    with torch.device("meta"):
        m = nn.VisionTransformer()
    a = ARCHITECTURES["vit_small"]
    assert (m.embed_dim, m.depth, m.num_heads) == (a.embed_dim, a.depth, a.num_heads)


def test_heads_of_named_and_custom_configs():
    for name, (_, _, heads) in PUBLISHED.items():
        assert heads_of_config({"arch": name, "num_heads": 99}) == heads   # the name wins
    assert heads_of_config({"arch": "custom", "num_heads": 4}) == 4
    assert heads_of_config({"num_heads": 5}) == 5                 # no arch: custom
    assert heads_of_config({"arch": "custom"}) is None            # does not say
    assert heads_of_config({"arch": "custom", "num_heads": "4"}) is None
    assert heads_of_config({"arch": "vit_huge"}) is None          # an unknown name says nothing
    assert heads_of_config({}) is None


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown architecture 'vit_huge'; choose from "
                                         r"\['vit_base', 'vit_small', 'vit_tiny'\]"):
        architecture("vit_huge")
