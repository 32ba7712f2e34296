"""Execution settings do not change what a stage makes (which is why they are left out of
its cache key): teacher-outputs with 1 and 2 actors (and other batch sizes) commits the
same rows, and kd-student with 1 and 2 Ray Train workers ends on the same weights."""

import numpy as np
import torch
from safetensors.torch import load_file

from tests.stages.conftest import KD_CONFIG, run_stage


def sorted_rows(dataset) -> dict:
    cols = dataset.to_numpy()
    order = np.argsort(cols["id"])
    return {k: v[order] for k, v in cols.items()}


def test_teacher_outputs_rows_do_not_depend_on_actors_or_batch_size(signal, teacher, digits,
                                                                    tmp_path):
    from stages.teacher.teacher_outputs import TeacherOutputs
    one = run_stage(TeacherOutputs, {"actors": 1, "batch_size": 256, "shard_rows": 700},
                    tmp_path, "one_actor", model=teacher, data=digits)[0]["signal"]
    a, b = sorted_rows(one), sorted_rows(signal)   # the session's: 2 actors, batches of 200
    assert set(a) == set(b) and len(a["id"]) == len(b["id"]) == 1797
    for k in a:
        if a[k].dtype.kind == "f":  # batched kernels may differ in the last bits
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_kd_student_weights_do_not_depend_on_num_workers(signal, tmp_path):
    """0 (the stage's process: what num_workers auto picks for small rows), 1 and 2 Ray
    Train workers end on the same weights (why auto is keyed as 1)."""
    from stages.train.kd_student import KDStudent
    weights = {}
    for workers in (0, 1, 2):
        out, _ = run_stage(KDStudent, {**KD_CONFIG, "epochs": 2, "num_workers": workers},
                           tmp_path / str(workers), "kd", signal=signal)
        assert out["model"].info["train_workers"] == workers
        weights[workers] = load_file(f"{out['model'].path}/model.safetensors")
    for other in (0, 2):
        assert weights[1].keys() == weights[other].keys()
        for k in weights[1]:
            assert torch.allclose(weights[1][k], weights[other][k], atol=1e-5), \
                (other, k, (weights[1][k] - weights[other][k]).abs().max())


def test_auto_workers_is_a_pure_decision_keyed_as_one():
    from stages.train.drivers import AUTO_IN_PROCESS_ROW_PASSES, workers_for
    from stages.train.kd_student import KDStudent
    from stages.train.rows import Rows
    held = Rows({}, files=["f.parquet"], num_rows=1000)
    cfg = KDStudent.Config(epochs=10)
    assert cfg.num_workers == "auto"
    assert workers_for(cfg, held, gpus=0) == 0                      # small, held, CPU
    assert workers_for(cfg, held, gpus=1) == 1                      # the GPU is a worker's
    assert workers_for(cfg.model_copy(update={"use_gpu": False}), held, gpus=1) == 0
    assert workers_for(cfg.model_copy(update={"max_failures": 2}), held, gpus=0) == 1
    big = Rows({}, files=["f.parquet"], num_rows=AUTO_IN_PROCESS_ROW_PASSES // 10 + 1)
    assert workers_for(cfg, big, gpus=0) == 1
    assert workers_for(cfg, Rows({}, stream=object(), num_rows=10), gpus=0) == 1
    assert workers_for(cfg, held, gpus=0, nodes=3) == 1              # a cluster: a worker
    assert workers_for(cfg.model_copy(update={"num_workers": 3}), held, gpus=0) == 3
    assert workers_for(KDStudent.Config(num_workers=0), big, gpus=1) == 0
    conv = {"arch": "convnet", "norm": "batch"}  # BatchNorm keeps num_workers in the key
    assert KDStudent.Config(**conv).split_execution()[0]["num_workers"] == 1
    assert KDStudent.Config(**conv, num_workers=1).split_execution()[0] == \
        KDStudent.Config(**conv).split_execution()[0]


def test_auto_actors_fill_the_free_cores_or_gpus_never_more_than_the_batches():
    from stages.teacher.signals import InferenceConfig, pool_size
    assert InferenceConfig().actors == "auto"
    assert pool_size("auto", 10_000, 256, free_cpus=2.0, gpus=0) == 2   # a 2-core laptop
    assert pool_size("auto", 10_000, 256, free_cpus=16.0, gpus=4) == 4  # one per GPU
    assert pool_size("auto", 300, 256, free_cpus=8.0, gpus=0) == 2      # 2 batches: 2 actors
    assert pool_size("auto", 10, 256, free_cpus=0.0, gpus=0) == 1       # always one
    assert pool_size(3, 10, 256, free_cpus=1.0, gpus=0) == 3            # the user's number
    assert "actors" not in InferenceConfig().split_execution()[0]


def test_auto_actors_are_reported(ray_session, teacher, digits, tmp_path):
    """The pool of a pass too large to run in the stage's task (``signals.in_task``)."""
    from pipelines.context import StageContext
    from stages.teacher.signals import InferenceConfig, with_teacher_logits
    ctx = StageContext.for_testing(tmp_path, name="auto")
    ds = with_teacher_logits(digits.read(), teacher, InferenceConfig(batch_size=1024), ctx,
                             "test", rows=1797)
    assert ds.count() == 1797
    assert [v for k, v, _ in ctx.board.history_of("auto") if k == "actors"] == [2]  # 2 batches


def test_a_loop_in_the_stages_task_uses_the_free_cores():
    from stages.models.device import loop_threads
    assert loop_threads(held=1, free=1, cores=2) == 2     # a teacher stage on a laptop
    assert loop_threads(held=0, free=3, cores=2) == 2     # the embedded Ray's 4 CPUs, 2 cores
    assert loop_threads(held=1, free=0, cores=2) == 1     # the other core is taken
    assert loop_threads(held=0, free=0, cores=8) == 1     # always one
