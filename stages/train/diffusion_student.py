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
from stages.train.rows import Rows, hold_in_memory, train_share_bytes


class StudentConfig(TrainConfig):
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

    def train(self, ctx, cfg: StudentConfig, pairs, teacher, method: StudentMethod,
              student_info: dict, scheduler_config: dict) -> Model:
        """Fit ``method`` on the pairs through the harness and save the student as a
        diffusers folder with ``student.json``."""
        columns = list(method.columns)
        files = pairs.files()
        if hold_in_memory(train_share_bytes(files, columns, 1, split=None), cfg.in_memory_mib):
            rows = Rows(method.columns, files=files, split=None)
        else:  # streamed from Ray Data every epoch
            rows = Rows(method.columns, stream=pairs.read(columns=columns).materialize(),
                        num_rows=parquet(pairs).count_rows(), shuffle_buffer=4096)
        trained = fit(ctx, method, rows, cfg)
        model = load_diffusion(teacher.path, where_of(ctx, self.kind, "teacher"))
        student, from_teacher = init_student(cfg, model)
        student.load_state_dict(trained.state["nets"]["student"])
        path = save_diffusion(student, scheduler_config, ctx.output_dir("model"), student_info)
        info = {"method": student_info["method"], "epochs": trained.state["epoch"] + 1,
                "params": sum(p.numel() for p in student.parameters()),
                "teacher_params": sum(p.numel() for p in model.unet.parameters()),
                "tensors_from_teacher": from_teacher, "tensors": len(student.state_dict()),
                **{k: float(v) for k, v in trained.metrics.items()}}
        return Model(path=path, info=info)

