"""The package as shipped: sdist and wheel contents, an install from the sdist, and
documents that exist.

* ``python -m build`` makes an sdist and a wheel (built from the unpacked sdist,
  so the sdist alone must compile), from a copy of the files that would be
  committed plus decoys of what must never ship (build outputs, a run folder, a
  virtual environment, a stale extension, byte code).
* The sdist installs into a fresh virtual environment and the operators give
  the hand-worked results of ``tests/packaging_smoke.py`` there.  The
  environment reuses this one's packages (numpy, scipy-openblas32, setuptools,
  pip) through a ``.pth`` line, so nothing is downloaded: ``venv
  --system-site-packages`` would not do, as it exposes the base interpreter's
  packages, not this virtual environment's.
* Every relative link of the Markdown files resolves to a file in the
  repository (and a ``#section`` to a heading of it), and no file cites a
  document that lives outside the repository.

About 25 s on 2 cores (two compilations of the C core).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Folders that hold build outputs, environments, runs or caches (see .gitignore):
#: never walked when git is not there to list the repository's files.
IGNORED_DIRS = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache",
                ".hypothesis", ".ipynb_checkpoints"}

#: Files written into the copy that is packaged; none may reach the sdist or the wheel.
DECOYS = ("build/lib/cribo/decoy.py", "dist/cribo-0.0.0-decoy.tar.gz", "runs/decoy/log.jsonl",
          ".venv/lib/decoy.py", "cribo/_C.decoy.so", "cribo/__pycache__/decoy.cpython-311.pyc",
          "tests/ops/sanitize/build/decoy_harness", "csrc/decoy.o")


def repo_files() -> List[str]:
    """Paths (relative, POSIX) of the files that would be committed: git's tracked
    and untracked-but-not-ignored files; without git, a walk that skips the
    ignored folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
        names = [n for n in out.decode("utf-8").split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info")
                       and not (root == str(REPO / "tests" / "sanitize") and d == "build")]
            names += [os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/")
                      for f in files]
    return sorted(n for n in names if (REPO / n).is_file())


# =============================================================================
# sdist and wheel
# =============================================================================

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Runs ``python -m build`` on a copy of the repository with decoys added;
    returns the paths of the sdist and the wheel."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("tests/test_packaging.py needs the `build` tool: pip install build "
                    "(`make test` installs it)")
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    for name in repo_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    for name in DECOYS:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("decoy: must not be packaged\n")
    dist = root / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, \
        f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"expected one sdist and one wheel, got " \
                                                  f"{[p.name for p in dist.iterdir()]}"
    return {"sdist": sdists[0], "wheel": wheels[0], "root": root}


def sdist_names(path: Path) -> Set[str]:
    """The sdist's file names, without the leading ``cribo-<version>/``."""
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return {n.split("/", 1)[1] for n in names if "/" in n}


def test_sdist_holds_the_sources_and_documents_and_nothing_built(built):
    names = sdist_names(built["sdist"])
    files = repo_files()
    must = {f for f in files if re.fullmatch(r"csrc/(binding/)?[^/]+\.[ch]", f)}
    assert {"csrc/cribo.h", "csrc/binding/_C.c", "csrc/cluster.c"} <= must  # the pattern found them
    must |= {f for f in files if f.startswith("docs/")}
    must |= {f for f in files if f.startswith("cribo/") and f.endswith(".py")}
    must |= {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
             "cribo/py.typed", "tests/packaging_smoke.py", "tests/reference.py"}
    missing = sorted(must - names)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    bad = sorted(n for n in names
                 if "decoy" in n or n.split("/")[0] in {"build", "dist", "runs", ".venv"}
                 or n.startswith("tests/ops/sanitize/build/")
                 or n.endswith((".so", ".o", ".pyc")) or "__pycache__" in n)
    assert not bad, f"the sdist ships build outputs or environments: {bad}"


def test_wheel_ships_the_extension_py_typed_and_the_licence(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = whl.read(meta_name).decode("utf-8")
    assert "cribo/py.typed" in names
    assert len([n for n in names if re.fullmatch(r"cribo/_C\..*\.so", n)]) == 1, sorted(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert not [n for n in names if "decoy" in n or n.startswith("tests/")], sorted(names)
    headers = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines()
                   if ": " in line)
    assert headers["License-Expression"] == "MIT"
    assert headers["Requires-Python"] == ">=3.9"
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "the cribo authors" in licence


def test_sdist_installs_into_a_fresh_venv_and_the_operators_run(built, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()
    # This environment's packages after the fresh one's own (a plain path line: the
    # .pth files there, such as the editable install of the working tree, do not run).
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_project_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation",
                           "--no-deps", "--no-index", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", str(built["sdist"])],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"pip install of the sdist failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    run = subprocess.run([str(python), str(REPO / "tests" / "packaging_smoke.py")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, f"the operators failed in the fresh venv:\n{run.stdout}\n" \
                                f"{run.stderr[-3000:]}"
    assert "packaging smoke: OK" in run.stdout
    first = run.stdout.splitlines()[0]
    assert first.startswith("cribo ") and str(venv) in first, \
        f"cribo was not imported from the fresh venv: {first!r}"


# =============================================================================
# documents
# =============================================================================

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[`*]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_every_relative_link_of_the_markdown_files_resolves():
    files = repo_files()
    present = set(files)
    docs = [f for f in files if f.endswith(".md")]
    assert "README.md" in docs and "docs/method.md" in docs and "docs/README.md" in docs
    broken, checked = [], 0
    for doc in docs:
        text = _CODE.sub("", _FENCE.sub("", (REPO / doc).read_text(encoding="utf-8")))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = Path(os.path.normpath(Path(doc).parent / path)).as_posix() if path \
                else doc
            if resolved.startswith("../") or (resolved not in present and not any(
                    f.startswith(resolved.rstrip("/") + "/") for f in present)):
                broken.append(f"{doc}: ({target}) -> {resolved} is not in the repository")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(REPO / resolved):
                broken.append(f"{doc}: ({target}) -> no heading #{anchor} in {resolved}")
    assert checked >= 5, f"found only {checked} relative links: is the link pattern broken?"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_file_cites_a_document_outside_the_repository():
    # Built from pieces so that this file does not match itself.
    outside = ("../" + "shared", "SP" + "EC.md", "ST" + "YLE.md", "DE" + "SIGN.md")
    bare_spec = re.compile(r"\b" + "SP" + r"EC\b")  # the old contract cited by section
    hits = []
    for name in repo_files():
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # pictures and other binary files
        for no, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in outside) or bare_spec.search(line):
                hits.append(f"{name}:{no}: {line.strip()[:100]}")
    assert not hits, (f"{len(hits)} lines cite documents that are not in the repository "
                      f"(cite docs/method.md, docs/contributing.md):\n" + "\n".join(hits[:60]))
