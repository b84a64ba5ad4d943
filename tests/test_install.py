"""What a fresh install depends on: import names no dependency takes, and a lock that matches.

The code runs from the repository root, which sits first on ``sys.path``; a top-level folder
or module of ours with the same name as a module of an installed distribution shadows it
(``kernels``, Hugging Face's kernel hub that transformers imports, was one). Scripts in bench/
and tests/ run with their own folder first on ``sys.path``, so their modules count too.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_ROOTS = ("", "bench", "tests")  # folders that stand first on sys.path when our code runs
OWN_DISTRIBUTION = "treespec"


def import_names(repo: str) -> dict[str, str]:
    """Top-level import names our code defines -> the file or folder that defines each.

    A name is a ``*.py`` module or a folder holding Python files (a package, or a namespace
    package that an installed module of the same name would shadow) in one of IMPORT_ROOTS.
    """
    names: dict[str, str] = {}
    for root in IMPORT_ROOTS:
        folder = os.path.join(repo, root)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith((".", "_")):
                continue
            if entry.endswith(".py"):
                names.setdefault(entry[:-3], os.path.join(root, entry))
            elif os.path.isdir(path) and entry.isidentifier() and _holds_python(path):
                names.setdefault(entry, os.path.join(root, entry) + "/")
    return names


def _holds_python(folder: str) -> bool:
    return any(f.endswith(".py") for _, _, files in os.walk(folder) for f in files)


def collisions(ours: dict[str, str], theirs: dict[str, list[str]]) -> list[str]:
    """One line per name that is ours and also a top-level module of another distribution."""
    found = []
    for name, where in sorted(ours.items()):
        dists = sorted({d for d in theirs.get(name, []) if canonicalize_name(d) != OWN_DISTRIBUTION})
        if dists:
            found.append(f"{name!r}: ours at {where}, and a module of " + ", ".join(
                f"{d} {importlib.metadata.version(d)}" for d in dists))
    return found


def test_no_import_name_of_ours_belongs_to_an_installed_distribution():
    ours = import_names(ROOT)
    assert {"app", "engine", "actors", "train", "common", "conftest"} <= set(ours)
    clash = collisions(ours, importlib.metadata.packages_distributions())
    assert not clash, "rename ours:\n" + "\n".join(clash)


def test_an_installed_distribution_with_one_of_our_names_is_caught(tmp_path, monkeypatch):
    """A real (if empty) distribution on sys.path whose top-level module is `engine`."""
    info = tmp_path / "clashing_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clashing-dist\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("engine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    clash = collisions(import_names(ROOT), importlib.metadata.packages_distributions())
    assert clash == ["'engine': ours at engine/, and a module of clashing-dist 1.0"]


def test_a_kernels_package_of_ours_would_clash_with_the_kernel_hub(tmp_path):
    """The layout that broke fresh installs: a top-level `kernels/` beside transformers' kernel hub."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    for root in IMPORT_ROOTS[1:]:
        (tmp_path / root).mkdir()
    clash = collisions(import_names(str(tmp_path)), importlib.metadata.packages_distributions())
    assert len(clash) == 1 and clash[0].startswith("'kernels': ours at kernels/, and a module of kernels ")


# ------------------------------------------------------------------------------------------ lock


def locked_versions() -> dict[str, str]:
    """requirements.lock's pins: canonical name -> version."""
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
            if m:
                pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_the_lock_satisfies_pyproject():
    """Every requirement in pyproject.toml (dev extra included) is pinned, inside its range."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = locked_versions()
    bad = []
    for line in wanted:
        req = Requirement(line)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(Version(pin), prereleases=True):
            bad.append(f"{line}: lock has {pin}")
    assert not bad, "run `make lock`:\n" + "\n".join(bad)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a virtual environment")
def test_the_environment_holds_what_the_lock_names():
    """`make setup` installs the lock exactly; a stale .venv shows up here."""
    wrong = []
    for name, version in locked_versions().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or Version(have) != Version(version):
            wrong.append(f"{name}: lock {version}, installed {have}")
    assert not wrong, "run `make setup`:\n" + "\n".join(wrong)
