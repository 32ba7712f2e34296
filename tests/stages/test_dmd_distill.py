"""``dmd-distill`` (DMD2): a pixel generator with the regression and GAN losses, a
multi-step generator trained by backward simulation sampling its covered step counts, a
latent SD 1.5 generator against the guided teacher that loads in a plain
``DiffusionPipeline``, a run killed mid-training that resumes with both networks and both
optimisers, and one clear error per bad input."""


import pytest
import torch
from pydantic import ValidationError

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.models.diffusion import load_diffusion
from stages.models.diffusion_sampling import sample_student
from stages.train import dmd_parts as dp
from stages.train.dmd_distill import DMDDistill
from tests.stages.conftest import run_stage
from tests.stages.killed import kill_after_first_epoch, stage_script

FAST = {"epochs": 1, "batch_size": 8, "num_workers": 0, "fake_updates_per_step": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_dmd_gradient_is_the_normalised_score_difference():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    dp.dmd_loss(x, real, fake).backward()
    w = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, (fake - real) / w / x.numel(), atol=1e-6)
    assert dp.chain_covers([999.0, 749.0, 499.0, 249.0]) == {
        "1": [999.0], "2": [999.0, 499.0], "4": [999.0, 749.0, 499.0, 249.0]}


def test_the_generators_gan_term_leaves_the_discriminator_alone():
    """Through ``dp.Frozen`` the generator's GAN loss reaches its input only: no gradient
    on the fake network or the head (under DDP their hooks would fire twice a step)."""
    from diffusers import UNet2DModel
    fake = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                       norm_num_groups=4, layers_per_block=1)
    head = dp.GANHead(dp.gan_channels(fake, "t"))
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    with dp.middle_features(fake) as found:
        dp.Frozen(fake)(x, 10)
    dp.gan_losses(torch.zeros(2), torch.zeros(2), dp.Frozen(head)(found[-1]))[1].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*fake.parameters(), *head.parameters()])


def test_pixel_generators_train_and_sample(ray_session, tiny_diffusion, tmp_path):
    teacher, reflow = tiny_diffusion["teacher"], tiny_diffusion["pairs"]["reflow"]
    one = run_stage(DMDDistill, {**FAST, "regression_weight": 0.5, "gan_weight": 0.1},
                    tmp_path / "one", "dmd", teacher=teacher, pairs=reflow)[0]["model"]
    for key in ("train_loss", "train_loss_fake", "train_dmd", "train_fake_denoising"):
        assert torch.isfinite(torch.tensor(one.info[key])), key
    four = run_stage(DMDDistill, {**FAST, "num_workers": 1, "steps": 4, "rows": 16},
                     tmp_path / "four", "dmd4", teacher=teacher)[0]["model"]  # Ray Train
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    m1, m4 = load_diffusion(one.path, "t"), load_diffusion(four.path, "t")
    assert m1.student["method"] == "dmd" and m1.student["covered_steps"] == [1]
    assert m4.student["covered_steps"] == [1, 2, 4]
    for model, steps in ((m1, 1), (m4, 1), (m4, 2), (m4, 4)):
        x = sample_student(model, noise, [0, 1, 2, 3], steps, torch.Generator().manual_seed(1))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(UserError, match=r"steps for the dmd student 2.*covered: \[1\]"):
        sample_student(m1, noise, [0, 1, 2, 3], 2)


def test_latent_generator_loads_in_a_plain_pipeline(tiny_sd15, tmp_path):
    from diffusers import DiffusionPipeline
    c = tiny_sd15
    out = run_stage(DMDDistill, {**FAST, "steps": 2, "guidance_scale": 3.0,
                                 "regression_weight": 0.5, "gan_weight": 0.1},
                    tmp_path, "dmd_sd", teacher=c["teacher"], pairs=c["pairs"]["reflow"],
                    embeddings=c["embeddings"])[0]["model"]
    assert torch.isfinite(torch.tensor(out.info["train_loss_fake"]))
    pipe = DiffusionPipeline.from_pretrained(out.path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    img = pipe("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape[0] == 1 and torch.isfinite(torch.tensor(img)).all()
    # without pairs: the train prompts at the fixed w, noise drawn in the loss
    run_stage(DMDDistill, {**FAST, "guidance_scale": 3.0, "rows": 8}, tmp_path / "np",
              "dmd_np", teacher=c["teacher"], embeddings=c["embeddings"])


RESUME = {**FAST, "epochs": 40, "rows": 8}  # enough that the kill lands mid-run on a quiet machine


def test_a_killed_run_resumes_with_both_networks(tiny_diffusion, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="dmd_resume", kind="dmd-distill", seed=0)
    state = kill_after_first_epoch(ctx, stage_script(DMDDistill, "dmd_resume", RESUME),
                                   [str(tmp_path), tiny_diffusion["teacher"].path],
                                   tmp_path / "stderr.txt")
    epoch = int(state["epoch"])
    assert epoch + 1 < RESUME["epochs"], "the run ended before it was killed"
    assert set(state["nets"]) == {"student", "fake"} == set(state["optimizers"])
    assert int(state["method"]["step"]) == epoch + 1  # one step an epoch
    model = DMDDistill(RESUME).run(ctx, teacher=tiny_diffusion["teacher"])["model"]
    assert model.info["start_epoch"] == epoch + 1 and model.info["epochs"] == RESUME["epochs"]


def errors(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


def test_bad_inputs_fail_before_training(tiny_diffusion, tiny_sd15, tmp_path):
    teacher = tiny_diffusion["teacher"]
    for field in ("regression_weight", "gan_weight"):
        message = errors(lambda: run_stage(DMDDistill, {**FAST, field: 0.5}, tmp_path, "d",
                                           teacher=teacher))
        assert f"stage 'd' (dmd-distill) config: {field}" in message and "'pairs'" in message
    for bad in ({"fake_updates_per_step": 0}, {"steps": 5}, {"steps": 0}):
        with pytest.raises(ValidationError):
            DMDDistill.Config(**bad)
    message = errors(lambda: run_stage(DMDDistill, {**FAST, "guidance_scale": 3.0}, tmp_path,
                                       "d", teacher=teacher))
    assert "guidance_scale" in message and "pixel-space" in message


def test_a_gan_head_needs_a_middle_block(tmp_path):
    from diffusers import PixArtTransformer2DModel
    net = PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, in_channels=4, out_channels=8,
                                   cross_attention_dim=16, caption_channels=16)
    message = errors(lambda: dp.gan_channels(net, "stage 'd' (dmd-distill) config"))
    assert "gan_weight" in message and "mid_block" in message and "transformer_blocks" in message
