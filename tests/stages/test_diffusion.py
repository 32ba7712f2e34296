"""The diffusion timestep distillation family on tiny UNets: teacher -> trajectories (Ray
Data, 1 and 2 actors) -> pairs -> consistency / progressive / reflow students (Ray Train,
resume) -> evaluate-generation; and one clear error for each kind of bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pipelines.context import StageContext
from pipelines.errors import UserError
from pipelines.stage import Model
from stages.distill.diffusion_pairs import DiffusionPairs
from stages.evaluate.evaluate_generation import EvaluateGeneration
from stages.models.diffusion import SUPPORTED_SCHEDULERS, load_diffusion, row_noise
from stages.models.diffusion_sampling import sample_student, sample_teacher
from stages.teacher.diffusion_trajectories import DiffusionTrajectories, TrajectoryActor
from stages.teacher.fit_diffusion_teacher import FitDiffusionTeacher
from stages.train.consistency_distill import ConsistencyDistill
from stages.train.progressive_distill import ProgressiveDistill
from stages.train.reflow import Reflow
from tests.stages.conftest import run_stage

TINY = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention": False}
TRAJ = {"rows": 24, "steps": 4, "keep_states": 4, "shard_size": 8}
STUDENT = {"epochs": 1, "batch_size": 32}

STUDENTS = ("consistency", "progressive", "reflow")


@pytest.fixture(scope="module")
def dteacher(digits, tmp_path_factory):
    out, _ = run_stage(FitDiffusionTeacher, {**TINY, "epochs": 1, "batch_size": 256},
                       tmp_path_factory.mktemp("dteacher"), "dteacher", data=digits)
    return out["model"]


@pytest.fixture(scope="module")
def trajectories(ray_session, dteacher, tmp_path_factory):
    """The same trajectories from 1 and from 2 actors."""
    runs = {}
    for actors in (1, 2):
        out, _ = run_stage(DiffusionTrajectories, {**TRAJ, "actors": actors},
                           tmp_path_factory.mktemp(f"traj{actors}"), "traj", seed=3,
                           teacher=dteacher)
        runs[actors] = out["trajectories"]
    return runs


@pytest.fixture(scope="module")
def pairs(ray_session, trajectories, tmp_path_factory):
    return run_stage(DiffusionPairs, {}, tmp_path_factory.mktemp("pairs"), "pairs",
                     trajectories=trajectories[2])[0]


@pytest.fixture(scope="module")
def students(ray_session, pairs, dteacher, tmp_path_factory):
    """Each student once; consistency twice on one work dir (the second run resumes)."""
    ctx = StageContext.for_testing(tmp_path_factory.mktemp("cd"), name="consistency",
                                   kind="consistency-distill")
    first = ConsistencyDistill(STUDENT).run(ctx, pairs=pairs["consistency"], teacher=dteacher)
    second = ConsistencyDistill({**STUDENT, "epochs": 2}).run(
        ctx, pairs=pairs["consistency"], teacher=dteacher)
    progressive = run_stage(ProgressiveDistill, {**STUDENT, "start_steps": 4},
                            tmp_path_factory.mktemp("pd"), "progressive",
                            pairs=pairs["reflow"], teacher=dteacher)[0]
    deeper = {**TINY, "layers_per_block": 2}  # a student architecture of its own
    reflow = run_stage(Reflow, {**STUDENT, "architecture": deeper}, tmp_path_factory.mktemp("rf"),
                       "reflow", pairs=pairs["reflow"], teacher=dteacher)[0]
    return {"first": first["model"], "consistency": second["model"],
            "progressive": progressive["model"], "reflow": reflow["model"]}


def test_teacher_is_a_diffusers_folder(dteacher):
    from diffusers import DDIMScheduler, UNet2DModel
    unet = UNet2DModel.from_pretrained(os.path.join(dteacher.path, "unet"))
    sched = DDIMScheduler.from_pretrained(os.path.join(dteacher.path, "scheduler"))
    assert unet.config.num_class_embeds == 10 and unet.config.sample_size == 8
    assert sched.config.prediction_type == "v_prediction"
    assert dteacher.info["shape"] == [1, 8, 8] and dteacher.info["num_classes"] == 10


def test_two_actors_give_the_rows_of_one(trajectories, dteacher):
    one, two = (trajectories[a].to_numpy() for a in (1, 2))
    assert sorted(one["id"].tolist()) == list(range(24))
    o1, o2 = np.argsort(one["id"]), np.argsort(two["id"])
    for col in ("id", "label", "noise", "states", "timesteps", "sample"):
        np.testing.assert_array_equal(one[col][o1], two[col][o2], err_msg=col)
    assert one["states"].shape == (24, 4, 1, 8, 8)
    info = trajectories[1].info
    assert info["timesteps"] == one["timesteps"][0].tolist() and info["timesteps"][-1] == -1
    # the stored states are the teacher's own trajectory; noise from the row's seed
    model = load_diffusion(dteacher.path, "test")
    ids = np.arange(8, 16)
    noise = row_noise(3, ids, model.shape)
    np.testing.assert_array_equal(noise.numpy(), one["noise"][o1][8:16])
    final, states, _ = sample_teacher(model, noise, ids % 10, "ddim", 4, [0, 1, 3, 4])
    np.testing.assert_allclose(states.numpy(), one["states"][o1][8:16], atol=1e-4)
    np.testing.assert_allclose(final.numpy(), one["sample"][o1][8:16], atol=1e-4)


def test_float16_and_euler_on_the_actor(dteacher):
    cfg = {**TRAJ, "sampler": "euler", "precision": "float16", "keep_states": None}
    threads = torch.get_num_threads()
    try:
        out = TrajectoryActor(dteacher, cfg, 0, 1, "test")({"id": np.array([1])})
    finally:
        torch.set_num_threads(threads)
    assert out["states"].dtype == np.float16 and out["states"].shape == (8, 5, 1, 8, 8)
    assert out["id"].tolist() == list(range(8, 16))
    np.testing.assert_allclose(out["states"][:, 0], out["noise"], atol=1e-2)  # x_T ~ z


def test_pairs_are_adjacent_states(pairs, trajectories):
    cons = pairs["consistency"].to_numpy()
    assert len(cons["id"]) == 24 * 3
    traj = trajectories[2].to_numpy()
    row = int(np.flatnonzero(traj["id"] == 5)[0])
    mine = np.flatnonzero(cons["id"] == 5)
    mine = mine[np.argsort(cons["pair"][mine])]
    np.testing.assert_array_equal(cons["x_hi"][mine], traj["states"][row][:-1])
    np.testing.assert_array_equal(cons["x_lo"][mine], traj["states"][row][1:])
    assert (cons["t_hi"] > cons["t_lo"]).all()
    reflow = pairs["reflow"].to_numpy()
    assert set(reflow) == {"id", "label", "noise", "sample"} and len(reflow["id"]) == 24


def test_students_train_resume_and_sample(students, dteacher):
    assert students["first"].info["start_epoch"] == 0
    assert students["consistency"].info["start_epoch"] == 1  # resumed after epoch 0
    assert students["consistency"].info["epochs"] == 2
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in STUDENTS:
        model = load_diffusion(students[name].path, "test")
        assert model.student["method"] == name
        for steps in (1, 2):
            x = sample_student(model, noise, [0, 1, 2, 3], steps, torch.Generator())
            assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert load_diffusion(students["progressive"].path, "t").student["covered_steps"] == [2, 1]
    # the reflow student has its own architecture, partly initialised from the teacher
    assert load_diffusion(students["reflow"].path, "t").unet.config.layers_per_block == 2
    info = students["reflow"].info
    assert 0 < info["tensors_from_teacher"] < info["tensors"]
    assert info["params"] > info["teacher_params"]
    assert students["consistency"].info["tensors_from_teacher"] == students["consistency"].info["tensors"]


def test_block_removed_student_starts_from_the_teacher_weights():
    """BK-SDM-style: a student without the attention blocks keeps every other teacher
    tensor; with init scratch it shares none, and with other widths at most one."""
    from diffusers import DDIMScheduler
    from stages.models.diffusion import Diffusion, UNetArch
    from stages.train.diffusion_student import StudentConfig, init_student
    torch.manual_seed(0)
    unet = UNetArch(block_out_channels=[16, 32], attention=True).build(8, 1, 10)
    teacher = Diffusion(unet, dict(DDIMScheduler(prediction_type="v_prediction").config))
    given = unet.state_dict()
    pruned = {"block_out_channels": [16, 32], "attention": False}
    student, n = init_student(StudentConfig(architecture=pruned), teacher)
    own = student.state_dict()
    assert n == len(own) < len(given)
    blocks = lambda sd: {k for k in sd if "attentions" in k and not k.startswith("mid_block")}  # noqa: E731
    assert not blocks(own) and blocks(given)
    assert all(torch.equal(v, given[k]) for k, v in own.items())
    scratch, n = init_student(StudentConfig(architecture=pruned, init="scratch"), teacher)
    assert n == 0 and not torch.equal(scratch.state_dict()["conv_in.weight"],
                                      given["conv_in.weight"])
    same, n = init_student(StudentConfig(), teacher)
    assert n == len(given) and all(torch.equal(v, given[k]) for k, v in same.state_dict().items())
    narrow, n = init_student(StudentConfig(architecture={"block_out_channels": [8, 16]}), teacher)
    assert n <= 1 and sum(p.numel() for p in narrow.parameters()) < unet.num_parameters() / 3


def test_evaluate_generation_names_and_plots(tmp_path, students, dteacher, teacher, digits):
    out, _ = run_stage(EvaluateGeneration,
                       {"teacher_steps": [4, 1], "student_steps": [1, 2], "num_samples": 40,
                        "kid_subsets": 3, "kid_subset_size": 20, "batch_size": 16,
                        "latency_batch_size": 16, "latency_repeats": 3,
                        "steps_for": {"progressive": [1]}},
                       tmp_path, "eval", teacher=dteacher, classifier=teacher, data=digits,
                       students={n: students[n] for n in STUDENTS})
    m = out["report"].metrics()
    for metric in ("fid", "kid", "precision", "recall", "class_accuracy", "ms_per_image"):
        for key in ["teacher/4", "teacher/1", "teacher/best", "progressive/1"] + \
                   [f"{n}/{s}" for n in ("consistency", "reflow") for s in (1, 2)]:
            assert f"{metric}/{key}" in m, f"{metric}/{key}"
    assert "fid/progressive/2" not in m  # its own step counts (steps_for)
    assert m["steps/teacher/best"] in (4, 1)
    assert m["fid/teacher/best"] == min(m["fid/teacher/4"], m["fid/teacher/1"])
    assert 0 < m["fid/real/floor"] < m["fid/teacher/best"]  # a 1-epoch teacher is poor
    assert m["speedup/reflow/1"] > 0
    assert m["ms_per_image/teacher/4"] > m["ms_per_image/teacher/1"]  # 4 UNet calls vs 1
    assert out["report"].info["latency_repeats"] == 3
    files = os.listdir(out["report"].path)
    assert {"fid_vs_steps.png", "samples_teacher.png", "samples_reflow.png"} <= set(files)


# -- bad input -----------------------------------------------------------------------------
def test_not_a_diffusers_folder(tmp_path, teacher):
    with pytest.raises(UserError, match=r"stage 'traj' \(diffusion-trajectories\) input "
                                        r"'teacher'.*diffusers model folder.*unet"):
        run_stage(DiffusionTrajectories, TRAJ, tmp_path, "traj", teacher=teacher)


def test_unsupported_scheduler_lists_the_supported(tmp_path, dteacher):
    bad = tmp_path / "lms"
    shutil.copytree(dteacher.path, bad)
    cfg_path = bad / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "LMSDiscreteScheduler"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="scheduler 'LMSDiscreteScheduler'.*" +
                       ", ".join(sorted(SUPPORTED_SCHEDULERS))):
        run_stage(DiffusionTrajectories, TRAJ, tmp_path, "traj",
                  teacher=Model(path=str(bad)))


def test_shape_mismatch(tmp_path, pairs, dteacher):
    wrong = type(pairs["reflow"])(path=pairs["reflow"].path,
                                  info={**pairs["reflow"].info, "shape": [3, 16, 16]})
    with pytest.raises(UserError, match=r"\(reflow\) input 'pairs'.*\[3, 16, 16\].*\[1, 8, 8\]"):
        run_stage(Reflow, STUDENT, tmp_path, "reflow", pairs=wrong, teacher=dteacher)


def test_more_steps_than_trained(tmp_path, students, dteacher, teacher, digits):
    model = load_diffusion(students["progressive"].path, "sampler")
    with pytest.raises(UserError, match=r"steps for the progressive student 4.*covered: \[2, 1\]"):
        sample_student(model, torch.zeros(1, 1, 8, 8), [0], 4)
    with pytest.raises(UserError, match=r"\(evaluate-generation\) input 'students' "
                                        r"\(stage 'consistency'\).*"
                                        r"steps for the consistency student 4.*at most 3"):
        run_stage(EvaluateGeneration, {"student_steps": [4]}, tmp_path, "eval",
                  teacher=dteacher, classifier=teacher, data=digits,
                  students={n: students[n] for n in STUDENTS})
    with pytest.raises(UserError, match=r"config steps_for.*'progresive'.*did you mean "
                                        r"'progressive'"):
        run_stage(EvaluateGeneration, {"steps_for": {"progresive": [1]}}, tmp_path, "eval",
                  teacher=dteacher, classifier=teacher, data=digits,
                  students={n: students[n] for n in STUDENTS})
    with pytest.raises(UserError, match=r"config reference.*'paired'.*auto for a "
                                        r"pixel-space"):
        run_stage(EvaluateGeneration, {"reference": "paired"}, tmp_path, "eval",
                  teacher=dteacher, classifier=teacher, data=digits,
                  students={n: students[n] for n in STUDENTS})


def test_pixel_students_are_mlflow_models(students):
    """Committed students carry an MLmodel: mlflow.pyfunc loads them from their own
    folder and draws one image per row, the same image for the same seed."""
    import mlflow
    import pandas as pd
    rows = pd.DataFrame({"label": [3, 5], "num_inference_steps": [1, 2], "seed": [0, 1]})
    for name in ("progressive", "reflow"):
        model = mlflow.pyfunc.load_model(students[name].path)
        images = model.predict(rows)
        assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8, name
        assert images.std() > 0
        np.testing.assert_array_equal(model.predict(rows), images)
    meta = mlflow.models.Model.load(students["progressive"].path).metadata
    assert meta["library_name"] == "diffusers" and meta["method"] == "progressive"
    assert meta["default_steps"] == 1
