"""What a run hands its users, on a toy student (tests/pipelines/toy_student.py): the
student is an MLflow Model in its own folder, registered once per artifact key, exported
with a model card; the MLflow UI of a store in one command."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient

from pipelines._internal.tracking import default_tracking_uri
from pipelines.cli import main
from tests.pipelines import toy_stages, toy_student  # noqa: F401  (registers the kinds)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = {"numbers": {"kind": "test-numbers", "config": {"n": 10}},
          "student": {"kind": "test-student", "inputs": {"numbers": "numbers"}},
          "evaluate": {"kind": "test-evaluate-student", "inputs": {"student": "student"}},
          "export": {"kind": "export", "inputs": {"model": "student", "report": "evaluate"}}}


def write(tmp_path, name: str, stages: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return str(path)


def distill(capsys, *args) -> tuple[int, str]:
    code = main(["--quiet" if a == "QUIET" else a for a in args])
    return code, capsys.readouterr().err


def fresh_python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


LOAD = """
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(model.predict(pd.DataFrame({"x": [1.0, 5.0]}))["y"].tolist()))
"""


@pytest.fixture(scope="module")
def toy(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    return {"yaml": write(tmp, "toy", STAGES), "store": str(tmp / "store"), "tmp": tmp}


def test_student_is_an_mlflow_model_registered_once_per_artifact(toy, capsys):
    store, uri = toy["store"], default_tracking_uri(toy["store"])
    code, err = distill(capsys, "run", toy["yaml"], "--store", store,
                        "--register", "student=toy-student")
    assert code == 0, err
    assert "student: registered as models:/toy-student/1" in err
    assert json.loads(fresh_python(LOAD, uri, "models:/toy-student/1")) == [2.0, 10.0]

    code, err = distill(capsys, "run", toy["yaml"], "--store", store,   # cached: same version
                        "--register", "student=toy-student")
    assert code == 0 and "already registered as models:/toy-student/1" in err, err
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'toy-student'")] == ["1"]
    code, err = distill(capsys, "run", toy["yaml"], "--store", store, "--set", "student.w=3",
                        "--register", "student=toy-student")
    assert code == 0 and "registered as models:/toy-student/2" in err, err
    assert json.loads(fresh_python(LOAD, uri, "models:/toy-student/2")) == [3.0, 15.0]

    # the version's source is the artifact's own folder: the weights exist once, in the store
    versions = {str(v.version): v for v in client.search_model_versions("name = 'toy-student'")}
    v1 = versions["1"]
    assert v1.source.startswith(os.path.join(store, "test-student"))
    assert {"MLmodel", "model.safetensors", "requirements.txt"} <= set(os.listdir(v1.source))
    weights = [os.path.join(d, f) for d, _, fs in os.walk(store) for f in fs
               if f == "model.safetensors" and "_staging" not in d]
    assert sorted(os.path.relpath(w, store).split(os.sep)[0] for w in weights) == [
        "export", "export", "test-student", "test-student"]  # 2 students, 2 exports
    assert len({os.stat(w).st_ino for w in weights}) == 2  # each export links its student
    manifest = json.load(open(os.path.join(os.path.dirname(v1.source), "manifest.json")))
    assert "MLmodel" in [f["path"] for f in manifest["outputs"]["model"]["files"]]

    # the stage's run: its inputs as MLflow datasets, the student as an external model
    run = client.get_run(v1.run_id)
    inputs = run.inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["numbers.numbers"]
    assert json.loads(inputs[0].dataset.source)["content"].startswith(inputs[0].dataset.digest)
    models = client.search_logged_models([run.info.experiment_id])
    assert {m.source_run_id for m in models} >= {v1.run_id}
    assert all(m.tags["distillery.uri"].startswith(store) for m in models)


def test_export_stage_and_command_write_a_model_card(toy, capsys):
    store = toy["store"]  # made by the test above
    folder = os.path.join(store, "export")
    exported = os.path.join(toy["tmp"], "exported")
    code, err = distill(capsys, "export", toy["yaml"], "student", "--to", exported,
                        "--store", store)
    assert code == 0, err
    card = ModelCard.load(os.path.join(exported, "README.md"))
    assert card.data.library_name == "pytorch" and card.data.tags[0] == "distillation"
    assert card.data.tags[1] == "toy" and "nobody 2026" in card.text
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "error": 1.0, "speedup": 2.0}
    assert "teacher_error" in card.text and "test-numbers" in card.text  # lineage, configs
    assert json.loads(fresh_python(LOAD, "sqlite://", exported)) == [2.0, 10.0]
    assert os.stat(os.path.join(exported, "model.safetensors")).st_nlink == 1  # a copy: the user's
    # the export stage's own artifact holds the same card
    committed = [os.path.join(folder, k, "folder", "README.md") for k in os.listdir(folder)]
    assert len(committed) == 2  # one per student
    assert all(ModelCard.load(p).data.eval_results for p in committed)

    alone = write(toy["tmp"], "toy", {k: STAGES[k] for k in ("numbers", "student")})
    plain = os.path.join(toy["tmp"], "plain")
    assert distill(capsys, "export", alone, "student", "--to", plain, "--store", store)[0] == 0
    assert "Not evaluated" in open(os.path.join(plain, "README.md")).read()
    assert not ModelCard.load(os.path.join(plain, "README.md")).data.eval_results


@pytest.mark.parametrize("args, message", [
    (["export", "stuent", "--to", "X"], "stage 'stuent' is not in pipeline 'toy' (did you mean "
                                        "'student'?); stages that make a student: student"),
    (["export", "numbers", "--to", "X"], "stage 'numbers' (test-numbers) makes no student"),
    (["export", "student", "--to", "X", "--set", "student.w=7"],
     "has no committed artifact for this pipeline"),
    (["export", "student", "--to", "NONEMPTY"], "exists and is not an empty folder"),
    (["run", "--register", "numbers=x"], "only a student can be registered"),
    (["run", "--register", "studnt=x"], "did you mean 'student'?"),
    (["run", "--register", "student=a/b"], "register: name 'a/b' is rejected by MLflow"),
    (["run", "--register", "student"], "allowed: STAGE=NAME"),
])
def test_bad_input_gets_one_clear_error(toy, capsys, args, message):
    nonempty = toy["tmp"] / "nonempty"
    nonempty.mkdir(exist_ok=True)
    (nonempty / "f").write_text("x")
    args = [str(nonempty) if a == "NONEMPTY" else str(toy["tmp"] / "x") if a == "X" else a
            for a in args]
    code, err = distill(capsys, args[0], toy["yaml"], *args[1:], "--store", toy["store"])
    assert code == 2 and message in err and "Traceback" not in err, err


def test_an_unavailable_registry_is_refused_before_anything_runs(toy, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    store = str(toy["tmp"] / "unregistered")
    code, err = distill(capsys, "run", toy["yaml"], "--store", store,
                        "--register", "student=toy-student", "QUIET")
    assert code == 2 and "Model Registry at 'http://127.0.0.1" in err, err
    assert "MLFLOW_REGISTRY_URI" in err and not os.path.exists(os.path.join(store, "test-student"))


def test_ui_serves_the_store_and_refuses_what_it_cannot_serve(toy, capsys, tmp_path):
    if not os.path.exists(default_tracking_uri(toy["store"])[len("sqlite:///"):]):
        assert distill(capsys, "run", toy["yaml"], "--store", toy["store"], "QUIET")[0] == 0
    code, err = distill(capsys, "ui", "--store", str(tmp_path))
    assert code == 2 and "has no tracking database" in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = distill(capsys, "ui", "--store", toy["store"], "--port", str(port))
        assert code == 2 and f"--port {port}" in err and "free port" in err, err
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--store",
                             toy["store"], "--port", str(port)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.time() + 300  # mlflow's server starts slowly on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "the UI never answered"
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_base_model_is_the_teachers_own_hub_id(tmp_path):
    """A copied Hub repository names itself in its card's usage code; its config's
    _name_or_path (the id it was fine-tuned from) only when the card names none."""
    from pipelines.export import base_model
    teacher = {"kind": "pretrained-model", "key": "ab" * 32}
    (tmp_path / "config.json").write_text('{"_name_or_path": "org/parent"}')
    assert base_model(teacher, str(tmp_path)) == "org/parent"
    (tmp_path / "README.md").write_text(
        "# m\n```python\nmodel = SentenceTransformer('org/self')\n"
        "tok = AutoTokenizer.from_pretrained( \"org/self\")\n"
        "other = AutoModel.from_pretrained('org/parent')\n```\n")
    assert base_model(teacher, str(tmp_path)) == "org/self"
    assert base_model(teacher, str(tmp_path / "missing")) == "distillery:pretrained-model/abababababab"
    assert base_model(None, None) == "unknown"
