"""Where a training step's time goes: runs a few iterations of a preset and prints
the per-step split (backbones, heads, the C operators, optimizer) and the share of
the CrIBo operators (clustering, pooling, queue, losses).

    python benchmarks/step_profile.py                 # the CPU preset, 12 steps
    python benchmarks/step_profile.py --steps 20 --threads 1 --json out.json
    python benchmarks/step_profile.py -- --embed-dim 192 --depth 6   # extra pretrain flags

The numbers are wall-clock medians over the steps after the first two (warm-up),
read from the run's log.jsonl (``t_*`` fields, written by cribo.train).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

PARTS = [  # (log key, label, C operator?)
    ("data", "data loading (wait)", False),
    ("teacher_backbone_forward", "teacher backbone forward", False),
    ("clustering", "clustering (C)", True),
    ("pooling", "pooling, teacher objects (C)", True),
    ("queue", "queue look-up + push (C)", True),
    ("student_backbone_forward", "student backbone forward", False),
    ("student_heads_forward", "student pooling (C) + heads forward", False),
    ("teacher_heads", "teacher heads (objects, neighbours)", False),
    ("losses", "losses + gradient + centres (C)", True),
    ("heads_backward", "heads + pooling backward", False),
    ("backbone_backward", "student backbone backward", False),
    ("optimizer_ema", "clip, optimizer, EMA teacher", False),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="training steps to run")
    p.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.add_argument("extra", nargs="*", help="further `cribo pretrain` flags (after --)")
    args = p.parse_args(argv)

    from cribo.train.config import config_from_args
    from cribo.train.loop import train

    out_dir = tempfile.mkdtemp(prefix="cribo-profile-")
    probe = config_from_args(["--preset", args.preset] + args.extra)
    flags = ["--preset", args.preset, "--epochs", "1", "--output-dir", out_dir,
             "--n-images", str(probe.batch_size * args.steps), "--log-every", "1",
             "--no-progress", "--warmup-epochs", "0", "--threads", str(args.threads)]
    cfg = config_from_args(flags + args.extra)
    train(cfg)
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    its = [r for r in recs if r.get("type") == "iter"][2:]
    if not its:
        print("too few steps to time (need > 2)", file=sys.stderr)
        return 1
    med = {k: float(np.median([r[f"t_{k}"] for r in its])) for k, _, _ in PARTS}
    step = float(np.median([r["t_step"] for r in its]))
    ops = sum(med[k] for k, _, c in PARTS if c)
    print(f"\nStep profile: preset {args.preset}, batch {cfg.batch_size}, "
          f"{cfg.img_size}px/patch {cfg.patch_size}, ViT {cfg.embed_dim}x{cfg.depth}, "
          f"head {cfg.out_dim}, K={cfg.n_clusters}, queue {cfg.queue_capacity}, "
          f"threads {recs[0]['threads']}; median of {len(its)} steps\n")
    print("| part | ms / step | share |\n|---|---:|---:|")
    for k, label, _ in PARTS:
        print(f"| {label} | {1e3 * med[k]:.1f} | {100 * med[k] / step:.1f}% |")
    print(f"| **step (excl. data wait)** | **{1e3 * step:.1f}** | 100% |")
    print(f"\nCrIBo C operators (clustering, pooling, queue, losses): "
          f"{1e3 * ops:.1f} ms = {100 * ops / step:.1f}% of the step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": cfg.to_dict(), "median_s": med, "step_s": step,
                       "operators_s": ops, "threads": recs[0]["threads"]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
