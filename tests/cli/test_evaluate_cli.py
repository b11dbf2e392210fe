"""``cribo evaluate`` as a new user meets it: its options, a checkpoint of a tiny
training run, a small VOC-style folder of their own classes, its class list, masks
and outputs checked before any work, checkpoints that cannot be read, and the
results table (percentages with one decimal)."""
from __future__ import annotations

import json
import os
import re
import traceback
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from cribo import nn  # noqa: E402
from cribo.cli.evaluate import _table, build_parser, main  # noqa: E402
from cribo.evaluation import load_backbone  # noqa: E402

FAST = ["--k", "3", "--n-train", "0", "--n-val", "0", "--probe-epochs", "1",
        "--augment-passes", "1", "--bootstrap", "20", "--no-progress", "--threads", "1"]


def make_folder(root, labels=((1,), (2,), (1, 2), (2,), (1,)), n_train=3):
    """A VOC-style folder of non-VOC ids; image k's mask holds a block per label.

    Returns the ids; the first ``n_train`` are the train list, the rest val.
    """
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"field_{k:02d}" for k in range(len(labels))]
    for k, (i, labs) in enumerate(zip(ids, labels)):
        h, w = (40, 48) if k % 2 else (48, 40)
        mask = np.zeros((h, w), np.uint8)
        for j, lab in enumerate(labs):
            mask[8 + 12 * j: 20 + 12 * j, 8:32] = lab
        mask[4, :] = 255                                    # a line to ignore
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[mask == 1] = (200, 40, 40)
        image[mask == 2] = (40, 200, 40)
        Image.fromarray(mask, "L").save(os.path.join(root, "SegmentationClass", i + ".png"))
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", i + ".jpg"))
    with open(os.path.join(root, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.write("\n".join(ids[:n_train]) + "\n")
    with open(os.path.join(root, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.write("\n".join(ids[n_train:]) + "\n")
    return ids


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny ViT's state dict (width 64, one block, patch 8, 32 px)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny_vit.pth"
    torch.save(nn.vit(64, 1, 1, patch_size=8, img_size=32).state_dict(), path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading or evaluation fails the test: the error must come first."""
    from cribo.evaluation import dense, features

    def work(*args, **kwargs):
        raise AssertionError("cribo evaluate started work before checking its inputs")

    monkeypatch.setattr(features, "load_backbone", work)
    monkeypatch.setattr(dense, "dense_evaluation", work)


# ----------------------------------------------------------------------------- a new user

def test_a_folder_of_my_own_classes_is_scored_with_my_class_names(tmp_path, checkpoint,
                                                                  capsys):
    root = tmp_path / "garden"
    make_folder(root)
    names = tmp_path / "names.txt"
    names.write_text("soil\nleaf\nstem\n")
    out = tmp_path / "results" / "garden.json"                # a folder created on the way
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--class-names",
                 str(names), "--out", str(out)] + FAST) == 0
    text = capsys.readouterr().out
    assert f"3 classes from {names}: soil, leaf, stem" in text
    assert "aeroplane" not in text and "leaf" in text and "checkpoint - random init" in text
    res = json.loads(out.read_text())
    assert res["n_train"] == 3 and res["n_val"] == 2
    for model in ("checkpoint", "random init"):
        for kind in ("retrieval", "probe"):
            r = res["models"][model][kind]
            assert list(r["per_class_iou"]) == ["soil", "leaf", "stem"]
            assert len(r["confusion"]) == 3
    # scored at the masks' resolution (val: 40 x 48 and 48 x 40), the ignore line left out
    assert np.sum(res["models"]["checkpoint"]["retrieval"]["confusion"]) == \
        (40 * 48 - 48) + (48 * 40 - 40)
    assert [f for f in os.listdir(out.parent)] == ["garden.json"]   # no temporary left


def test_a_folder_without_a_class_list_gets_numbered_classes_and_a_note(tmp_path, checkpoint,
                                                                       capsys):
    root = tmp_path / "garden"
    make_folder(root)
    out = tmp_path / "garden.json"
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out),
                 "--no-floor", "--no-probe"] + FAST) == 0
    text = capsys.readouterr().out
    assert "3 classes from the masks' labels 0..2: background, class 1, class 2" in text
    assert "note: " in text and "--class-names FILE" in text and "aeroplane" not in text
    r = json.loads(out.read_text())["models"]["checkpoint"]["retrieval"]
    assert list(r["per_class_iou"]) == ["background", "class 1", "class 2"]
    # classes.txt in the folder is found without the option
    (root / "classes.txt").write_text("background\nleaf\nstem\n")
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out),
                 "--no-floor", "--no-probe"] + FAST) == 0
    assert f"from {root / 'classes.txt'}" in capsys.readouterr().out
    r = json.loads(out.read_text())["models"]["checkpoint"]["retrieval"]
    assert list(r["per_class_iou"]) == ["background", "leaf", "stem"]


# ----------------------------------------------------------------------------- checks first

def test_labels_beyond_voc_without_a_list_ask_for_class_names(tmp_path, checkpoint, no_work):
    root = tmp_path / "many"
    make_folder(root, labels=((1,), (2,), (1,), (30,), (2,)))
    with pytest.raises(ValueError, match=r"labels up to 30 .*field_03\.png.*--class-names FILE"):
        main(["--checkpoint", str(checkpoint), "--data", str(root)] + FAST)


def test_a_label_outside_the_list_only_in_validation_fails_before_any_work(tmp_path,
                                                                          checkpoint,
                                                                          no_work):
    root = tmp_path / "garden"
    make_folder(root, labels=((1,), (2,), (1,), (2,), (5,)))
    (root / "classes.txt").write_text("background\nleaf\nstem\n")
    with pytest.raises(ValueError, match=r"field_04\.png holds label 5, outside the allowed "
                                         r"range 0\.\.2 \(the 3 classes from .*classes\.txt\)"):
        main(["--checkpoint", str(checkpoint), "--data", str(root)] + FAST)
    # with --n-val 1 the bad mask is not used, and the run gets as far as the work
    with pytest.raises(AssertionError, match="started work"):
        main(["--checkpoint", str(checkpoint), "--data", str(root), "--out", "",
              ] + FAST + ["--n-val", "1"])


def test_outputs_and_inputs_are_checked_before_any_work(tmp_path, checkpoint, no_work,
                                                       monkeypatch):
    root = tmp_path / "garden"
    make_folder(root)
    run = ["--checkpoint", str(checkpoint), "--data", str(root)] + FAST
    with pytest.raises(ValueError, match=r"--out: .* is a folder; give a file path"):
        main(run + ["--out", str(tmp_path)])
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out: cannot write .*plain\.txt is a file"):
        main(run + ["--out", str(tmp_path / "plain.txt" / "sub" / "eval.json")])
    with pytest.raises(FileNotFoundError, match="--class-names: no such file"):
        main(run + ["--class-names", str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="--class-names applies to a VOC-style"):
        main(["--checkpoint", str(checkpoint), "--class-names", str(tmp_path / "plain.txt")])
    with pytest.raises(FileNotFoundError, match="--data must be 'synthetic' or a VOC-style"):
        main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")])

    # a folder that cannot be written (root ignores permissions, so the refusal is injected)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError, match=r"--out: cannot write .*eval\.json \(Permission"):
        main(run + ["--out", str(tmp_path / "eval.json")])


# ----------------------------------------------------------------------------- checkpoints

def _bad_checkpoints(tmp_path):
    """name -> (path, what the message must say)."""
    good = tmp_path / "good.pth"
    torch.save(nn.vit(64, 1, 1, patch_size=8, img_size=32).state_dict(), good)
    data = good.read_bytes()
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files = {"truncated": (data[: len(data) // 2], "truncated"),
             "random": (b"\x01" + noise, "not a torch checkpoint"),
             "empty": (b"", "empty"),
             "text": (b"epoch 3 loss 0.25\nsaved by hand\n", "text file"),
             "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n",
                     "Git LFS pointer")}
    out = {}
    for name, (content, says) in files.items():
        p = tmp_path / f"{name}.pth"
        p.write_bytes(content)
        out[name] = (p, says)
    out["missing"] = (tmp_path / "missing.pth", "no checkpoint file")
    return out


def _whole_error(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def test_unreadable_checkpoints_say_what_is_wrong_and_never_advise_unsafe_loading(tmp_path):
    for name, (path, says) in _bad_checkpoints(tmp_path).items():
        for load in (load_backbone, nn.load_pretrained):
            with pytest.raises((ValueError, FileNotFoundError)) as e:
                load(path)
            msg = str(e.value)
            assert str(path) in msg and says in msg, (name, msg)
            assert "weights_only" not in _whole_error(e.value), (name, _whole_error(e.value))
            assert isinstance(e.value, FileNotFoundError) == (name == "missing"), name
    # a file with Python objects beyond tensors: refused, no unsafe advice either
    odd = tmp_path / "objects.pth"
    torch.save({"teacher": {"w": torch.zeros(1)}, "stat": os.stat(tmp_path)}, odd)
    with pytest.raises(ValueError, match=r"objects other than tensors .*os\.stat_result") as e:
        load_backbone(odd)
    assert "weights_only" not in _whole_error(e.value)


def test_cribo_evaluate_names_the_option_of_an_unreadable_checkpoint(tmp_path, checkpoint):
    bad = _bad_checkpoints(tmp_path)
    out = tmp_path / "never.json"
    for option, args in (("--checkpoint", ["--checkpoint", str(bad["truncated"][0])]),
                         ("--compare", ["--checkpoint", str(checkpoint), "--compare",
                                        str(bad["text"][0])])):
        with pytest.raises(ValueError, match=f"^{option}: load_backbone: cannot read the "
                                             "checkpoint") as e:
            main(args + ["--n-train", "2", "--n-val", "2", "--out", str(out)])
        assert "weights_only" not in _whole_error(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- options, runs

def test_cli_help_lists_every_option_and_unknown_options_fail(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = [s for act in parser._actions for s in act.option_strings if s.startswith("--")]
    assert len(options) > 25
    for opt in options:
        assert opt in text, opt
    for act in parser._actions:
        assert act.help, act.option_strings
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "x.pth", "--no-such-option"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    # Range errors are exceptions naming the option (the cribo CLI prints one line, exit 2).
    for bad, exc, msg in (
            (["--k", "0"], ValueError, "--k must be >= 1, got 0"),
            (["--temperature", "inf"], ValueError, "--temperature must be a finite number > 0"),
            (["--probe-lr", "nan"], ValueError, "--probe-lr must be a finite number > 0"),
            (["--crop-scale", "0.5", "nan"], ValueError, "--crop-scale must be two numbers"),
            ([], FileNotFoundError, "--checkpoint: no checkpoint at x.pth")):
        with pytest.raises(exc, match=re.escape(msg)):
            main(["--checkpoint", "x.pth"] + bad)
    from cribo.cli import main as cribo_main

    assert cribo_main(["evaluate", "--checkpoint", "x.pth", "--temperature", "inf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cribo: error: --temperature must be a finite number > 0, got inf"]


def test_evaluate_a_checkpoint_from_a_tiny_training_run(tmp_path, capsys):
    from cribo.train.config import config_from_args
    from cribo.train.loop import train

    from runs import TINY

    run = tmp_path / "run"
    train(config_from_args(TINY + ["--output-dir", str(run), "--epochs", "1",
                                   "--batch-size", "8"]))
    out = tmp_path / "eval.json"
    rc = main(["--checkpoint", str(run / "teacher_backbone.pth"), "--n-train", "6",
               "--n-val", "4", "--scene-size", "32", "--k", "5", "--augment-passes", "1",
               "--probe-epochs", "1", "--bootstrap", "50", "--no-progress", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NN mIoU" in text and "random init" in text and "checkpoint - random init" in text
    res = json.loads(out.read_text())
    for model in ("checkpoint", "random init"):
        for kind in ("retrieval", "probe"):
            r = res["models"][model][kind]
            assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1
            assert len(r["confusion"]) == 7 and r["n_images"] == 4
    assert res["image_size"] == 32
    assert "miou" in res["bootstrap"]["checkpoint - random init"]["retrieval"]
    # checkpoint.pth (heads from its config) holds the same teacher backbone
    a = load_backbone(run / "checkpoint.pth")
    b = load_backbone(run)
    assert a.training_config["num_heads"] == 2 and b.training_config["seed"] == 0
    assert res["init_seed"] == 0
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x)[1], b(x)[1])


def test_cli_on_a_voc_style_folder_with_ignore_labels(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(5)]
    for n, i in enumerate(ids):
        h, w = (40, 56) if n % 2 else (48, 36)                  # non-square, both ways
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 15 if n % 2 else 1
        mask[h // 4, :] = 255                                   # a boundary line to ignore
        Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{i}.png")
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[3:]) + "\n")
    torch.manual_seed(0)
    vit = nn.vit(64, 1, 1, patch_size=8, img_size=32)       # heads = 64 / 64: published rule
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "voc.json"
    assert main(["--checkpoint", str(tmp_path / "vit.pth"), "--data", str(root), "--k", "3",
                 "--n-train", "0", "--n-val", "0", "--probe-epochs", "1", "--no-floor",
                 "--bootstrap", "0", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["models"]["checkpoint"]["retrieval"]
    # no class list and not VOC 2012: labels 0..15 named 'class 1'..'class 15', not VOC's
    assert res["n_train"] == 3 and res["n_val"] == 2 and len(r["confusion"]) == 16
    # scored at the masks' own resolution, boundary pixels not counted
    assert np.sum(r["confusion"]) == 40 * 56 - 56 + 48 * 36 - 36
    assert "class 15" in r["per_class_iou"] and "aeroplane" not in r["per_class_iou"]


# ----------------------------------------------------------------------------- the numbers

def test_the_table_prints_percentages_with_one_decimal():
    names = ("background", "leaf", "stem")

    def scores(miou, fg, acc, per_class):
        return SimpleNamespace(miou=miou, fg_iou=fg, pixel_acc=acc, class_names=names,
                               per_class_iou=dict(zip(names, per_class)))

    table = _table({"checkpoint": {"retrieval": scores(0.12345, 0.5, 0.999, (0.0666, 1.0, 0.0)),
                                   "probe": None},
                    "random init": {"retrieval": scores(0.0349, float("nan"), 0.25,
                                                        (0.5, 0.12, 0.0)),
                                    "probe": None}})
    lines = table.splitlines()
    assert lines[0] == "scores (%):"
    row = lines[2].split()
    assert row[:5] == ["checkpoint", "12.3", "50.0", "99.9", "-"]
    assert lines[3].split()[2:5] == ["3.5", "-", "25.0"]      # NaN: "-"
    per_class = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.split()[:1] and
                 ln.split()[0] in names}
    assert per_class == {"background": ["6.7", "50.0"], "leaf": ["100.0", "12.0"],
                         "stem": ["0.0", "0.0"]}
    assert "per-class IoU (%)" in table
    assert not re.search(r"\d\.\d\d", table)


def test_a_run_prints_no_number_with_two_decimals(tmp_path, checkpoint, capsys):
    root = tmp_path / "garden"
    make_folder(root)
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--out", ""] + FAST) == 0
    text = capsys.readouterr().out
    results = text[text.index("scores (%):"):]
    assert "checkpoint - random init" in results and "% CI)" in results
    assert not re.search(r"\d\.\d\d", results), results


# ----------------------------------------------------------------------------- the device

def test_device_defaults_to_auto_and_bad_devices_name_the_option(monkeypatch):
    from cribo.cli import evaluate

    parser = build_parser()
    a = parser.parse_args(["--checkpoint", "x.pth"])
    assert a.device == "auto" and a.search_mb == 256
    assert "auto (cuda when available, else cpu)" in " ".join(parser.format_help().split())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluate._device("auto") == torch.device("cuda")
    assert evaluate._device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate._device("auto") == torch.device("cpu")
    assert evaluate._device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        evaluate._device("cuda:1")
    with pytest.raises(ValueError, match=re.escape("--device must be auto, cpu, cuda or "
                                                   "cuda:N, got 'gpu'")):
        evaluate._device("gpu")
    with pytest.raises(ValueError, match="--search-mb must be >= 1, got 0"):
        main(["--checkpoint", "x.pth", "--search-mb", "0"])


def test_device_cpu_runs_the_c_search_and_auto_without_a_gpu_is_the_same(tmp_path, checkpoint,
                                                                          monkeypatch):
    from cribo.nn import torch_ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch_ops.queue, "topk_cosine",
                        lambda *a, **kw: pytest.fail("the torch search ran on the CPU"))
    common = ["--checkpoint", str(checkpoint), "--n-train", "3", "--n-val", "2",
              "--scene-size", "32", "--k", "3", "--augment-passes", "1", "--probe-epochs", "1",
              "--bootstrap", "0", "--no-floor", "--no-progress", "--threads", "1"]
    results = []
    for extra in (["--device", "cpu"], []):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main(common + extra + ["--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["device"] == "cpu"
        for r in res["models"]["checkpoint"].values():
            r.pop("seconds")
        results.append(res["models"])
    assert results[0] == results[1]
