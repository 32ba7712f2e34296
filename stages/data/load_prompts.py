"""``load-prompts``: the prompts a text-to-image (or chat) teacher is run on.

From a local file (field ``path``: ``.txt`` one prompt a line, ``.csv``, ``.jsonl`` or
``.parquet``, the prompts in column ``column``), or from the text column ``column`` of a
dataset input ``data``. Steps:

1. read the prompts (and ``negative_column``'s and ``reference_column``'s, if given);
   blank prompts are dropped and counted;
2. de-duplicate (the first of equal prompts is kept; ``duplicates`` counts the rest);
3. a stable ``id`` from the text alone (``tables.stable_id``), so the same prompt keeps
   its id whatever file or order it came in;
4. a held-out split from the id (``test_fraction`` of them, the same for any seed), so a
   prompt stays on its side when the file grows;
5. with a diffusers pipeline folder as input ``pipeline``, the prompts longer than each
   of its tokenizers' limit are counted and reported (``too_long/<tokenizer>``), never
   cut here: the text encoder's own truncation is what the teacher sees, and the report
   says how many prompts it affects.

Output columns: ``id``, ``prompt`` (a chat prompt, a list of ``{role, content}`` messages
in a ``.jsonl`` file: ``messages``, as JSON text), ``negative_prompt`` (with
``negative_column``), ``reference`` (with ``reference_column``: each prompt's reference
answer, as text, ``""`` where missing) and ``split``. The file is keyed by content: an
edited prompt file re-runs the stage.
"""

from __future__ import annotations

import json
import os

import numpy as np
from pydantic import Field

from pipelines.errors import UserError, allowed_list, bad_value
from pipelines.stage import Dataset, Model, Stage, StageConfig
from stages.data.tables import stable_id

FORMATS = (".txt", ".csv", ".jsonl", ".parquet")


def read_table(path: str, where: str):
    """The file as a pyarrow Table (a ``.txt`` file: one column ``prompt``)."""
    import pyarrow as pa
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise bad_value(where, "prompt file", path, f"a file ending in {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise bad_value(where, "prompt file", path, "an existing file; it does not exist")
    try:
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                return pa.table({"prompt": [line.rstrip("\n") for line in f]})
        if ext == ".csv":
            import pyarrow.csv
            return pyarrow.csv.read_csv(path)
        if ext == ".jsonl":
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return pa.Table.from_pylist(rows) if rows else pa.table({})
        import pyarrow.parquet as pq
        return pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise bad_value(where, "prompt file", path, f"a readable {ext} file ({e})") from None


def as_text(value) -> str | None:
    """A prompt as text: a string, or chat messages as JSON; None for a blank one."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return json.dumps([{"role": m["role"], "content": m["content"]} for m in value])
    text = str(value).strip()
    return text or None


def tokenizer_limits(folder: str, texts: list[str]) -> dict[str, int]:
    """Per tokenizer of a diffusers pipeline folder (``tokenizer``, ``tokenizer_2``, ...),
    how many of ``texts`` are longer than its ``model_max_length``."""
    from transformers import AutoTokenizer
    out = {}
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not (name.startswith("tokenizer") and os.path.isdir(sub)):
            continue
        tok = AutoTokenizer.from_pretrained(sub)
        limit = tok.model_max_length
        lengths = [len(ids) for ids in tok(texts, truncation=False)["input_ids"]]
        out[f"too_long/{name}"] = int(sum(n > limit for n in lengths))
    return out


class LoadPrompts(Stage):
    kind = "load-prompts"
    version = "1"

    class Config(StageConfig):
        path: str | None = None               # a local prompt file; or wire input 'data'
        column: str = "prompt"
        negative_column: str | None = None
        reference_column: str | None = None   # reference answers, as 'reference'
        test_fraction: float = Field(0.1, ge=0, lt=1)

    optional_inputs = {"data": Dataset, "pipeline": Model}
    outputs = {"prompts": Dataset}
    metrics = ("prompts", "duplicates", "blank", "train", "test")

    def content_paths(self) -> dict[str, str]:
        return {"path": self.config.path} if self.config.path else {}

    def run(self, ctx, data=None, pipeline=None):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        if (cfg.path is None) == (data is None):
            raise UserError(f"{where}: give exactly one source of prompts: field 'path' (a "
                            f"{', '.join(FORMATS)} file) or input 'data' (a dataset)")
        if cfg.path:                                                       # 1. read
            table = read_table(os.path.abspath(os.path.expanduser(cfg.path)),
                               f"{where} field 'path'")
            source = f"field 'path' ({cfg.path})"
        else:
            table, source = data.to_arrow(), "input 'data'"
        for fld, c in (("column", cfg.column), ("negative_column", cfg.negative_column),
                       ("reference_column", cfg.reference_column)):
            if c is not None and c not in table.column_names:
                have = allowed_list(table.column_names) or "(none: it is empty)"
                raise bad_value(f"{where} field '{fld}'", "column", c,
                                f"a column of {source}: {have}")
        prompts = table.column(cfg.column).to_pylist()
        negatives = (table.column(cfg.negative_column).to_pylist() if cfg.negative_column
                     else [None] * len(prompts))
        answers = (table.column(cfg.reference_column).to_pylist() if cfg.reference_column
                   else [None] * len(prompts))
        texts, negs, refs, seen, blank = [], [], [], set(), 0              # 2. dedupe
        chat = any(isinstance(p, (list, tuple)) for p in prompts)
        for p, n, r in zip(prompts, negatives, answers):
            text = as_text(p)
            if text is None:
                blank += 1
                continue
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            negs.append(as_text(n) or "")
            refs.append(as_text(r) or "")
        if not texts:
            raise bad_value(where, f"prompts in {source}", 0,
                            f"at least one non-blank prompt in column '{cfg.column}'")
        ids = np.array([stable_id(t) for t in texts], dtype=np.int64)     # 3. ids
        draw = (ids % 1_000_003) / 1_000_003                                # 4. split
        split = np.where(draw < cfg.test_fraction, "test", "train")
        metrics = {"prompts": len(texts), "duplicates": len(prompts) - blank - len(texts),
                   "blank": blank, "train": int((split == "train").sum()),
                   "test": int((split == "test").sum())}
        if pipeline is not None:                                            # 5. limits
            metrics.update(tokenizer_limits(pipeline.path, texts))
        ctx.log_metrics(metrics)
        columns = {"id": ids, ("messages" if chat else "prompt"): np.array(texts, dtype=object)}
        if cfg.negative_column:
            columns["negative_prompt"] = np.array(negs, dtype=object)
        if cfg.reference_column:
            columns["reference"] = np.array(refs, dtype=object)
        columns["split"] = split
        info = {"text_column": "messages" if chat else "prompt", "source": source,
                **{k: v for k, v in metrics.items()}}
        return {"prompts": ctx.write_dataset("prompts", columns, info=info)}
