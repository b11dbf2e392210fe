"""Writes the notebooks of this folder (outputs cleared) from the cells below.

    python notebooks/make_notebooks.py

Edit the cells here, not the .ipynb files, and run this again.  Every notebook
reads CRIBO_NB_TINY=1 (set by tests/test_notebooks.py in CI) to run at tiny sizes.
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """import os
TINY = os.environ.get("CRIBO_NB_TINY") == "1"   # CI runs the notebooks at tiny sizes
import cribo
print("cribo", cribo.__version__, "| kernel threads:", cribo.get_num_threads())"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        new_markdown_cell("""# 01 · Quickstart: joint-space clustering of two views

CrIBo (*Cross-Image Object-Level Bootstrapping*, ICLR 2024) clusters the tokens of
**two augmented views of one image together**, so that cluster *k* in view 1 and
cluster *k* in view 2 are the same object seen twice. Here we do it on a real
photograph that ships with matplotlib, using each patch's pixels as its token (a
stand-in for a network's tokens; `02_pretrain_and_evaluate` uses a ViT)."""),
        new_code_cell("import numpy as np\n" + SETUP),
        new_code_cell("""from matplotlib import cbook
from PIL import Image
from cribo.data import TwoViewTransform

photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
size, patch = (64, 8) if TINY else (224, 16)
views = TwoViewTransform(size=size, patch_size=patch).geometric_only()  # crops + flips only
v1, v2 = views(photo, np.random.default_rng(3))
print(photo.shape, "->", v1.image.shape, "| patch centres in the photo's frame:", v1.positions[:2])"""),
        new_code_cell("""def patch_tokens(view):
    \"\"\"(N, p*p*3) tokens: each patch's pixels, centred.\"\"\"
    c, s, _ = view.image.shape
    g = s // patch
    t = view.image.reshape(c, g, patch, g, patch).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
    return t - t.mean(0)

tokens = np.stack([patch_tokens(v1), patch_tokens(v2)])[None]      # (B=1, 2, N, d)
positions = np.stack([v1.positions, v2.positions])[None]           # (1, 2, N, 2)
K = 8
c = cribo.cluster(tokens, positions, K, pos_weight=2.0, seed=0)
print("labels", c.labels.shape, "| valid (seen in both views):", c.valid.sum(), "of", K)"""),
        new_code_cell("""from cribo import viz
g = size // patch
viz.plot_clusters(v1.image, v2.image, c.labels[0, 0], c.labels[0, 1], grid=(g, g),
                  valid=c.valid[0], title="One colour = one cluster in both views")"""),
        new_markdown_cell("""Each valid cluster becomes an **object**: the mean of its tokens in each view
(`cribo.pool`). Objects of many images go into a memory queue, where each object
looks for its nearest neighbour in *other* images — the cross-image bootstrapping."""),
        new_code_cell("""objects = cribo.pool(tokens, c.labels, K)                      # (1, 2, K, d)
t1, t2 = objects[0, 0][c.valid[0]], objects[0, 1][c.valid[0]]
queue = cribo.ObjectQueue(capacity=16, dim=tokens.shape[-1])
rng = np.random.default_rng(0)
for i in range(4):   # other "images": jittered copies of these objects
    queue.push(t1 + rng.normal(0, 0.3, t1.shape), t2 + rng.normal(0, 0.3, t2.shape), [len(t1)])
m = queue.match(t1, t2)
print("nearest queue entries:", m.index1, "| cycle-consistent:", m.mask1.mean())"""),
    ],
    "02_pretrain_and_evaluate.ipynb": [
        new_markdown_cell("""# 02 · Pretrain a tiny ViT with CrIBo and evaluate it

`cribo.train.train` is what `cribo pretrain` runs. We train on the embedded
synthetic scenes, then measure dense nearest-neighbour retrieval (docs/method.md §7) of the
teacher against the same network untrained."""),
        new_code_cell(SETUP),
        new_code_cell("""import tempfile
from cribo.train.config import config_from_args
from cribo.train import train

out = tempfile.mkdtemp(prefix="cribo-nb02-")
flags = ["--output-dir", out, "--no-progress", "--num-workers", "0", "--no-evaluate"]
if TINY:
    flags += ["--epochs", "1", "--n-images", "32", "--batch-size", "16", "--embed-dim", "32",
              "--depth", "1", "--num-heads", "2", "--out-dim", "128", "--head-hidden-dim", "64",
              "--img-size", "32", "--scene-size", "48", "--n-clusters", "6", "--queue-capacity", "32"]
else:
    flags += ["--epochs", "3", "--n-images", "512"]
cfg = config_from_args(flags)
summary = train(cfg)
print({k: round(v, 3) for k, v in summary["history"][-1].items()})"""),
        new_code_cell("""from cribo import viz
viz.plot_curves(out)"""),
        new_code_cell("""from cribo.evaluation import dense_evaluation, paired_bootstrap, random_init_like
from cribo.evaluation.job import teacher_backbone, eval_datasets

cfg.eval_train_images, cfg.eval_val_images = (16, 8) if TINY else (100, 50)
train_set, val_set = eval_datasets(cfg)
teacher = teacher_backbone(cfg)
kw = dict(image_size=cfg.scene_size, progress=False)
trained, probe = dense_evaluation(teacher, train_set, val_set, **kw)
floor, probe0 = dense_evaluation(random_init_like(teacher, cfg.seed), train_set, val_set, **kw)
boot = paired_bootstrap(trained, floor)
print(f"retrieval mIoU {trained.miou:.3f} (untrained {floor.miou:.3f}), "
      f"gain 95% CI [{boot.miou.low:+.3f}, {boot.miou.high:+.3f}]")
print(f"fg/bg IoU {trained.fg_iou:.3f} (untrained {floor.fg_iou:.3f}); probe mIoU {probe.miou:.3f}")"""),
        new_code_cell("""idx = sorted(trained.predictions)[:3]
viz.plot_predictions([val_set[i][0] for i in idx], [val_set[i][1] for i in idx],
                     [trained.predictions[i] for i in idx], list(val_set.class_names))"""),
    ],
    "03_ablation.ipynb": [
        new_markdown_cell("""# 03 · An ablation: full CrIBo against its global term alone (DINO)

`cribo.evaluation.ablate.run_ablation` trains each variant with the same compute and seeds and
evaluates them like the main job. At CPU scale use several seeds and look at the
spread before believing a difference."""),
        new_code_cell(SETUP),
        new_code_cell("""import tempfile
from cribo.evaluation.ablate import VARIANTS, run_ablation
print(sorted(VARIANTS))
out = tempfile.mkdtemp(prefix="cribo-nb03-")
common = ["--no-progress", "--num-workers", "0"]
if TINY:
    common += ["--epochs", "1", "--n-images", "32", "--batch-size", "16", "--embed-dim", "32",
               "--depth", "1", "--num-heads", "2", "--out-dim", "128", "--head-hidden-dim", "64",
               "--img-size", "32", "--scene-size", "48", "--n-clusters", "6",
               "--queue-capacity", "32", "--eval-train-images", "16", "--eval-val-images", "8"]
    seeds = [0]
else:
    common += ["--epochs", "3", "--n-images", "512"]
    seeds = [0, 1, 2]
table = run_ablation(["full", "global_only"], seeds, out, common)"""),
        new_code_cell("""from IPython.display import Image as Show, Markdown
display(Markdown(open(f"{out}/ablation.md").read()))
Show(filename=f"{out}/ablation.png")"""),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):  # stable ids: regenerating changes only what changed
            cell["id"] = f"nb{name[:2]}-cell{i:02d}"
        nb = new_notebook(cells=cells, metadata={"kernelspec": {
            "name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, os.path.join(HERE, name))
        print("wrote", name)


if __name__ == "__main__":
    main()
