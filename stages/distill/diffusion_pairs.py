"""``diffusion-pairs``: the synthetic-data step of diffusion timestep distillation; turns
teacher trajectories into training pairs, no real images needed.

- ``consistency``: trajectory-sampled pairs (Song et al. 2023, "Consistency Models",
  eq. 7 with the ODE solver step replaced by the stored teacher trajectory, as in TBCM /
  BOOT-style data-free distillation): for every trajectory with K stored states
  x_{t_0}, ..., x_{t_{K-1}} (t_0 > ... > t_{K-1} = clean) the K - 1 adjacent pairs
  (x_hi = x_{t_i}, t_hi = t_i, x_lo = x_{t_{i+1}}, t_lo = t_{i+1}), with the label and the
  trajectory's final ``sample`` (used by the online variant as data).
- ``reflow``: (noise z, final sample x1 = ODE_teacher(z), label) pairs of rectified flow
  (Liu et al. 2022, "Flow Straight and Fast", Sec. 2.2, the "reflow" coupling).

Latent text-to-image trajectories carry their conditioning keys instead of a label:
``prompt_id``, ``prompt_index`` (the row of the train prompts in the ``encode-prompts``
output) and ``guidance_scale`` (the row's w), and their model times are floats.

Built with Ray Data ``map_batches`` over the trajectory dataset.
"""

from __future__ import annotations

import numpy as np

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Resources, Stage, StageConfig
from stages.data.tables import parquet, require_columns
from stages.models.diffusion import where_of

COLUMNS = ["id", "noise", "states", "timesteps", "sample"]
KEYS = {"pixel": ["label"], "latent": ["prompt_id", "prompt_index", "guidance_scale"]}


def consistency_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    states, ts = np.asarray(batch["states"]), np.asarray(batch["timesteps"])
    n, k = states.shape[:2]
    rep = lambda a: np.repeat(np.asarray(a), k - 1, axis=0)  # noqa: E731
    keys = {c: rep(batch[c]) for c in batch if c in KEYS["pixel"] + KEYS["latent"]}
    return {"id": rep(batch["id"]), **keys,
            "pair": np.tile(np.arange(k - 1), n),
            "x_hi": states[:, :-1].reshape(n * (k - 1), *states.shape[2:]),
            "t_hi": ts[:, :-1].reshape(-1), "t_lo": ts[:, 1:].reshape(-1),
            "x_lo": states[:, 1:].reshape(n * (k - 1), *states.shape[2:]),
            "sample": rep(batch["sample"])}


def reflow_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = {c: batch[c] for c in batch if c in KEYS["pixel"] + KEYS["latent"]}
    return {"id": batch["id"], **keys, "noise": batch["noise"], "sample": batch["sample"]}


class DiffusionPairs(Stage):
    kind = "diffusion-pairs"
    version = "2"  # 2: latent trajectories (prompt keys and float model times)

    class Config(StageConfig):
        pass

    inputs = {"trajectories": Dataset}
    outputs = {"consistency": Dataset, "reflow": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, trajectories):
        where = where_of(ctx, self.kind, "trajectories")
        names = parquet(trajectories).schema.names
        keys = KEYS["latent"] if "prompt_index" in names else KEYS["pixel"]
        require_columns(trajectories, COLUMNS + keys, where)
        timesteps = trajectories.info.get("timesteps")
        if not timesteps or len(timesteps) < 2:
            raise bad_value(where, "info.timesteps", timesteps,
                            "at least 2 stored states per trajectory (diffusion-trajectories)")
        info = {k: trajectories.info[k] for k in ("num_classes", "shape", "sampler", "steps",
                                                  "precision", "pipeline_class", "family",
                                                  "time", "guidance_scale", "guidance")
                if k in trajectories.info}
        ds = trajectories.read(columns=COLUMNS + keys)
        consistency = ctx.write_dataset(
            "consistency", ds.map_batches(consistency_pairs, batch_format="numpy"),
            info={**info, "pairs": "consistency", "timesteps": timesteps})
        reflow = ctx.write_dataset("reflow", ds.map_batches(reflow_pairs, batch_format="numpy"),
                                   info={**info, "pairs": "reflow"})
        rows = parquet(consistency).count_rows()
        ctx.progress(rows, rows, "rows", force=True)
        return {"consistency": consistency, "reflow": reflow}
