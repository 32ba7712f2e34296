"""Artifacts shared by the stage tests, built once per session by the real stages:
digits -> teacher (fit-classifier) -> signal (teacher-outputs) -> student (kd-student)."""

import pytest

from pipelines.context import StageContext


def run_stage(cls, config, root, name, seed=0, **inputs):
    """Run a stage directly, as a unit test does; returns (outputs, ctx)."""
    ctx = StageContext.for_testing(root, name=name, kind=cls.kind, seed=seed)
    return cls(config).run(ctx, **inputs), ctx


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from stages.data.digits import LoadDigits
    return run_stage(LoadDigits, {}, tmp_path_factory.mktemp("digits"), "digits")[0]["data"]


@pytest.fixture(scope="session")
def teacher_run(digits, tmp_path_factory):
    from stages.teacher.fit_classifier import FitClassifier
    return run_stage(FitClassifier, {}, tmp_path_factory.mktemp("teacher"), "teacher",
                     data=digits)


@pytest.fixture(scope="session")
def teacher(teacher_run):
    return teacher_run[0]["model"]


@pytest.fixture(scope="session")
def signal(ray_session, teacher, digits, tmp_path_factory):
    from stages.teacher.teacher_outputs import TeacherOutputs
    return run_stage(TeacherOutputs, {"actors": 2, "batch_size": 200},
                     tmp_path_factory.mktemp("signal"), "signal",
                     model=teacher, data=digits)[0]["signal"]


KD_CONFIG = {"temperature": 4.0, "alpha": 0.9}


@pytest.fixture(scope="session")
def kd_runs(ray_session, signal, tmp_path_factory):
    """kd-student run twice on the same work dir and key, as a retried attempt would be:
    first for 2 epochs, then for 5; the second run must resume after epoch 1."""
    from stages.train.kd_student import KDStudent
    ctx = StageContext.for_testing(tmp_path_factory.mktemp("kd"), name="kd", kind="kd-student")
    first = KDStudent({**KD_CONFIG, "epochs": 2}).run(ctx, signal=signal)["model"]
    second = KDStudent({**KD_CONFIG, "epochs": 5}).run(ctx, signal=signal)["model"]
    return {"first": first, "second": second, "ctx": ctx}


@pytest.fixture(scope="session")
def student(kd_runs):
    return kd_runs["second"]
