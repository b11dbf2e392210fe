"""The package's layers (docs/architecture.md): what may import what.

Every module of ``cribo`` belongs to one layer of :data:`LAYERS` (lowest first),
and imports only modules of its own layer or of layers below it, with no cycle
anywhere.  The import graph is read statically with :mod:`ast` from every
``.py`` file under ``cribo/``: module-level and function-level imports,
absolute and relative.  ``from . import x`` counts as importing the submodule
``x`` when there is one, else the package itself (its ``__init__``), so
``from .. import cluster`` imports ``cribo``, which is part of the ops layer
(it re-exports ``cribo.ops`` only).

Two more rules: ``cribo.ops`` never imports torch (scanned here, and checked by
importing it with torch made unimportable), and ``import cribo.ops`` loads no
module of cribo outside ops and the base it stands on.

The checker takes a root folder (the one holding ``cribo/``), so it is tested
on small synthetic graphs and on a copy of the tree with an upward import
planted, as well as on the real tree.
"""
from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cribo"

#: The layers, lowest first.  A pattern is a module name, or ``name.*`` for
#: every module below ``name`` (``cribo.ops.*`` holds ``cribo.ops`` too).
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("base", ("cribo._C", "cribo._blas", "cribo._paths", "cribo.distributed")),
    ("ops", ("cribo", "cribo.ops.*")),
    ("data", ("cribo.data.*",)),
    ("nn", ("cribo.nn.*", "cribo.models")),
    ("train", ("cribo.train.*",)),
    ("viz", ("cribo.viz.*",)),
    ("evaluation", ("cribo.evaluation.*",)),
    ("cli", ("cribo.cli.*", "cribo.__main__")),
)

#: Modules built from C (csrc/), present as files only after a build.
EXTENSIONS = ("cribo._C",)

#: Modules that must import with torch absent.
TORCH_FREE = ("cribo", "cribo.ops", "cribo.data", "cribo.train.config",
              "cribo.train.run_folder", "cribo.nn.architectures", "cribo.distributed")


# =============================================================================
# the checker
# =============================================================================

@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line`` of its file, by ``statement``."""
    importer: str
    imported: str
    line: int = 0
    statement: str = ""

    def where(self) -> str:
        return f"{self.importer} (line {self.line}: {self.statement})" if self.line \
            else self.importer


def find_modules(root: Path) -> Dict[str, Optional[Path]]:
    """Every module of the package under ``root``: its dotted name -> its ``.py``
    file (None for a C extension)."""
    pkg = root / PACKAGE
    if not (pkg / "__init__.py").is_file():
        raise FileNotFoundError(f"root {str(root)!r} holds no package {PACKAGE}/__init__.py")
    modules: Dict[str, Optional[Path]] = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if "__pycache__" in parts:
            continue
        modules[".".join(parts)] = path
    built = [".".join(p.relative_to(root).parent.parts + (p.name.split(".")[0],))
             for p in sorted(pkg.rglob("*")) if p.suffix in (".so", ".pyd")]
    for ext in list(EXTENSIONS) + built:
        modules.setdefault(ext, None)
    return modules


def _resolve_from(importer: str, is_package: bool, level: int, module: Optional[str],
                  names: Sequence[str], modules: Container[str]) -> List[str]:
    """The modules ``from <level dots><module> import <names>`` in ``importer`` imports."""
    if level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        if level - 1 > len(base) - 1:
            raise ValueError(f"{importer}: relative import beyond the package")
        base = base[:len(base) - (level - 1)]
        target = ".".join(base + ([module] if module else []))
    else:
        target = module or ""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    out = []
    for name in names:
        sub = f"{target}.{name}"
        out.append(sub if name != "*" and sub in modules else target)
    return out


def _resolve_import(name: str) -> List[str]:
    """The module of cribo ``import name`` imports (the deepest one it names)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return []
    return [name]


def import_edges(root: Path) -> Tuple[Dict[str, Optional[Path]], List[Edge], List[Edge]]:
    """The package's modules, its internal import edges, and its imports of other
    packages (``imported`` = the top-level name, e.g. ``torch``)."""
    modules = find_modules(root)
    internal: List[Edge] = []
    external: List[Edge] = []
    for name, path in modules.items():
        if path is None:
            continue
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: List[str] = []
            others: List[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found = _resolve_import(alias.name)
                    targets += found
                    if not found:
                        others.append(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    continue
                found = _resolve_from(name, is_package, node.level, node.module,
                                      [a.name for a in node.names], modules)
                targets += found
                if not found and not node.level and node.module:
                    others.append(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                                 "__import__")):
                targets += _resolve_import(node.args[0].value)
            else:
                continue
            statement = ast.unparse(node)
            for t in dict.fromkeys(targets):
                if t != name:
                    internal.append(Edge(name, t, node.lineno, statement))
            for o in dict.fromkeys(others):
                external.append(Edge(name, o, node.lineno, statement))
    return modules, internal, external


def layer_of(module: str) -> Optional[int]:
    """The index in :data:`LAYERS` of ``module``'s layer, or None."""
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if module == p or (p.endswith(".*") and (module == p[:-2]
                                                      or module.startswith(p[:-1]))):
                return i
    return None


def find_cycle(edges: Iterable[Edge]) -> Optional[List[str]]:
    """A cycle of the graph, as its modules in import order with the first one
    repeated at the end, or None when there is none."""
    graph: Dict[str, List[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, []).append(e.imported)
        graph.setdefault(e.imported, [])
    state: Dict[str, int] = {}          # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def layer_problems(modules: Iterable[str], edges: Iterable[Edge]) -> List[str]:
    """Modules no layer holds, and edges that go to a higher layer."""
    modules = set(modules)
    problems = [f"{m} is in no layer: add it to LAYERS in tests/test_architecture.py"
                for m in sorted(modules) if layer_of(m) is None]
    for e in edges:
        if e.imported not in modules:
            problems.append(f"{e.where()} imports {e.imported}, which is no module "
                            "of the package")
            continue
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is None or b is None:
            continue                    # reported above
        if b > a:
            problems.append(f"{e.where()} imports {e.imported}: layer {LAYERS[a][0]!r} "
                            f"may not import layer {LAYERS[b][0]!r} above it")
    return problems


def check_tree(root: Path) -> List[str]:
    """Every broken rule of the tree under ``root``, one line each (empty: all hold)."""
    modules, internal, external = import_edges(root)
    problems = layer_problems(modules, internal)
    cycle = find_cycle(internal)
    if cycle is not None:
        problems.append("import cycle: " + " -> ".join(cycle))
    problems += [f"{e.where()} imports torch: cribo.ops must stay torch-free"
                 for e in external
                 if e.imported == "torch" and layer_of(e.importer) == 1]
    return problems


# =============================================================================
# the real tree
# =============================================================================

@pytest.fixture(scope="module")
def tree() -> Tuple[Dict[str, Optional[Path]], List[Edge], List[Edge]]:
    """:func:`import_edges` of the real tree, read once."""
    return import_edges(ROOT)


def test_every_module_is_in_a_layer(tree):
    modules, _, _ = tree
    assert len(modules) > 20, sorted(modules)
    unclassified = [m for m in modules if layer_of(m) is None]
    assert not unclassified, f"{unclassified} in no layer: add them to LAYERS"


def test_no_import_cycle(tree):
    _, edges, _ = tree
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_each_layer_imports_only_layers_below(tree):
    modules, edges, _ = tree
    problems = layer_problems(modules, edges)
    assert not problems, "\n".join(problems)
    # the graph really was read: the known edges across layers are there
    pairs = {(e.importer, e.imported) for e in edges}
    for pair in [("cribo.nn.objective", "cribo.ops.clustering"),
                 ("cribo.cli.pretrain", "cribo.evaluation.job"),
                 ("cribo.train.saving", "cribo"),              # import cribo (its __version__)
                 ("cribo.evaluation.job", "cribo.viz"),        # from .. import viz (a package)
                 ("cribo.train", "cribo.train.loop")]:              # lazy, in __getattr__
        assert pair in pairs, f"edge {pair} not found"


def test_training_never_imports_evaluation(tree):
    _, edges, _ = tree
    bad = [e.where() for e in edges
           if e.importer.startswith("cribo.train") and e.imported.startswith("cribo.evaluation")]
    assert not bad, bad


def test_ops_never_imports_torch(tree):
    _, _, external = tree
    bad = [e.where() for e in external
           if e.imported == "torch" and layer_of(e.importer) == 1]
    assert not bad, f"cribo.ops must stay torch-free: {bad}"
    # and the scan sees torch where it is imported
    assert any(e.imported == "torch" and e.importer == "cribo.nn.backbone" for e in external)


_NO_TORCH = textwrap.dedent("""
    import importlib, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)",
                                          name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    importlib.import_module(sys.argv[1])
    assert "torch" not in sys.modules, "torch was imported"
    print("\\n".join(sorted(m for m in sys.modules if m == "cribo" or m.startswith("cribo."))))
""")


@functools.lru_cache(maxsize=None)
def _import_without_torch(module: str) -> List[str]:
    """The cribo modules loaded by importing ``module`` in a fresh interpreter
    where torch cannot be imported."""
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, module], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (f"import {module} without torch failed:\n"
                                  f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout.split()


@pytest.mark.parametrize("module", TORCH_FREE)
def test_imports_without_torch(module):
    loaded = _import_without_torch(module)
    assert module in loaded


def test_ops_loads_only_ops_and_base():
    loaded = _import_without_torch("cribo.ops")
    allowed = {"cribo", "cribo._C", "cribo._blas"}
    outside = [m for m in loaded if m not in allowed and m != "cribo.ops"
               and not m.startswith("cribo.ops.")]
    assert not outside, f"import cribo.ops loaded {outside}"
    assert "cribo.ops.clustering" in loaded and "cribo._C" in loaded


# =============================================================================
# the checker itself
# =============================================================================

def test_checker_finds_a_cycle():
    edges = [Edge("cribo.ops.a", "cribo.ops.b"), Edge("cribo.ops.b", "cribo.ops.c"),
             Edge("cribo.ops.c", "cribo.ops.a"), Edge("cribo.ops.c", "cribo._C")]
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"cribo.ops.a", "cribo.ops.b", "cribo.ops.c"}
    assert find_cycle(edges[1:]) is None
    assert find_cycle([Edge("cribo.ops.a", "cribo.ops.b"), Edge("cribo.ops.a", "cribo.ops.c"),
                       Edge("cribo.ops.b", "cribo.ops.c")]) is None       # a diamond


def test_checker_finds_an_upward_edge():
    modules = ["cribo.train.loop", "cribo.evaluation.job", "cribo.ops.pooling"]
    up = Edge("cribo.train.loop", "cribo.evaluation.job", 7, "from ..evaluation import job")
    problems = layer_problems(modules, [up, Edge("cribo.train.loop", "cribo.ops.pooling")])
    assert problems == ["cribo.train.loop (line 7: from ..evaluation import job) imports "
                        "cribo.evaluation.job: layer 'train' may not import layer "
                        "'evaluation' above it"]
    assert layer_problems(modules, [Edge("cribo.evaluation.job", "cribo.train.loop")]) == []
    assert "add it to LAYERS" in layer_problems(["cribo.newpkg.x"], [])[0]


def test_checker_classifies_by_package():
    assert LAYERS[layer_of("cribo")][0] == "ops"
    assert LAYERS[layer_of("cribo.ops.queue")][0] == "ops"
    assert LAYERS[layer_of("cribo.models")][0] == "nn"
    assert LAYERS[layer_of("cribo.train.faults")][0] == "train"   # a new module
    assert LAYERS[layer_of("cribo.__main__")][0] == "cli"
    assert LAYERS[layer_of("cribo._C")][0] == "base"
    assert layer_of("cribo.operations") is None                   # not cribo.ops.*
    assert layer_of("cribo.helpers") is None


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_checker_resolves_imports(tmp_path):
    _write(tmp_path, {
        "cribo/__init__.py": "from .ops import *\n",
        "cribo/ops/__init__.py": "from .pooling import pool\n",
        "cribo/ops/pooling.py": "from .. import _C\nimport numpy as np\n",
        "cribo/train/__init__.py": "",
        "cribo/train/loop.py": """
            import cribo
            from . import schedules, helper_name
            def f():
                from .. import cluster
                import torch.nn
                from ..ops.pooling import pool
                from cribo.ops import pooling
            """,
        "cribo/train/schedules.py": "",
    })
    modules, edges, external = import_edges(tmp_path)
    assert set(modules) == {"cribo", "cribo.ops", "cribo.ops.pooling", "cribo.train",
                            "cribo.train.loop", "cribo.train.schedules", "cribo._C"}
    got = {(e.importer, e.imported) for e in edges}
    assert got == {("cribo", "cribo.ops"), ("cribo.ops", "cribo.ops.pooling"),
                   ("cribo.ops.pooling", "cribo._C"),
                   ("cribo.train.loop", "cribo"),                  # import cribo / from .. import
                   ("cribo.train.loop", "cribo.train.schedules"),  # a submodule
                   ("cribo.train.loop", "cribo.train"),            # an attribute of the package
                   ("cribo.train.loop", "cribo.ops.pooling")}
    assert {(e.importer, e.imported) for e in external} == {("cribo.ops.pooling", "numpy"),
                                                           ("cribo.train.loop", "torch")}
    assert check_tree(tmp_path) == []


def test_checker_fails_on_a_planted_upward_import(tmp_path):
    """The old train <-> pipeline cycle, planted in a copy of the real tree: the
    training loop imports the evaluation job inside a function (as train.py once
    imported pipeline.py), and the job imports the loop (as pipeline.py once
    imported train.py's builders).  The checker names the upward edge and the
    cycle."""
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    loop = tmp_path / PACKAGE / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _planted():\n    from ..evaluation import job\n")
    job = tmp_path / PACKAGE / "evaluation" / "job.py"
    job.write_text(job.read_text() + "\n\ndef _planted():\n    from ..train.loop import train\n")
    problems = check_tree(tmp_path)
    assert any(p.startswith("cribo.train.loop (line ") and "from ..evaluation import job" in p
               and "layer 'train' may not import layer 'evaluation'" in p for p in problems), \
        "\n".join(problems)
    assert any(p.startswith("import cycle:") and "cribo.train.loop" in p
               and "cribo.evaluation.job" in p for p in problems), "\n".join(problems)


def test_checker_fails_on_torch_in_ops(tmp_path):
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    pooling = tmp_path / PACKAGE / "ops" / "pooling.py"
    pooling.write_text(pooling.read_text() + "\n\ndef _planted():\n    import torch\n")
    problems = check_tree(tmp_path)
    assert any("cribo.ops.pooling" in p and "torch-free" in p for p in problems), problems


def _main(argv: Sequence[str]) -> int:
    """``python tests/test_architecture.py [ROOT]``: prints every broken rule."""
    problems = check_tree(Path(argv[0]) if argv else ROOT)
    print("\n".join(problems) if problems else "all layer rules hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

