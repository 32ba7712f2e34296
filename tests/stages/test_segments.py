"""Hyper-SD's trajectory-segmented consistency distillation (``consistency-distill`` with
``segments``): the segment ends of a pair, phases of ``epochs`` each that end in ordinary
consistency distillation, on a tiny pixel teacher and a tiny latent SD 1.5 pipeline; each
earlier phase's student kept and sampled at its k steps; and
one clear error for segments that do not decrease, do not end in 1 or do not divide the
stored timesteps."""

import math

import pytest
import torch
from pydantic import ValidationError

from pipelines.errors import UserError
from stages.models.diffusion import load_diffusion
from stages.models.diffusion_sampling import consistency_fn, ddim_step, sample_student
from stages.train.consistency_distill import (ConsistencyDistill, Segments,
                                              segment_boundaries, segment_ends)
from tests.stages.conftest import run_stage


def test_segment_ends_are_the_lower_boundary_of_each_pair():
    grid = [999, 749, 499, 249, -1]
    assert segment_boundaries(grid, 4) == grid
    assert segment_boundaries(grid, 2) == [999, 499, -1]
    assert segment_boundaries(grid, 1) == [999, -1]
    t_lo = torch.tensor([749.0, 499.0, 249.0, -1.0])
    assert segment_ends(t_lo, [999, 499, -1]).tolist() == [499.0, 499.0, -1.0, -1.0]


def test_pixel_phases_train_and_the_student_samples(tiny_diffusion, tmp_path):
    pairs, teacher = tiny_diffusion["pairs"]["consistency"], tiny_diffusion["teacher"]
    out = run_stage(ConsistencyDistill, {"epochs": 1, "batch_size": 32, "num_workers": 0,
                                         "segments": [4, 2, 1]},
                    tmp_path, "tscd", pairs=pairs, teacher=teacher)[0]["model"]
    assert out.info["epochs"] == 3  # one epoch per phase
    assert out.info["segments"] == 1  # the last phase: ordinary consistency distillation
    model = load_diffusion(out.path, "test")
    assert model.student["segments"] == [4, 2, 1]
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4):
        x = sample_student(model, noise, [0, 1, 2, 3], steps, torch.Generator().manual_seed(1))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    # the 4- and 2-segment phases' students, kept (Hyper-SD's k-step models)
    grid = pairs.info["timesteps"]
    assert model.student["segment_unets"] == {"2": {"boundaries": [grid[0], grid[2], -1]},
                                              "4": {"boundaries": grid}}
    weights = [dict(u.named_parameters()) for u in (model.segment_unets[4],
                                                    model.segment_unets[2], model.unet)]
    for a, b in zip(weights, weights[1:]):  # each phase trained on from the last
        assert any(not torch.equal(a[k], b[k]) for k in a)
    # 4 steps: the 4-segment model's DDIM jumps between its boundaries, deterministic
    labels = torch.tensor([0, 1, 2, 3])
    x, unet = noise.clone(), model.segment_unets[4]
    with torch.no_grad():
        for t, end in zip(grid[:-1], grid[1:]):
            tt = torch.full((4,), float(t))
            if end < 0:
                x = consistency_fn(model, unet, x, tt, labels)
            else:
                x0, eps = model.predict_x0(unet, x, tt, labels)
                x = ddim_step(model, x, x0, eps, tt, torch.full((4,), float(end)))
    for seed in (1, 2):
        got = sample_student(model, noise, labels, 4, torch.Generator().manual_seed(seed))
        assert torch.allclose(got, x.clamp(-1, 1), atol=1e-5)


def test_a_phase_is_kept_when_it_ends_and_survives_a_resume():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    method, net = Segments(), Net()
    method.segments, method.epochs_per_phase, method.keep_phases = [4, 2, 1], 2, True
    method.phase_nets = {}
    for epoch in range(6):
        method.begin_epoch(epoch, {"student": net})
        kept = sorted(method.phase_nets)
        assert kept == {0: [], 1: [], 2: [4], 3: [4], 4: [2, 4], 5: [2, 4]}[epoch], epoch
        with torch.no_grad():
            net.w += 1  # "training" this epoch
    assert method.phase_nets[4]["w"].item() == 2 and method.phase_nets[2]["w"].item() == 4
    resumed = Segments()
    resumed.load_state_dict(method.state_dict())  # the checkpoint's method state
    assert {k: v["w"].item() for k, v in resumed.phase_nets.items()} == {4: 2.0, 2: 4.0}


def test_latent_phases_train(tiny_sd15, tmp_path):
    c = tiny_sd15
    out = run_stage(ConsistencyDistill, {"epochs": 1, "batch_size": 8, "num_workers": 0,
                                         "segments": [2, 1], "guidance": "embedded"},
                    tmp_path, "tscd_latent", pairs=c["pairs"]["consistency"],
                    teacher=c["teacher"], embeddings=c["embeddings"])[0]["model"]
    assert out.info["epochs"] == 2 and out.info["segments"] == 1
    losses = {k: v for k, v in out.info.items() if k.startswith("train_")}
    assert "train_loss" in losses and all(math.isfinite(v) for v in losses.values()), losses
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(out.path)  # the saved pipeline, plain diffusers
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    img = pipe("a cat", num_inference_steps=1, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # w through the slot
    assert img.shape[0] == 1 and torch.isfinite(torch.tensor(img)).all()


@pytest.mark.parametrize("segments", [[2, 4, 1], [4, 2], [4, 4, 1]])
def test_segments_must_decrease_to_one(segments):
    with pytest.raises(ValidationError, match="decrease phase by phase and end in 1"):
        ConsistencyDistill.Config(segments=segments)


def test_segments_must_divide_the_stored_intervals(tiny_diffusion, tmp_path):
    with pytest.raises(UserError) as e:
        run_stage(ConsistencyDistill, {"epochs": 1, "num_workers": 0, "segments": [3, 1]},
                  tmp_path, "bad", pairs=tiny_diffusion["pairs"]["consistency"],
                  teacher=tiny_diffusion["teacher"])
    message = str(e.value)
    assert "segments" in message and "3" in message and "one of [1, 2, 4]" in message
    assert "999" in message  # the stored timesteps, the boundaries that exist
