"""Resuming across a rename of options (cribo/train/config.py's RENAMED): a
checkpoint, config.json or config file written with an old option name is read
with today's; an old flag is refused with today's name."""
from __future__ import annotations

from dataclasses import fields

import pytest

from runs import TINY

from cribo.train.config import (RENAMED, TrainConfig, config_from_args, load_config_file,
                                upgrade_saved_config)

#: The renames, written by hand (issue 10: an option feeding an operator's
#: argument is named after it: ObjectQueue(capacity), cluster(n_iters)).
OLD_NAMES = {"queue_size": "queue_capacity", "cluster_iters": "cluster_n_iters"}


def test_the_table_maps_each_old_name_to_an_option_of_today():
    assert RENAMED == OLD_NAMES
    names = {f.name for f in fields(TrainConfig)}
    assert set(RENAMED.values()) <= names and not set(RENAMED) & names


def test_a_saved_config_is_read_with_todays_names():
    saved = {"queue_size": 40, "cluster_iters": 3, "lr": 0.5}
    assert upgrade_saved_config(saved) == {"queue_capacity": 40, "cluster_n_iters": 3,
                                           "lr": 0.5}
    assert saved == {"queue_size": 40, "cluster_iters": 3, "lr": 0.5}  # not modified
    # Both names (never written by cribo): today's wins.
    assert upgrade_saved_config({"queue_size": 1, "queue_capacity": 2}) == {"queue_capacity": 2}


def test_a_config_file_with_an_old_name_still_sets_the_option(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text("queue_size = 40\ncluster_iters = 3\n")
    assert load_config_file(str(f)) == {"queue_capacity": 40, "cluster_n_iters": 3}
    cfg = config_from_args(["--config", str(f)])
    assert (cfg.queue_capacity, cfg.cluster_n_iters) == (40, 3)
    both = tmp_path / "both.toml"
    both.write_text("queue_size = 40\nqueue_capacity = 41\n")
    with pytest.raises(ValueError, match="set the same option"):
        load_config_file(str(both))


def test_an_old_flag_is_refused_naming_todays(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--queue-size", "40", "--cluster-iters", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--queue-size is now --queue-capacity" in err
    assert "--cluster-iters is now --cluster-n-iters" in err


def test_a_checkpoint_written_before_the_rename_resumes(tmp_path):
    torch = pytest.importorskip("torch")
    from cribo.train.loop import train
    from cribo.train.resume import config_differences

    out = tmp_path / "run"
    cfg = config_from_args(TINY + ["--n-images", "16", "--batch-size", "8", "--epochs", "2",
                                   "--no-evaluate", "--cluster-n-iters", "3",
                                   "--output-dir", str(out)])

    class Stop(Exception):
        pass

    def stop_after_first(epoch, stats):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first)
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for old, new in OLD_NAMES.items():  # as a version before the rename wrote it
        ck["config"][old] = ck["config"].pop(new)
    torch.save(ck, out / "checkpoint.pth")
    assert config_differences(ck["config"], cfg.to_dict()) == []
    summary = train(cfg)
    assert summary["start_epoch"] == 1 and len(summary["history"]) == 1
    # A real difference under an old name is still one.
    changed = dict(ck["config"], queue_size=41)
    assert config_differences(changed, cfg.to_dict()) == [("queue_capacity", 41, 40)]
