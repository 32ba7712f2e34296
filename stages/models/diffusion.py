"""Diffusion models shared by the diffusion timestep distillation family: a diffusers
``UNet2DModel`` (class-conditional through class embeddings, or unconditional) with its
scheduler config, the deterministic teacher samplers, the few-step student samplers and
the Ray Train harness the students share.

Notation (DDPM / diffusers convention, Ho et al. 2020): a noised sample
x_t = alpha_t x0 + sigma_t z with alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2.
Every stored state is in this "VP" space; t = -1 means clean (alpha 1, sigma 0).

- Model folder: ``unet/`` and ``scheduler/`` written by ``save_pretrained`` and a
  ``model_index.json`` (the layout of a diffusers ``DDPMPipeline``); students add
  ``student.json`` (method, the step counts their training covered, parameterisation).
- Teacher sampler: DDIM with eta 0 (Song et al. 2021, eq. 12) or Euler on the
  probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn), with the diffusers
  ``DDIMScheduler`` / ``EulerDiscreteScheduler`` and "trailing" timesteps (Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", so the first step starts
  at t = T - 1). Euler states (x0 + s z) are mapped to VP space by x / sqrt(1 + s^2).
- Consistency function (LCM form, Luo et al. 2023 eq. 9; Song et al. 2023 eq. 7):
  f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), c_skip = s_d^2 / ((k t)^2 + s_d^2),
  c_out = k t / sqrt((k t)^2 + s_d^2), s_d = 0.5, k = 10; f(x, 0) = x.
- Students: ``consistency`` (multistep consistency sampling, Song et al. 2023 Algorithm 1),
  ``progressive`` (DDIM on the student, Salimans & Ho 2022), ``reflow`` (Euler on the
  rectified flow dx/ds = v(x, s), Liu et al. 2022 eq. 1).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from pipelines.errors import UserError, allowed_list, bad_value
from pipelines.stage import Dataset, Model, Resources, Stage, StageConfig

STUDENT_FILE = "student.json"
STATE_FILE = "state.pt"
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0


def _schedulers() -> dict:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    return {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


SAMPLERS = ("ddim", "euler")  # keys of _schedulers(); pydantic Literal choices
# scheduler classes whose config (beta schedule, prediction type) the samplers can run
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


class UNetArch(StageConfig):
    """The ``UNet2DModel`` fields of a stage that builds one."""

    block_out_channels: list[PositiveInt] = [32, 64]
    layers_per_block: PositiveInt = 1
    attention: bool = True  # self-attention in the lowest-resolution block

    def build(self, sample_size: int, channels: int, num_classes: int | None):
        from diffusers import UNet2DModel
        levels = len(self.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if self.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        groups = math.gcd(*self.block_out_channels, 32)
        return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                           block_out_channels=tuple(self.block_out_channels),
                           layers_per_block=self.layers_per_block, down_block_types=tuple(down),
                           up_block_types=tuple(up), norm_num_groups=groups,
                           attention_head_dim=min(self.block_out_channels[-1], 32),
                           num_class_embeds=num_classes)


class Diffusion:
    """A loaded model folder: the UNet, its scheduler config and the noise schedule."""

    def __init__(self, unet, scheduler_config: dict, student: dict | None = None):
        from diffusers import DDPMScheduler
        self.unet, self.scheduler_config, self.student = unet, dict(scheduler_config), student
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        ddpm = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = ddpm.alphas_cumprod.double()
        self.num_train_timesteps = int(ddpm.config.num_train_timesteps)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    @property
    def shape(self) -> tuple[int, int, int]:
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        return (c, s, s) if isinstance(s, int) else (c, *s)

    def to(self, device):
        self.unet.to(device)
        return self

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """alpha_t, sigma_t broadcastable to ``like``; t = -1 is clean; float t (reflow)
        interpolates the table linearly."""
        t = t.to(torch.float64).cpu()
        tc = t.clamp(0, self.num_train_timesteps - 1)
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = tc - lo
        ab = self.alphas_cumprod[lo] * (1 - w) + self.alphas_cumprod[hi] * w
        ab = torch.where(t < 0, torch.ones_like(ab), ab)
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = ab.sqrt().to(like).view(shape)
        s = (1 - ab).clamp(min=0).sqrt().to(like).view(shape)
        return a, s

    def model_out(self, unet, x, t, labels):
        t_in = t.clamp(min=0).to(x.device)
        kwargs = {"class_labels": labels.to(x.device)} if self.num_classes else {}
        return unet(x, t_in, **kwargs).sample

    def x0_eps(self, out, x, t):
        """(x0, eps) from the network output under the model's prediction type."""
        a, s = self.alpha_sigma(t, x)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s * eps) / a.clamp(min=1e-4)
        elif self.prediction_type == "v_prediction":
            x0, eps = a * x - s * out, s * x + a * out
        else:  # sample
            x0 = out
            eps = (x - a * x0) / s.clamp(min=1e-4)
        return x0, eps

    def predict_x0(self, unet, x, t, labels, clip: bool = False):
        x0, eps = self.x0_eps(self.model_out(unet, x, t, labels), x, t)
        return (x0.clamp(-1, 1) if clip else x0), eps


def where_of(ctx, kind: str, field: str | None = None) -> str:
    return f"stage '{ctx.name}' ({kind})" + (f" input '{field}'" if field else "")


# -- folders -----------------------------------------------------------------------------
def save_diffusion(unet, scheduler_config: dict, path: str, student: dict | None = None) -> str:
    """``save_pretrained`` of the UNet and its scheduler, in a diffusers pipeline layout."""
    unet = getattr(unet, "module", unet)
    cls = _scheduler_class(scheduler_config)
    unet.save_pretrained(os.path.join(path, "unet"))
    cls.from_config(scheduler_config).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", cls.__name__]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if student is not None:
        with open(os.path.join(path, STUDENT_FILE), "w") as f:
            json.dump(student, f, indent=2)
    return path


def _scheduler_class(config: dict):
    import diffusers
    name = config.get("_class_name", "DDIMScheduler")
    return getattr(diffusers, name)


def load_diffusion(path: str, where: str) -> Diffusion:
    """A folder written by ``save_diffusion`` (or any diffusers ``UNet2DModel`` folder
    with ``unet/`` and ``scheduler/``), with the real ``from_pretrained``; anything else is
    one ``UserError`` naming ``where``."""
    from diffusers import UNet2DModel
    expected = ("a diffusers model folder with unet/ (UNet2DModel) and scheduler/ "
                "(saved with save_pretrained)")
    if not os.path.isdir(path):
        raise bad_value(where, "model folder", path, f"{expected}; it does not exist")
    unet_cfg = os.path.join(path, "unet", "config.json")
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if not (os.path.isfile(unet_cfg) and os.path.isfile(sched_cfg)):
        raise bad_value(where, "model folder", path, f"{expected}; it has no unet/config.json "
                                                     "or scheduler/scheduler_config.json")
    with open(unet_cfg) as f:
        unet_class = json.load(f).get("_class_name")
    if unet_class != "UNet2DModel":
        raise bad_value(where, "unet class", unet_class, ["UNet2DModel"])
    with open(sched_cfg) as f:
        scheduler_config = json.load(f)
    name = scheduler_config.get("_class_name")
    if name not in SUPPORTED_SCHEDULERS:
        raise bad_value(where, "scheduler", name, SUPPORTED_SCHEDULERS)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise bad_value(where, "scheduler prediction_type", prediction, PREDICTIONS)
    student = None
    if os.path.isfile(os.path.join(path, STUDENT_FILE)):
        with open(os.path.join(path, STUDENT_FILE)) as f:
            student = json.load(f)
    try:
        unet = UNet2DModel.from_pretrained(os.path.join(path, "unet"))
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"{where}: cannot load the UNet from {path}/unet: {e}") from e
    return Diffusion(unet.eval(), scheduler_config, student)


def check_shape(model: Diffusion, shape, where: str, what: str) -> None:
    """A data shape (channels, height, width) that differs from the model's is an error."""
    shape = tuple(int(s) for s in shape)
    if shape != model.shape:
        raise bad_value(where, f"{what} shape (channels, height, width)", list(shape),
                        f"the teacher's {list(model.shape)}")


def to_images(x01: np.ndarray) -> torch.Tensor:
    """Data in [0, 1] to the model's range [-1, 1]."""
    return torch.tensor(x01, dtype=torch.float32) * 2 - 1


def row_noise(seed: int, ids, shape) -> torch.Tensor:
    """x_T for every row id: N(0, I) drawn from the row's own generator, so any row (and
    any shard) regenerates exactly, whatever the batching or the worker."""
    out = torch.empty((len(ids), *shape))
    for i, row in enumerate(ids):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(row))
        out[i] = torch.randn(shape, generator=gen)
    return out


def row_labels(ids, num_classes: int | None) -> np.ndarray:
    """Balanced class labels: row id modulo the number of classes (0 when unconditional)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids % num_classes if num_classes else np.zeros_like(ids)


# -- teacher sampler (diffusers scheduler classes) ---------------------------------------
def make_scheduler(model: Diffusion, sampler: str, steps: int, where: str = "sampler"):
    schedulers = _schedulers()
    if sampler not in schedulers:
        raise bad_value(where, "sampler", sampler, schedulers)
    sched = schedulers[sampler].from_config(model.scheduler_config,
                                            timestep_spacing="trailing")
    if steps > model.num_train_timesteps:
        raise bad_value(where, "steps", steps, f"at most {model.num_train_timesteps}, the "
                        "teacher's training timesteps")
    sched.set_timesteps(steps)
    return sched


@torch.inference_mode()
def sample_teacher(model: Diffusion, noise: torch.Tensor, labels, sampler: str, steps: int,
                   keep: list[int] | None = None):
    """Deterministic teacher sampling from x_T = noise. Returns (final sample, states at
    the indices ``keep`` of the N + 1 states (VP space), their timesteps; -1 = clean)."""
    sched = make_scheduler(model, sampler, steps)
    device = next(model.unet.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    x = noise.to(device) * sched.init_noise_sigma
    timesteps = [int(t) for t in sched.timesteps] + [-1]
    keep = set(range(steps + 1) if keep is None else keep)
    states = []

    def vp(i):  # the state before step i in VP space
        if sampler == "euler":
            return x / math.sqrt(1 + float(sched.sigmas[i]) ** 2)
        return x

    for i, t in enumerate(sched.timesteps):
        if i in keep:
            states.append(vp(i).float().cpu())
        inp = sched.scale_model_input(x, t)
        kwargs = {"class_labels": labels} if model.num_classes else {}
        out = model.unet(inp, t.to(device), **kwargs).sample
        x = sched.step(out, t, x).prev_sample
    if steps in keep:
        states.append(x.float().cpu())
    chosen = [timesteps[i] for i in sorted(keep)]
    return x.float().cpu(), (torch.stack(states, 1) if states else None), chosen


def ddim_step(model: Diffusion, x, x0, eps, t_from, t_to):
    """One DDIM (eta 0) step in VP space from t_from to t_to given the predictions."""
    a_to, s_to = model.alpha_sigma(t_to, x)
    return a_to * x0 + s_to * eps


def trailing_grid(steps: int, num_train_timesteps: int) -> list[int]:
    """The "trailing" timesteps of a k-step sampler, then -1 (clean)."""
    return [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1
            for i in range(steps)] + [-1]


# -- consistency function ---------------------------------------------------------------
def consistency_scalings(t: torch.Tensor, like: torch.Tensor):
    """c_skip, c_out of the LCM boundary condition; t <= 0 gives (1, 0): f(x, 0) = x."""
    st = t.to(like).clamp(min=0).view((-1,) + (1,) * (like.ndim - 1)) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)
    c_out = st / (st ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip, c_out


def consistency_fn(model: Diffusion, unet, x, t, labels):
    """f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)."""
    x0, _ = model.predict_x0(unet, x, t, labels)
    c_skip, c_out = consistency_scalings(t, x)
    return c_skip * x + c_out * x0


# -- student sampler ----------------------------------------------------------------------
def check_student_steps(model: Diffusion, steps: int, where: str) -> None:
    info = model.student or {}
    covered = info.get("covered_steps")
    if covered is not None and steps not in covered:
        raise bad_value(where, f"steps for the {info.get('method')} student", steps,
                        f"one its training covered: {covered}")
    if steps > info.get("max_steps", steps):
        raise bad_value(where, f"steps for the {info.get('method')} student", steps,
                        f"at most {info['max_steps']}, the steps its training covered")


@torch.inference_mode()
def sample_student(model: Diffusion, noise: torch.Tensor, labels, steps: int,
                   generator: torch.Generator | None = None, where: str = "sampler"):
    """A student in ``steps`` steps; the method is read from its ``student.json``."""
    check_student_steps(model, steps, where)
    method = model.student["method"]
    device = next(model.unet.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    x = noise.to(device)
    n = len(x)
    unet = model.unet
    if method == "reflow":  # Euler on dx/ds = v(x, s), s from 0 (noise) to 1 (data)
        for i in range(steps):
            s = torch.full((n,), i / steps, device=device)
            x = x + reflow_velocity(model, unet, x, s, labels) / steps
        return x.clamp(-1, 1).float().cpu()
    if method == "consistency":  # multistep consistency sampling
        grid = model.student["timesteps"]
        ts = [grid[int(j)] for j in np.linspace(0, len(grid), steps, endpoint=False)]
        x0 = None
        for i, t in enumerate(ts):
            tt = torch.full((n,), t, device=device)
            if i:
                z = torch.randn(x.shape, generator=generator).to(device)
                a, s = model.alpha_sigma(tt, x)
                x = a * x0 + s * z
            x0 = consistency_fn(model, unet, x, tt, labels).clamp(-1, 1)
        return x0.float().cpu()
    if method == "progressive":  # DDIM on the student's own trailing grid
        grid = trailing_grid(steps, model.num_train_timesteps)
        for t, t_next in zip(grid[:-1], grid[1:]):
            tt = torch.full((n,), t, device=device)
            x0, eps = model.predict_x0(unet, x, tt, labels, clip=True)
            x = ddim_step(model, x, x0, eps, tt, torch.full((n,), t_next, device=device))
        return x.clamp(-1, 1).float().cpu()
    raise UserError(f"{where}: unknown student method {method!r}; allowed: "
                    f"{allowed_list(('consistency', 'progressive', 'reflow'))}")


def reflow_velocity(model: Diffusion, unet, x, s, labels):
    """v(x_s, s): the UNet at timestep (1 - s)(T - 1), output sign flipped so that a
    v-prediction teacher is a sensible initialisation (its v points from data to noise)."""
    t = (1 - s) * (model.num_train_timesteps - 1)
    kwargs = {"class_labels": labels} if model.num_classes else {}
    return -unet(x, t, **kwargs).sample


def sample_any(model: Diffusion, noise, labels, steps: int, sampler: str = "ddim",
               generator=None, where: str = "sampler"):
    """A teacher (no student.json) with its sampler, or a student with its own."""
    if model.student is None:
        return sample_teacher(model, noise, labels, sampler, steps, keep=[])[0].clamp(-1, 1)
    return sample_student(model, noise, labels, steps, generator, where)


# -- students: Ray Train harness ---------------------------------------------------------
class StudentConfig(StageConfig):
    """Fields shared by the student stages (Ray Train, AdamW, EMA).

    ``architecture`` None is the teacher's own UNet. A smaller one (fewer channels, no
    attention blocks) with ``init: teacher`` starts from every teacher weight whose name and
    shape it shares, the rest freshly initialised: block removal followed by distillation,
    as BK-SDM does for Stable Diffusion (Kim et al. 2023, arXiv 2305.15798, Sec. 3.1)."""

    init: Literal["teacher", "scratch"] = "teacher"
    architecture: UNetArch | None = None
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = True
    max_failures: int = Field(0, ge=-1)


def init_student(cfg: StudentConfig, teacher: Diffusion):
    """The student UNet before training, and how many of its tensors came from the teacher."""
    from diffusers import UNet2DModel
    if cfg.architecture is None:
        if cfg.init == "teacher":
            student = copy.deepcopy(teacher.unet)
            return student.train().requires_grad_(True), len(student.state_dict())
        student = UNet2DModel.from_config(teacher.unet.config)
        return student.train(), 0
    c, h, _ = teacher.shape
    student = cfg.architecture.build(h, c, teacher.num_classes).train()
    if cfg.init == "scratch":
        return student, 0
    own, given = student.state_dict(), teacher.unet.state_dict()
    shared = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    return student, len(shared)


def _load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: epochs over the shard, method.loss per batch, EMA,
    a checkpoint every epoch (rank 0), resumed from the last one."""
    import ray.train
    import ray.train.torch

    cfg, ctx, method = config["cfg"], config["ctx"], config["method"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(ctx.seed + rank)
    teacher = load_diffusion(config["teacher_path"], "student").to(device)
    for p in teacher.unet.parameters():
        p.requires_grad_(False)
    student = init_student(cfg, teacher)[0].to(device)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    state, start = _load_state(ray.train.get_checkpoint()), 0
    if state:
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        method.load_state_dict(state["method"])
        start = state["epoch"] + 1
    model = ray.train.torch.prepare_model(student)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    if state:
        opt.load_state_dict(state["optimizer"])
    shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + rank)

    for epoch in range(start, cfg.epochs):
        method.begin_epoch(epoch, student, teacher)                           # 1. round set-up
        total, seen = 0.0, 0
        model.train()
        for step, batch in enumerate(shard.iter_torch_batches(
                batch_size=cfg.batch_size, local_shuffle_buffer_size=4096,
                local_shuffle_seed=ctx.seed + epoch, device=device)):
            loss = method.loss(model, ema, teacher, batch, gen)               # 2. loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch} "
                                         f"step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()                                                   # 3. update
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():                                             # 4. EMA target
                for pe, ps in zip(ema.parameters(), student.parameters()):
                    pe.lerp_(ps, 1 - cfg.ema_decay)
            total += loss.item() * len(batch["label"])
            seen += len(batch["label"])
        metrics = {"train_loss": total / max(seen, 1), "start_epoch": start, **method.metrics()}
        with tempfile.TemporaryDirectory() as d:                              # 5. checkpoint
            checkpoint = None
            if rank == 0:
                torch.save({"student": student.state_dict(), "ema": ema.state_dict(),
                            "optimizer": opt.state_dict(), "method": method.state_dict(),
                            "epoch": epoch}, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            ctx.log_metrics(metrics, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")


class StudentMethod:
    """What a student stage plugs into the harness (pickled to the workers)."""

    def begin_epoch(self, epoch, student, teacher) -> None:
        pass

    def loss(self, model, ema, teacher: Diffusion, batch, gen) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_student(ctx, kind: str, cfg: StudentConfig, teacher_path: str, train_ds,
                  method: StudentMethod, student_info: dict, scheduler_config: dict) -> Model:
    """Fit a student with a ``TorchTrainer`` (run name from the artifact key, so a re-run
    resumes from the last checkpoint in ``ctx.train_storage``) and save it as a model folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train import DataConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    use_gpu = ctx.num_gpus_available > 0 and cfg.use_gpu
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "ctx": ctx, "method": method,
                           "teacher_path": teacher_path},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=f"{kind}-{ctx.key[:16]}",
            storage_path=ctx.train_storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        for failure in getattr(e, "worker_failures", {}).values():
            if isinstance(failure, (FloatingPointError, UserError)):
                raise failure from e
        raise
    state = _load_state(result.checkpoint)
    teacher = load_diffusion(teacher_path, where_of(ctx, kind, "teacher"))
    student, from_teacher = init_student(cfg, teacher)
    student.load_state_dict(state["student"])
    path = save_diffusion(student, scheduler_config, ctx.output_dir("model"), student_info)
    info = {"method": student_info["method"], "epochs": state["epoch"] + 1,
            "params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.unet.parameters()),
            "tensors_from_teacher": from_teacher, "tensors": len(student.state_dict()),
            **{k: float(v) for k, v in (result.metrics or {}).items()}}
    return Model(path=path, info=info)


def pairs_dataset(pairs, columns: list[str]):
    """The pair rows as a materialised Ray dataset of float32 / int64 columns."""
    import ray.data

    def cast(batch):
        return {c: (batch[c].astype(np.int64) if c == "label" else batch[c].astype(np.float32))
                for c in columns}
    return pairs.read(columns=columns).map_batches(cast, batch_format="numpy").materialize()


class StudentStage(Stage):
    """Base of the student stages: (pairs, teacher) -> model, Ray Train work only."""

    inputs = {"pairs": Dataset, "teacher": Model}
    outputs = {"model": Model}
    resources = Resources(num_cpus=0)  # only launches Ray Train work

    def load_inputs(self, ctx, pairs, teacher, pairs_kind: str) -> Diffusion:
        """The teacher, and the pairs checked against it before any training: the right
        kind (``diffusion-pairs`` output ``pairs_kind``), the teacher's image shape."""
        model = load_diffusion(teacher.path, where_of(ctx, self.kind, "teacher"))
        where = where_of(ctx, self.kind, "pairs")
        if pairs.info.get("pairs") != pairs_kind:
            raise bad_value(where, "info.pairs", pairs.info.get("pairs"),
                            [f"{pairs_kind} (diffusion-pairs output '{pairs_kind}')"])
        if pairs.info.get("shape") is not None:
            check_shape(model, pairs.info["shape"], where, "pairs")
        return model
