"""``standardize-column``: z-score standardisation of one column of a dataset, feature by
feature, with the mean and standard deviation of one split (the train split by default, so
test rows are scaled by statistics they did not contribute to).

A stage kind shipped in its own package: distillery finds it through this package's entry
point (``pyproject.toml``), ``standardize-column =
"distillery_plugin_example.standardize:StandardizeColumn"``, and imports this module only
when a pipeline uses the kind. Ray workers unpickle the stage by this module's name, which
the installed package makes importable on every node.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipelines.artifacts import column_to_numpy, parquet_dataset
from pipelines.errors import bad_value
from pipelines.stage import Dataset, Resources, Stage, StageConfig


class StandardizeColumn(Stage):
    """``(value - mean) / (std + eps)`` for every feature of ``column`` (a number column or
    a tensor column such as an image's pixels); a feature constant over the split becomes
    0. The other columns pass through unchanged, and ``info`` is the input's plus what was
    standardised, so the output feeds any stage the input fed (``fit-classifier``, ...)."""

    kind = "standardize-column"
    version = "1"

    class Config(StageConfig):
        column: str = "x"
        split: str | None = "train"   # the rows whose statistics are used; None: every row
        eps: float = Field(1e-6, ge=0)
        batch_size: int = Field(1024, ge=1)   # rows per Ray Data batch
        execution = ("batch_size",)

    inputs = {"data": Dataset}
    outputs = {"data": Dataset}
    resources = Resources(num_cpus=0)  # the work runs in Ray Data tasks
    metrics = ("stats_rows", "constant_features")

    def run(self, ctx, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        mean, std, rows = self.statistics(data, where)
        ctx.log_metrics({"stats_rows": rows, "constant_features": int((std == 0).sum())})
        column, scale = cfg.column, 1.0 / (std + cfg.eps)

        def standardize(batch: dict) -> dict:
            values = np.asarray(batch[column])
            dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
            batch[column] = ((values - mean) * scale).astype(dtype)
            return batch

        out = data.read().map_batches(standardize, batch_format="numpy",
                                      batch_size=cfg.batch_size)
        info = {**data.info, "standardized": {"column": column, "split": cfg.split,
                                              "rows": rows}}
        return {"data": ctx.write_dataset("data", out, info=info)}

    def statistics(self, data: Dataset, where: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-feature mean and standard deviation of the column over the split's rows, in
        one streaming pass of pyarrow record batches (memory: one batch), merged batch by
        batch (Chan et al.'s pairwise update: a constant feature gets exactly 0), and the
        number of rows."""
        import pyarrow.compute as pc
        cfg = self.config
        table = parquet_dataset(data.files())
        names = table.schema.names
        if cfg.column not in names:
            raise bad_value(where, "config column", cfg.column, names)
        if cfg.split is not None and "split" not in names:
            raise bad_value(where, "config split", cfg.split,
                            "null: the dataset has no 'split' column")
        where_rows = None if cfg.split is None else pc.field("split") == cfg.split
        rows, mean, m2 = 0, 0.0, 0.0
        for batch in table.to_batches(columns=[cfg.column], filter=where_rows,
                                      batch_size=cfg.batch_size):
            if not batch.num_rows:
                continue
            values = column_to_numpy(batch.column(0)).astype(np.float64)
            n, batch_mean = len(values), values.mean(axis=0)
            delta = batch_mean - mean
            mean = mean + delta * n / (rows + n)
            m2 = m2 + ((values - batch_mean) ** 2).sum(axis=0) + delta ** 2 * rows * n / (rows + n)
            rows += n
        if not rows:
            raise bad_value(where, f"number of rows with split == {cfg.split!r}", 0,
                            "at least one")
        return np.asarray(mean), np.sqrt(np.asarray(m2) / rows), rows
