"""What the diffusion students (``consistency-distill``, ``progressive-distill``,
``reflow``) share: their config, the student network started from the teacher, the method
base the training harness runs (``stages.train.harness``: the frozen teacher loaded on each
worker, AdamW on the student, an EMA of it kept as theta-), and the stage base that reads
the pairs and saves the student as a diffusers folder."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet
from stages.models.diffusion import (Diffusion, UNetArch, check_shape, load_diffusion,
                                     save_diffusion, where_of)
from stages.train.harness import Loss, TrainConfig, TrainMethod, fit
from stages.train.latent_student import (LatentStudentFields, build_student,
                                         check_latent_student, trainable_params)
from stages.train.rows import Rows, hold_in_memory, train_share_bytes


class StudentConfig(LatentStudentFields, TrainConfig):
    """Fields shared by the student stages (the harness's, AdamW, EMA).

    ``architecture`` None is the teacher's own UNet. A smaller one (fewer channels, no
    attention blocks) with ``init: teacher`` starts from every teacher weight whose name and
    shape it shares, the rest freshly initialised: block removal followed by distillation,
    as BK-SDM does for Stable Diffusion (Kim et al. 2023, arXiv 2305.15798, Sec. 3.1)."""

    def keyed_execution(self) -> dict[str, str]:
        return {**super().keyed_execution(),
                "num_workers": "the loss draws noise and timesteps on each worker"}

    init: Literal["teacher", "scratch"] = "teacher"
    architecture: UNetArch | None = None
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    # pairs at most this large are held in memory by every worker; larger ones stream
    in_memory_mib: int = Field(2048, ge=0)


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


class StudentMethod(TrainMethod):
    """A student of a frozen diffusion teacher: a subclass gives ``student_loss``."""

    def __init__(self, cfg: StudentConfig, teacher: Model, columns: list[str]):
        # the teacher's artifact, never its path: ``setup`` runs on each Ray Train worker,
        # where ``teacher.path`` is a verified copy on that worker's node
        self.cfg, self.teacher_artifact = cfg, teacher
        self.columns = {c: torch.int64 if c == "label" else torch.float32 for c in columns}
        self.ema = {"student": cfg.ema_decay}

    def setup(self, device):
        self.teacher = load_diffusion(self.teacher_artifact.path, "student").to(device)
        self.teacher.unet.requires_grad_(False)
        return {"student": init_student(self.cfg, self.teacher)[0].to(device)}

    def optimizers(self, nets):
        return {"student": torch.optim.AdamW(nets["student"].parameters(), lr=self.cfg.lr)}

    def loss(self, nets, emas, batch, gen):
        loss = self.student_loss(nets["student"], emas["student"], self.teacher, batch, gen)
        return Loss({"student": loss}, len(batch["label"]))

    def student_loss(self, model, ema, teacher: Diffusion, batch, gen) -> torch.Tensor:
        raise NotImplementedError


def saved_weights(trained, method) -> dict:
    """The student's weights to save: its EMA copy for a method that samples with it
    (``save_ema``, e.g. ``scm-distill``), else the last trained ones (the other students,
    whose EMA is only the consistency target theta-)."""
    return trained.state["emas" if getattr(method, "save_ema", False) else "nets"]["student"]


class StudentStage(Stage):
    """Base of the student stages: (pairs, teacher) -> model, Ray Train work only."""

    inputs = {"pairs": Dataset, "teacher": Model}
    optional_inputs = {"embeddings": Dataset}  # latent text-to-image teachers
    outputs = {"model": Model}
    mlflow_outputs = ("model",)
    resources = Resources(num_cpus=0)  # only launches Ray Train work

    def mlflow_model(self, output: str, artifact: Model):
        """One image per row: prompt (latent) or label (pixel), steps, guidance, seed."""
        import json
        import os

        from stages.serving.diffusion import default_steps, spec
        with open(os.path.join(artifact.path, "student.json")) as f:
            student = json.load(f)
        with open(os.path.join(artifact.path, "model_index.json")) as f:
            pipeline = json.load(f)["_class_name"]
        meta = {"method": student.get("method", self.kind), "stage_kind": self.kind,
                "default_steps": default_steps(student), "pipeline_class": pipeline}
        return spec(pipeline != "DDPMPipeline", meta)

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

    def pixel_only(self, ctx, teacher, embeddings) -> None:
        """For the methods that take pixel-space teachers only (so far)."""
        from stages.models.families import is_latent
        if is_latent(teacher.path):
            raise bad_value(where_of(ctx, self.kind, "teacher"), "model", teacher.path,
                            f"a pixel-space UNet2DModel folder ({self.kind} has no latent "
                            "text-to-image path yet; consistency-distill has)")
        self.check_pixel(ctx, self.config, embeddings)

    def check_pixel(self, ctx, cfg: StudentConfig, embeddings) -> None:
        """A pixel teacher takes none of the latent students' fields."""
        latent = {"embeddings": embeddings is not None, "guidance": cfg.guidance != "fixed",
                  "guidance_scale": cfg.guidance_scale is not None,
                  "lora": cfg.lora is not None}
        if any(latent.values()):
            raise bad_value(where_of(ctx, self.kind), [k for k, v in latent.items() if v][0],
                            "set", "unset for a pixel-space UNet2DModel teacher (a latent "
                            "text-to-image pipeline's student field)")

    def load_latent_inputs(self, ctx, pairs, teacher, embeddings, pairs_kind: str,
                           online: bool = False):
        """The latent teacher, checked against the pairs (None: a method that needs none,
        ``dmd-distill``), the embeddings and the config before any training; returns
        (model, the fixed w)."""
        from stages.models.families import load_latent
        from stages.models.families.base import check_embeddings
        where = where_of(ctx, self.kind)
        model = load_latent(teacher.path, where_of(ctx, self.kind, "teacher"))
        if embeddings is None:
            made = ("the trajectories were made with" if pairs is not None
                    else "of the prompts to distil on")
            raise bad_value(where, "input 'embeddings'", None, f"the encode-prompts output "
                            f"{made} (a {model.pipeline_class} teacher)")
        check_embeddings(model, embeddings.info, where_of(ctx, self.kind, "embeddings"))
        info = pairs.info if pairs is not None else {}
        pw = where_of(ctx, self.kind, "pairs")
        if pairs is not None and info.get("pairs") != pairs_kind:
            raise bad_value(pw, "info.pairs", info.get("pairs"),
                            [f"{pairs_kind} (diffusion-pairs output '{pairs_kind}')"])
        shape = info.get("shape")
        if shape is not None and int(shape[0]) != model.latent_shape()[0]:
            raise bad_value(pw, "latent shape (channels, height, width)", shape,
                            f"{model.latent_shape()[0]} channels, the teacher's latents")
        if self.config.architecture is not None or self.config.init != "teacher":
            raise bad_value(f"{where} config", "architecture / init", "set", "unset for a "
                            "latent teacher (its student starts from the teacher's denoiser)")
        w = check_latent_student(model, self.config, info, f"{where} config", online)
        build_student(model, self.config, f"{where} config")  # slot and LoRA targets
        return model, w

    def rows(self, cfg: StudentConfig, pairs, method) -> Rows:
        columns = list(method.columns)
        files = pairs.files()
        if hold_in_memory(train_share_bytes(files, columns, 1, split=None), cfg.in_memory_mib):
            return Rows(method.columns, files=files, split=None)
        return Rows(method.columns, stream=pairs.read(columns=columns).materialize(),  # streamed
                    num_rows=parquet(pairs).count_rows(), shuffle_buffer=4096)

    def train_latent(self, ctx, cfg: StudentConfig, pairs, model, method, student_info: dict,
                     scheduler) -> Model:
        """Fit a latent student and save it as a pipeline folder (``families.export``)."""
        from stages.models.families.export import save_student
        trained = fit(ctx, method, self.rows(cfg, pairs, method), cfg)
        net = build_student(model, cfg, where_of(ctx, self.kind))
        net.load_state_dict(saved_weights(trained, method))
        trainable = trainable_params(net)
        student_info = {**student_info, "guidance": cfg.guidance,
                        "guidance_scale": method.w_fixed if cfg.guidance == "fixed" else None,
                        "lora": cfg.lora.model_dump() if cfg.lora else None,
                        "trainable_params": trainable}
        path = save_student(model, net, scheduler, ctx.output_dir("model"), student_info,
                            lora=cfg.lora is not None)
        info = {"method": student_info["method"], "epochs": trained.state["epoch"] + 1,
                "params": sum(p.numel() for p in net.parameters()),
                "trainable_params": trainable, "guidance": cfg.guidance,
                "lora_rank": cfg.lora.rank if cfg.lora else None,
                "pipeline_class": model.pipeline_class,
                **{k: float(v) for k, v in trained.metrics.items()}}
        return Model(path=path, info=info)

    def train(self, ctx, cfg: StudentConfig, pairs, teacher, method: StudentMethod,
              student_info: dict, scheduler_config: dict, finish=None) -> Model:
        """Fit ``method`` on the pairs through the harness and save the student as a
        diffusers folder with ``student.json``; ``finish(path, student, state)`` adds to
        the folder before ``student.json`` is written (and may add to ``student_info``)."""
        trained = fit(ctx, method, self.rows(cfg, pairs, method), cfg)
        model = load_diffusion(teacher.path, where_of(ctx, self.kind, "teacher"))
        student, from_teacher = init_student(cfg, model)
        student.load_state_dict(saved_weights(trained, method))
        path = ctx.output_dir("model")
        if finish is not None:
            finish(path, student, trained.state)
        save_diffusion(student, scheduler_config, path, student_info)
        info = {"method": student_info["method"], "epochs": trained.state["epoch"] + 1,
                "params": sum(p.numel() for p in student.parameters()),
                "teacher_params": sum(p.numel() for p in model.unet.parameters()),
                "tensors_from_teacher": from_teacher, "tensors": len(student.state_dict()),
                **{k: float(v) for k, v in trained.metrics.items()}}
        return Model(path=path, info=info)

