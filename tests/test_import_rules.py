"""Import rules between versemi's folders, checked on the import graph (``ast``: nothing is imported).

* Prediction, bundles and evaluation read the trained model from ``versemi.model``, never from
  ``versemi.training``, so they never load a trainer (not even lazily inside a function).
* ``versemi.model`` itself (what training hands on) imports none of its readers nor training.
* ``versemi.plans`` and ``versemi.preprocessing`` do not import each other both ways.
"""
from __future__ import annotations

import ast
from pathlib import Path

import versemi

SOURCE_ROOT = Path(versemi.__file__).resolve().parent.parent  # the folder that holds versemi/


def module_name(path: Path, source_root: Path) -> str:
    parts = path.relative_to(source_root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source_root: Path) -> list[tuple[int, list[str]]]:
    """(line, names) of every import in the file, at any depth, relative ones resolved: ``import
    a`` gives ``[a]``, ``from P import x`` gives ``[P, P.x]`` (``x`` may be a submodule of ``P``)."""
    module = module_name(path, source_root)
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, [origin] + [f"{origin}.{alias.name}" for alias in node.names]))
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(importer: str, imported: str, source_root: Path = SOURCE_ROOT) -> list[str]:
    """``file:line imports name`` for every import of package ``imported`` by a module of package
    ``importer`` (both dotted, e.g. ``versemi.inference``)."""
    folder = source_root.joinpath(*importer.split("."))
    found = []
    for path in sorted(folder.rglob("*.py")):
        for line, names in imports(path, source_root):
            hits = [name for name in names if within(name, imported)]
            if hits:
                found.append(f"{path.relative_to(source_root).as_posix()}:{line} imports {hits[0]}")
    return found


def test_prediction_bundles_and_evaluation_do_not_import_training():
    found = [v for reader in ("inference", "bundles", "evaluation")
             for v in violations(f"versemi.{reader}", "versemi.training")]
    assert not found, "read the trained model from versemi.model instead:\n" + "\n".join(found)


def test_the_trained_model_imports_neither_training_nor_its_readers():
    found = [v for other in ("training", "inference", "bundles", "evaluation")
             for v in violations("versemi.model", f"versemi.{other}")]
    assert not found, "\n".join(found)


def test_plans_and_preprocessing_do_not_import_each_other_both_ways():
    forward, backward = violations("versemi.plans", "versemi.preprocessing"), \
        violations("versemi.preprocessing", "versemi.plans")
    assert not (forward and backward), "a cycle between the folders:\n" + "\n".join(forward + backward)


def test_the_checker_reports_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/training/__init__.py": "",
        "pkg/inference/__init__.py": "from ..model import layout\n",
        "pkg/inference/top.py": "import os\nfrom ..training.run import train\nimport pkg.trainingdata\n",
        "pkg/inference/lazy.py": "def f():\n    from pkg.training import trainer\n    from .. import training\n",
        "pkg/inference/deep/nested.py": "from ...training import config\nfrom . import sibling\n",
        "pkg/inference/deep/__init__.py": "from ..training_notes import x\nfrom ...training import budget\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations("pkg.inference", "pkg.training", tmp_path) == [
        "pkg/inference/deep/__init__.py:2 imports pkg.training",
        "pkg/inference/deep/nested.py:1 imports pkg.training",
        "pkg/inference/lazy.py:2 imports pkg.training",
        "pkg/inference/lazy.py:3 imports pkg.training",
        "pkg/inference/top.py:2 imports pkg.training.run",
    ]
    assert violations("pkg.inference", "pkg.model", tmp_path) == ["pkg/inference/__init__.py:1 imports pkg.model"]
