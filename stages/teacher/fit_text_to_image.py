r"""``fit-text-to-image-teacher``: a small latent text-to-image diffusion model (Rombach et
al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models") trained from
scratch on the ``split == "train"`` rows of a captioned image dataset (``x``: 1-channel
images in [0, 1], ``prompt``: their captions, e.g. ``load-mnist`` with ``captions: true``),
in the stage task itself; saved as a diffusers ``StableDiffusionPipeline`` folder (VAE,
CLIP tokenizer and text encoder, UNet, DDIM scheduler) that plain diffusers loads and
samples with classifier-free guidance, offline.

Two phases, each through the training harness (``stages.train.harness``), each with its
own ``max_minutes`` budget:

1. The autoencoder (an ``AutoencoderKL``, images padded with background to
   ``image_size``): E(x) = N(mu, sigma^2), z = mu + sigma n, n ~ N(0, I), and
   L = |D(z) - x|_1 + |D(z) - x|_2^2 + beta KL(N(mu, sigma^2) || N(0, I)) / d (means over
   pixels; KL over the d latent elements, a small beta as in LDM's KL-regularised
   autoencoders). Then every training image is encoded once, z0 = s mu(x), with
   s = 1 / std(mu) (the VAE's ``scaling_factor``: latents of unit variance, as SD's).
2. The UNet eps_theta(z_t, t, c) and the text encoder c = tau(y) together, from scratch
   (DDPM, Ho et al. 2020, Algorithm 1, in latent space): t ~ U{0..T-1}, eps ~ N(0, I),
   z_t = alpha_t z0 + sigma_t eps (SD's scaled-linear betas 0.00085..0.012, T = 1000) and
   L = ||F_theta(z_t, t, tau(y)) - target||^2, target eps (``epsilon``) or
   v = alpha_t eps - sigma_t z0 (``v_prediction``, Salimans & Ho 2022). A share
   ``cond_drop`` of the prompts is replaced by the empty prompt "" (Ho & Salimans 2022,
   "Classifier-Free Diffusion Guidance"), so sampling can mix
   eps_uncond + w (eps_cond - eps_uncond). An EMA of the UNet's and the text encoder's
   weights (decay ``ema_decay``) is what gets saved.

The tokenizer is CLIP's BPE made from the training prompts' words (each word one token;
the byte-level symbols keep any other text tokenizable), ``max_length`` tokens. A killed
run resumes each phase from its last epoch, with the time it had used.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import parquet, read_split
from stages.models import latent_teacher as lt
from stages.models.device import device as local_device
from stages.models.diffusion import to_images, where_of
from stages.train.harness import Loss, TrainConfig, TrainMethod, fit
from stages.train.rows import Rows


def warmup_cosine(progress: float) -> float:
    """5% linear warm-up, then cosine to zero over the run (steps or max_minutes)."""
    if progress < 0.05:
        return max(progress / 0.05, 0.01)
    return 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))


class VAELoss(torch.nn.Module):
    """The autoencoder's training forward: reconstruction, posterior mean and log-variance
    (one ``forward``, so Ray Train's DDP sees the whole step)."""

    def __init__(self, config: dict):
        super().__init__()
        self.vae = lt.build("vae", config)

    def forward(self, x, noise):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class Autoencoding(TrainMethod):
    """Phase 1: the VAE (L1 + L2 reconstruction, a small KL)."""

    columns = {"x": torch.float32}

    def __init__(self, cfg, vae_config: dict, latent_shape):
        self.cfg, self.vae_config, self.latent_shape = cfg, vae_config, list(latent_shape)

    def setup(self, device):
        return {"vae": VAELoss(self.vae_config).to(device)}

    def optimizers(self, nets):
        return {"vae": torch.optim.AdamW(nets["vae"].parameters(), lr=self.cfg.vae_lr)}

    def lr_factor(self, progress):
        return warmup_cosine(progress)

    def loss(self, nets, emas, batch, gen):
        x = batch["x"]
        noise = torch.randn((len(x), *self.latent_shape), generator=gen).to(x.device)
        recon, mean, logvar = nets["vae"](x, noise)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        l1 = F.l1_loss(recon, x)
        loss = l1 + F.mse_loss(recon, x) + self.cfg.kl_weight * kl
        return Loss({"vae": loss}, len(x), {"l1": l1.item() * len(x), "kl": kl.item() * len(x)})


class LatentDenoising(TrainMethod):
    """Phase 2: the UNet and the text encoder, one optimiser, prompts dropped for CFG."""

    columns = {"latent": torch.float32, "ids": torch.int64}

    def __init__(self, cfg, configs: dict, empty_ids, scheduler_config: dict):
        self.cfg, self.configs, self.empty = cfg, configs, empty_ids
        self.scheduler_config = scheduler_config
        self.ema = {"unet": cfg.ema_decay, "text": cfg.ema_decay}

    def setup(self, device):
        from diffusers import DDIMScheduler
        self.ab = DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod.float().to(device)
        return {k: lt.build(k, c).to(device) for k, c in self.configs.items()}

    def optimizers(self, nets):
        params = list(nets["unet"].parameters()) + list(nets["text"].parameters())
        return {"unet": torch.optim.AdamW(params, lr=self.cfg.lr)}

    def lr_factor(self, progress):
        return warmup_cosine(progress)

    def loss(self, nets, emas, batch, gen):
        z0, ids = batch["latent"], batch["ids"]
        n, dev = len(z0), z0.device
        drop = (torch.rand(n, generator=gen) < self.cfg.cond_drop).to(dev)
        ids = torch.where(drop[:, None], self.empty.to(dev), ids)
        t = torch.randint(0, len(self.ab), (n,), generator=gen).to(dev)
        eps = torch.randn(z0.shape, generator=gen).to(dev)
        a = self.ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.ab[t]).sqrt().view(-1, 1, 1, 1)
        context = nets["text"](ids).last_hidden_state
        out = nets["unet"](a * z0 + s * eps, t, encoder_hidden_states=context).sample
        target = eps if self.cfg.prediction_type == "epsilon" else a * eps - s * z0
        return Loss({"unet": F.mse_loss(out, target)}, n)


class FitTextToImageTeacher(Stage):
    kind = "fit-text-to-image-teacher"
    version = "2"  # 2: steps_offset 1 in the saved scheduler, shorter default budgets

    class Config(TrainConfig):
        # the prompts: a word-level CLIP tokenizer made from the training prompts
        max_words: int = Field(1000, ge=1)        # its vocabulary: the most frequent words
        max_length: int = Field(16, ge=3)         # tokens per prompt, start and end included
        # phase 1: the VAE; images padded with background (-1) to image_size pixels
        image_size: int = Field(32, ge=8)
        vae_channels: list[PositiveInt] = [16, 32, 64]  # one block per level; a halving each
        latent_channels: int = Field(4, ge=1)
        kl_weight: float = Field(1e-4, ge=0)      # beta, on the KL per latent element
        vae_epochs: int = Field(12, ge=1)
        vae_batch_size: int = Field(64, ge=1)
        vae_lr: float = Field(1e-3, gt=0)
        vae_max_minutes: float | None = Field(6.0, gt=0)  # stop phase 1 after this wall time
        # phase 2: the text encoder (a CLIP text transformer) and the UNet
        text_width: int = Field(64, ge=1)
        text_layers: int = Field(2, ge=1)
        text_heads: int = Field(4, ge=1)
        unet_channels: list[PositiveInt] = [64, 128]
        cross_attention: list[bool] = [False, True]  # per UNet level (the middle always)
        layers_per_block: int = Field(1, ge=1)
        attention_heads: int = Field(8, ge=1)
        prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
        cond_drop: float = Field(0.1, ge=0, lt=1)  # share of prompts replaced by ""
        epochs: int = Field(55, ge=1)
        batch_size: int = Field(128, ge=1)
        lr: float = Field(1e-3, gt=0)
        ema_decay: float = Field(0.998, ge=0, lt=1)
        grad_clip: float | None = Field(1.0, gt=0)
        max_minutes: float | None = Field(18.0, gt=0)   # stop phase 2 after this wall time
        threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
        num_workers: int = Field(0, ge=0)  # 0: in the stage's process; N: Ray Train workers
        execution = ("threads",)

        @model_validator(mode="after")
        def _shapes(self):
            levels = len(self.vae_channels)
            if self.image_size % 2 ** (levels - 1):
                raise ValueError(f"image_size ({self.image_size}) must be a multiple of "
                                 f"2 ** (len(vae_channels) - 1) = {2 ** (levels - 1)}")
            latent = self.image_size // 2 ** (levels - 1)
            if latent % 2 ** (len(self.unet_channels) - 1):
                raise ValueError(f"the latent size ({latent}) must be a multiple of "
                                 f"2 ** (len(unet_channels) - 1)")
            if len(self.cross_attention) != len(self.unet_channels):
                raise ValueError("cross_attention needs one entry per unet_channels level")
            if self.text_width % self.text_heads:
                raise ValueError("text_width must be a multiple of text_heads")
            if self.num_workers and self.vae_batch_size % self.num_workers:
                raise ValueError("vae_batch_size must be a multiple of num_workers")
            return self

        def keyed_execution(self) -> dict[str, str]:
            return {**super().keyed_execution(),
                    "num_workers": "the losses draw noise, timesteps and dropped prompts "
                                   "on each worker"}

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("vae_train_loss", "vae_train_l1", "vae_train_kl", "vae_start_epoch",
               "train_loss", "start_epoch")  # per epoch, phase 1 then phase 2

    def run(self, ctx, data):
        from diffusers import DDIMScheduler

        cfg = self.config
        where = where_of(ctx, self.kind, "data")
        names = parquet(data).schema.names
        if "prompt" not in names:
            raise bad_value(where, "columns", names, "a 'prompt' column of captions (load-mnist "
                            "writes one with `captions: true`)")
        cols = read_split(data, "train", ["x", "prompt"], where)              # 1. data
        x = to_images(cols["x"])
        if x.ndim != 4 or x.shape[1] != 1 or max(x.shape[2:]) > cfg.image_size:
            raise bad_value(where, "x shape", list(x.shape[1:]),
                            f"(1, height, width), at most image_size ({cfg.image_size}) pixels")
        x = lt.pad_images(x, cfg.image_size)
        prompts = [str(p) for p in cols["prompt"]]
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tok_dir = tempfile.mkdtemp(prefix="distill-tokenizer-")              # 2. tokenizer
        tok = lt.build_tokenizer(tok_dir, lt.prompt_words(prompts, cfg.max_words),
                                 cfg.max_length)
        ids = lt.token_ids(tok, prompts)

        size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)           # 3. the VAE
        vae_cfg = lt.vae_config(cfg.vae_channels, cfg.latent_channels, cfg.image_size)
        phase = TrainConfig(epochs=cfg.vae_epochs, batch_size=cfg.vae_batch_size,
                            grad_clip=cfg.grad_clip, num_workers=cfg.num_workers,
                            use_gpu=cfg.use_gpu, max_failures=cfg.max_failures)
        first = fit(lt.phase_context(ctx, "vae"),
                    Autoencoding(cfg, vae_cfg, (cfg.latent_channels, size, size)),
                    Rows(Autoencoding.columns, tensors={"x": x}), phase,
                    max_minutes=cfg.vae_max_minutes)
        holder = VAELoss(vae_cfg)
        holder.load_state_dict(first.state["nets"]["vae"])
        vae = holder.vae.eval()

        dev = local_device()                                                   # 4. latents
        vae.to(dev)
        with torch.no_grad():
            mu = torch.cat([vae.encode(b.to(dev)).latent_dist.mean.cpu() for b in x.split(256)])
        scale = float(1 / mu.std())
        vae.register_to_config(scaling_factor=scale)

        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085,  # 5. UNet
                                  beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=cfg.prediction_type, clip_sample=False,
                                  set_alpha_to_one=False, timestep_spacing="trailing",
                                  steps_offset=1)  # what the SD pipeline expects
        configs = {"text": lt.text_config(tok, cfg.text_width, cfg.text_layers, cfg.text_heads),
                   "unet": lt.unet_config(size, cfg.latent_channels, cfg.unet_channels,
                                          cfg.cross_attention, cfg.layers_per_block,
                                          cfg.text_width, cfg.attention_heads)}
        method = LatentDenoising(cfg, configs, lt.token_ids(tok, [""]), dict(scheduler.config))
        second = fit(ctx, method, Rows(LatentDenoising.columns,
                                       tensors={"latent": mu * scale, "ids": ids}),
                     cfg, max_minutes=cfg.max_minutes)

        nets = {}                                                              # 6. save EMA
        for k, c in configs.items():
            nets[k] = lt.build(k, c)
            nets[k].load_state_dict(second.state["emas"][k])
        path = lt.save_pipeline(ctx.output_dir("model"), vae.cpu(), nets["text"], tok_dir,
                                nets["unet"], scheduler)
        shutil.rmtree(tok_dir, ignore_errors=True)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        info = {"image_shape": list(cols["x"].shape[1:]), "image_size": cfg.image_size,
                "latent_shape": [cfg.latent_channels, size, size], "scaling_factor": scale,
                "vocabulary": len(tok), "max_length": cfg.max_length,
                "prediction_type": cfg.prediction_type,
                "params": {"vae": count(vae), "text_encoder": count(nets["text"]),
                           "unet": count(nets["unet"])},
                "vae_epochs": first.state["epoch"] + 1, "epochs": second.state["epoch"] + 1,
                "vae_seconds": round(first.state["elapsed"], 1),
                "train_seconds": round(second.state["elapsed"], 1)}
        return {"model": Model(path=path, info=info)}
