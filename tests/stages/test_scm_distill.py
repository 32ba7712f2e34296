"""``scm-distill`` (sCM / TBCM): the TrigFlow conversion and its JVP against finite
differences (a UNet with attention, and a flow-matching SD3 transformer against the
analytic flow velocity); ``jitter``'s step along the teacher's flow; pixel students from
stored trajectories (Ray Train, one worker, ``jitter``), from their clean ends (``data:
samples``, noised at sCM's proposal times) and from the teacher's rollouts,
sampled by the x0 chain in 1, 2 and 4 steps; the saved student is the EMA of its weights; a latent SD 1.5 student with embedded
guidance that a plain ``DiffusionPipeline`` samples in 2 steps; a run SIGKILLed after its
first epochs resuming with its tangent warm-up counter; one clear error for each bad input,
before any training."""

import json
import os
import time

import pytest
import torch

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.models.diffusion import load_diffusion
from stages.models.diffusion_sampling import chain_timesteps, sample_student
from stages.models.trigflow import CONVERTIBLE, LogVar, TrigFlow, jvp
from stages.train.scm_distill import SCMDistill
from stages.train.scm_parts import SCM
from tests.stages.conftest import run_stage
from tests.stages.killed import kill_after_first_epoch, stage_script

FAST = {"epochs": 1, "batch_size": 8, "num_workers": 0, "tangent_warmup_steps": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finite_difference(fn, x, t, v, h):
    cs = t.cos() * t.sin()
    step = h * cs.view(-1, *[1] * (x.ndim - 1)) * v
    with torch.no_grad():
        return (fn(x + step, t + h * cs) - fn(x - step, t - h * cs)) / (2 * h)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_jvp_through_attention_equals_finite_differences():
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
                       attention_head_dim=8, num_class_embeds=10).double().eval()
    abar = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    y = torch.tensor([1, 2, 3])
    call = lambda x_m, tau: unet(x_m, tau, class_labels=y).sample  # noqa: E731
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.3], dtype=torch.float64)
    v = torch.randn_like(x)
    for prediction in ("v_prediction", "epsilon"):
        tf = TrigFlow(prediction, 0.5, abar, 1000)
        fn = lambda a, b: tf.F(call, a, b)  # noqa: E731
        F, dF = jvp(fn, x, t, v, unet)  # the default CPU attention kernel has no JVP
        assert relative(dF, finite_difference(fn, x, t, v, 1e-4)) < 2e-3, prediction
        with torch.no_grad():
            x0, eps = tf.denoise(call, x, t)
            torch.testing.assert_close(tf.f(call, x, t), x0)  # f is the network's x0
            torch.testing.assert_close(F, fn(x, t))
            # the stored-state mapping inverts the model state: x_m at tau -> (x_t, t)
            tau = tf.model_time(t)
            back, t_back = tf.from_model(x / tf.scale(t).view(-1, 1, 1, 1), tau)
        torch.testing.assert_close(t_back.double(), t, atol=1e-5, rtol=0)
        torch.testing.assert_close(back, x, atol=1e-4, rtol=0)


def test_flow_teacher_velocity_and_jvp(tmp_path):
    from stages.models.families import load_latent
    from tests.stages.t2i_tiny import build
    model = load_latent(build("sd3", str(tmp_path / "sd3")), "teacher")
    net = model.denoiser().double()
    tf = TrigFlow.of(model, 0.5, "teacher")
    assert tf.flow and tf.t_range() == (0.0, torch.pi / 2)
    c, h, w = model.latent_shape()
    torch.manual_seed(0)
    cond = {"prompt_embeds": torch.randn(2, 8, net.config.joint_attention_dim).double(),
            "pooled_embeds": torch.randn(2, net.config.pooled_projection_dim).double()}
    call = lambda x_m, tau: model.predict(net, x_m, tau, cond, None, "none")  # noqa: E731
    x, t = torch.randn(2, c, h, w, dtype=torch.float64), torch.tensor([0.4, 1.2]).double()
    with torch.no_grad():  # dx_t/dt from the flow ODE dx_m/ds = v: D' x_m + sigma_d v / D
        d = t.cos() + 0.5 * t.sin()
        x_m, s = x / d.view(-1, 1, 1, 1), 0.5 * t.sin() / d
        flow_v = call(x_m, 1000 * s)
        dd = (-t.sin() + 0.5 * t.cos()).view(-1, 1, 1, 1)
        analytic = dd * x_m + 0.5 * flow_v / d.view(-1, 1, 1, 1)
        torch.testing.assert_close(tf.velocity(call, x, t), analytic)
    fn = lambda a, b: tf.F(call, a, b)  # noqa: E731
    v = torch.randn_like(x)
    _, dF = jvp(fn, x, t, v, net)
    assert relative(dF, finite_difference(fn, x, t, v, 1e-4)) < 2e-3


def test_an_exact_consistency_function_has_a_zero_tangent():
    """The flow-matching teacher of data at one point x0* predicts v = (x_m - x0*) / s: its
    f = x0* everywhere, so along its own flow df/dt = -sin t (x_t + sigma_d dF/dt) = 0 and
    sCM's g vanishes for every r (the JVP's tangent scaling checked against the maths)."""
    x0 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    call = lambda x_m, tau: (x_m - x0) / (tau / 1000).view(-1, 1, 1, 1)  # noqa: E731
    tf = TrigFlow("flow", 0.5)
    t = torch.tensor([0.2, 0.8, 1.4], dtype=torch.float64)
    x = torch.cos(t).view(-1, 1, 1, 1) * x0 + 0.5 * torch.sin(t).view(-1, 1, 1, 1) \
        * torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(tf.f(call, x, t), x0.expand_as(x))
        v = tf.velocity(call, x, t)
    F, dF = jvp(lambda a, b: tf.F(call, a, b), x, t, v, torch.nn.Identity())
    cs = (t.cos() * t.sin()).view(-1, 1, 1, 1)
    g = -t.cos().view(-1, 1, 1, 1) ** 2 * (0.5 * F - v) - (cs * x + 0.5 * dF)
    assert g.abs().max() < 1e-9 * x.abs().max()


def test_jitter_moves_stored_states_along_the_teachers_flow():
    """TBCM's ``jitter``: a state at t moved by one DDIM step to a time between t and the
    next stored state's stays on the teacher's flow. For the flow-matching teacher of data
    at one point x0* (exact x0_hat everywhere) the step is exact: f(x_s, s) = x0*, and the
    velocity returned is the teacher's at (x_s, s)."""
    torch.manual_seed(0)
    x0 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    call = lambda x_m, tau: (x_m - x0) / (tau / 1000).view(-1, 1, 1, 1)  # noqa: E731
    tf = TrigFlow("flow", 0.5)
    t = torch.tensor([0.4, 0.9, 1.2, 1.5], dtype=torch.float64)
    eps = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x = col(t.cos()) * x0 + 0.5 * col(t.sin()) * eps
    method = SCM()
    method.tf, t_next = tf, torch.tensor([0.2, 0.4, 0.9, 1.2], dtype=torch.float64)
    with torch.no_grad():
        v = tf.velocity(call, x, t)
        x_s, s, v_s = method.jittered(call, x, t, v, t_next, torch.Generator().manual_seed(1))
        torch.testing.assert_close(tf.f(call, x_s, s), x0.expand_as(x))
        torch.testing.assert_close(x_s, col(s.cos()) * x0 + 0.5 * col(s.sin()) * eps)
        torch.testing.assert_close(v_s, tf.velocity(call, x_s, s))
    assert ((s >= t_next) & (s <= t)).all() and (s != t).all()
    torch.testing.assert_close(TrigFlow.step(x, t, t, v), x)  # no move, no change


def test_logvar_learns_at_its_own_rate_only_when_asked():
    """``logvar_lr``: u(t) in its own AdamW group (a fine-tuning lr leaves u(t) near 0, so
    the adaptive weighting would not adapt); unset, one group as before (old checkpoints
    of the same key resume)."""
    nets = {"student": torch.nn.Linear(3, 3), "logvar": LogVar()}
    method = SCM()
    for logvar_lr, lrs in ((None, [1e-4]), (1e-2, [1e-4, 1e-2])):
        method.cfg = SCMDistill({"lr": 1e-4, "logvar_lr": logvar_lr}).config
        groups = method.optimizers(nets)["student"].param_groups
        assert [g["lr"] for g in groups] == lrs
        assert sum(len(g["params"]) for g in groups) == 4
        keyed = method.cfg.split_execution()[0]
        assert ("logvar_lr" in keyed) == (logvar_lr is not None)  # unset: the old key


def test_time_difference_averages_out_an_embedding_that_only_integer_times_trained():
    """fn = x cos t + a sin(k t): a smooth flow plus the fast ripple of a time embedding
    between the timesteps it was trained at. The exact JVP follows the ripple (a k cos k t);
    the central difference over +-d sees the flow (within a / d) and its part along dx_t/dt
    stays exact."""
    a, k, d = 1e-3, 2000.0, 0.02
    fn = lambda x, t: x * t.cos().view(-1, 1) + a * torch.sin(k * t).view(-1, 1)  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7, 1.0, 1.3], dtype=torch.float64)
    v = torch.randn(4, 3, dtype=torch.float64)
    cs = (t.cos() * t.sin()).view(-1, 1)
    smooth = cs * (v * t.cos().view(-1, 1) - x * t.sin().view(-1, 1))
    _, exact = jvp(fn, x, t, v, torch.nn.Identity())
    F, averaged = jvp(fn, x, t, v, torch.nn.Identity(), time_delta=d, t_range=(0.0, 1.5))
    torch.testing.assert_close(F, fn(x, t))
    torch.testing.assert_close(exact, smooth + cs * a * k * torch.cos(k * t).view(-1, 1))
    assert (averaged - smooth).abs().max() < cs.max() * (a / d + d)  # O(a / d) + O(d^2 x)
    assert (exact - smooth).abs().max() > 10 * (averaged - smooth).abs().max()


def test_unconvertible_prediction_lists_the_convertible_ones():
    with pytest.raises(UserError) as e:
        TrigFlow("mu", 0.5, None, 1000, where="stage 'scm' (scm-distill) input 'teacher'")
    msg = str(e.value)
    assert "'mu'" in msg and "scm-distill" in msg and all(p in msg for p in CONVERTIBLE)


@pytest.fixture(scope="module")
def pixel_students(ray_session, tiny_diffusion, tmp_path_factory):
    root = tmp_path_factory.mktemp("scm")
    t0 = time.time()
    traj = run_stage(SCMDistill, {**FAST, "num_workers": 1, "jitter": True}, root / "traj",
                     "scm_traj", teacher=tiny_diffusion["teacher"],
                     trajectories=tiny_diffusion["trajectories"])[0]["model"]
    noise = run_stage(SCMDistill, {**FAST, "data": "noise", "rows": 16, "rollout_steps": 2},
                      root / "noise", "scm_noise", teacher=tiny_diffusion["teacher"])[0]["model"]
    samples = run_stage(SCMDistill, {**FAST, "data": "samples"}, root / "samples",
                        "scm_samples", teacher=tiny_diffusion["teacher"],
                        trajectories=tiny_diffusion["trajectories"])[0]["model"]
    print(f"pixel students: {time.time() - t0:.1f} s")
    return {"trajectories": traj, "noise": noise, "samples": samples}


def test_pixel_students_train_and_sample_their_chains(pixel_students, tiny_diffusion):
    for data, model in pixel_students.items():
        info = model.info
        assert info["method"] == "scm" and info["data"] == data and info["epochs"] == 1
        for k in ("train_loss", "train_weighted_distance", "train_tangent_norm"):
            assert torch.isfinite(torch.tensor(info[k])), (data, k)
        assert 0 < info["tangent_warmup"] <= 1
        student = load_diffusion(model.path, "test")
        chains = student.student["timesteps"]
        assert student.student["covered_steps"] == [1, 2, 4]
        assert chains["1"] == [999.0] and chains["2"][0] == 999.0
        assert 999 > chains["4"][1] > chains["2"][1] == chains["4"][2] > chains["4"][3] > 0
        assert chain_timesteps(student.student, 2) == chains["2"]
        for steps in (1, 2, 4):
            x = sample_student(student, torch.randn(4, 1, 8, 8), [0, 1, 2, 3], steps,
                               torch.Generator().manual_seed(0))
            assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.std() > 0
    # trajectories: 24 rows of 4 noisy states, batches of 8 trajectories: 3 steps;
    # samples: the same 24 rows' clean ends, 3 steps
    assert pixel_students["trajectories"].info["steps"] == 3.0
    assert pixel_students["samples"].info["steps"] == 3.0


def test_samples_are_the_clean_ends_noised_at_the_proposal_times(tiny_diffusion):
    """data: samples: x_t = cos t x0 + sin t sigma_d eps, x0 the stored clean end,
    t = atan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2), drawn from the generator in
    that order (tau, then eps)."""
    cfg = SCMDistill.Config(data="samples", P_mean=0.3, P_std=0.8)
    method = SCM()
    method.cfg, method.clean = cfg, 2
    method.tf = TrigFlow.of(load_diffusion(tiny_diffusion["teacher"].path, "test"), 0.5, "t")
    states = torch.randn(6, 3, 1, 8, 8)
    batch = {"states": states, "label": torch.arange(6)}
    x_t, t, t_next, rows = method.from_stored(batch, ["label"], torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    tau = 0.3 + 0.8 * torch.randn(6, generator=gen)
    want_t = torch.atan(tau.exp() / 0.5).clamp(*method.tf.t_range())
    eps = torch.randn(6, 1, 8, 8, generator=gen)
    c, s = want_t.cos().view(-1, 1, 1, 1), want_t.sin().view(-1, 1, 1, 1)
    torch.testing.assert_close(t, want_t)
    torch.testing.assert_close(x_t, c * states[:, 2] + s * 0.5 * eps)
    assert t_next is None and torch.equal(rows["label"], torch.arange(6))


def test_latent_student_with_embedded_guidance_samples_in_a_plain_pipeline(tiny_sd15,
                                                                           tmp_path):
    from diffusers import DiffusionPipeline
    model = run_stage(SCMDistill, {**FAST, "guidance": "embedded"}, tmp_path, "scm_sd",
                      teacher=tiny_sd15["teacher"], trajectories=tiny_sd15["trajectories"],
                      embeddings=tiny_sd15["embeddings"])[0]["model"]
    assert model.info["method"] == "scm" and torch.isfinite(torch.tensor(
        model.info["train_loss"]))
    info = json.load(open(os.path.join(model.path, "student.json")))
    assert info["guidance"] == "embedded" and info["max_steps"] == 4
    pipe = DiffusionPipeline.from_pretrained(model.path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.unet.config.time_cond_proj_dim  # w through the guidance slot
    img = pipe("a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape[0] == 1 and torch.isfinite(torch.tensor(img)).all() and img.std() > 0
    # data: noise (the teacher's guided rollouts), a LoRA student at a fixed w
    lora = run_stage(SCMDistill, {**FAST, "data": "noise", "rows": 8, "rollout_steps": 1,
                                  "guidance_scale": 3.0, "lora": {"rank": 4, "alpha": 4}},
                     tmp_path, "scm_lora", teacher=tiny_sd15["teacher"],
                     embeddings=tiny_sd15["embeddings"])[0]["model"]
    assert lora.info["data"] == "noise" and 0 < lora.info["trainable_params"] < \
        lora.info["params"] / 5 and torch.isfinite(torch.tensor(lora.info["train_loss"]))
    assert os.path.isfile(os.path.join(lora.path, "pytorch_lora_weights.safetensors"))
    # data: samples (the stored clean latents) at a fixed w
    samples = run_stage(SCMDistill, {**FAST, "data": "samples", "guidance_scale": 3.0},
                        tmp_path, "scm_sd_samples", teacher=tiny_sd15["teacher"],
                        trajectories=tiny_sd15["trajectories"],
                        embeddings=tiny_sd15["embeddings"])[0]["model"]
    assert samples.info["data"] == "samples" and torch.isfinite(torch.tensor(
        samples.info["train_loss"]))


def test_the_saved_student_is_the_ema_of_its_weights(tiny_diffusion, tmp_path):
    """One step (8 rows, batch 8): the EMA is d theta_0 + (1 - d) theta_1, theta_0 the
    teacher's weights and theta_1 what ema_decay 0 saves (the EMA never feeds the loss)."""
    from diffusers import UNet2DModel
    one = {**FAST, "data": "noise", "rows": 8, "rollout_steps": 1}
    saved = {d: UNet2DModel.from_pretrained(os.path.join(run_stage(
        SCMDistill, {**one, "ema_decay": d}, tmp_path, f"scm_ema{d}", teacher=tiny_diffusion[
            "teacher"])[0]["model"].path, "unet")).state_dict() for d in (0.0, 0.75)}
    theta0 = load_diffusion(tiny_diffusion["teacher"].path, "test").unet.state_dict()
    moved = [k for k in theta0 if not torch.equal(theta0[k], saved[0.0][k])]
    assert len(moved) > len(theta0) / 2  # the step changed the weights
    for k in theta0:
        torch.testing.assert_close(saved[0.75][k], 0.75 * theta0[k] + 0.25 * saved[0.0][k])


def test_cosine_lr_schedule_decays_to_zero():
    method = SCM()
    method.cfg = SCMDistill.Config(lr_schedule="cosine")
    assert [round(method.lr_factor(p), 6) for p in (0, 0.5, 1)] == [1.0, 0.5, 0.0]
    method.cfg = SCMDistill.Config()
    assert method.lr_factor(0.9) == 1.0


RESUME = {**FAST, "epochs": 25, "data": "noise", "rows": 8, "rollout_steps": 1}


def test_a_killed_run_resumes_with_its_warmup_counter(tiny_diffusion, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="scm_resume", kind="scm-distill", seed=0)
    state = kill_after_first_epoch(ctx, stage_script(SCMDistill, "scm_resume", RESUME),
                                   [str(tmp_path), tiny_diffusion["teacher"].path],
                                   tmp_path / "stderr.txt")
    epoch = int(state["epoch"])
    assert int(state["method"]["step"]) == epoch + 1  # one step an epoch (8 rows, batch 8)
    assert epoch + 1 < RESUME["epochs"], "the run ended before it was killed"
    model = SCMDistill(RESUME).run(ctx, teacher=tiny_diffusion["teacher"])["model"]
    assert model.info["start_epoch"] == epoch + 1 and model.info["epochs"] == RESUME["epochs"]
    assert model.info["steps"] == RESUME["epochs"]  # the warm-up counter went on
    assert model.info["tangent_warmup"] == 1.0


def errors(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


def test_bad_inputs_fail_before_training(tiny_diffusion, tiny_sd15, tmp_path):
    teacher, traj = tiny_diffusion["teacher"], tiny_diffusion["trajectories"]
    run = lambda config, **inputs: run_stage(  # noqa: E731
        SCMDistill, {**FAST, **config}, tmp_path, "scm", teacher=teacher, **inputs)
    msg = errors(lambda: run({}))
    assert "input 'trajectories'" in msg and "diffusion-trajectories" in msg
    msg = errors(lambda: run({}, trajectories=tiny_diffusion["pairs"]["consistency"]))
    assert "info.pairs='consistency'" in msg and "not a diffusion-pairs output" in msg
    msg = errors(lambda: run({"data": "noise"}, trajectories=traj))
    assert "unwired for data: noise" in msg
    msg = errors(lambda: run({"guidance_scale": 3.0}, trajectories=traj))
    assert "guidance_scale" in msg and "pixel-space" in msg
    msg = errors(lambda: run({}, trajectories=traj, embeddings=tiny_sd15["embeddings"]))
    assert "embeddings" in msg
    msg = errors(lambda: run_stage(SCMDistill, {**FAST, "data": "noise",
                                                "guidance": "embedded"}, tmp_path, "scm",
                                   teacher=tiny_sd15["teacher"],
                                   embeddings=tiny_sd15["embeddings"]))
    assert "guidance_range" in msg
    from pipelines.stage import Dataset
    no_clean = Dataset(path=traj.path, info={**traj.info, "timesteps": [
        t for t in traj.info["timesteps"] if t != -1]})
    msg = errors(lambda: run({"data": "samples"}, trajectories=no_clean))
    assert "info.timesteps" in msg and "clean end (-1)" in msg and "keep_states" in msg
    with pytest.raises(ValueError, match="rows is for data: noise"):
        SCMDistill({"rows": 8})
    with pytest.raises(ValueError, match="jitter is for data: trajectories"):
        SCMDistill({"data": "noise", "jitter": True})
    assert not os.path.exists(tmp_path / "scm" / "model")  # nothing trained
