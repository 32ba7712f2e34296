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
    from stages.train.kd_student import KDStudent
    weights = {}
    for workers in (1, 2):
        out, _ = run_stage(KDStudent, {**KD_CONFIG, "epochs": 2, "num_workers": workers},
                           tmp_path / str(workers), "kd", signal=signal)
        weights[workers] = load_file(f"{out['model'].path}/model.safetensors")
    assert weights[1].keys() == weights[2].keys()
    for k in weights[1]:
        assert torch.allclose(weights[1][k], weights[2][k], atol=1e-5), \
            (k, (weights[1][k] - weights[2][k]).abs().max())
