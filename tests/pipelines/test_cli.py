"""The `distill` command line: bad input is one clear message and exit 2 (checked in real
subprocesses), and run / plan / ls / show / lineage / gc work on a real store."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipelines._internal.store import Store
from pipelines.cli import main
from tests.pipelines import toy_stages  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = "import sys; import tests.pipelines.toy_stages; from pipelines.cli import main; sys.exit(main())"


def json_document(stdout: str) -> dict:
    """The ``--json`` document of a ``distill`` run; Ray may print warnings of its own (the
    raylet's "many Python workers started") on the same stream, before or after it."""
    start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
    return json.JSONDecoder().raw_decode(stdout[start:])[0]

GOOD = """
name: cli
seed: 0
stages:
  nums: {kind: test-numbers, config: {n: 12}}
  double: {kind: test-scale, inputs: {numbers: nums}}
  sum: {kind: test-summarize, inputs: {a: double, b: nums}}
"""


def cli(*args, cwd=ROOT):
    """`distill ...` in a fresh interpreter with the test stages registered."""
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


BAD = {
    "malformed": ("stages:\n  nums: {kind: test-numbers\n", [],
                  ["malformed YAML at line"]),
    "unknown_kind": (GOOD.replace("kind: test-scale", "kind: test-scal"), [],
                     ["stage 'double'", "'test-scal'", "did you mean 'test-scale'", "known kinds:"]),
    "unknown_key": (GOOD.replace("{n: 12}", "{nn: 12}"), [],
                    ["stage 'nums' (test-numbers)", "unknown field 'nn'",
                     "allowed fields: api_token, n, sleep"]),
    "bad_value": (GOOD.replace("{n: 12}", "{n: twelve}"), [],
                  ["stage 'nums' (test-numbers)", "field 'n'", "'twelve'", "integer"]),
    "set_missing_field": (GOOD, ["--set", "double.factr=3"],
                          ["--set double.factr=3", "no config field 'factr'",
                           "did you mean 'factor'", "allowed fields: factor, fail"]),
    "missing_stage_input": (GOOD.replace("numbers: nums}", "numbers: numbs}"), [],
                            ["stage 'double' (test-scale)", "'numbs'", "did you mean 'nums'"]),
    "cycle": (GOOD.replace("numbers: nums}", "numbers: triple}")
              + "  triple: {kind: test-scale, inputs: {numbers: double}}\n", [],
              ["cycle", "double -> triple -> double"]),
    "bad_flag": (GOOD, ["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    "force_unknown": (GOOD, ["--force", "dubble"], ["--force", "'dubble'", "did you mean 'double'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_message(tmp_path, case):
    text, extra, expected = BAD[case]
    path = write(tmp_path, text)
    store = tmp_path / "store"
    proc = cli("run", path, "--store", str(store), *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.startswith("error: ")
    for piece in expected:
        assert piece in proc.stderr, (piece, proc.stderr)
    assert Store(str(store)).manifests() == []  # nothing committed


def test_wrong_artifact_type_and_unwritable_store(tmp_path):
    text = GOOD + "  rep: {kind: test-scale, inputs: {numbers: sum}}\n"
    proc = cli("plan", write(tmp_path, text))
    assert proc.returncode == 2
    assert "stage 'rep' (test-scale): input 'numbers' needs a dataset, but 'sum.report' is a report" \
        in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = cli("run", write(tmp_path, GOOD), "--store", str(blocker / "store"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--store: store path" in proc.stderr and "is not writable" in proc.stderr


def test_pipeline_without_stages(tmp_path):
    proc = cli("plan", write(tmp_path, "name: empty\nstages: {}\n"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "field 'stages'" in proc.stderr and "at least 1" in proc.stderr


def test_missing_pipeline_file(tmp_path):
    proc = cli("plan", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def cli_store(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    path = write(d, GOOD)
    return path, str(d / "store")


def test_run_json_then_plan_ls_show_lineage_gc(cli_store, capsys):
    path, store = cli_store
    assert main(["run", path, "--store", store, "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in doc["stages"]] == ["ran"] * 3
    assert set(doc["stages"][0]) == {"name", "kind", "status", "key", "uri", "seconds", "metrics"}
    assert doc["stages"][2]["metrics"]["rows"] == 12

    assert main(["plan", path, "--store", store, "--set", "double.factor=5", "--json"]) == 0
    plan = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert [plan[n]["status"] for n in ("nums", "double", "sum")] == ["cached", "run", "run"]
    assert plan["double"]["reason"] == "config changed: factor 2.0 -> 5.0"

    assert main(["plan", path, "--store", store]) == 0
    out = capsys.readouterr().out
    assert out.count("cached") == 3

    assert main(["ls", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "test-numbers" in out and "numbers:dataset[12 rows]" in out

    sum_key = doc["stages"][2]["key"]
    assert main(["show", sum_key[:10], "--store", store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key"] == sum_key and shown["metrics"]["rows"] == 12

    assert main(["show", doc["run_id"], "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == doc["run_id"]

    assert main(["lineage", sum_key[:10], "--store", store]) == 0
    out = capsys.readouterr().out
    assert "test-summarize" in out and "a <- scaled of test-scale" in out
    assert out.count("test-numbers") == 2  # reached through both inputs

    assert main(["show", "zzzzzz", "--store", store]) == 2
    assert "no artifact key or run id 'zzzzzz'" in capsys.readouterr().err

    assert main(["gc", "--store", store]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["run", path, "--store", store, "--json", "--quiet"]) == 0
    assert [s["status"] for s in json.loads(capsys.readouterr().out)["stages"]] == ["cached"] * 3


def test_failed_stage_exit_code_and_resume_command(cli_store, capsys, tmp_path):
    path, _ = cli_store
    store = str(tmp_path / "s")
    code = main(["run", path, "--store", store, "--quiet", "--set", "double.fail=error",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    statuses = {s["name"]: s["status"] for s in json.loads(out)["stages"]}
    assert statuses == {"nums": "ran", "double": "failed"}  # 'sum' never ran
    assert "stage 'double' failed: RuntimeError: boom in scale" in err
    assert "finished (committed, will be reused): nums" in err
    assert (f"resume with: distill run {path} --store {store} --quiet --set double.fail=error "
            f"--json") in err


def test_resume_command_hides_secret_looking_values():
    from pipelines.cli import _resume_command
    argv = ["run", "p.yaml", "--set", "hub.api_token=sk-1", "--set=hub.password=pw",
            "--set", "student.lr=0.1", "--force", "student", "--set", "tokenizer=bpe"]
    assert _resume_command(argv) == ("distill run p.yaml --set 'hub.api_token=***' "
                                     "'--set=hub.password=***' --set student.lr=0.1 "
                                     "--set tokenizer=bpe")
