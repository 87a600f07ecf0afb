"""The folder layout is the architecture: each part imports only the parts below it (README, "Layout").

Every import counts, also one inside a function: a lazy import still makes the lower layer depend on the upper one.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# part -> the parts it may import (besides itself). Lower layers first.
BASE = {"fashionbert.errors", "fashionbert.logs"}  # what every part may import
ALLOWED = {
    "schemas": set(),
    "fashionbert.errors": set(),
    "fashionbert.logs": set(),
    "fashionbert.runtime": BASE,
    "fashionbert.model": BASE | {"fashionbert.runtime"},
    "fashionbert.data": BASE | {"fashionbert.runtime", "fashionbert.model", "schemas"},
    "fashionbert.rank": BASE | {"fashionbert.runtime", "fashionbert.model", "fashionbert.data", "schemas"},
    "fashionbert.evaluation": BASE | {"fashionbert.runtime", "fashionbert.model", "fashionbert.data", "fashionbert.rank",
                                      "schemas"},
    "fashionbert.train": BASE | {"fashionbert.runtime", "fashionbert.model", "fashionbert.data", "fashionbert.rank",
                                 "fashionbert.evaluation", "schemas"},
    # The Beam featurizer needs the patch CNN, the tokenizer, atomic publishing and the synthetic catalog; the Beam
    # retrieve and score-pairs run rank's scorers in their workers. Nothing that trains or evaluates.
    "pipelines": BASE | {"fashionbert.runtime", "fashionbert.model", "fashionbert.data", "fashionbert.rank", "schemas"},
    "fashionbert.commands": BASE | {"fashionbert.runtime", "fashionbert.model", "fashionbert.data", "fashionbert.rank",
                                    "fashionbert.evaluation", "fashionbert.train", "pipelines", "schemas"},
}
# fashionbert/__init__.py registers the model with transformers' Auto classes: the package root may import model/.
PACKAGE_ROOT_ALLOWED = {"fashionbert.model", "fashionbert.errors"}


def part_of(module: str) -> str | None:
    pieces = module.split(".")
    if pieces[0] == "fashionbert":
        return "fashionbert." + pieces[1] if len(pieces) > 1 else "fashionbert"
    if pieces[0] in ("pipelines", "schemas"):
        return pieces[0]
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            # `from fashionbert import model` names a sub-package
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if part_of(base) == "fashionbert"]
    return found


def layering_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for top in ("fashionbert", "pipelines", "schemas"):
        for path in sorted((root / top).rglob("*.py")):
            source = part_of(module_name(path, root))
            allowed = PACKAGE_ROOT_ALLOWED if source == "fashionbert" else ALLOWED[source]
            for line, module in imported_modules(path, root):
                target = part_of(module)
                if target is None or target in (source, "fashionbert"):
                    continue
                if target not in allowed:
                    bad.append(f"{path.relative_to(root)}:{line} ({source}) imports {module} ({target})")
    return bad


def test_every_part_imports_only_the_parts_below_it():
    assert layering_violations() == []


def test_every_part_is_in_the_table():
    parts = {part_of(module_name(p)) for top in ("fashionbert", "pipelines", "schemas")
             for p in (ROOT / top).rglob("*.py")}
    assert parts - {"fashionbert"} <= set(ALLOWED), "a new sub-package needs its row in ALLOWED (and the README)"


def test_the_check_catches_an_upward_import(tmp_path):
    for top in ("fashionbert/model", "fashionbert/train", "pipelines", "schemas"):
        (tmp_path / top).mkdir(parents=True, exist_ok=True)
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "fashionbert" / "__init__.py").write_text("")
    (tmp_path / "fashionbert/model/modeling.py").write_text("def f():\n    from fashionbert.train import trainer\n")
    (tmp_path / "pipelines/featurize.py").write_text("import numpy\nfrom fashionbert import train\n")
    (tmp_path / "fashionbert/model/config.py").write_text("from . import modeling\nfrom ..train import trainer\n")
    bad = layering_violations(tmp_path)
    assert any("fashionbert/model/modeling.py:2" in b and "fashionbert.train" in b for b in bad)
    assert any("pipelines/featurize.py:2" in b and "fashionbert.train" in b for b in bad)
    assert any("fashionbert/model/config.py:2" in b and "imports fashionbert.train " in b for b in bad)
    assert len(bad) == 3
