"""TAID (stages.train.taid) and ``kd-student`` with ``loss: taid``: the schedule and the
loss as pure functions, the config check, and one Ray Train fit on the session signal."""

import os
import pickle

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipelines.context import StageContext
from pipelines.testing import ray_board
from stages.models.classifiers import load_classifier, predict_logits
from stages.train.kd_student import KDStudent, _taid_schedule, hinton_kd_loss
from stages.train.taid import TAIDSchedule, taid_loss


def run_schedule(losses, total_steps, **kw):
    """t after each step, and the linear schedule's t, for the given per-step losses."""
    s = TAIDSchedule(**kw)
    ts = [s.update(loss, n + 1, total_steps) for n, loss in enumerate(losses)]
    return np.array(ts), np.array([s.linear(n + 1, total_steps) for n in range(len(losses))])


def test_schedule_starts_at_t_start_and_ends_at_t_end_never_behind_linear():
    assert TAIDSchedule(t_start=0.3).t == 0.3
    rng = np.random.default_rng(0)
    losses = 2.0 * np.exp(-np.arange(300) / 100) + 0.3 * rng.random(300)  # noisy descent
    ts, lin = run_schedule(losses, 300)
    assert np.all(np.diff(ts) >= 0)              # monotone non-decreasing
    assert np.all(ts >= lin - 1e-12)             # never slower than linear
    assert ts[-1] == pytest.approx(1.0) and ts.max() <= 1.0
    ts, _ = run_schedule(losses, 300, t_start=0.2, t_end=0.7)
    assert ts[-1] == pytest.approx(0.7) and ts.max() <= 0.7


def test_schedule_stays_on_linear_while_the_loss_stagnates():
    ts, lin = run_schedule([1.5] * 200, 200)
    np.testing.assert_allclose(ts, lin, rtol=0, atol=1e-12)


def test_schedule_runs_ahead_of_linear_while_the_loss_improves():
    # a long run, where the paper's alpha = 5e-4 steps are larger than the linear slope
    n = 10_000
    improving, lin = run_schedule(0.999 ** np.arange(2000), n)
    stagnant, _ = run_schedule(np.ones(2000), n)
    worsening, _ = run_schedule(1.001 ** np.arange(2000), n)
    assert improving[-1] > lin[-1] + 0.05
    assert improving[-1] > stagnant[-1] > worsening[-1]  # sigmoid(m) above/at/below 1/2


def test_schedule_state_round_trips_and_pickles():
    s = TAIDSchedule()
    for n, loss in enumerate([3.0, 2.0, 1.5]):
        s.update(loss, n + 1, 10)
    restored = TAIDSchedule()
    restored.load_state_dict(s.state_dict())
    clone = pickle.loads(pickle.dumps(s))
    assert restored.state_dict() == clone.state_dict() == s.state_dict()
    t = s.update(1.2, 4, 10)  # the same next step from every copy
    assert restored.update(1.2, 4, 10) == clone.update(1.2, 4, 10) == t
    with pytest.raises(ValueError, match="t_start <= t_end"):
        TAIDSchedule(t_start=0.8, t_end=0.5)


def test_kd_student_resumes_the_schedule_from_the_checkpoint_state():
    cfg = KDStudent.Config(loss="taid")
    assert _taid_schedule(KDStudent.Config(), None) is None  # hinton: no schedule
    fresh = _taid_schedule(cfg, {"epoch": 0})
    assert fresh.state_dict() == {"t": 0.4, "m": 0.0, "prev_loss": None, "step": 0}
    saved = {"t": 0.55, "m": 0.01, "prev_loss": 0.7, "step": 42}
    assert _taid_schedule(cfg, {"epoch": 1, "taid": saved}).state_dict() == saved


def test_taid_loss_at_t_1_is_kl_to_the_teacher():
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    kl = (F.softmax(z_t, 1) * (F.log_softmax(z_t, 1) - F.log_softmax(z_s, 1))).sum(1).mean()
    torch.testing.assert_close(taid_loss(z_s, z_t, y, 1.0, 1.0, 1.0), kl)
    for temperature, alpha in [(4.0, 0.9), (2.0, 0.5), (1.0, 0.0)]:
        torch.testing.assert_close(taid_loss(z_s, z_t, y, 1.0, temperature, alpha),
                                   hinton_kd_loss(z_s, z_t, y, temperature, alpha))


def test_taid_loss_at_t_0_is_zero():
    torch.manual_seed(1)
    z_s = torch.randn(8, 10, requires_grad=True)
    z_t, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = taid_loss(z_s, z_t, y, 0.0, 4.0, 1.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert z_s.grad.abs().max().item() < 1e-6


def test_taid_loss_gradient_skips_the_detached_student_term():
    torch.manual_seed(2)
    z_s = torch.randn(8, 10, requires_grad=True)
    z_t, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    t, temp = 0.4, 2.0
    taid_loss(z_s, z_t, y, t, temp, 1.0).backward()
    # d/dz_s of T^2 KL(p_t || softmax(z_s/T)) / B with p_t held fixed: T (q - p_t) / B
    with torch.no_grad():
        p_t = F.softmax(((1 - t) * z_s + t * z_t) / temp, 1)
        want = temp * (F.softmax(z_s / temp, 1) - p_t) / len(z_s)
    torch.testing.assert_close(z_s.grad, want)


def test_config_rejects_t_start_above_t_end():
    with pytest.raises(ValidationError, match=r"taid_t_start \(0.9\) must not exceed "
                                              r"taid_t_end \(0.5\)"):
        KDStudent.Config(loss="taid", taid_t_start=0.9, taid_t_end=0.5)
    with pytest.raises(ValidationError, match="taid_t_end"):
        KDStudent.Config(loss="taid", taid_t_end=1.5)
    with pytest.raises(ValidationError, match="loss"):
        KDStudent.Config(loss="reverse-kl")
    assert KDStudent.Config().loss is None  # the signal's first loss: hinton for logits


def test_kd_student_with_taid_learns_and_logs_a_rising_t(ray_session, signal, tmp_path):
    board = ray_board()
    ctx = StageContext.for_testing(tmp_path, name="taid", kind="kd-student", board=board,
                                   key="taid")
    epochs = 3
    student = KDStudent({"loss": "taid", "epochs": epochs, "num_workers": 1}).run(  # Ray Train
        ctx, signal=signal)["model"]
    ts = [v for k, v, _ in board.history("taid") if k == "taid_t"]
    assert len(ts) == epochs and all(a < b for a, b in zip(ts, ts[1:]))
    assert ts[0] > 0.4 and ts[-1] == pytest.approx(1.0)  # t_end on the last step
    assert student.info["taid_t"] == pytest.approx(ts[-1])  # reported to Ray Train too
    # the last checkpoint carries the schedule's state
    run_dir = os.path.join(ctx.work_dir, "ray_train", f"{ctx.kind}-{ctx.key[:16]}")
    states = sorted(os.path.join(r, "state.pt") for r, _, f in os.walk(run_dir)
                    if "state.pt" in f)
    state = torch.load(states[-1], weights_only=True)
    taid = state["method"]["taid"]  # the method's own state, in the harness's checkpoint
    assert state["epoch"] == epochs - 1 and taid["t"] == pytest.approx(ts[-1])
    assert taid["step"] > 0 and taid["prev_loss"] > 0
    model = load_classifier(student.path)
    test = signal.to_numpy(["x", "label"], filter=pc.field("split") == "test")
    pred = predict_logits(model, test["x"]).argmax(1).numpy()
    assert (pred == test["label"]).mean() >= 0.8  # chance is 0.1
