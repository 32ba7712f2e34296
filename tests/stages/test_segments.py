"""Hyper-SD's trajectory-segmented consistency distillation (``consistency-distill`` with
``segments``): the segment ends of a pair, phases of ``epochs`` each that end in ordinary
consistency distillation, on a tiny pixel teacher and a tiny latent SD 1.5 pipeline; and
one clear error for segments that do not decrease, do not end in 1 or do not divide the
stored timesteps."""

import math

import pytest
import torch
from pydantic import ValidationError

from pipelines.errors import UserError
from stages.models.diffusion import load_diffusion
from stages.models.diffusion_sampling import sample_student
from stages.train.consistency_distill import (ConsistencyDistill, segment_boundaries,
                                              segment_ends)
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
