"""The stored conditioning (``encode-prompts`` output) as tensors: one table per split,
the prompts sorted by id, so the trajectories' ``prompt_index`` and the students' lookups
agree; and the unconditional row (id -1) that classifier-free guidance uses."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

from pipelines.errors import bad_value

UNCOND_ID = -1
INT_COLUMNS = ("class_labels", "attention_mask")


def _tensor(a: np.ndarray, name: str) -> torch.Tensor:
    if a.dtype == object:
        a = np.stack([np.asarray(r) for r in a])
    if name in INT_COLUMNS or a.dtype.kind in "iu":
        return torch.as_tensor(a.astype(np.int64))
    return torch.as_tensor(a.astype(np.float32))


class Conditioning:
    """``table[col][i]`` is the conditioning of the split's i-th prompt (sorted by id);
    ``uncond[col]`` the unconditional prompt's, with a batch axis of 1."""

    def __init__(self, embeddings, split: str, where: str):
        columns = list(embeddings.info.get("columns") or [])
        self.columns = [c for c in columns if not c.startswith("negative_")]
        if not self.columns:
            raise bad_value(where, "embeddings info.columns", columns,
                            "the conditioning columns written by encode-prompts")
        data = embeddings.to_numpy(["id", "prompt", *self.columns],
                                   filter=pc.field("split").isin([split, "uncond"]))
        ids = np.asarray(data["id"], dtype=np.int64)
        rows = np.flatnonzero(ids != UNCOND_ID)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        un = np.flatnonzero(ids == UNCOND_ID)
        if len(rows) == 0:
            raise bad_value(where, f"prompts with split == {split!r}", 0, "at least one")
        if len(un) != 1:
            raise bad_value(where, "unconditional rows (id -1)", len(un), "exactly 1")
        self.ids = ids[rows]
        self.prompts = [str(p) for p in np.asarray(data["prompt"], dtype=object)[rows]]
        self.table = {c: _tensor(np.asarray(data[c])[rows], c) for c in self.columns}
        self.uncond = {c: _tensor(np.asarray(data[c])[un], c) for c in self.columns}

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device):
        self.table = {k: v.to(device) for k, v in self.table.items()}
        self.uncond = {k: v.to(device) for k, v in self.uncond.items()}
        return self

    def batch(self, index: torch.Tensor) -> dict:
        """The conditioning of rows ``index``, with ``uncond`` expanded to the batch."""
        index = index.to(next(iter(self.table.values())).device).long()
        cond = {k: v[index] for k, v in self.table.items()}
        cond["uncond"] = {k: v.expand(len(index), *v.shape[1:]) for k, v in self.uncond.items()}
        return cond
