"""cribo.nn: the ViT backbone, the CrIBo head and checkpoint reading and loading (small
sizes); the cribo.models shim re-exports the same objects."""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from cribo import nn  # noqa: E402

# A tiny ViT: D=128 (2 heads of 64, so the head count is inferable), 2 blocks,
# 4-px patches, a 4x4 grid stored for 16-px images.
TINY = dict(img_size=16, patch_size=4, embed_dim=128, depth=2, num_heads=2)


def tiny(**kw) -> nn.VisionTransformer:
    return nn.VisionTransformer(**{**TINY, **kw})


def images(b=2, h=16, w=16, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def seeded():
    torch.manual_seed(0)


# DINO's vision_transformer.py naming, written out for depth 2.
DINO_NAMES_DEPTH2 = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + [
    f"blocks.{i}.{name}" for i in range(2) for name in (
        "norm1.weight", "norm1.bias",
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
] + ["norm.weight", "norm.bias"]

# The CrIBo reference head (source/models/vision_transformer.py, DINOHead with last_layer_c).
CRIBO_HEAD_NAMES = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                    "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v",
                    "last_layer_c.weight_g", "last_layer_c.weight_v"]


# --------------------------------------------------------------------------- backbone

def test_parameter_names_follow_dino(seeded):
    model = tiny()
    assert list(model.state_dict()) == DINO_NAMES_DEPTH2
    assert [n for n, _ in model.named_parameters()] == DINO_NAMES_DEPTH2
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1 + 16, 128)
    assert sd["patch_embed.proj.weight"].shape == (128, 3, 4, 4)
    assert sd["blocks.0.attn.qkv.weight"].shape == (384, 128)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (512, 128)


@pytest.mark.parametrize("h, w", [(16, 16), (24, 12)])
def test_output_shapes_at_two_resolutions(seeded, h, w):
    model = tiny().eval()
    cls, patches = model(images(3, h, w))
    assert cls.shape == (3, 128)
    assert patches.shape == (3, (h // 4) * (w // 4), 128)
    assert torch.isfinite(cls).all() and torch.isfinite(patches).all()


def test_outputs_come_after_the_final_layernorm(seeded):
    model = tiny().eval()
    cls, patches = model(images())
    tokens = torch.cat((cls[:, None], patches), 1)
    # LayerNorm with weight 1, bias 0 (the init): zero mean, unit variance per token.
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 17), atol=1e-3, rtol=0)


def test_pos_embed_interpolation(seeded):
    model = tiny()
    assert model.interpolate_pos_embed(4, 4) is model.pos_embed      # the stored grid as is
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.25                                 # a constant grid
    pe = model.interpolate_pos_embed(6, 3)
    assert pe.shape == (1, 1 + 18, 128)
    torch.testing.assert_close(pe[:, 0], model.pos_embed[:, 0])       # [CLS] untouched
    torch.testing.assert_close(pe[:, 1:], torch.full((1, 18, 128), 0.25))  # bicubic keeps constants


def test_presets_and_custom_sizes():
    with torch.device("meta"):                                        # no memory, no init cost
        for fn, (d, depth, heads) in ((nn.vit_tiny, (192, 12, 3)),
                                      (nn.vit_small, (384, 12, 6)),
                                      (nn.vit_base, (768, 12, 12))):
            m = fn(patch_size=8, drop_path_rate=0.1)
            assert (m.embed_dim, m.depth, m.num_heads, m.patch_size) == (d, depth, heads, 8)
            assert m.blocks[-1].drop_path.p == pytest.approx(0.1) and m.blocks[0].drop_path.p == 0
        m = nn.vit(96, 3, 2, patch_size=8, img_size=64)
        assert (m.embed_dim, len(m.blocks), m.num_heads) == (96, 3, 2)
        assert (m.patch_size, m.img_size) == (8, 64)
        assert m.pos_embed.shape == (1, 1 + 64, 96)


def test_init_follows_dino(seeded):
    model = nn.vit(256, 1, 4, patch_size=4, img_size=16)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith(".bias") and "patch_embed" not in name:
            assert torch.all(p == 0), name
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


def test_bad_configuration_and_inputs_are_named():
    with pytest.raises(ValueError, match="embed_dim .* divisible by num_heads"):
        nn.vit(100, 1, 3)
    with pytest.raises(ValueError, match="img_size .* multiple of patch_size"):
        nn.VisionTransformer(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="drop_path_rate"):
        tiny(drop_path_rate=1.0)
    model = tiny()
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        model(torch.zeros(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 16, 16))


def test_drop_path_only_in_train_mode(seeded):
    model = tiny(drop_path_rate=0.5)
    plain = tiny()
    plain.load_state_dict(model.state_dict())
    x = images(8)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, plain.eval()(x))                    # eval: identity
    model.train()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    d = model(x)
    assert not torch.allclose(c[0], d[0])                             # train: stochastic
    plain.train()
    torch.testing.assert_close(plain(x), plain.eval()(x))             # rate 0: no effect


def test_drop_path_drops_whole_samples():
    dp = nn.DropPath(0.5).train()
    x = torch.ones(1000, 3, 5)
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.reshape(1000, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}            # kept ones scaled by 1/(1-p)
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6


# --------------------------------------------------------------------------- head

def test_head_names_and_shapes(seeded):
    head = nn.CriboHead(128, out_dim=40, out_dim_objects=24, hidden_dim=32, bottleneck_dim=16)
    assert list(head.state_dict()) == CRIBO_HEAD_NAMES
    assert head.last_layer.weight_g.shape == (40, 1) and head.last_layer.weight_v.shape == (40, 16)
    x = torch.randn(5, 128)
    assert head.forward_global(x).shape == (5, 40)
    assert head(x).shape == (5, 40)
    assert head.forward_objects(x).shape == (5, 24)
    assert head(x, objects=True).shape == (5, 24)
    assert head.forward_objects(torch.randn(2, 7, 128)).shape == (2, 7, 24)
    default = nn.CriboHead(8, out_dim=12, hidden_dim=4, bottleneck_dim=4)
    assert default.last_layer_c.out_features == 12                    # objects default to out_dim
    one = nn.CriboHead(8, out_dim=12, bottleneck_dim=4, nlayers=1)
    assert list(one.state_dict())[:2] == ["mlp.weight", "mlp.bias"]


def test_head_bottleneck_is_unit_norm_and_feeds_the_last_layers(seeded):
    head = nn.CriboHead(128, out_dim=40, hidden_dim=32, bottleneck_dim=16)
    x = 10 * torch.randn(6, 128)
    z = head.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
    W = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.forward_global(x), z @ W.T)       # g = 1 at init


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_the_gain(seeded, norm_last_layer):
    head = nn.CriboHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4,
                            norm_last_layer=norm_last_layer)
    for layer in (head.last_layer, head.last_layer_c):
        assert layer.weight_g.requires_grad is (not norm_last_layer)
        torch.testing.assert_close(layer.weight_g, torch.ones(10, 1))
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(10))
    (head(torch.randn(3, 8)).sum() + head(torch.randn(3, 8), objects=True).sum()).backward()
    for layer in (head.last_layer, head.last_layer_c):
        assert (layer.weight_g.grad is None) is norm_last_layer
        assert layer.weight_v.grad is not None
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert ("last_layer.weight_g" in trainable) is (not norm_last_layer)


def test_weight_norm_matches_torch_weight_norm():
    layer = nn.WeightNormLinear(6, 5)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    ref = torch.nn.Linear(6, 5, bias=False)
    with pytest.warns(FutureWarning):                                 # deprecated, hence ours
        ref = torch.nn.utils.weight_norm(ref)
    ref.load_state_dict(layer.state_dict())                           # same keys and shapes
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), ref(x))


def test_deepcopy_of_model_and_head(seeded):
    student = torch.nn.ModuleDict({"backbone": tiny(drop_path_rate=0.1),
                                   "head": nn.CriboHead(128, out_dim=10, hidden_dim=16,
                                                            bottleneck_dim=8)})
    x = images()
    student.head(student.backbone(x)[0]).sum().backward()   # grads present, as in training
    teacher = copy.deepcopy(student).eval()
    student.eval()
    for (n, p), (_, q) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    run = lambda net: net.head(net.backbone(x)[0])  # noqa: E731
    torch.testing.assert_close(run(teacher), run(student))
    with torch.no_grad():                             # an EMA step touches only the teacher
        for p, q in zip(student.parameters(), teacher.parameters()):
            q.mul_(0.5).add_(p.detach() + 1, alpha=0.5)
    assert not torch.equal(teacher.backbone.cls_token, student.backbone.cls_token)


# --------------------------------------------------------------------------- loading

def _checkpoint(student, s_head, teacher, t_head):
    """A training checkpoint in the published CrIBo/DINO layout."""
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.head.{k}": v for k, v in s_head.state_dict().items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **{f"head.{k}": v for k, v in t_head.state_dict().items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=4, out_dim=10),
    }


@pytest.fixture
def pair(seeded):
    head = lambda: nn.CriboHead(128, out_dim=10, hidden_dim=16, bottleneck_dim=8)  # noqa: E731
    return tiny().eval(), head(), tiny().eval(), head()


def test_training_checkpoint_file_loads_teacher_and_student(tmp_path, pair):
    student, s_head, teacher, t_head = pair
    path = tmp_path / "checkpoint.pth"
    torch.save(_checkpoint(student, s_head, teacher, t_head), path)
    x = images(2, 20, 12)
    for key, ref in (("teacher", teacher), ("student", student)):
        model, report = nn.load_pretrained(path, key=key)        # architecture inferred
        assert model.config() == ref.config()
        assert report.ok and report.entry == key and len(report.skipped) == len(CRIBO_HEAD_NAMES)
        assert sorted(report.loaded) == sorted(DINO_NAMES_DEPTH2)
        for a, b in zip(model.eval()(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "all model keys loaded" in str(report) and str(path) in str(report)


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.backbone."])
def test_bare_backbone_state_dict_loads(pair, prefix):
    ref = pair[0]
    sd = {prefix + k: v.clone() for k, v in ref.state_dict().items()}
    target = tiny()
    model, report = nn.load_pretrained(sd, target, key="teacher")
    assert model is target and report.ok and report.entry is None and not report.skipped
    x = images()
    for a, b in zip(model.eval()(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "bare state dict" in str(report)


def test_num_heads_override_and_inference_error(pair):
    sd = pair[0].state_dict()
    model, _ = nn.load_pretrained(sd, num_heads=4)
    assert model.num_heads == 4
    odd = nn.vit(96, 1, 3, patch_size=4, img_size=8).state_dict()
    with pytest.raises(ValueError, match="num_heads="):
        nn.load_pretrained(odd)
    assert nn.load_pretrained(odd, num_heads=3)[1].ok


def test_missing_unexpected_and_mismatched_keys_are_reported(pair):
    ref = pair[0]
    sd = dict(ref.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    target = tiny()
    with pytest.warns(UserWarning, match="incomplete load"):
        _, report = nn.load_pretrained(sd, target)
    assert report.missing == ["blocks.1.mlp.fc2.bias"]
    assert report.unexpected == ["blocks.1.extra.weight"]
    assert not report.ok
    text = str(report)
    assert "missing" in text and "blocks.1.mlp.fc2.bias" in text
    assert "unexpected" in text and "blocks.1.extra.weight" in text
    assert torch.equal(target.norm.weight, ref.norm.weight)           # the rest was loaded

    sd = dict(ref.state_dict())
    sd["pos_embed"] = torch.zeros(1, 10, 128)
    with pytest.warns(UserWarning):
        _, report = nn.load_pretrained(sd, tiny())
    assert report.mismatched == [("pos_embed", (1, 10, 128), (1, 17, 128))]


def test_strict_raises_naming_the_keys_and_loads_nothing(pair):
    sd = dict(pair[0].state_dict())
    del sd["norm.bias"]
    sd["surplus"] = torch.zeros(1)
    target = tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="strict") as err:
        nn.load_pretrained(sd, target, strict=True)
    assert "norm.bias" in str(err.value) and "surplus" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    nn.load_pretrained(pair[0].state_dict(), target, strict=True)  # a full match passes


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        nn.load_pretrained(path)


def test_corrupt_files_name_the_path(tmp_path, pair):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        nn.load_pretrained(garbage)
    whole = tmp_path / "whole.pth"
    torch.save(pair[0].state_dict(), whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.pth"):
        nn.load_pretrained(truncated)


def test_wrong_layouts_are_explained(tmp_path, pair):
    with pytest.raises(ValueError, match="'student', 'epoch'"):
        nn.load_pretrained({"student": pair[0].state_dict(), "epoch": 1}, key="teacher")
    with pytest.raises(ValueError, match="cannot infer the architecture"):
        nn.load_pretrained({"foo.weight": torch.zeros(2)})
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"teacher": pair[0].state_dict(), "obj": _Opaque()}, unsafe)
    with pytest.raises(ValueError, match=r"unsafe.pth.*objects other than tensors") as e:
        nn.load_pretrained(unsafe)
    assert "weights_only=False" not in str(e.value)        # never advise unsafe loading


class _Opaque:
    """Not allowed by torch.load(weights_only=True)."""


def test_read_checkpoint_returns_what_was_saved_on_the_cpu(tmp_path, pair):
    path = tmp_path / "checkpoint.pth"
    saved = _checkpoint(*pair)
    torch.save(saved, path)
    got = nn.read_checkpoint(path)
    assert set(got) == set(saved) and got["epoch"] == 3
    assert got["args"] == saved["args"]                      # argparse.Namespace is allowed
    for entry in ("student", "teacher"):
        assert list(got[entry]) == list(saved[entry])
        for k, v in saved[entry].items():
            assert got[entry][k].device.type == "cpu" and torch.equal(got[entry][k], v), k


def test_read_checkpoint_errors_start_with_who(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^load_backbone: no checkpoint file at .*nope"):
        nn.read_checkpoint(tmp_path / "nope.pth", who="load_backbone")
    with pytest.raises(FileNotFoundError, match=r"^cribo x: .* is a folder"):
        nn.read_checkpoint(tmp_path, who="cribo x")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"^cribo x: cannot read .*empty.pth.*the file is empty"):
        nn.read_checkpoint(empty, who="cribo x")


def test_import_cribo_does_not_import_torch_models():
    code = ("import sys, cribo\n"
            "assert 'cribo.models' not in sys.modules and 'torch' not in sys.modules\n"
            "assert 'cribo.nn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cribo_models_shim_reexports_the_same_objects():
    from cribo import models
    published = {"VisionTransformer", "vit", "vit_tiny", "vit_small", "vit_base", "CriboHead",
                 "WeightNormLinear", "DropPath", "LoadReport", "load_pretrained"}
    assert set(models.__all__) == published
    for name in published:
        assert getattr(models, name) is getattr(nn, name), name
