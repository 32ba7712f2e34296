"""fit-text-to-image-teacher on a few hundred captioned MNIST digits, tiny networks, one
epoch per phase: the folder is a StableDiffusionPipeline that plain diffusers loads and
samples with guidance (in a process that never imports distillery); the captions follow
the measured stroke width and slant; data without prompts is one clear error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines.errors import UserError
from stages.data.captions import DIGITS, WORDS, caption, class_stats, slant, stroke_width
from stages.data.mnist import LoadMNIST
from stages.teacher.fit_text_to_image import FitTextToImageTeacher
from tests.stages.conftest import run_stage

TINY = {"vae_epochs": 1, "vae_channels": [8, 16, 16], "vae_batch_size": 128,
        "epochs": 1, "unet_channels": [16, 32], "attention_heads": 2,
        "text_width": 16, "text_heads": 2, "max_minutes": 1, "vae_max_minutes": 1}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return run_stage(LoadMNIST, {"captions": True, "test_fraction": 0.95},
                     tmp_path_factory.mktemp("mnist"), "data")[0]["data"]


@pytest.fixture(scope="module")
def t2i(captioned, tmp_path_factory):
    out, ctx = run_stage(FitTextToImageTeacher, TINY, tmp_path_factory.mktemp("t2i"), "t2i",
                         data=captioned)
    return out["model"], ctx


SAMPLE = r"""
import json, sys
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer
path, words = sys.argv[1], json.loads(sys.argv[2])
tok = CLIPTokenizer.from_pretrained(path + "/tokenizer")
split = {w: tok.convert_ids_to_tokens(tok(w).input_ids)[1:-1] for w in words}
pipe = StableDiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
out = pipe(["a thick handwritten seven, slanted left"], num_inference_steps=2,
           guidance_scale=4.0, height=32, width=32, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(torch.tensor(out)).all()),
                  "split": split, "max_length": tok.model_max_length,
                  "ours": sorted(m for m in ("pipelines", "stages") if m in sys.modules)}))
"""


def test_the_folder_is_a_stable_diffusion_pipeline(t2i, captioned):
    model, ctx = t2i
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    words = [w for w in WORDS if w != ","]
    done = subprocess.run([sys.executable, "-c", SAMPLE, model.path, json.dumps(words)],
                          capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["shape"] == [1, 32, 32, 1] and got["finite"]
    assert got["ours"] == []  # plain diffusers: distillery never imported
    assert got["split"] == {w: [w + "</w>"] for w in words}  # each caption word one token
    assert got["max_length"] == 16
    with open(os.path.join(model.path, "tokenizer", "merges.txt")) as f:
        assert f.readline().strip() == "#version: 0.2"
    info = model.info
    assert info["latent_shape"] == [4, 8, 8] and info["image_size"] == 32
    assert info["epochs"] == 1 and info["vae_epochs"] == 1 and info["scaling_factor"] > 0
    assert {"vae_train_loss", "vae_train_kl", "train_loss"} <= set(ctx.metrics)
    with open(os.path.join(model.path, "vae", "config.json")) as f:
        assert json.load(f)["scaling_factor"] == pytest.approx(info["scaling_factor"])


def test_captions_follow_the_pixels(captioned):
    def bar(width, shear=0.0):
        img = np.zeros((28, 28), np.float32)
        for r in range(4, 24):
            c = int(round(14 + shear * (14 - r)))  # shear > 0: the top leans right
            img[r, c - width // 2:c - width // 2 + width] = 1.0
        return img

    stats = {1: stroke_width(bar(3))}
    assert caption(bar(3), 1, stats) == "a handwritten one"
    assert caption(bar(1), 1, stats) == "a thin handwritten one"
    assert caption(bar(6), 1, stats) == "a thick handwritten one"
    assert slant(bar(3, 0.5)) > 0.3 > slant(bar(3)) > -0.15 > slant(bar(3, -0.5))
    # a sheared bar's measured width is its own class median here (jagged edges make the
    # width estimate of a sheared bar lower than an upright one's)
    sheared = {1: stroke_width(bar(3, 0.5))}
    assert caption(bar(3, 0.5), 1, sheared) == "a handwritten one, slanted right"
    assert caption(bar(6, -0.5), 1, sheared) == "a thick handwritten one, slanted left"
    assert caption(np.zeros((1, 28, 28)), 0, {0: 0.0}) == "a handwritten zero"  # blank
    assert class_stats([bar(2), bar(4), bar(6)], [5, 5, 5]) == {5: stroke_width(bar(4))}
    # on the dataset: a caption per row, naming the row's digit
    cols = captioned.to_numpy(["label", "prompt"])
    assert all(DIGITS[k] in p.replace(",", " ").split() for k, p in zip(cols["label"][:50], cols["prompt"][:50]))


def test_default_load_mnist_has_no_prompts():
    assert LoadMNIST().config.captions is False
    assert LoadMNIST.version == "1"


def test_data_without_prompts(tmp_path, digits):
    with pytest.raises(UserError, match=r"stage 't2i' \(fit-text-to-image-teacher\) input "
                                        r"'data'.*'prompt' column.*captions: true"):
        run_stage(FitTextToImageTeacher, TINY, tmp_path, "t2i", data=digits)


def test_bad_shapes_are_config_errors():
    with pytest.raises(ValueError, match="cross_attention needs one entry"):
        FitTextToImageTeacher({"cross_attention": [True]})
    with pytest.raises(ValueError, match="image_size"):
        FitTextToImageTeacher({"image_size": 30})
