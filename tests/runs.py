"""What the training, fault, evaluation and picture tests share: a tiny run.

``TINY`` are ``cribo pretrain`` options for a ViT of width 32 and depth 2 on 48
synthetic scenes of 48 px (one thread, no data workers): a step takes
milliseconds, so a test can train several epochs.
"""
from __future__ import annotations

import socket

TINY = ["--n-images", "48", "--scene-size", "48", "--img-size", "32", "--patch-size", "8",
        "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--out-dim", "64",
        "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--n-clusters", "6",
        "--queue-capacity", "40", "--num-workers", "0", "--no-progress", "--threads", "1",
        "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "1", "--log-every", "1",
        "--objects-start-epoch", "0"]


def free_port() -> int:
    """A TCP port nobody listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
