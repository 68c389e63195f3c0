"""The package's shape, read from its source with `ast` (nothing imported, nothing run): the rules the redesign set.

Counted as ../shared/tools/structure.py counts them: a module's imports are every `import` / `from … import` in it
(at the top or inside functions); `from minidit.x import y` is an edge to minidit.x.y when that is a module, else to
minidit.x; relative imports are resolved. A failure names the module, line and import that break the rule.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minidit"
SIDE = ("grading", "assignments", "variants")  # beside the teaching package: instructors' tools, experiments
TEACHING_PATH = ("tokens", "embed", "attention", "models")  # DiT's own modules
NO_VARIANTS = (*TEACHING_PATH, "flow", "guidance", "train")  # these never import minidit.variants
MAX_LOCAL_IMPORTS, MAX_DIT_PATH_LINES, MAX_CORE_LINES = 10, 700, 4000


@dataclass
class Import:
    module: str  # the importing module
    target: str  # the package module imported
    name: str | None  # the name taken from it (`from target import name`), None for `import target`
    line: int
    top: bool  # at module level (runs when the module is imported)
    local: bool  # inside a function

    def __str__(self) -> str:
        what = f"from {self.target} import {self.name}" if self.name else f"import {self.target}"
        return f"{self.module}:{self.line} ({what})"


@dataclass
class Package:
    files: dict[str, Path] = field(default_factory=dict)
    trees: dict[str, ast.Module] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    local_import_count: int = 0  # structure.py's count: per function, nested functions counted again


def module_name(f: Path) -> str:
    name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def is_side(name: str) -> bool:
    return any(name == f"minidit.{s}" or name.startswith(f"minidit.{s}.") for s in SIDE)


def read_package() -> Package:
    pkg = Package()
    for f in sorted(PACKAGE.rglob("*.py")):
        name = module_name(f)
        pkg.files[name], pkg.trees[name] = f, ast.parse(f.read_text(), str(f))
        pkg.lines[name] = len(f.read_text().splitlines(keepends=True))
    for name, tree in pkg.trees.items():
        parent = name if pkg.files[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = parent.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [(base, a.name) for a in node.names]
            else:
                continue
            for mod, nm in targets:
                full = f"{mod}.{nm}" if nm and f"{mod}.{nm}" in pkg.files else mod
                if full in pkg.files and full != name:
                    pkg.imports.append(Import(name, full, nm if full == mod else None, node.lineno,
                                              node in tree.body, id(node) in in_function))
        for node in ast.walk(tree):  # as structure.py counts: every function's imports of the package
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        m = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                        pkg.local_import_count += (m or "").startswith("minidit") or bool(getattr(sub, "level", 0))
    return pkg


@pytest.fixture(scope="module")
def pkg() -> Package:
    return read_package()


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a closed path."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def dit_module(pkg: Package) -> str:
    mods = [n for n, t in pkg.trees.items() if not is_side(n)
            and any(isinstance(c, ast.ClassDef) and c.name == "DiT" for c in t.body)]
    assert len(mods) == 1, f"expected one core module defining class DiT, found {mods}"
    return mods[0]


def dit_path(pkg: Package) -> set[str]:
    """DiT's module and the package modules it imports at module level, transitively."""
    path, todo = set(), [dit_module(pkg)]
    while todo:
        v = todo.pop()
        if v not in path:
            path.add(v)
            todo += [i.target for i in pkg.imports if i.module == v and i.top and i.target != "minidit"]
    return path


# ---- the rules -------------------------------------------------------------------------------------------------
def subpackage(module: str) -> str:
    """'grading' for minidit.grading.grader, '' for minidit itself."""
    return (module.split(".") + [""])[1]


def test_the_reader_sees_every_module(pkg):
    assert {"minidit.cli", "minidit.variants.speed", *(f"minidit.{m}" for m in NO_VARIANTS)} <= set(pkg.files)
    assert pkg.imports and any(i.top for i in pkg.imports)  # the walk finds imports at all


def test_no_import_cycles(pkg):
    edges: dict[str, set[str]] = {}
    for i in pkg.imports:
        edges.setdefault(i.module, set()).add(i.target)
    cycles = find_cycles(edges)
    detail = [" ⇄ ".join(c) + ": " + "; ".join(str(i) for i in pkg.imports if i.module in c and i.target in c)
              for c in cycles]
    assert not cycles, "import cycles between package modules:\n" + "\n".join(detail)


def test_no_private_names_imported_across_modules(pkg):
    bad = [str(i) for i in pkg.imports if i.name and i.name.startswith("_") and not i.name.startswith("__")]
    assert not bad, "private names imported from another package module:\n" + "\n".join(bad)


def test_imports_of_the_package_are_at_module_top(pkg):
    local = [str(i) for i in pkg.imports if i.local]
    assert pkg.local_import_count <= MAX_LOCAL_IMPORTS, (
        f"{pkg.local_import_count} function-local imports of package modules (at most {MAX_LOCAL_IMPORTS}):\n"
        + "\n".join(local))


def test_only_the_cli_dispatches_to_grading_and_assignments(pkg):
    bad = [str(i) for i in pkg.imports if subpackage(i.target) in ("grading", "assignments")
           and i.module != "minidit.cli" and subpackage(i.module) not in ("grading", "assignments")]
    assert not bad, "only minidit.cli may import minidit.grading / minidit.assignments:\n" + "\n".join(bad)


def test_the_teaching_path_flow_guidance_and_trainer_never_import_variants(pkg):
    never = {f"minidit.{m}" for m in NO_VARIANTS} | dit_path(pkg)
    bad = [str(i) for i in pkg.imports if i.module in never and i.target.startswith("minidit.variants")]
    assert not bad, "these modules must not import minidit.variants:\n" + "\n".join(bad)


def test_dit_forward_has_at_most_one_branch(pkg):
    tree = pkg.trees[dit_module(pkg)]
    dit = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "DiT")
    forward = next(f for f in dit.body if isinstance(f, ast.FunctionDef) and f.name == "forward")
    ifs = [n.lineno for n in ast.walk(forward) if isinstance(n, (ast.If, ast.IfExp))]
    assert len(ifs) <= 1, f"DiT.forward ({dit_module(pkg)}:{forward.lineno}) branches {len(ifs)} times, at lines {ifs}"


def test_dit_path_is_short(pkg):
    path = dit_path(pkg)
    assert {"minidit.models", "minidit.tokens", "minidit.embed", "minidit.attention"} <= path
    total = sum(pkg.lines[m] for m in path)
    per_module = ", ".join(f"{m} {pkg.lines[m]}" for m in sorted(path, key=pkg.lines.get, reverse=True))
    assert total <= MAX_DIT_PATH_LINES, f"DiT's path is {total} lines (at most {MAX_DIT_PATH_LINES}): {per_module}"


def test_core_package_size(pkg):
    core = {m: n for m, n in pkg.lines.items() if not is_side(m)}
    total = sum(core.values())
    largest = ", ".join(f"{m} {n}" for m, n in sorted(core.items(), key=lambda kv: -kv[1])[:8])
    assert total <= MAX_CORE_LINES, (f"the core package (all but {', '.join(SIDE)}) is {total} lines (at most "
                                     f"{MAX_CORE_LINES}); largest: {largest}")


# ---- the checker itself ----------------------------------------------------------------------------------------
def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    """A made-up package with one of each offence: every rule fires, and names the offender."""
    fake = tmp_path / "minidit"
    (fake / "variants").mkdir(parents=True)
    (fake / "grading").mkdir()
    files = {
        "__init__.py": "",
        "tokens.py": "from minidit.variants.speed import fast\n",
        "models.py": "from minidit.tokens import _private\nimport minidit.embed\n"
                     "class DiT:\n    def forward(self, x):\n        if x:\n            x = 1\n"
                     "        return 2 if x else 3\n",
        "embed.py": "from minidit.models import DiT\n",
        "train.py": "def f():\n" + "".join(f"    from minidit.models import x{i}\n" for i in range(11)),
        "data.py": "from minidit.grading import grader\n",
        "variants/__init__.py": "",
        "variants/speed.py": "",
        "grading/__init__.py": "",
        "grading/grader.py": "",
    }
    for name, text in files.items():
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    bad = read_package()
    checks = {test_no_import_cycles: "minidit.embed ⇄ minidit.models",
              test_no_private_names_imported_across_modules: "minidit.models:1 (from minidit.tokens import _private)",
              test_imports_of_the_package_are_at_module_top: "11 function-local imports",
              test_only_the_cli_dispatches_to_grading_and_assignments: "minidit.data:1 (import minidit.grading.grader)",
              test_the_teaching_path_flow_guidance_and_trainer_never_import_variants: "minidit.tokens:1",
              test_dit_forward_has_at_most_one_branch: "branches 2 times, at lines [5, 7]"}
    for check, offender in checks.items():
        with pytest.raises(AssertionError) as e:
            check(bad)
        assert offender in str(e.value), (check.__name__, str(e.value))
