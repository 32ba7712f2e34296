"""The catalog's layout: stage files import only downward (never another stage file), and
no file under ``stages/`` is longer than 350 lines."""

import ast
import os

import stages.catalog  # noqa: F401  registers every kind
from pipelines.stage import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LINES = 350


def stage_modules() -> set[str]:
    """Modules that define a registered ``Stage`` class: the stage files."""
    return {cls.__module__ for cls in registry().values() if cls.__module__.startswith("stages.")}


def imported_modules(path: str, module: str) -> set[str]:
    """Every module a file imports (at any depth: function-level imports too), with
    ``from package import name`` counted as ``package.name`` when that is a module."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .mod import y
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def module_files():
    for folder, _, files in os.walk(os.path.join(ROOT, "stages")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def test_the_catalog_has_stage_files():
    found = stage_modules()
    assert "stages.train.kd_student" in found and "stages.teacher.fit_diffusion_teacher" in found
    assert "stages.train.harness" not in found and "stages.models.diffusion" not in found


def test_no_stage_file_imports_another_stage_file():
    stage_files = stage_modules()
    offenders = []
    for path, module in module_files():
        if module in stage_files:
            for target in sorted(imported_modules(path, module) & (stage_files - {module})):
                offenders.append(f"{module} imports {target}")
    assert not offenders, ("stage files import only downward (shared code goes into a helper "
                           "module beside its family): " + "; ".join(offenders))


def test_the_import_walk_sees_a_stage_file_import(tmp_path):
    """The check itself: an import of a stage file, at module or function level, plain or
    relative, is found."""
    src = ("from stages.teacher.teacher_outputs import TeacherActor\n"
           "def f():\n    import stages.train.kd_student\n"
           "from . import reflow\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    found = imported_modules(str(path), "stages.train.probe")
    assert {"stages.teacher.teacher_outputs", "stages.train.kd_student",
            "stages.train.reflow"} <= found


def test_no_file_under_stages_is_longer_than_the_limit():
    long = {}
    for path, module in module_files():
        with open(path) as f:
            lines = sum(1 for _ in f)
        if lines > MAX_LINES:
            long[module] = lines
    assert not long, f"files above {MAX_LINES} lines: {long}"
