"""The core's import graph: ``import pipelines`` is light (no torch, no stage module), no
module of ``pipelines`` imports ``stages`` (kinds come from entry points), and the
module-level imports inside ``pipelines`` have no cycle."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "stages", "transformers", "diffusers")


def modules(package: str = "pipelines") -> dict[str, str]:
    """Dotted module name -> file, for every module of ``package``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def imports(path: str, module: str, known: set[str], top_level_only: bool) -> set[str]:
    """The modules a file imports, ``from package import name`` counted as
    ``package.name`` when that is one of ``known``. ``top_level_only``: the imports run
    when the module is imported (module level, under ``if``/``try``, not under
    ``if TYPE_CHECKING``); else every import, functions' included."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: set[str] = set()

    def add(node) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)

    def walk(body) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody,
                              *(h.body for h in node.handlers)):
                    walk(block)
            else:
                add(node)

    if top_level_only:
        walk(tree.body)
    else:
        for node in ast.walk(tree):
            add(node)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports(p, m, set(mods), True) if t in mods and t != m}
            for m, p in mods.items()}


def cycle(g: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a path (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_pipelines_imports_no_torch_and_no_stage():
    probe = ("import sys, pipelines, pipelines.cli, pipelines.stage\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"`import pipelines` imported: {out.stdout}"


def test_no_module_of_pipelines_imports_stages():
    mods = modules()
    offenders = sorted(f"{m} imports {t}" for m, p in mods.items()
                       for t in imports(p, m, set(mods), False)
                       if t == "stages" or t.startswith("stages."))
    assert not offenders, ("the core finds stage kinds through entry points and never imports "
                           "the catalog: " + "; ".join(offenders))


def test_the_module_level_imports_of_pipelines_have_no_cycle():
    found = cycle(graph())
    assert not found, ("an import cycle inside pipelines (import one side inside the "
                       "function that needs it): " + " -> ".join(found))


def test_the_checks_see_an_import_of_stages_and_a_cycle(tmp_path):
    """The checks themselves: a function-level ``import stages...`` and a relative
    ``from .`` import are found, ``TYPE_CHECKING`` imports are not, and a cycle is."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nfrom . import stage\n"
                     "if TYPE_CHECKING:\n    from .pipeline import Pipeline\n"
                     "def f():\n    import stages.catalog\n    from .cli import main\n")
    known = {"pipelines.stage", "pipelines.pipeline", "pipelines.cli"}
    every = imports(str(probe), "pipelines.probe", known, False)
    top = imports(str(probe), "pipelines.probe", known, True)
    assert {"stages.catalog", "pipelines.stage", "pipelines.cli"} <= every
    assert "pipelines.stage" in top and not top & {"stages.catalog", "pipelines.pipeline",
                                                   "pipelines.cli"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert "pipelines.stage" in graph()["pipelines.pipeline"]  # the real graph is walked
