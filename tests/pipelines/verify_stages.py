"""Small real stages for the tests of verified reads (registered only in tests): one makes
a model folder; one reads a dataset with Ray Data and a model in a Ray task it hands the
model artifact to, as a stage hands one to its actors or Train workers."""

import json
import os

import numpy as np

from pipelines import Dataset, Model, Report, Resources, Stage, StageConfig


class MakeModel(Stage):
    kind = "test-make-model"
    version = "1"

    class Config(StageConfig):
        size: int = 4096

    outputs = {"model": Model}
    resources = Resources(num_cpus=0.25)

    def run(self, ctx):
        out = ctx.output_dir("model")
        with open(os.path.join(out, "weights.bin"), "wb") as f:
            f.write(np.random.default_rng(ctx.seed).bytes(self.config.size))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"size": self.config.size}, f)
        return {"model": Model(path=out, info={"size": self.config.size})}


def weights_sum(model: Model) -> tuple[str, int]:
    """In a Ray task: the model's weights, read from this node's verified copy."""
    with open(os.path.join(model.path, "weights.bin"), "rb") as f:
        return model.path, sum(f.read())


class UseModel(Stage):
    kind = "test-use-model"
    version = "1"

    class Config(StageConfig):
        pass

    inputs = {"numbers": Dataset, "model": Model}
    outputs = {"report": Report}
    resources = Resources(num_cpus=0)

    def run(self, ctx, numbers, model):
        import ray
        ids = numbers.read().sum("id")
        _, total = ray.get(ray.remote(num_cpus=0.25)(weights_sum).remote(model))
        return {"report": ctx.write_report("report", {"ids": ids, "weights": total})}
