"""The GPU paths, run only where Ray reports a GPU: teacher-outputs with GPU actors and
kd-student with ``use_gpu`` Ray Train workers. On a CPU machine these are skipped."""

import numpy as np
import pytest
import torch

from pipelines.context import StageContext
from pipelines.testing import ray_board
from stages.models.classifiers import load_classifier
from tests.stages.conftest import KD_CONFIG

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpus(ray_session):
    n = ray_session.cluster_resources().get("GPU", 0)
    if not n:
        pytest.skip("Ray reports no GPU")
    return n


def test_teacher_outputs_on_gpu_actors_match_cpu_logits(gpus, teacher, digits, tmp_path):
    from stages.teacher.teacher_outputs import TeacherOutputs
    ctx = StageContext.for_testing(tmp_path, name="signal", num_gpus_available=gpus)
    signal = TeacherOutputs({"actors": 1, "batch_size": 256}).run(
        ctx, model=teacher, data=digits)["signal"]
    got = signal.to_numpy(["id", "x", "logits"])
    order = np.argsort(got["id"])
    model = load_classifier(teacher.path, "test").eval()
    with torch.inference_mode():
        want = model(torch.as_tensor(got["x"][order])).numpy()
    assert len(np.unique(got["id"])) == len(got["id"]) == 1797
    np.testing.assert_allclose(got["logits"][order], want, rtol=1e-2, atol=1e-2)


def test_kd_student_trains_with_use_gpu_workers(gpus, signal, tmp_path):
    from stages.train.kd_student import KDStudent
    board = ray_board()
    ctx = StageContext.for_testing(tmp_path, name="kd", kind="kd-student",
                                   num_gpus_available=gpus, board=board, key="gpu")
    model = KDStudent({**KD_CONFIG, "epochs": 4, "use_gpu": True}).run(ctx, signal=signal)["model"]
    losses = [v for k, v, _ in board.history("kd") if k == "train_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert model.info["train_accuracy"] > 0.8


def test_text_teacher_on_gpu_actors_and_transformers_student_on_gpu(gpus, minilm, corpus,
                                                                     tmp_path):
    from stages.evaluate.evaluate_embeddings import Encoder
    from stages.teacher.teacher_outputs import TeacherOutputs
    from stages.train.kd_student import KDStudent
    ctx = StageContext.for_testing(tmp_path, name="emb", num_gpus_available=gpus)
    signal = TeacherOutputs({"signal": "embeddings", "max_length": 24}).run(
        ctx, model=minilm, data=corpus)["signal"]
    got = signal.to_numpy(["id", "text", "embedding"])
    want = Encoder(minilm.path, "test").eval().embed(list(got["text"]), 24).numpy()
    assert len(np.unique(got["id"])) == len(got["id"]) == 240
    np.testing.assert_allclose(got["embedding"], want, rtol=1e-2, atol=1e-2)
    board = ray_board()
    ctx = StageContext.for_testing(tmp_path, name="st", kind="kd-student",
                                   num_gpus_available=gpus, board=board, key="gpu-text")
    model = KDStudent({"teacher_layers": [0, 5], "epochs": 3, "batch_size": 32, "lr": 1e-4,
                       "use_gpu": True}).run(ctx, signal=signal)["model"]
    losses = [v for k, v, _ in board.history("st") if k == "train_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert model.info["num_layers"] == 2
