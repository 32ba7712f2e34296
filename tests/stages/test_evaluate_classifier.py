import os
import re

import pytest

from pipelines.errors import UserError
from stages.evaluate.evaluate_classifier import EvaluateClassifier
from stages.models.classifiers import ARCHITECTURES
from tests.stages.conftest import run_stage

ALLOWED = ", ".join(sorted(ARCHITECTURES))  # taken from the code, as the message does

NAMES = {"accuracy", "teacher_accuracy", "agreement", "param_ratio", "speedup",
         "student_latency_ms", "teacher_latency_ms", "student_params", "teacher_params"}


def test_report_of_the_distilled_student(student, teacher, digits, tmp_path):
    outputs, ctx = run_stage(EvaluateClassifier, {"repeats": 5}, tmp_path, "eval",
                             student=student, teacher=teacher, data=digits)
    report = outputs["report"]
    m = report.metrics()
    assert set(m) == NAMES and ctx.metrics == m
    assert 0.8 <= m["accuracy"] <= 1 and 0.95 <= m["teacher_accuracy"] <= 1
    assert 0.8 <= m["agreement"] <= 1
    assert m["param_ratio"] == m["student_params"] / m["teacher_params"] < 0.5
    assert m["student_latency_ms"] > 0 and m["teacher_latency_ms"] > 0
    assert m["speedup"] == pytest.approx(m["teacher_latency_ms"] / m["student_latency_ms"])
    assert {"accuracy.png", "confusion.png"} <= set(os.listdir(report.path))


def test_teacher_against_itself(teacher, digits, tmp_path):
    m = run_stage(EvaluateClassifier, {"repeats": 9}, tmp_path, "self",
                  student=teacher, teacher=teacher, data=digits)[0]["report"].metrics()
    assert m["agreement"] == 1 and m["param_ratio"] == 1
    assert m["accuracy"] == m["teacher_accuracy"]
    assert 0.5 < m["speedup"] < 2  # same model: no real speed-up


def test_bad_student_folder(teacher, digits, tmp_path):
    bad = type(teacher)(path=str(tmp_path / "no-model"))
    with pytest.raises(UserError, match=r"input 'student'.*no-model.*" + re.escape(ALLOWED)):
        run_stage(EvaluateClassifier, {}, tmp_path, "bad", student=bad, teacher=teacher,
                  data=digits)


def test_repeats_below_five_rejected():
    with pytest.raises(ValueError, match="repeats"):
        EvaluateClassifier({"repeats": 3})
