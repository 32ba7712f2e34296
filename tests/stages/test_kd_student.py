import json
import os

import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from pipelines.errors import UserError
from stages.models.classifiers import MLP, load_classifier, predict_logits
from stages.train.kd_student import KDStudent, hinton_kd_loss
from tests.stages.conftest import KD_CONFIG, run_stage


def test_hinton_loss():
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(z_s, y)
    torch.testing.assert_close(hinton_kd_loss(z_s, z_t, y, 4.0, 0.0), ce)
    # a student equal to the teacher pays only the hard-label part
    torch.testing.assert_close(hinton_kd_loss(z_t, z_t, y, 4.0, 0.5),
                               0.5 * F.cross_entropy(z_t, y))
    kl = (F.softmax(z_t / 2, 1) * (F.log_softmax(z_t / 2, 1) - F.log_softmax(z_s / 2, 1)))
    torch.testing.assert_close(hinton_kd_loss(z_s, z_t, y, 2.0, 1.0), 4 * kl.sum(1).mean())


def test_student_learns_from_the_teacher(student, signal):
    model = load_classifier(student.path)
    assert isinstance(model, MLP)
    test = signal.to_numpy(["x", "label", "logits"], filter=pc.field("split") == "test")
    pred = predict_logits(model, test["x"]).argmax(1).numpy()
    assert (pred == test["label"]).mean() >= 0.8  # chance is 0.1
    assert (pred == test["logits"].argmax(1)).mean() >= 0.8


def test_second_run_resumes_from_the_last_checkpoint(kd_runs):
    first, second = kd_runs["first"], kd_runs["second"]
    assert first.info["start_epoch"] == 0 and first.info["epochs"] == 2
    assert second.info["start_epoch"] == 2 and second.info["epochs"] == 5
    assert second.info["train_loss"] < first.info["train_loss"]
    # every checkpoint carries the resolved config; two are kept
    ctx = kd_runs["ctx"]
    run_dir = os.path.join(ctx.work_dir, "ray_train", "kd-" + ctx.key[:16])
    configs = [os.path.join(root, "config.json") for root, _, files in os.walk(run_dir)
               if "state.pt" in files]
    assert len(configs) == 2
    with open(sorted(configs)[-1]) as f:
        saved = json.load(f)
    assert saved == KDStudent.Config(**KD_CONFIG, epochs=5, loss="hinton").model_dump()  # resolved


def test_refuses_a_signal_it_cannot_use(signal, digits, tmp_path):
    wrong = type(signal)(path=signal.path, info={**signal.info, "signal": "topk-logprobs"})
    with pytest.raises(UserError, match=r"stage 'kd' \(kd-student\) input 'signal'.*"
                                        r"'topk-logprobs'.*allowed: embeddings, hidden_states, "
                                        r"logits, probabilities, topk_logprobs "
                                        r"\(did you mean 'topk_logprobs'\?\)"):
        run_stage(KDStudent, {}, tmp_path, "kd", signal=wrong)
    no_logits = type(digits)(path=digits.path, info={"signal": "logits"})
    with pytest.raises(UserError, match=r"logits"):
        run_stage(KDStudent, {}, tmp_path, "kd", signal=no_logits)
