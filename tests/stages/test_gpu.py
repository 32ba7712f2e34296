"""The GPU paths, run only where Ray reports a GPU: teacher-outputs and diffusion-trajectories
with GPU actors, kd-student and the diffusion students with ``use_gpu`` Ray Train workers,
the dataset-distillation networks as Ray tasks with a GPU share (and mtt/dm on the GPU of
their process). On a CPU machine these are skipped."""

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
                       "use_gpu": True}).run(ctx, signal=signal, teacher=minilm)["model"]
    losses = [v for k, v, _ in board.history("st") if k == "train_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert model.info["num_layers"] == 2


def test_diffusion_family_on_gpu(gpus, digits, tmp_path):
    """fit-diffusion-teacher on the GPU of its process, diffusion-trajectories on a GPU
    actor (the same trajectories as the CPU sampler, up to TF32), and the three students
    with ``use_gpu`` Ray Train workers; every student then samples on the GPU."""
    from stages.distill.diffusion_pairs import DiffusionPairs
    from stages.models.diffusion import load_diffusion, row_noise
    from stages.models.diffusion_sampling import sample_student, sample_teacher
    from stages.teacher.diffusion_trajectories import DiffusionTrajectories
    from stages.teacher.fit_diffusion_teacher import FitDiffusionTeacher
    from stages.train.consistency_distill import ConsistencyDistill
    from stages.train.progressive_distill import ProgressiveDistill
    from stages.train.reflow import Reflow
    from tests.stages.conftest import run_stage

    tiny = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention": False}
    dteacher = run_stage(FitDiffusionTeacher, {**tiny, "epochs": 2, "batch_size": 256},
                         tmp_path / "dt", "dteacher", data=digits)[0]["model"]
    ctx = StageContext.for_testing(tmp_path / "traj", name="traj",
                                   kind="diffusion-trajectories", seed=3,
                                   num_gpus_available=gpus)
    traj = DiffusionTrajectories({"rows": 64, "steps": 4, "keep_states": 3, "shard_size": 16}
                                 ).run(ctx, teacher=dteacher)["trajectories"]
    got = traj.to_numpy()
    order = np.argsort(got["id"])
    assert got["id"][order].tolist() == list(range(64))
    cpu = load_diffusion(dteacher.path, "test")  # the CPU reference, same noise
    noise = row_noise(3, np.arange(64), cpu.shape)
    np.testing.assert_array_equal(noise.numpy(), got["noise"][order])
    final, _, _ = sample_teacher(cpu, noise, got["label"][order], "ddim", 4, [])
    np.testing.assert_allclose(final.numpy(), got["sample"][order], atol=2e-2)

    pairs = run_stage(DiffusionPairs, {}, tmp_path / "pairs", "pairs", trajectories=traj)[0]
    student = {"epochs": 3, "batch_size": 32, "use_gpu": True}
    for cls, name, data in ((ConsistencyDistill, "consistency", pairs["consistency"]),
                            (ProgressiveDistill, "progressive", pairs["reflow"]),
                            (Reflow, "reflow", pairs["reflow"])):
        board = ray_board()
        ctx = StageContext.for_testing(tmp_path / name, name=name, kind=cls.kind,
                                       num_gpus_available=gpus, board=board, key=f"gpu-{name}")
        config = {**student, "start_steps": 4} if name == "progressive" else student
        model = cls(config).run(ctx, pairs=data, teacher=dteacher)["model"]
        losses = [v for k, v, _ in board.history(name) if k == "train_loss"]
        rounds = 2 if name == "progressive" else 1  # 4 -> 2 -> 1 steps
        assert len(losses) == 3 * rounds and all(np.isfinite(losses)), (name, losses)
        gpu = load_diffusion(model.path, "test").to("cuda")
        x = sample_student(gpu, noise[:8], got["label"][order][:8], 1, torch.Generator())
        assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all()


def test_dataset_distillation_on_gpu(gpus, digits, tmp_path):
    """expert-trajectories and evaluate-synthetic run their networks as Ray tasks with a
    GPU share; mtt and dm run on the GPU of their process, resume from a CPU checkpoint."""
    from stages.distill.dm import DistributionMatching
    from stages.distill.mtt import MatchTrajectories
    from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
    from stages.distill.experts import ExpertReader
    from stages.teacher.expert_trajectories import ExpertTrajectories

    net = {"width": 16, "depth": 2}
    ctx = StageContext.for_testing(tmp_path, name="experts", kind="expert-trajectories",
                                   num_gpus_available=gpus)
    experts = ExpertTrajectories({**net, "experts": 4, "epochs": 4, "lr": 0.05}).run(
        ctx, data=digits)["experts"]
    assert experts.info["expert_test_accuracy_mean"] > 0.5  # 4 epochs; chance is 0.1
    reader = ExpertReader(experts, "test")
    assert reader.load(3, 4).device.type == "cpu" and reader.load(3, 4).isfinite().all()

    mtt = {**net, "ipc": 2, "syn_steps": 5, "expert_epochs": 1, "max_start_epoch": 3,
           "checkpoint_every": 2}
    ctx = StageContext.for_testing(tmp_path, name="mtt", kind="mtt")
    MatchTrajectories({**mtt, "iterations": 2}).run(ctx, experts=experts, data=digits)
    syn = MatchTrajectories({**mtt, "iterations": 4}).run(ctx, experts=experts,
                                                          data=digits)["synthetic"]
    assert syn.info["resumed_from"] == 2 and 0 < syn.info["synthetic_lr"] < 10
    ctx = StageContext.for_testing(tmp_path, name="dm", kind="dm")
    dm = DistributionMatching({**net, "ipc": 2, "iterations": 3, "batch_real": 64}).run(
        ctx, data=digits)["synthetic"]
    assert np.isfinite(dm.to_numpy()["x"]).all()

    ctx = StageContext.for_testing(tmp_path, name="eval", kind="evaluate-synthetic",
                                   num_gpus_available=gpus)
    report = EvaluateSynthetic({**net, "networks": 5, "epochs": 50, "lr": 0.05,
                                "full_networks": 1, "full_epochs": 5}).run(
        ctx, synthetic=syn, data=digits)["report"]
    m = report.metrics()
    assert 0.2 < m["accuracy_mean"] <= 1 and m["full_accuracy_mean"] > 0.8


def test_teachers_train_on_the_gpu_of_their_process(gpus, digits, corpus, tmp_path):
    """fit-classifier and fit-causal-lm use the GPU their stage was given and save CPU
    folders that load anywhere."""
    from stages.teacher.fit_causal_lm import FitCausalLM
    from stages.teacher.fit_classifier import FitClassifier
    from tests.stages.conftest import TINY_LM, run_stage
    clf = run_stage(FitClassifier, {"epochs": 3}, tmp_path, "clf", data=digits)[0]["model"]
    assert clf.info["val_accuracy"] > 0.8
    load_classifier(clf.path, "test")  # on the CPU
    lm = run_stage(FitCausalLM, {**TINY_LM, "epochs": 2}, tmp_path, "lm", data=corpus)[0]["model"]
    assert np.isfinite(lm.info["val_perplexity"])
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(lm.path).device.type == "cpu"
