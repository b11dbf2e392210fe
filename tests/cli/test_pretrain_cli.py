"""cribo pretrain through the dispatcher: the options are parsed once, in the
checks before any work, and the same configuration is trained."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from runs import TINY  # noqa: E402

import cribo.cli.pretrain as pretrain_cmd  # noqa: E402
import cribo.train.config as config_mod  # noqa: E402
from cribo.cli import main  # noqa: E402


def test_the_configuration_is_parsed_once(tmp_path, monkeypatch):
    parsed, trained = [], []
    original = config_mod.config_and_origin

    def counted(*a, **k):
        parsed.append(a)
        return original(*a, **k)

    def fake_train(cfg):
        trained.append(cfg)
        return {"history": []}

    monkeypatch.setattr(config_mod, "config_and_origin", counted)
    monkeypatch.setattr(pretrain_cmd, "train", fake_train)
    argv = TINY + ["--batch-size", "8", "--no-evaluate", "--lr", "0.003",
                   "--output-dir", str(tmp_path / "run")]
    assert main(["pretrain", *argv]) == 0
    assert len(parsed) == 1 and len(trained) == 1
    assert trained[0].lr == 0.003 and trained[0].output_dir == str(tmp_path / "run")
    # Called directly (as the tests do), pretrain.main parses argv itself.
    assert pretrain_cmd.main(argv) == 0
    assert len(parsed) == 2 and trained[1] == trained[0]
