"""Stage kinds from entry points (group ``distillery.stages``): a real plugin package
installed with ``pip install -e`` into a throw-away environment runs in a pipeline and is
listed by ``distill kinds``; fake entry points show lazy loading and every bad entry point
as one clear error; the catalog's entry points are exactly the kinds ``stages/`` defines."""

import ast
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata

import numpy as np
import pytest

from pipelines._internal import plugins
from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.stage import get_stage_class, registry, unregister

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, "examples", "plugin")


# -- a real plugin, installed ----------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """A venv that sees the project's packages (a ``.pth`` adding its site-packages as a
    site dir) plus the example plugin, installed editable there: the project's own venv
    is left untouched. Offline: no index, no build isolation, no dependencies."""
    tmp = tmp_path_factory.mktemp("plugin-env")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True)
    parent = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib.stdout.strip(), "_distillery_parent.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({parent!r})\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-build-isolation", "-e", PLUGIN],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    return python, tmp


def distill(python, *args, cwd):
    """``distill ARGS`` in the plugin's environment, from a folder outside the repository
    (its ``*.egg-info``, if any, is not on the path there)."""
    return subprocess.run([python, "-m", "pipelines.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def json_document(stdout: str):
    """The JSON document of ``--json``; Ray may print warnings of its own around it."""
    start = min(i for i in (stdout.find("{"), stdout.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


@pytest.mark.e2e
def test_an_installed_plugin_runs_in_a_pipeline_and_is_listed(plugin_env):
    python, tmp = plugin_env
    store = tmp / "store"
    ran = distill(python, "run", os.path.join(PLUGIN, "standardize_digits.yaml"),
                  "--store", str(store), "--json", "--quiet", cwd=tmp)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = {s["name"]: s for s in json_document(ran.stdout)["stages"]}
    assert result["scaled"]["kind"] == "standardize-column" and result["scaled"]["status"] == "ran"
    assert result["scaled"]["metrics"]["stats_rows"] == 1437  # the train split's rows

    from pipelines._internal.store import Store
    s = Store.open(str(store), create=False)
    by_kind = {m["kind"]: m for m in s.manifests()}
    before = s.open_input(by_kind["load-digits"], "data").to_numpy()
    after = s.open_input(by_kind["standardize-column"], "data").to_numpy()
    order = np.argsort(after["id"])
    after = {k: v[order] for k, v in after.items()}
    assert (after["label"] == before["label"]).all() and (after["split"] == before["split"]).all()
    x = before["x"].reshape(len(before["x"]), -1).astype(np.float64)
    train = x[before["split"] == "train"]
    expected = (x - train.mean(0)) / (train.std(0) + 1e-6)
    np.testing.assert_allclose(after["x"].reshape(len(x), -1), expected, rtol=1e-4, atol=1e-4)
    assert s.open_input(by_kind["standardize-column"], "data").info["num_classes"] == 10

    listed = distill(python, "kinds", "--json", cwd=tmp)
    assert listed.returncode == 0, listed.stderr
    rows = {r["kind"]: r for r in json.loads(listed.stdout)}
    assert rows["standardize-column"] == {
        "kind": "standardize-column", "package": "distillery-plugin-example", "version": "0.1.0",
        "object": "distillery_plugin_example.standardize:StandardizeColumn"}
    assert rows["load-digits"]["package"] == "distillery"
    text = distill(python, "kinds", cwd=tmp).stdout
    assert "standardize-column" in text and "distillery-plugin-example 0.1.0" in text


# -- fake entry points ------------------------------------------------------------------
FAKE = """
from pipelines.stage import Dataset, Stage, StageConfig

class {cls}(Stage):
    kind = {kind!r}
    version = "1"
    outputs = {{"data": Dataset}}

def not_a_stage():
    pass
"""


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """``install(package, version, kind=value, ...)`` declares fake entry points; modules
    ``fake_*`` written with ``module(name, cls, kind)`` import from ``tmp_path``. Every
    kind the test registered and every fake module is gone afterwards."""
    declared: list = []
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points", lambda: list(declared))
    plugins.refresh()

    def module(name: str, cls: str, kind: str) -> None:
        (tmp_path / f"{name}.py").write_text(FAKE.format(cls=cls, kind=kind))

    def install(package: str, version: str, **kinds: str) -> None:
        for kind, value in kinds.items():
            ep = metadata.EntryPoint(kind.replace("_", "-"), value, plugins.GROUP)
            declared.append((ep, package, version))
        plugins.refresh()

    yield module, install
    for ep, _, _ in declared:
        unregister(ep.name)
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]
    for kind in ("fake-other", "fake-direct"):
        unregister(kind)
    plugins.refresh()


def test_a_kind_loads_only_its_own_module(fake_plugins):
    module, install = fake_plugins
    module("fake_a", "A", "fake-a")
    module("fake_b", "B", "fake-b")
    install("fake-pkg", "1.0", fake_a="fake_a:A", fake_b="fake_b:B")
    assert "fake_a" not in sys.modules and "fake_b" not in sys.modules
    cls = get_stage_class("fake-a")
    assert cls.__name__ == "A" and "fake_a" in sys.modules and "fake_b" not in sys.modules
    with pytest.raises(UserError) as e:  # known kinds come from names, not imports
        get_stage_class("fake-c", "stage 'x'")
    msg = str(e.value)
    assert msg.startswith("stage 'x': unknown stage kind 'fake-c'") and "fake-b" in msg
    assert "did you mean" in msg and "fake_b" not in sys.modules
    assert set(registry()) >= {"fake-a", "fake-b"} and "fake_b" in sys.modules


def test_an_entry_point_that_does_not_resolve_names_kind_value_and_package(fake_plugins):
    module, install = fake_plugins
    module("fake_c", "C", "fake-c")
    install("fake-pkg", "1.2", fake_gone="fake_gone_module:X", fake_c="fake_c:Missing")
    with pytest.raises(UserError) as e:
        get_stage_class("fake-gone", "stage 'g'")
    msg = str(e.value)
    for part in ("stage 'g'", "'fake-gone'", "fake_gone_module:X", "fake-pkg 1.2",
                 "ModuleNotFoundError", "fake_gone_module"):
        assert part in msg, msg
    with pytest.raises(UserError, match=r"'fake-c = fake_c:Missing' of fake-pkg 1\.2\) does not "
                                        r"load: AttributeError"):
        get_stage_class("fake-c")


def test_an_entry_point_must_name_a_stage_of_its_own_kind(fake_plugins):
    module, install = fake_plugins
    module("fake_d", "D", "fake-other")
    install("fake-pkg", "2.0", fake_fn="fake_d:not_a_stage", fake_d="fake_d:D")
    with pytest.raises(UserError, match="not a subclass of pipelines.Stage"):
        get_stage_class("fake-fn")
    with pytest.raises(UserError) as e:
        get_stage_class("fake-d")
    assert "whose kind is 'fake-other'" in str(e.value) and "fake_d.D" in str(e.value)


def test_two_packages_claiming_one_kind_is_an_error_naming_both(fake_plugins, capsys):
    module, install = fake_plugins
    module("fake_e", "E", "fake-e")
    install("fake-one", "1.0", fake_e="fake_e:E")
    install("fake-two", "3.1", fake_e="fake_e:E")
    with pytest.raises(UserError) as e:
        get_stage_class("fake-e", "stage 'e'")
    msg = str(e.value)
    assert "stage 'e': stage kind 'fake-e' is claimed by 2 installed packages" in msg
    assert "fake-one 1.0" in msg and "fake-two 3.1" in msg
    assert main(["kinds"]) == 2
    out, err = capsys.readouterr()
    assert "fake-one 1.0" in out and "fake-two 3.1" in out and "claimed by 2" in err


def test_a_class_defined_directly_is_usable_without_an_entry_point(fake_plugins):
    from pipelines.stage import Dataset, Stage

    class Direct(Stage):
        kind = "fake-direct"
        version = "1"
        outputs = {"data": Dataset}

    assert get_stage_class("fake-direct") is Direct and registry()["fake-direct"] is Direct


def test_distill_kinds_lists_and_checks_the_entry_points(fake_plugins, capsys):
    module, install = fake_plugins
    module("fake_f", "F", "fake-f")
    install("fake-pkg", "0.3", fake_f="fake_f:F", fake_bad="fake_nowhere:X")
    assert main(["kinds", "--json"]) == 0  # listing imports nothing
    rows = json.loads(capsys.readouterr().out)
    assert {"kind": "fake-f", "package": "fake-pkg", "version": "0.3",
            "object": "fake_f:F"} in rows and "fake_f" not in sys.modules
    assert main(["kinds", "--check"]) == 2
    out, err = capsys.readouterr()
    assert "fake-bad" in out and "error: distill kinds --check: stage kind 'fake-bad'" in err
    assert "fake-f" not in err and "fake_f" in sys.modules


# -- the catalog's own entry points -------------------------------------------------------
def catalog_kinds() -> dict[str, str]:
    """kind -> 'module:Class' of every class under stages/ that sets ``kind``, from source."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "stages")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in tree.body:
                for st in node.body if isinstance(node, ast.ClassDef) else ():
                    if (isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant)
                            and any(getattr(t, "id", None) == "kind" for t in st.targets)):
                        found[st.value.value] = f"{module.removesuffix('.__init__')}:{node.name}"
    return found


def test_the_entry_points_list_exactly_the_catalog_kinds():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"][plugins.GROUP]
    defined = catalog_kinds()
    assert len(defined) >= 20
    missing = {k: v for k, v in defined.items() if declared.get(k) != v}
    extra = sorted(set(declared) - set(defined))
    assert not missing, ("stage classes without their entry point: add these lines to "
                         f"[project.entry-points.\"{plugins.GROUP}\"] in pyproject.toml:\n"
                         + "\n".join(f'{k} = "{v}"' for k, v in sorted(missing.items())))
    assert not extra, f"entry points naming no stage class under stages/: {extra}"
    installed = {ep.name: ep.value for ep in metadata.distribution("distillery").entry_points
                 if ep.group == plugins.GROUP}
    assert installed == declared, ("the installed metadata is stale: reinstall "
                                   "(`make install`, or `pip install -e .`)")
