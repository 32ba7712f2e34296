"""The text-to-image family adapters against diffusers itself, on tiny random pipelines
(``tests.stages.t2i_tiny``): every family loads, encodes prompts with its pipeline's own
``encode_prompt``, and predicts with guidance; a 2-step sampling loop written with
``LatentModel.predict`` and the folder's own scheduler reproduces the diffusers pipeline's
call (same latents, same w) for every family; plus the registry's and DiT's errors, the
LoRA targets and the added guidance slots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.errors import UserError
from stages.models.families import FAMILIES, load_latent
from tests.stages import t2i_tiny

PROMPTS = {"dit": ["cat", "two"]}
W = {"flux": 3.5}  # Flux-dev: w through its guidance input


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t2i")
    return {f: t2i_tiny.build(f, str(root / f)) for f in t2i_tiny.FAMILIES_BUILT}


def tensors(arrays: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}


def encoded(model, prompts):
    """(cond of the prompts, uncond expanded to them), as ``encode-prompts`` and
    ``Conditioning.batch`` give them."""
    parts = {k: None for k in model.family.not_for_encoding if k in model.index}
    pipe = model.pipeline(**parts)
    out = model.family.encode(model, pipe, prompts)
    un = model.family.encode(model, pipe, [""])
    for k, v in {**out, **un}.items():
        assert isinstance(v, np.ndarray) and v.dtype in (np.float32, np.int64), (k, v.dtype)
    assert set(out) == set(un) and all(len(v) == len(prompts) for v in out.values())
    cond = tensors(out)
    cond["uncond"] = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in tensors(un).items()}
    return cond


def own_loop(model, net, cond, noise, w, steps=2):
    """2 steps of the folder's own scheduler driven by ``model.predict``."""
    import diffusers
    sched = getattr(diffusers, model.scheduler_config["_class_name"]).from_config(
        model.scheduler_config)
    model.family.set_timesteps(model, sched, steps, tuple(noise.shape[1:]))
    mode = "embedded" if model.family.teacher_guidance == "embedded" else "cfg"
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow schedulers have none
    with torch.inference_mode():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = model.predict(net, inp, t.float().expand(len(x)), cond, w, mode)
            x = sched.step(out, t, x, return_dict=False)[0]
    return x


def pipeline_run(family, pipe, prompts, noise, w, steps=2):
    """The diffusers pipeline's own call on the same noise: its final latents (DiT,
    which always decodes: its images)."""
    from stages.models.families.flux import pack, unpack
    if family == "dit":
        return pipe(class_labels=pipe.get_label_ids(prompts), guidance_scale=w,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    kwargs = dict(t2i_tiny.call_kwargs(family), num_inference_steps=steps, guidance_scale=w,
                  output_type="latent")
    if family == "flux":
        out = pipe(prompts, latents=pack(noise), **kwargs).images
        return unpack(out, *noise.shape[-2:])
    return pipe(prompts, negative_prompt=[""] * len(prompts), latents=noise, **kwargs).images


@pytest.mark.parametrize("family", t2i_tiny.FAMILIES_BUILT)
def test_family_matches_its_pipeline(folders, family):
    from diffusers import DiffusionPipeline
    model = load_latent(folders[family], "test")
    assert type(model.family).__name__ and model.pipeline_class in model.family.pipelines
    prompts = PROMPTS.get(family, ["a cat", "a dog"])
    cond = encoded(model, prompts)
    net = model.denoiser()
    shape = model.latent_shape(t2i_tiny.IMAGE_SIZE, t2i_tiny.IMAGE_SIZE)
    assert shape[1:] == (8, 8), shape

    # one guided prediction: [uncond; cond] through the net, combined per row
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 500.0)
    with torch.inference_mode():
        out = model.predict(net, x, t, cond, torch.tensor([1.0, 3.0]), "cfg")
        plain = model.predict(net, x, t, cond, None, "none")
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out[0], plain[0], atol=1e-5)  # w = 1: the conditional branch

    # 2 sampling steps against the pipeline's own call
    w = W.get(family, 4.0)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    mine = own_loop(model, net, cond, noise, torch.full((2,), w))
    pipe = DiffusionPipeline.from_pretrained(folders[family])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipeline_run(family, pipe, prompts, noise, w)
    if family == "dit":  # decode ours as DiTPipeline does
        with torch.inference_mode():
            mine = pipe.vae.decode(mine / pipe.vae.config.scaling_factor).sample
        mine = (mine / 2 + 0.5).clamp(0, 1)
    assert theirs.shape == mine.shape
    err = (mine - theirs).abs().max().item()
    assert err <= 1e-4 * max(1.0, theirs.abs().max().item()), (family, err)


def test_flux_dynamic_shift_and_unpacked_shape(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
    model = load_latent(folders["flux"], "test")
    assert model.latent_shape(64, 96) == (16, 16, 24)
    assert model.latent_shape()[0] == 16
    for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler):
        sched = cls.from_config(model.scheduler_config)
        model.family.set_timesteps(model, sched, 4, (16, 8, 8))   # needs mu
        assert len(sched.timesteps) == 4 and float(sched.timesteps[0]) == pytest.approx(1000)
    sched = model.family.student_scheduler(model, [999.0, 500.0])
    model.family.set_timesteps(model, sched, 2, (16, 8, 8))


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError) as e:
        load_latent(str(tmp_path), "stage 'x'")
    for name in FAMILIES:
        assert name in str(e.value)
    assert {"PixArtAlphaPipeline", "PixArtSigmaPipeline", "DiTPipeline",
            "StableDiffusion3Pipeline", "FluxPipeline", "SanaPipeline"} <= set(FAMILIES)


def test_dit_labels(folders):
    model = load_latent(folders["dit"], "stage 'enc'")
    pipe = model.pipeline(transformer=None, vae=None, scheduler=None)
    out = model.family.encode(model, pipe, ["cat", "", " zero "])
    assert out["class_labels"].tolist() == [4, 1000, 0]  # "" = the null class
    with pytest.raises(UserError) as e:
        model.family.encode(model, pipe, ["cat", "zebra"])
    msg = str(e.value)
    assert "stage 'enc'" in msg and "zebra" in msg and "cat" in msg and "three" in msg


@pytest.mark.parametrize("family", t2i_tiny.FAMILIES_BUILT)
def test_lora_targets(folders, family):
    from peft import LoraConfig, inject_adapter_in_model
    model = load_latent(folders[family], "test")
    net = model.denoiser()
    names = [n for n, _ in net.named_modules()]
    found = [t for t in model.family.lora_targets if any(n.endswith("." + t) for n in names)]
    assert found, (family, model.family.lora_targets)
    # (PixArt's and DiT's transformers have no ``add_adapter``: peft's own injection)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=list(model.family.lora_targets)), net)
    assert any("lora" in n for n, _ in net.named_parameters())


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_added_guidance_slot_starts_as_teacher(folders, family):
    """A transformer without the slot (Flux schnell-like, Sana) gets one that changes
    nothing at any w until trained."""
    import diffusers
    model = load_latent(folders[family], "test")
    net = model.denoiser()
    cls = getattr(diffusers, model.index["transformer"][1])
    torch.manual_seed(0)
    bare = cls.from_config({**net.config, "guidance_embeds": False}).eval()
    slot = model.family.with_guidance_slot(model, bare).eval()
    assert slot.config.guidance_embeds and model.family.with_guidance_slot(model, slot) is slot
    cond = encoded(model, ["a cat"])
    x = torch.randn(1, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700.0])
    with torch.inference_mode():
        ref = model.family.denoise(model, bare, x, t, {k: v for k, v in cond.items()
                                                       if k != "uncond"}, None)
        got = model.predict(slot, x, t, cond, torch.tensor([6.0]), "embedded")
    assert torch.allclose(ref, got, atol=1e-5)
