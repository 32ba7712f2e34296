"""Latent text-to-image teachers end to end, on tiny random pipelines of real diffusers
architectures (``tests/stages/t2i_tiny.py``), one Ray session: pretrained-diffusion ->
load-prompts -> encode-prompts -> diffusion-trajectories -> diffusion-pairs -> a one-epoch
consistency student -> the saved student loaded with ``DiffusionPipeline.from_pretrained``
in a process that never imports distillery and sampled in 2 steps. Plus LoRA (its weights
load onto the teacher and equal the fused student), embedded guidance, identical
trajectories from 1 and 2 actors, and one clear error for each bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines.errors import UserError
from stages.data.load_prompts import LoadPrompts
from stages.distill.diffusion_pairs import DiffusionPairs
from stages.models.families import FAMILIES
from stages.teacher.diffusion_trajectories import DiffusionTrajectories
from stages.teacher.encode_prompts import EncodePrompts
from stages.teacher.pretrained_diffusion import PretrainedDiffusion
from stages.train.consistency_distill import ConsistencyDistill
from stages.train.progressive_distill import ProgressiveDistill
from stages.train.reflow import Reflow
from tests.stages.conftest import run_stage
from tests.stages.t2i_tiny import build, call_kwargs

FAMILIES_TESTED = ("sd15", "sdxl", "pixart", "sd3")
PROMPTS = ["a cat", "a dog", "a red car", "a blue house", "a tree", "a horse",
           "the cat on a car", "a photo of a dog"]
TRAJ = {"steps": 4, "keep_states": 3, "samples_per_prompt": 2, "guidance_scale": [1.5, 4.0],
        "shard_size": 4}
STUDENT = {"epochs": 1, "batch_size": 8, "num_workers": 0}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return run_stage(LoadPrompts, {"path": str(root / "p.txt"), "test_fraction": 0.25},
                     root, "prompts")[0]["prompts"]


class Chain:
    """One family's artifacts, made once per module."""

    def __init__(self, family, root, prompts):
        self.family, self.root = family, root
        src = build(family, str(root / "src"))
        self.teacher = run_stage(PretrainedDiffusion, {"path": src}, root / "t", "teacher")[0]["model"]
        self.embeddings = run_stage(EncodePrompts, {"batch_size": 4}, root / "e", "emb",
                                    pipeline=self.teacher, prompts=prompts)[0]["embeddings"]
        self.trajectories = run_stage(DiffusionTrajectories, TRAJ, root / "tr", "traj", seed=1,
                                      teacher=self.teacher, embeddings=self.embeddings
                                      )[0]["trajectories"]
        self.pairs = run_stage(DiffusionPairs, {}, root / "p", "pairs",
                               trajectories=self.trajectories)[0]

    def student(self, name, **config):
        return run_stage(ConsistencyDistill, {**STUDENT, **config}, self.root / name, name,
                         teacher=self.teacher, pairs=self.pairs["consistency"],
                         embeddings=self.embeddings)[0]["model"]


@pytest.fixture(scope="module")
def chains(ray_session, prompts, tmp_path_factory):
    return {f: Chain(f, tmp_path_factory.mktemp(f), prompts) for f in FAMILIES_TESTED}


@pytest.fixture(scope="module")
def students(chains):
    """A fixed-guidance consistency student of each family (trajectory mode, w read from
    per-family trajectories at one w would be needed: online mode takes the teacher's
    guided step at the fixed w instead), plus SD 1.5's embedded-guidance and LoRA ones."""
    out = {f: c.student(f"cd_{f}", mode="online", guidance_scale=3.0) for f, c in chains.items()}
    sd = chains["sd15"]
    out["sd15_embedded"] = sd.student("cd_embedded", guidance="embedded")
    out["sd15_lora"] = sd.student("cd_lora", mode="online", guidance_scale=3.0,
                                  lora={"rank": 4, "alpha": 4})
    out["sd15_reflow"] = run_stage(Reflow, {**STUDENT, "guidance": "embedded"},
                                   sd.root / "reflow", "reflow", teacher=sd.teacher,
                                   pairs=sd.pairs["reflow"], embeddings=sd.embeddings
                                   )[0]["model"]
    out["sd3_progressive"] = run_stage(ProgressiveDistill,
                                       {**STUDENT, "start_steps": 4, "final_steps": 2,
                                        "guidance_scale": 3.0},
                                       chains["sd3"].root / "pd", "progressive",
                                       teacher=chains["sd3"].teacher,
                                       pairs=chains["sd3"].pairs["reflow"],
                                       embeddings=chains["sd3"].embeddings)[0]["model"]
    return out


LOAD_SCRIPT = """
import json, sys, torch
from diffusers import DiffusionPipeline
out = {}
for name, (path, kwargs) in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", **kwargs).images
    out[name] = [type(pipe).__name__, type(pipe.scheduler).__name__, list(img.shape),
                 bool(abs(img).sum() > 0 and img.std() > 0)]
assert not any(m.split(".")[0] in ("pipelines", "stages") for m in sys.modules)
print(json.dumps(out))
"""


def test_students_load_with_plain_diffusers_and_sample_in_two_steps(students, tmp_path):
    runs = {}
    for name, model in students.items():
        family = name.split("_")[0]
        guidance = 4.0 if name in ("sd15_embedded", "sd15_reflow") else 1.0
        runs[name] = [model.path, {**call_kwargs(family), "guidance_scale": guidance}]
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(runs)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (pipe_class, scheduler, shape, varied) in out.items():
        family = name.split("_")[0]
        assert pipe_class == FAMILIES[pipe_class].pipelines[0] or pipe_class in FAMILIES
        flow = FAMILIES[pipe_class].flow
        if name.endswith("progressive"):  # DDIM (VP) or the teacher's flow Euler
            assert scheduler == ("FlowMatchEulerDiscreteScheduler" if flow
                                 else "DDIMScheduler"), name
        elif name.endswith("reflow"):  # rectified flow: flow Euler (as DPM-Solver++ order 1)
            assert scheduler == ("FlowMatchEulerDiscreteScheduler" if flow
                                 else "DPMSolverMultistepScheduler"), name
        else:
            assert scheduler == ("FlowMatchLCMScheduler" if flow else "LCMScheduler"), name
        assert shape[0] == 1 and varied, (name, shape)
    assert set(out) == set(students)
    for name, model in students.items():
        info = json.load(open(os.path.join(model.path, "student.json")))
        if not name.endswith(("reflow", "progressive")):
            assert info["method"] == "consistency" and info["max_steps"] == 2  # 3 states kept


def test_trajectories_carry_prompts_and_w_and_are_identical_for_1_and_2_actors(
        chains, tmp_path):
    sd = chains["sd15"]
    one = sd.trajectories.to_numpy()
    two = run_stage(DiffusionTrajectories, {**TRAJ, "actors": 2}, tmp_path, "traj", seed=1,
                    teacher=sd.teacher, embeddings=sd.embeddings)[0]["trajectories"].to_numpy()
    order1, order2 = np.argsort(one["id"]), np.argsort(two["id"])
    for k in ("prompt_id", "prompt_index", "guidance_scale", "noise", "states", "sample"):
        np.testing.assert_array_equal(np.stack(one[k])[order1], np.stack(two[k])[order2], k)
    train = list(sd.embeddings.to_numpy(["split"])["split"]).count("train")
    assert 0 < train < len(PROMPTS)
    assert len(one["id"]) == train * TRAJ["samples_per_prompt"]
    w = np.asarray(one["guidance_scale"])
    assert ((w >= 1.5) & (w <= 4.0)).all() and len(set(w.tolist())) == len(w)
    assert sd.trajectories.info["guidance"] == "cfg"
    assert np.stack(one["states"]).shape[1:3] == (3, 4)  # K = 3 latents, 4 channels


def test_embeddings_hold_each_prompt_once_and_the_unconditional_row(chains):
    for family, chain in chains.items():
        emb = chain.embeddings.to_numpy()
        ids = list(emb["id"])
        assert ids.count(-1) == 1 and len(ids) == len(PROMPTS) + 1, family
        assert "prompt_embeds" in chain.embeddings.info["columns"]
    assert "pooled_embeds" in chains["sdxl"].embeddings.info["columns"]


def test_lora_weights_load_onto_the_teacher_and_equal_the_fused_student(chains, students):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    lora = students["sd15_lora"]
    assert os.path.isfile(os.path.join(lora.path, "pytorch_lora_weights.safetensors"))
    assert 0 < lora.info["trainable_params"] < lora.info["params"] / 5
    pipe = DiffusionPipeline.from_pretrained(chains["sd15"].teacher.path)
    pipe.load_lora_weights(lora.path)
    fused = UNet2DConditionModel.from_pretrained(os.path.join(lora.path, "unet"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    h = torch.randn(2, 77, fused.config.cross_attention_dim)
    with torch.no_grad():
        a, b = pipe.unet(x, t, encoder_hidden_states=h).sample, fused(x, t, encoder_hidden_states=h).sample
        base = UNet2DConditionModel.from_pretrained(
            os.path.join(chains["sd15"].teacher.path, "unet"))(x, t, encoder_hidden_states=h).sample
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - base).abs().max() > 1e-6  # the adapter changed something


def test_embedded_guidance_adds_a_zero_initialised_slot(chains, students):
    from diffusers import UNet2DConditionModel
    emb = students["sd15_embedded"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(emb.path, "unet"))
    assert unet.config.time_cond_proj_dim
    info = json.load(open(os.path.join(emb.path, "student.json")))
    assert info["guidance"] == "embedded" and info["guidance_scale"] is None


def errors(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


def test_bad_inputs_get_one_clear_error_before_any_training(chains, tmp_path):
    sd, pixart = chains["sd15"], chains["pixart"]
    # a folder without model_index.json; an unsupported pipeline class
    (tmp_path / "empty").mkdir()
    msg = errors(lambda: run_stage(PretrainedDiffusion, {"path": str(tmp_path / "empty")},
                                   tmp_path / "a", "teacher"))
    assert "model_index.json" in msg and "teacher" in msg
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    msg = errors(lambda: run_stage(PretrainedDiffusion, {"path": str(tmp_path / "odd")},
                                   tmp_path / "b", "teacher"))
    assert "KandinskyPipeline" in msg and "StableDiffusionPipeline" in msg
    # guidance: embedded on a family without the slot lists the families with one
    msg = errors(lambda: pixart.student("bad_embedded", guidance="embedded"))
    assert "embedded" in msg and "stable-diffusion" in msg
    # LoRA targets matching nothing list some module names
    msg = errors(lambda: sd.student("bad_lora", mode="online", guidance_scale=3.0,
                                    lora={"rank": 2, "target_modules": ["nothing_here"]}))
    assert "nothing_here" in msg and "to_q" in msg
    # a fixed student in trajectory mode needs the trajectories' one w
    msg = errors(lambda: sd.student("bad_w", guidance_scale=3.0))
    assert "guidance_scale" in msg and "online" in msg
    # latents of another family (16 channels) against a 4-channel teacher
    msg = errors(lambda: run_stage(ConsistencyDistill, {**STUDENT, "guidance": "embedded"},
                                   tmp_path / "c", "cd", teacher=sd.teacher,
                                   pairs=chains["sd3"].pairs["consistency"],
                                   embeddings=sd.embeddings))
    assert "channels" in msg
    # embeddings of another pipeline family
    msg = errors(lambda: run_stage(DiffusionTrajectories, TRAJ, tmp_path / "d", "traj",
                                   teacher=sd.teacher, embeddings=pixart.embeddings))
    assert "PixArtAlphaPipeline" in msg
    # a guidance range with low > high, or negative
    for bad in ([4.0, 1.5], [-1.0, 2.0], -2.0):
        with pytest.raises(Exception) as e:
            DiffusionTrajectories.Config(guidance_scale=bad)
        assert "guidance_scale" in str(e.value)


def test_latent_students_are_mlflow_models(students):
    """A latent student's MLmodel runs its own diffusers pipeline: a prompt per row."""
    import mlflow
    import pandas as pd
    model = mlflow.pyfunc.load_model(students["sd15_embedded"].path)
    rows = pd.DataFrame({"prompt": ["a cat", "a dog"], "num_inference_steps": [2, 2],
                         "guidance_scale": [4.0, 4.0], "seed": [0, 0]})
    images = model.predict(rows)
    assert images.dtype == np.uint8 and images.shape[0] == 2 and images.shape[-1] == 3
    assert (images[0] != images[1]).any()  # the prompt matters
    np.testing.assert_array_equal(model.predict(rows.iloc[:1]), images[:1])
    meta = mlflow.models.Model.load(students["sd15_embedded"].path).metadata
    assert meta["pipeline_tag"] == "text-to-image" and meta["method"] == "consistency"
