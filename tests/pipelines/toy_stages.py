"""Small real stages for testing the core (registered only in tests)."""

import math
import os
import time

import numpy as np
from pydantic import Field

from pipelines import Dataset, Report, Resources, Stage, StageConfig, UserError
from pipelines.stage import Many


class MakeNumbers(Stage):
    kind = "test-numbers"
    version = "1"

    class Config(StageConfig):
        n: int = 100
        sleep: float = 0.0
        api_token: str = ""  # secret-looking: in the cache key, never written in clear

    outputs = {"numbers": Dataset}
    resources = Resources(num_cpus=0.5)

    def run(self, ctx):
        rng = np.random.default_rng(ctx.seed)
        for i in range(10):
            ctx.progress(i + 1, 10, "steps")
            time.sleep(self.config.sleep / 10)
        ids = np.arange(self.config.n)
        ctx.log_metrics({"n": self.config.n})
        return {"numbers": ctx.write_dataset("numbers", {
            "id": ids, "x": rng.normal(size=(self.config.n, 2, 3)).astype("float32")},
            info={"n": self.config.n})}


class Scale(Stage):
    kind = "test-scale"
    version = "1"

    class Config(StageConfig):
        factor: float = 2.0
        fail: str = "none"   # none | error | user | nan | crash-once
        noise: bool = False  # add unseeded noise: every run commits different content
        threads: int = Field(1, ge=1)  # an execution setting: not in the key
        execution = ("threads",)

    inputs = {"numbers": Dataset}
    outputs = {"scaled": Dataset}
    resources = Resources(num_cpus=0)

    def run(self, ctx, numbers):
        if self.config.fail == "error":
            raise RuntimeError("boom in scale")
        if self.config.fail == "user":
            raise UserError(f"stage '{ctx.name}': field 'factor' is bad")
        if self.config.fail == "crash-once":
            marker = os.path.join(ctx.work_dir, "crashed")
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
        factor = self.config.factor
        jitter = np.random.default_rng().normal() if self.config.noise else 0.0
        for step in range(3):
            loss = float("nan") if self.config.fail == "nan" and step == 2 else 1.0 / (step + 1)
            ctx.log_metrics({"loss": loss}, step=step)
        ds = numbers.read().map_batches(lambda b: {"id": b["id"], "x": b["x"] * factor + jitter})
        return {"scaled": ctx.write_dataset("scaled", ds)}


class Summarize(Stage):
    kind = "test-summarize"
    version = "1"

    class Config(StageConfig):
        pass

    inputs = {"a": Dataset, "b": Dataset}
    outputs = {"report": Report}
    resources = Resources(num_cpus=0.5)

    def run(self, ctx, a, b):
        xa, xb = a.to_numpy()["x"], b.to_numpy()["x"]
        return {"report": ctx.write_report("report", {"sum_a": xa.sum(), "sum_b": xb.sum(),
                                                      "rows": len(xa)})}


class ToyTrain(Stage):
    """A 'training' stage for sweeps: per epoch, score = (1 - exp(-lr * epoch)) * rows /
    (rows + 10), deterministic, better with a larger lr at every epoch."""

    kind = "test-train"
    version = "1"

    class Config(StageConfig):
        lr: float = Field(0.1, gt=0)
        epochs: int = Field(4, ge=1)
        sleep: float = Field(0.0, ge=0)   # seconds per epoch
        crash_once: bool = False          # the first attempt's process dies after epoch 0

    inputs = {"numbers": Dataset}
    outputs = {"report": Report}
    resources = Resources(num_cpus=0.25)
    metrics = ("score", "loss")

    @staticmethod
    def score(lr: float, epochs: int, rows: int) -> float:
        return (1 - math.exp(-lr * epochs)) * rows / (rows + 10)

    def run(self, ctx, numbers):
        rows = len(numbers.to_numpy()["id"])
        cfg = self.config
        for epoch in range(cfg.epochs):
            time.sleep(cfg.sleep)
            score = self.score(cfg.lr, epoch + 1, rows)
            ctx.log_metrics({"score": score, "loss": 1 - score}, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")
            marker = os.path.join(ctx.work_dir, "crashed")
            if cfg.crash_once and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
        return {"report": ctx.write_report("report", {"score": score, "loss": 1 - score})}


class CountMany(Stage):
    """A variadic input: any number of datasets, metrics named by their stage."""
    kind = "test-count-many"
    version = "1"

    class Config(StageConfig):
        pass

    inputs = {"parts": Many(Dataset)}
    outputs = {"report": Report}
    resources = Resources(num_cpus=0.5)

    def run(self, ctx, parts):
        return {"report": ctx.write_report("report", {
            f"rows/{name}": len(part.to_numpy()["x"]) for name, part in parts.items()})}
