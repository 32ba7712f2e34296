"""The second wave of dataset distillation on tiny settings: attention matching
(``datadam``)."""

import numpy as np
import pytest
import torch

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.distill.datadam import AttentionMatching, attention, attention_loss, block_outputs
from stages.distill.dd_common import build_net
from stages.distill.random_subset import RandomSubset

from .conftest import run_stage

NET = {"width": 8, "depth": 2}
ARCH = {"arch": "convnet", "width": 8, "depth": 2, "norm": "instance", "in_shape": [1, 8, 8],
        "num_classes": 10}


def test_attention_maps_are_unit_power_sums_per_position():
    net = build_net(ARCH, seed=0)
    x = torch.randn(3, 1, 8, 8)
    outs = block_outputs(net, x)
    assert [tuple(o.shape) for o in outs] == [(3, 8, 4, 4), (3, 8, 2, 2)]
    a = attention(outs[0], 4.0)
    assert a.shape == (3, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(3))
    expected = outs[0].abs().pow(4).sum(1).flatten(1)
    assert torch.allclose(a, expected / expected.norm(dim=1, keepdim=True))


def test_attention_loss_is_zero_on_the_real_batch_and_a_step_lowers_it():
    net = build_net(ARCH, seed=1).requires_grad_(False)
    real = torch.randn(16, 1, 8, 8)
    sam, mmd = attention_loss(net, real, real.clone(), 4.0)
    assert float(sam) == pytest.approx(0, abs=1e-10) and float(mmd) == pytest.approx(0, abs=1e-10)
    syn = torch.randn(2, 1, 8, 8, requires_grad=True)
    sam, mmd = attention_loss(net, real, syn, 4.0)
    (sam + 0.01 * mmd).backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    with torch.no_grad():
        after = attention_loss(net, real, syn - 0.05 * syn.grad / syn.grad.norm(), 4.0)
    assert float(after[0] + 0.01 * after[1]) < float(sam + 0.01 * mmd)


def test_datadam_learns_and_resumes(digits, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="datadam", kind="datadam")
    cfg = {**NET, "ipc": 2, "batch_real": 32, "checkpoint_every": 2}
    first = AttentionMatching({**cfg, "iterations": 2}).run(ctx, data=digits)["synthetic"]
    assert first.info["method"] == "datadam" and first.info["resumed_from"] == 0
    x1 = first.to_numpy()["x"]
    second = AttentionMatching({**cfg, "iterations": 3}).run(ctx, data=digits)["synthetic"]
    assert second.info["resumed_from"] == 2 and second.info["iterations"] == 3
    x2 = second.to_numpy()["x"]
    init = RandomSubset({"ipc": 2}).run(StageContext.for_testing(tmp_path, name="init"),
                                        data=digits)["synthetic"].to_numpy()["x"]
    assert x2.shape == (20, 1, 8, 8) and not np.allclose(x1, x2) and not np.allclose(init, x1)
    assert np.bincount(second.to_numpy()["label"]).tolist() == [2] * 10
    with pytest.raises(UserError, match="ipc"):
        run_stage(AttentionMatching, {**cfg, "ipc": 500}, tmp_path, "datadam2", data=digits)
    with pytest.raises(Exception, match="power"):
        AttentionMatching({"power": 0})


# -- mtt with DATM's options ----------------------------------------------------------------
@pytest.fixture(scope="module")
def experts(ray_session, digits, tmp_path_factory):
    from stages.teacher.expert_trajectories import ExpertTrajectories
    ctx = StageContext.for_testing(tmp_path_factory.mktemp("experts"), name="experts",
                                   kind="expert-trajectories")
    return ExpertTrajectories({**NET, "epochs": 4, "lr": 0.05, "experts": 2}).run(
        ctx, data=digits)["experts"]


DATM = {**NET, "ipc": 2, "syn_steps": 3, "expert_epochs": 1, "soft_labels": True,
        "min_start_epoch": 1, "max_start_epoch_from": 2, "max_start_epoch": 3,
        "checkpoint_every": 2}


def test_mtt_soft_labels_window_and_ema_resume(experts, digits, tmp_path):
    from stages.distill.mtt import MatchTrajectories
    cfg = MatchTrajectories.Config(**{**DATM, "iterations": 5})
    assert [cfg.upper(i) for i in range(5)] == [2, 2, 2, 3, 3]  # DATM's growing window
    ctx = StageContext.for_testing(tmp_path, name="datm", kind="mtt")
    straight = MatchTrajectories({**DATM, "iterations": 4, "ema_decay": 0.5}).run(
        StageContext.for_testing(tmp_path, name="straight", kind="mtt"),
        experts=experts, data=digits)["synthetic"]
    progress = ctx.progress

    def interrupt(done, *args, **kwargs):  # killed in iteration 3, after the checkpoint of 2
        if done == 3:
            raise KeyboardInterrupt
        return progress(done, *args, **kwargs)

    ctx.progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        MatchTrajectories({**DATM, "iterations": 4, "ema_decay": 0.5}).run(
            ctx, experts=experts, data=digits)
    ctx.progress = progress
    resumed = MatchTrajectories({**DATM, "iterations": 4, "ema_decay": 0.5}).run(
        ctx, experts=experts, data=digits)["synthetic"]
    assert resumed.info["resumed_from"] == 2
    a, b = straight.to_numpy(), resumed.to_numpy()
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["soft_label"], b["soft_label"])
    soft = np.stack(a["soft_label"])
    assert soft.shape == (20, 10) and np.allclose(soft.sum(1), 1, atol=1e-5)
    assert straight.info["soft_labels"] and "soft_init_misclassified" in straight.info
    assert np.bincount(a["label"]).tolist() == [2] * 10
    with pytest.raises(Exception, match="min_start_epoch < max_start_epoch_from"):
        MatchTrajectories({**DATM, "min_start_epoch": 3})


def test_correct_init_prefers_images_the_expert_gets_right(experts, digits):
    from stages.distill.dd_common import functional_forward, real_split
    from stages.distill.experts import ExpertReader
    from stages.distill.mtt import correct_init
    x, y = real_split(digits, "train", "test")
    theta = ExpertReader(experts, "test").load(0, 4)
    net = build_net(ARCH)
    xs, ys, missed = correct_init(net, theta, x, y, 3, 10, seed=0)
    right = (functional_forward(net, theta, xs).argmax(1) == ys).sum().item()
    assert right == 30 - missed and np.bincount(ys.numpy()).tolist() == [3] * 10


# -- sre2l and evaluation with soft labels -----------------------------------------------
SRE2L = {"ipc": 2, "iterations": 20, "batch_size": 8, "checkpoint_every": 3,
         "crop_scale": [0.5, 1.0], "curriculum": "cosine"}


def test_sre2l_recovers_relabels_and_resumes_mid_chunk(teacher, digits, tmp_path):
    from stages.distill.sre2l import SRe2L
    cfg = SRe2L.Config(**SRE2L)
    assert cfg.lower(0) == pytest.approx(1.0) and cfg.lower(19) == pytest.approx(0.5)
    straight = SRe2L(SRE2L).run(StageContext.for_testing(tmp_path, name="a", kind="sre2l"),
                                teacher=teacher, data=digits)["synthetic"]
    ctx = StageContext.for_testing(tmp_path, name="b", kind="sre2l")
    calls = {"n": 0}
    progress = ctx.progress

    def interrupt(*args, **kwargs):  # killed in the second chunk, after its checkpoint
        calls["n"] += 1
        if calls["n"] == 28:
            raise KeyboardInterrupt
        return progress(*args, **kwargs)

    ctx.progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        SRe2L(SRE2L).run(ctx, teacher=teacher, data=digits)
    ctx.progress = progress
    resumed = SRe2L(SRE2L).run(ctx, teacher=teacher, data=digits)["synthetic"]
    a, b = straight.to_numpy(), resumed.to_numpy()
    assert np.array_equal(a["x"], b["x"]) and a["x"].shape == (20, 1, 8, 8)
    soft = np.stack(a["soft_label"])
    assert np.allclose(soft.sum(1), 1, atol=1e-5)
    assert straight.info["teacher_accuracy_on_synthetic"] >= 0.8  # recovered to its class


def test_sre2l_needs_a_batch_norm_teacher(digits, tmp_path):
    from stages.distill.sre2l import SRe2L
    from stages.teacher.fit_classifier import FitClassifier
    plain = run_stage(FitClassifier, {"norm": "instance", "epochs": 1}, tmp_path, "plain",
                      data=digits)[0]["model"]
    with pytest.raises(UserError, match="batch norm"):
        run_stage(SRe2L, SRE2L, tmp_path, "sre2l", teacher=plain, data=digits)
    with pytest.raises(Exception, match="crop_scale"):
        SRe2L({"crop_scale": [0.9, 0.5]})


def test_evaluate_synthetic_reports_soft_labels_beside_hard(ray_session, teacher, digits,
                                                            tmp_path):
    from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
    syn = run_stage(RandomSubset, {"ipc": 2}, tmp_path, "syn", data=digits)[0]["synthetic"]
    cfg = {**NET, "networks": 5, "epochs": 20, "full_networks": 1, "full_epochs": 2,
           "lr": 0.05}
    m = run_stage(EvaluateSynthetic, cfg, tmp_path, "eval", synthetic=syn, data=digits,
                  teacher=teacher)[0]["report"]
    metrics = m.metrics()
    for name in ("accuracy_mean", "accuracy_soft_mean", "accuracy_soft_std",
                 "random_accuracy_soft_mean", "ior_soft"):
        assert name in metrics and np.isfinite(metrics[name])
    assert len(m.info["per_network"]["synthetic_soft"]) == 5
    assert m.info["soft_labels"] == "teacher"
    # a set without soft labels and no teacher: hard labels only
    hard = run_stage(EvaluateSynthetic, cfg, tmp_path, "eval2", synthetic=syn,
                     data=digits)[0]["report"].metrics()
    assert "accuracy_soft_mean" not in hard


def test_sharpness_aware_experts_differ_and_are_recorded(ray_session, digits, tmp_path):
    from stages.distill.experts import ExpertReader
    from stages.teacher.expert_trajectories import ExpertTrajectories
    cfg = {**NET, "epochs": 2, "lr": 0.05, "experts": 1}
    plain = run_stage(ExpertTrajectories, cfg, tmp_path, "plain", data=digits)[0]["experts"]
    flat = run_stage(ExpertTrajectories, {**cfg, "sam_rho": 0.05}, tmp_path, "flat",
                     data=digits)[0]["experts"]
    assert flat.info["sam_rho"] == 0.05 and plain.info["sam_rho"] == 0.0
    a, b = ExpertReader(plain, "t").load(0, 2), ExpertReader(flat, "t").load(0, 2)
    assert torch.equal(ExpertReader(plain, "t").load(0, 0), ExpertReader(flat, "t").load(0, 0))
    assert not torch.allclose(a, b) and torch.isfinite(b).all()
    from pipelines import Pipeline
    for rho, bound in ((2, "less than or equal to 1"), (-0.1, "greater than or equal to 0")):
        with pytest.raises(UserError, match=rf"stage 'experts'.*'sam_rho': value {rho} .*{bound}"):
            Pipeline.from_dict({"name": "rho", "stages": {
                "data": {"kind": "load-digits"},
                "experts": {"kind": "expert-trajectories", "config": {"sam_rho": rho},
                            "inputs": {"data": "data"}}}})


def test_sharpness_aware_gradient_is_taken_at_the_perturbed_point():
    from stages.distill.dd_common import sharpness_aware_grad
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    model = torch.nn.Module()
    model.w = w

    def loss_fn(m, batch):
        return (m.w ** 4).sum(), None, torch.zeros(1)

    loss_fn(model, None)[0].backward()
    g = w.grad.clone()
    sharpness_aware_grad(model, None, loss_fn, rho=0.1)
    at = torch.tensor([1.0, 2.0]) + 0.1 * g / g.norm()
    assert torch.allclose(w.grad, 4 * at ** 3) and torch.equal(w.data, torch.tensor([1.0, 2.0]))


def test_evaluate_synthetic_trains_against_a_stored_soft_label_column(experts, digits, tmp_path):
    from stages.distill.mtt import MatchTrajectories
    from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
    syn = run_stage(MatchTrajectories, {**DATM, "iterations": 1}, tmp_path, "datm",
                    experts=experts, data=digits)[0]["synthetic"]
    cfg = {**NET, "networks": 5, "epochs": 5, "full_networks": 1, "full_epochs": 1}
    report = run_stage(EvaluateSynthetic, cfg, tmp_path, "eval", synthetic=syn,
                       data=digits)[0]["report"]
    m = report.metrics()
    assert report.info["soft_labels"] == "stored"
    assert len(report.info["per_network"]["synthetic_soft"]) == 5
    assert np.isfinite(m["accuracy_soft_mean"]) and "random_accuracy_soft_mean" not in m


def test_evaluate_synthetic_refuses_soft_labels_of_another_class_count(digits, tmp_path):
    """A soft_label column with 3 entries per image for 10-class data: one clear error
    naming the input, the field, the bad length and the allowed one."""
    from stages.distill.dd_common import read_synthetic, write_synthetic
    from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
    syn = run_stage(RandomSubset, {"ipc": 1}, tmp_path, "rnd", data=digits)[0]["synthetic"]
    xs, ys = read_synthetic(syn, "test")
    ctx = StageContext.for_testing(tmp_path, name="soft3", kind="random-subset")
    bad = write_synthetic(ctx, xs, ys, {"method": "test"}, soft=torch.full((len(xs), 3), 1 / 3))
    cfg = {**NET, "networks": 5, "epochs": 1, "full_networks": 0}
    with pytest.raises(UserError, match=r"input 'synthetic'.*soft_label length 3 .*10, the classes"):
        run_stage(EvaluateSynthetic, cfg, tmp_path, "eval", synthetic=bad, data=digits)


def test_evaluate_synthetic_without_full_networks_reports_no_full_figures(digits, tmp_path):
    """full_networks 0: the converged full-data reference lives in another cell; this one
    trains no full-data network and reports no full_* or hlr (never a made-up value)."""
    from stages.distill.random_subset import RandomSubset
    from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
    syn = run_stage(RandomSubset, {"ipc": 1}, tmp_path, "rnd", data=digits)[0]["synthetic"]
    cfg = {**NET, "networks": 5, "epochs": 2, "full_networks": 0, "augment": True}
    report = run_stage(EvaluateSynthetic, cfg, tmp_path, "eval", synthetic=syn,
                       data=digits)[0]["report"]
    m = report.metrics()
    assert not {"full_accuracy_mean", "full_accuracy_std", "hlr"} & set(m)
    assert "full" not in report.info["per_network"]
    assert len(report.info["per_network"]["random"]) == 5 and np.isfinite(m["ior"])
