"""Every example pipeline in examples/ loads and validates (kinds, fields, wiring), with
and without the overrides that shrink it; the plan of a fresh store runs every stage.
Running them is the e2e tests' and the benchmarks' business."""

import glob
import os

import pytest

from pipelines import Pipeline, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))
SHRINK = {
    "kd_embeddings.yaml": ["corpus.max_rows=200", "student.epochs=1"],
    "kd_lm.yaml": ["corpus.max_rows=200", "teacher.epochs=1", "student_kd.epochs=1",
                   "student_ce.epochs=1"],
}


def test_there_are_examples():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"quickstart.yaml", "kd_mnist1d.yaml", "kd_embeddings.yaml", "kd_lm.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_validates_and_plans(path, tmp_path):
    pipeline = Pipeline.from_yaml(path, SHRINK.get(os.path.basename(path), ()))
    pipeline.validate()
    (tmp_path / "store").mkdir()
    decided = plan(pipeline, store=str(tmp_path / "store"))
    assert decided.to_run() == pipeline.order()  # a fresh store runs everything, in order


def test_text_examples_name_the_stages_users_rely_on():
    lm = Pipeline.from_yaml(os.path.join(ROOT, "examples", "kd_lm.yaml"))
    assert {"student_kd", "student_ce", "eval_kd", "eval_ce"} <= set(lm.nodes)
    emb = Pipeline.from_yaml(os.path.join(ROOT, "examples", "kd_embeddings.yaml"))
    assert emb.nodes["eval"].kind == "evaluate-embeddings"
    assert emb.nodes["student"].stage.config.teacher_layers == [0, 5]
    # text students are made from their teacher: it is a declared input, never a path
    for p, students in ((lm, ("student_kd", "student_ce")), (emb, ("student",))):
        for name in students:
            assert p.nodes[name].inputs["teacher"] == ("teacher", "model"), name


def test_the_plugin_example_needs_its_package():
    """examples/plugin/ is a package of its own (tests/pipelines/test_plugins.py installs it
    and runs its pipeline): the pipeline validates where the package is installed, and
    elsewhere fails on its plugin kind, by name, before anything runs."""
    from pipelines._internal import plugins
    from pipelines.errors import UserError
    path = os.path.join(ROOT, "examples", "plugin", "standardize_digits.yaml")
    assert path not in EXAMPLES
    if "standardize-column" in plugins.kinds():
        Pipeline.from_yaml(path).validate()
    else:
        with pytest.raises(UserError, match="stage 'scaled': unknown stage kind "
                                            "'standardize-column'"):
            Pipeline.from_yaml(path)
