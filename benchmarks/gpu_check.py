"""The torch engine on a GPU against the C core on the host, operator by operator.

    python benchmarks/gpu_check.py                 # the first GPU; says so and exits 0 without one
    python benchmarks/gpu_check.py --device cpu    # the same checks on CPU tensors (CI runs this)

For each CrIBo operator of :mod:`cribo.nn.torch_ops` (clustering, pooling, the
queue's search, the losses) it draws one input at a small reference-like size,
runs the torch implementation on ``--device`` and the C core (:mod:`cribo.ops`)
on the same numbers copied to the host, and prints one line per operator: what
was compared, the largest difference, and OK or FAIL.  Exit status 1 if any
check fails.  Labels and indices must be identical on these well-separated
inputs; floats agree to float32 rounding.  (Timings, the vit_small step and NCCL
come with the torch backend of the objective.)
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Tuple

import numpy as np

import cribo

Check = Tuple[str, Callable[["object"], Tuple[float, bool, str]]]


def _objects_scene(rng: np.random.Generator, B: int, N: int, d: int, K: int
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(B,2,N,d) tokens made of K well-separated objects, and (B,2,N,2) grid positions."""
    centres = rng.standard_normal((K, d)).astype(np.float32) * 4
    which = rng.integers(0, K, size=(B, 2, N))
    tok = centres[which] + 0.1 * rng.standard_normal((B, 2, N, d)).astype(np.float32)
    g = int(np.ceil(np.sqrt(N)))
    yy, xx = np.divmod(np.arange(N), g)
    pos = np.stack([xx, yy], -1).astype(np.float32) / g
    return tok.astype(np.float32), np.broadcast_to(pos, (B, 2, N, 2)).copy()


def checks(device: str, seed: int = 0) -> List[Tuple[str, float, bool, str]]:
    """[(operator, largest difference, ok, what was compared)] on ``device``."""
    import torch

    from cribo.nn import torch_ops

    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    B, N, d, K, L = 4, 196, 64, 16, 4096
    out: List[Tuple[str, float, bool, str]] = []

    tok, pos = _objects_scene(rng, B, N, d, K)
    c = cribo.cluster(tok, pos, K, seed=seed)
    t = torch_ops.cluster(torch.from_numpy(tok).to(dev), torch.from_numpy(pos).to(dev), K,
                          seed=seed)
    labels_equal = np.array_equal(t.labels.cpu().numpy(), c.labels)
    out.append(("cluster", float((t.labels.cpu().numpy() != c.labels).mean()), labels_equal,
                f"labels of {B} images x 2 x {N} tokens, K={K} (fraction differing)"))

    objs_c = cribo.pool(tok, c.labels, K)
    objs_t = torch_ops.pool(torch.from_numpy(tok).to(dev), torch.from_numpy(c.labels).to(dev), K)
    diff = float(np.abs(objs_t.cpu().numpy() - objs_c).max())
    out.append(("pool", diff, diff <= 1e-5 * max(float(np.abs(objs_c).max()), 1.0),
                f"({B},2,{K},{d}) objects (max abs difference)"))

    bank = rng.standard_normal((4000, d)).astype(np.float32)
    queries = rng.standard_normal((300, d)).astype(np.float32)
    idx_c, sim_c = cribo.topk_cosine(queries, bank, 10)
    idx_t, sim_t = torch_ops.topk_cosine(torch.from_numpy(queries).to(dev),
                                         torch.from_numpy(bank).to(dev), 10)
    same = np.array_equal(idx_t.cpu().numpy(), idx_c)
    diff = float(np.abs(sim_t.cpu().numpy() - sim_c).max())
    out.append(("topk_cosine", diff, same and diff <= 1e-6,
                "10 nearest of 300 queries in 4000 rows (indices identical; max similarity "
                "difference)"))

    s = rng.standard_normal((512, L)).astype(np.float32) * 3
    te = rng.standard_normal((512, L)).astype(np.float32) * 3
    loss_c, grad_c = cribo.softmax_cross_entropy(s, te)
    loss_t, grad_t = torch_ops.softmax_cross_entropy(torch.from_numpy(s).to(dev),
                                                     torch.from_numpy(te).to(dev))
    diff = max(float(np.abs(loss_t.cpu().numpy() - loss_c).max() / np.abs(loss_c).max()),
               float(np.abs(grad_t.cpu().numpy() - grad_c).max() / np.abs(grad_c).max()))
    out.append(("softmax_cross_entropy", diff, diff <= 1e-5,
                f"512 x {L} logits, losses and gradient (max relative difference)"))
    return out


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device of the torch engine "
                   "(default: cuda; cpu runs the same checks without a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run with --device cpu to "
              "check the torch engine on the CPU)")
        return 0
    cribo.set_num_threads(1)
    failed = 0
    print(f"gpu_check: torch engine on {args.device} against the C core on the host")
    for name, diff, ok, what in checks(args.device, args.seed):
        failed += not ok
        print(f"  {'OK  ' if ok else 'FAIL'} {name:22s} {diff:.2e}  {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
