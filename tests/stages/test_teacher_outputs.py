import re

import numpy as np
import pytest

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.models.classifiers import load_classifier, predict_logits
from stages.teacher.teacher_outputs import TeacherActor, TeacherOutputs
from tests.stages.conftest import run_stage
from stages.models.classifiers import ARCHITECTURES

ALLOWED = ", ".join(sorted(ARCHITECTURES))  # taken from the code, as the message does


def test_logits_match_the_model_in_process(signal, teacher, digits):
    out, src = signal.to_numpy(), digits.to_numpy()
    assert set(out) == {"id", "x", "label", "split", "logits"}
    assert sorted(out["id"].tolist()) == src["id"].tolist()  # every id exactly once
    order = np.argsort(out["id"])
    for name in ("x", "label", "split"):
        np.testing.assert_array_equal(out[name][order], src[name])
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (1797, 10)
    expected = predict_logits(load_classifier(teacher.path), src["x"]).numpy()
    np.testing.assert_allclose(out["logits"][order], expected, rtol=1e-5, atol=1e-5)
    assert signal.info == {"signal": "logits", "precision": "float32", "num_classes": 10,
                           "input_shape": [1, 8, 8]}


def test_bad_model_folder_fails_before_any_work(tmp_path, digits):
    with pytest.raises(UserError, match=r"stage 'bad' \(teacher-outputs\) input 'model'.*"
                                        + re.escape(ALLOWED)):
        run_stage(TeacherOutputs, {}, tmp_path, "bad",
                  model=type(digits)(path=str(tmp_path / "nope")), data=digits)


def test_precision_is_a_checked_choice():
    with pytest.raises(ValueError, match="'float32' or 'float16'"):
        TeacherOutputs({"precision": "bf16"})


def test_float16_logits(teacher, digits):
    """The precision cast, on the actor class itself (the Ray path is covered above)."""
    batch = digits.to_numpy()
    for array in batch.values():
        array.setflags(write=False)  # Ray Data hands actors read-only views
    out = TeacherActor(teacher, "float16", "test")(batch)
    assert out["logits"].dtype == np.float16 and out["logits"].shape == (1797, 10)
    assert set(out) == {"id", "x", "label", "split", "logits"}
    expected = predict_logits(load_classifier(teacher.path), batch["x"]).numpy()
    np.testing.assert_allclose(out["logits"], expected, rtol=2e-3, atol=2e-2)


def test_data_without_inputs_is_user_error(tmp_path, teacher):
    ctx = StageContext.for_testing(tmp_path, name="nox")
    data = ctx.write_dataset("data", {"id": np.arange(3), "label": np.zeros(3, np.int64)})
    with pytest.raises(UserError, match=r"stage 'nox' \(teacher-outputs\) input 'data'.*'x'"):
        TeacherOutputs({}).run(ctx, model=teacher, data=data)


def test_a_small_pass_runs_in_the_stage_task_with_the_pools_rows(ray_session, tmp_path,
                                                                 signal, teacher, digits):
    """``actors: auto`` on a small pass: no actor pool (metric ``actors`` 0), the same
    columns, types and rows as the pool's pass (the ``signal`` fixture, 2 actors)."""
    outputs, ctx = run_stage(TeacherOutputs, {"batch_size": 200}, tmp_path, "small",
                             model=teacher, data=digits)
    small = outputs["signal"]
    metrics = {k: v for k, v, _ in ctx.board.history_of("small")}
    assert metrics["actors"] == 0 and metrics["teacher_threads"] >= 1
    assert metrics["rows"] == 1797
    a, b = small.to_arrow().sort_by("id"), signal.to_arrow().sort_by("id")
    assert a.schema == b.schema
    for name in ("id", "x", "label", "split"):
        assert a[name].equals(b[name]), name
    mine, pool = small.to_numpy(), signal.to_numpy()
    np.testing.assert_allclose(mine["logits"][np.argsort(mine["id"])],
                               pool["logits"][np.argsort(pool["id"])], rtol=1e-5, atol=1e-5)
    assert small.info == signal.info


def test_in_task_decision():
    from stages.teacher.signals import SMALL_PASS, in_task
    assert in_task("auto", 5000, 10_000, gpus=0, nodes=1)
    assert not in_task(2, 5000, 10_000, gpus=0, nodes=1)          # the user's pool stays
    assert not in_task("auto", 5000, 10_000, gpus=1, nodes=1)     # the pool gets the GPU
    assert not in_task("auto", 5000, 10_000, gpus=0, nodes=3)     # a cluster spreads it
    assert not in_task("auto", int(SMALL_PASS), 2, gpus=0, nodes=1)  # a large pass
